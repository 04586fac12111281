"""The optimizer step on a CUDA GPU: ``python -m bench --device cuda`` (what make gpu-check runs).

For each parameter set (LLaMA shapes of ~1.1B and ~110M params) and each parameter dtype (bf16 params, whose
fastopt states are fp32 and torch's bf16; fp32 params), the contenders below step the same params and grads. Each
step is timed with CUDA events: warm-up steps first, then rounds in rotated order, medians. Reported per contender:
ms/step and its ratio to torch's fused AdamW; GB/s, the bytes the algorithm must move per step over the time, and
that as a share of the device-to-device copy bandwidth measured in the same rounds; kernel launches per step
(torch.profiler); host time per step (until step() returns, without waiting for the GPU); and the memory it adds
(its state and the peak of its step's temporaries).
"""
from __future__ import annotations

import gc
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

import fastopt
from bench.contenders import ADAMW, SPAM_PEER, installed, llama_shapes, peer
from fastopt.quant import FORMATS

PRESETS = {
    "llama-1b": dict(hidden=2048, intermediate=5632, layers=22, vocab=32000),  # TinyLlama's shapes, 1.1B params
    "llama-110m": dict(hidden=768, intermediate=2048, layers=12, vocab=32000),
}
BASELINE = "torch AdamW (fused)"


@dataclass(frozen=True)
class GpuContender:
    name: str
    make: Callable[[list[torch.Tensor], torch.dtype], torch.optim.Optimizer]
    state_bytes: Callable[[torch.dtype], float]  # bytes of both moments per element, by param dtype
    extra_grad_reads: int = 0                    # passes over the gradient besides the update's (Stable-SPAM: 1)
    available: Callable[[], bool] = lambda: True


def param_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def moved_bytes(c: GpuContender, dtype: torch.dtype) -> float:
    """Read p, g and both moments, write p and both moments (and Stable-SPAM's extra read of g)."""
    return (3 + c.extra_grad_reads) * param_bytes(dtype) + 2 * c.state_bytes(dtype)


def quantized(bits: int) -> Callable[[torch.dtype], float]:
    return lambda dtype: 2 * FORMATS[(bits, True)].bytes_per_element()


def galore_groups(ps):
    """The attention and MLP matrices projected (as GaLore's paper does; every one of them is wider than the rank in
    both presets), the tied embedding (the first shape of llama_shapes) and the norms stepped in full."""
    matrices = [p for p in ps[1:] if p.dim() == 2 and min(p.shape) > 256]
    rest = [p for p in ps if all(p is not q for q in matrices)]
    return [{"params": matrices, "rank": 256, "update_proj_gap": 200, "scale": 0.25, "refresh": "randomized"},
            {"params": rest}]


FP32_STATES = lambda dtype: 8.0  # noqa: E731  (fastopt keeps fp32 moments for bf16 params: state_bits=32)
PARAM_STATES = lambda dtype: 2.0 * param_bytes(dtype)  # noqa: E731  (torch's moments follow the param dtype)
CONTENDERS = [
    GpuContender("fastopt.AdamW", lambda ps, d: fastopt.AdamW(ps, state_bits=32, **ADAMW), FP32_STATES),
    GpuContender("fastopt.AdamW 8-bit states", lambda ps, d: fastopt.AdamW(ps, state_bits=8, **ADAMW), quantized(8)),
    GpuContender("fastopt.AdamW 4-bit states", lambda ps, d: fastopt.AdamW(ps, state_bits=4, **ADAMW), quantized(4)),
    GpuContender("fastopt.StableSPAM 4-bit states",
                 lambda ps, d: fastopt.StableSPAM(ps, state_bits=4, **SPAM_PEER), quantized(4), extra_grad_reads=1),
    GpuContender("fastopt.SPAM", lambda ps, d: fastopt.SPAM(ps, state_bits=32, **SPAM_PEER), FP32_STATES),
    GpuContender("fastopt.GaLoreAdamW (rank 256)", lambda ps, d: fastopt.GaLoreAdamW(galore_groups(ps), **ADAMW),
                 FP32_STATES),
    GpuContender("torch AdamW (foreach)", lambda ps, d: torch.optim.AdamW(ps, foreach=True, **ADAMW), PARAM_STATES),
    GpuContender(BASELINE, lambda ps, d: torch.optim.AdamW(ps, fused=True, **ADAMW), PARAM_STATES),
    GpuContender("torchao AdamW8bit", lambda ps, d: peer("torchao.optim.AdamW8bit", **ADAMW)(ps), quantized(8),
                 available=installed("torchao")),
    GpuContender("torchao AdamW4bit", lambda ps, d: peer("torchao.optim.AdamW4bit", **ADAMW)(ps), quantized(4),
                 available=installed("torchao")),
    GpuContender("bitsandbytes AdamW8bit", lambda ps, d: peer("bitsandbytes.optim.AdamW8bit", **ADAMW)(ps),
                 quantized(8), available=installed("bitsandbytes")),
]


