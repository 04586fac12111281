"""Step time over many small tensors, where what a step costs per tensor outside the kernels shows and memory
traffic does not:

    python -m bench.host [--tensors 300] [--numel 256] [--rounds 200] [--threads N] [--out bench/results]

Every contender steps the same ``--tensors`` fp32 tensors of ``--numel`` elements (their grads shared and never
changed), one step per round in rotated order after warm-up; the table reports medians, and the time of one
step over a single tensor of the same total size, for each contender, as the floor its kernels set. This is the
Python and dispatch work a GPU step pays on the host too (a 7B LLaMA has 291 tensors).

The "Triton path, launches stubbed" rows run the GPU path's Python on CPU tensors (Triton's interpreter) with every
kernel launch replaced by a no-op: what a GPU step costs on the host up to its launches. A real launch adds Triton's
own cost per launch (2 per step for AdamW, 6 for Stable-SPAM), which only a GPU run measures.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined: the stubbed rows run CPU tensors

import torch  # noqa: E402

import fastopt  # noqa: E402
from bench.contenders import RECIPE, with_compiled_step  # noqa: E402
from bench.run import add_study_options, machine, parse_study_args, publish, rotated_rounds  # noqa: E402


class LaunchesStubbed:
    """``opt.step()`` with every Triton launch a no-op, for the duration of the step only."""

    def __init__(self, opt):
        self.opt = opt

    def step(self):
        from triton.runtime import interpreter

        launch = interpreter.InterpretedFunction.__getitem__
        interpreter.InterpretedFunction.__getitem__ = lambda kernel, grid: lambda *args, **kwargs: None
        try:
            self.opt.step()
        finally:
            interpreter.InterpretedFunction.__getitem__ = launch


CONTENDERS = {
    "fastopt AdamW": lambda ps: fastopt.AdamW(ps, lr=1e-3),
    "fastopt AdamW, compiled step": lambda ps: with_compiled_step(fastopt.AdamW(ps, lr=1e-3)),
    "fastopt AdamW, compiled step, size_asserts off": lambda ps: with_compiled_step(fastopt.AdamW(ps, lr=1e-3),
                                                                                   **RECIPE),
    "fastopt AdamW 4-bit": lambda ps: fastopt.AdamW(ps, lr=1e-3, state_bits=4, min_quant_size=0),
    "fastopt StableSPAM 4-bit": lambda ps: fastopt.StableSPAM(ps, lr=1e-3, state_bits=4, min_quant_size=0),
    "fastopt SPAM": lambda ps: fastopt.SPAM(ps, lr=1e-3),
    "torch AdamW (fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    "torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    # torch's compiled-optimizer recipe (a tensor lr); its step breaks the graph once (torch.optim's _use_grad)
    "torch AdamW, compiled step": lambda ps: with_compiled_step(torch.optim.AdamW(ps, lr=torch.tensor(1e-3)),
                                                                fullgraph=False),
}
if importlib.util.find_spec("triton") is not None:
    CONTENDERS.update({
        f"fastopt {name}, Triton path, launches stubbed": lambda ps, cls=cls, options=options: LaunchesStubbed(
            cls(ps, lr=1e-3, backend="triton", **options))
        for name, cls, options in [("AdamW", fastopt.AdamW, {}),
                                   ("AdamW 4-bit", fastopt.AdamW, {"state_bits": 4, "min_quant_size": 0}),
                                   ("StableSPAM 4-bit", fastopt.StableSPAM, {"state_bits": 4, "min_quant_size": 0})]})
BASELINE = "torch AdamW (fused)"


def steps(tensors: int, numel: int) -> dict:
    """Each contender's step() over ``tensors`` tensors and over one tensor of the same total size."""
    torch.manual_seed(0)
    tasks = {}
    for name, make in CONTENDERS.items():
        for count, size, label in ((tensors, numel, name), (1, tensors * numel, f"{name} [1 tensor]")):
            params = [torch.nn.Parameter(torch.randn(size) * 0.02) for _ in range(count)]
            for p in params:
                p.grad = torch.randn(size) * 1e-3
            tasks[label] = make(params).step
    return tasks


def run(tensors: int, numel: int, rounds: int, warmup: int) -> dict:
    tasks = steps(tensors, numel)
    for step in tasks.values():
        for _ in range(warmup):
            step()

    def timed(step) -> float:
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    times = rotated_rounds(tasks, range(rounds), timed)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    rows = [{"optimizer": name, "us_per_step": median[name] * 1e6,
             "us_per_tensor": median[name] * 1e6 / tensors,
             "vs_torch_fused": median[name] / median[BASELINE],
             "one_tensor_us": median[f"{name} [1 tensor]"] * 1e6} for name in CONTENDERS]
    return {"tensors": tensors, "numel": numel, "rounds": rounds, "warmup": warmup, "machine": machine(),
            "rows": rows, "command": "python -m bench.host " + " ".join(sys.argv[1:])}


def table(result: dict) -> str:
    lines = [f"{result['tensors']} fp32 tensors of {result['numel']} elements, median of {result['rounds']} rotated "
             f"rounds; {result['machine']['cpu']}, {result['machine']['threads']} threads", "",
             "| optimizer | µs/step | vs torch fused | µs/tensor | one tensor of the same size: µs/step |",
             "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['optimizer']} | {r['us_per_step']:.0f} | {r['vs_torch_fused']:.2f}× | "
                     f"{r['us_per_tensor']:.1f} | {r['one_tensor_us']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.host", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=300)
    parser.add_argument("--numel", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5)
    add_study_options(parser, "host.json and host.md", "host")
    args = parse_study_args(parser, argv)
    result = run(args.tensors, args.numel, args.rounds, args.warmup)
    text = table(result) + f"\n\nCommand: `{result['command']}`"
    print(text)
    publish(Path(args.out), "host", result, text, args.readme)
    print(f"\nwrote {args.out}/host.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
