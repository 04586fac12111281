"""The optimizers the benchmark compares, and the parameter shapes it runs them on.

A contender is a name, a factory ``make(params) -> optimizer``, the bytes its step must move per parameter
(its floor on any machine), and whether it can run here. Peers that are not installed are skipped.
"""
from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

import fastopt
from fastopt.quant import FORMATS


@dataclass(frozen=True)
class Contender:
    name: str
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    bytes_per_param: float  # read p, g, m, v + write p, m, v, for fp32: 7 × 4 bytes
    available: Callable[[], bool] = lambda: True


ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
FP32_ADAM_BYTES = 7 * 4


def low_bit_bytes(bits: int) -> float:
    """fp32 param read+write and grad read (12 bytes), both moments' codes and scales read and written."""
    return 12 + 2 * 2 * FORMATS[(bits, True)].bytes_per_element()


def installed(module: str) -> Callable[[], bool]:
    return lambda: importlib.util.find_spec(module) is not None


def peer(path: str, **options):
    """A factory for an installed library's optimizer class ("module.Class"), imported on first use (quietly:
    some peers warn about GPU features on import)."""
    module, _, name = path.rpartition(".")

    def make(ps):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls = getattr(importlib.import_module(module), name)
        return cls(ps, **options)
    return make


SPAM_PEER = dict(lr=ADAMW["lr"], weight_decay=ADAMW["weight_decay"])


def deepspeed_cpu_adam(ps):
    import os
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # JIT-builds its C++ op on first use, once per machine
    return DeepSpeedCPUAdam(ps, adamw_mode=True, **ADAMW)


RECIPE = {"size_asserts": False}  # the README's recipe for a step compiled alone on CPU params (the op checks them)


def compiled_step(opt: torch.optim.Optimizer, fullgraph: bool = True, **options) -> Callable[[], object]:
    """``opt.step`` compiled (``options``: Inductor's). Timed, it adds what a compiled call costs per tensor (Dynamo's
    guards, Inductor's input checks unless RECIPE turns them off) and drops what the graph does instead of the
    eager Python; the first calls compile."""
    return torch.compile(opt.step, fullgraph=fullgraph, options=options or None)


def with_compiled_step(opt: torch.optim.Optimizer, fullgraph: bool = True, **options) -> torch.optim.Optimizer:
    """``opt``, its step() replaced by ``compiled_step``: a contender whose every step runs compiled."""
    opt.step = compiled_step(opt, fullgraph, **options)
    return opt


CONTENDERS = [
    Contender("fastopt.AdamW", lambda ps: fastopt.AdamW(ps, **ADAMW), FP32_ADAM_BYTES),
    Contender("fastopt.AdamW 8-bit states", lambda ps: fastopt.AdamW(ps, state_bits=8, **ADAMW), low_bit_bytes(8)),
    Contender("fastopt.AdamW 4-bit states", lambda ps: fastopt.AdamW(ps, state_bits=4, **ADAMW), low_bit_bytes(4)),
    Contender("fastopt.AdamW 4-bit states, compiled step (size_asserts off)",
              lambda ps: with_compiled_step(fastopt.AdamW(ps, state_bits=4, **ADAMW), **RECIPE), low_bit_bytes(4)),
    # Stable-SPAM reads g once more than Adam (max|g| and ‖g‖ in one reduction pass; the clipped norm re-reads only
    # the chunks that hold clipped entries, none in a step without spikes); SPAM moves exactly Adam's bytes.
    Contender("fastopt.StableSPAM", lambda ps: fastopt.StableSPAM(ps, **SPAM_PEER), FP32_ADAM_BYTES + 4),
    Contender("fastopt.StableSPAM 4-bit states", lambda ps: fastopt.StableSPAM(ps, state_bits=4, **SPAM_PEER),
              low_bit_bytes(4) + 4),
    Contender("fastopt.SPAM", lambda ps: fastopt.SPAM(ps, **SPAM_PEER), FP32_ADAM_BYTES),
    Contender("fastopt.SPAM 4-bit states", lambda ps: fastopt.SPAM(ps, state_bits=4, **SPAM_PEER), low_bit_bytes(4)),
    Contender("torch AdamW (default)", lambda ps: torch.optim.AdamW(ps, **ADAMW), FP32_ADAM_BYTES),
    Contender("torch AdamW (foreach)", lambda ps: torch.optim.AdamW(ps, foreach=True, **ADAMW), FP32_ADAM_BYTES),
    Contender("torch AdamW (fused)", lambda ps: torch.optim.AdamW(ps, fused=True, **ADAMW), FP32_ADAM_BYTES),
    Contender("DeepSpeed CPUAdam", deepspeed_cpu_adam, FP32_ADAM_BYTES, installed("deepspeed")),
    Contender("torchao AdamW8bit", peer("torchao.optim.AdamW8bit", **ADAMW), low_bit_bytes(8), installed("torchao")),
    Contender("torchao AdamW4bit", peer("torchao.optim.AdamW4bit", **ADAMW), low_bit_bytes(4), installed("torchao")),
    Contender("bitsandbytes AdamW8bit", peer("bitsandbytes.optim.AdamW8bit", **ADAMW), low_bit_bytes(8),
              installed("bitsandbytes")),
    Contender("pytorch-optimizer StableSPAM", peer("pytorch_optimizer.StableSPAM", **SPAM_PEER), FP32_ADAM_BYTES + 4,
              installed("pytorch_optimizer")),
    Contender("pytorch-optimizer SPAM", peer("pytorch_optimizer.SPAM", **SPAM_PEER), FP32_ADAM_BYTES,
              installed("pytorch_optimizer")),
]
BASELINE = "torch AdamW (fused)"


def llama_shapes(hidden: int = 768, intermediate: int = 2048, layers: int = 12, vocab: int = 32000) -> list[tuple]:
    """Parameter shapes of a LLaMA-style decoder (tied embeddings): the default is ~110M parameters."""
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4                 # q, k, v, o
        shapes += [(intermediate, hidden)] * 2 + [(hidden, intermediate)]  # gate, up, down
        shapes += [(hidden,)] * 2                        # the two RMSNorm weights
    return shapes + [(hidden,)]                          # final norm


PRESETS = {
    "llama-110m": dict(hidden=768, intermediate=2048, layers=12, vocab=32000),
    "llama-20m": dict(hidden=256, intermediate=688, layers=6, vocab=32000),
    "llama-350m": dict(hidden=1024, intermediate=2816, layers=24, vocab=32000),
}