def event_timed(fn: Callable[[], object]) -> float:
    """Seconds fn's GPU work takes, by CUDA events around it."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def host_seconds(fn: Callable[[], object]) -> float:
    """Seconds until fn returns, with the GPU idle before (what the host spends issuing its work)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t
    torch.cuda.synchronize()
    return seconds


def launches(fn: Callable[[], object]) -> int:
    """Kernels (and copies) fn runs on the GPU, counted by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor) and t.device.type == "cuda")


def run(preset: str, dtype: torch.dtype, rounds: int, warmup: int, only: list[str] | None) -> dict:
    """One table: every available contender on ``preset``'s shapes with ``dtype`` params."""
    shapes = llama_shapes(**PRESETS[preset])
    n = sum(torch.Size(s).numel() for s in shapes)
    contenders = [c for c in CONTENDERS if c.available() and (not only or any(o in c.name for o in only))]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda").mul_(0.02).to(dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p).mul_(1e-3)
    opts, added, steps = {}, {}, {}
    for c in contenders:  # one at a time: the memory each adds, its warm-up (state, compilation, refreshes)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        opts[c.name] = c.make(params, dtype)
        for _ in range(warmup):
            opts[c.name].step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        opts[c.name].step()
        torch.cuda.synchronize()
        added[c.name] = (held - before, torch.cuda.max_memory_allocated() - held)
        steps[c.name] = opts[c.name].step
    copy_src, copy_dst = torch.empty(n, dtype=dtype, device="cuda"), torch.empty(n, dtype=dtype, device="cuda")
    from bench.run import rotated_rounds

    times = rotated_rounds(dict(steps, copy=lambda: copy_dst.copy_(copy_src)), range(rounds), event_timed)
    copy_gbs = 2 * n * param_bytes(dtype) / statistics.median(times["copy"]) / 1e9
    base = statistics.median(times[BASELINE]) if BASELINE in times else None
    rows = []
    for c in contenders:
        t = statistics.median(times[c.name])
        gbs = moved_bytes(c, dtype) * n / t / 1e9
        rows.append({"optimizer": c.name, "ms_per_step": t * 1e3, "vs_torch_fused": t / base if base else None,
                     "gb_per_s": gbs, "of_copy_bandwidth": gbs / copy_gbs, "launches_per_step": launches(steps[c.name]),
                     "host_us_per_step": statistics.median(host_seconds(steps[c.name]) for _ in range(5)) * 1e6,
                     "state_bytes_per_param": state_bytes(opts[c.name]) / n,
                     "memory_added_mib": added[c.name][0] / 2**20, "step_peak_temporaries_mib": added[c.name][1] / 2**20,
                     "ms_all_rounds": [x * 1e3 for x in times[c.name]]})
    return {"preset": preset, "dtype": str(dtype).removeprefix("torch."), "params": n, "tensors": len(shapes),
            "rounds": rounds, "warmup": warmup, "copy_gb_per_s": copy_gbs, "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "rows": rows}


def table(result: dict) -> str:
    lines = [f"{result['preset']}: {result['params'] / 1e6:.0f}M params in {result['tensors']} tensors, "
             f"{result['dtype']} params, median of {result['rounds']} rotated rounds (CUDA events); device-to-device "
             f"copy measured in the same rounds: {result['copy_gb_per_s']:.0f} GB/s; {result['device']}, torch "
             f"{result['torch']}", "",
             "| optimizer | ms/step | time vs torch fused | GB/s | of copy BW | launches/step | host µs/step | "
             "state bytes/param | step temporaries |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        ratio = f"{r['vs_torch_fused']:.2f}×" if r["vs_torch_fused"] else "—"
        lines.append(f"| {r['optimizer']} | {r['ms_per_step']:.2f} | {ratio} | {r['gb_per_s']:.0f} | "
                     f"{r['of_copy_bandwidth']:.0%} | {r['launches_per_step']} | {r['host_us_per_step']:.0f} | "
                     f"{r['state_bytes_per_param']:.2f} | {r['step_peak_temporaries_mib']:.0f} MiB |")
    return "\n".join(lines)


def main(args) -> int:
    """python -m bench --device cuda [--preset ...] [--rounds] [--warmup] [--only ...] [--out]."""
    from pathlib import Path

    from bench.run import publish

    if not torch.cuda.is_available():
        print(f"python -m bench --device cuda: no CUDA device here (torch {torch.__version__} sees none)",
              file=sys.stderr)
        return 2
    presets = [args.preset] if args.preset else list(PRESETS)
    texts = []
    for preset in presets:
        for dtype in (torch.bfloat16, torch.float32):
            result = run(preset, dtype, args.rounds, args.warmup, args.only + [BASELINE] if args.only else None)
            text = table(result) + f"\n\nCommand: `python -m bench {' '.join(sys.argv[1:])}`"
            print(text + "\n", flush=True)
            publish(Path(args.out), f"gpu-{preset}-{result['dtype']}", result, text, None)
            texts.append(text)
            gc.collect()  # an optimizer is in reference cycles (torch's too): free this table's states now
            torch.cuda.empty_cache()
    return 0
