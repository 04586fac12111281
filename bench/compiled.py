"""A compiled step against the eager one, on the very same optimizer:

    python -m bench.compiled [--preset llama-110m] [--rounds 40] [--only NAME ...] [--threads N] [--out bench/results]

Each configuration builds one optimizer and steps it three ways, in an order rotated per round: eagerly, through
``torch.compile(opt.step, fullgraph=True)``, and through the README's recipe for a step compiled alone on CPU params
(``options={"size_asserts": False}``). All three step the same params, grads and state, so their kernels read and
write the same memory; separate contenders (``make bench``) land in different memory, which moves a memory-bound
step by more than the call path does. Each step is split into the time inside the C++ kernels and the rest (the
host's work around them: Python, guards, dispatch, checks); the ratio to eager is taken per round.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import fastopt
from bench.contenders import ADAMW, PRESETS, RECIPE, SPAM_PEER, compiled_step, llama_shapes
from bench.run import add_study_options, machine, make_params, parse_study_args, publish, rotated_rounds
from fastopt.ops import cpu

CONFIGS = {
    "fastopt.AdamW": lambda ps: fastopt.AdamW(ps, **ADAMW),
    "fastopt.AdamW 4-bit states": lambda ps: fastopt.AdamW(ps, state_bits=4, **ADAMW),
    "fastopt.StableSPAM 4-bit states": lambda ps: fastopt.StableSPAM(ps, state_bits=4, **SPAM_PEER),
}
PATHS = {
    "eager": lambda opt: opt.step,
    "compiled": compiled_step,
    "compiled, size_asserts off": lambda opt: compiled_step(opt, **RECIPE),
}


class KernelClock:
    """Adds up the time spent inside the C++ kernels (``fastopt.ops.cpu._call``, through which every CPU kernel call
    goes) while it is installed."""

    def __init__(self):
        self.seconds = 0.0
        self._call = cpu._call

    def _timed_call(self, *args) -> None:
        start = time.perf_counter()
        try:
            self._call(*args)
        finally:
            self.seconds += time.perf_counter() - start

    def __enter__(self) -> KernelClock:
        cpu._call = self._timed_call
        return self

    def __exit__(self, *exc) -> None:
        cpu._call = self._call


def run(preset: str, rounds: int, warmup: int, only: list[str] | None) -> dict:
    shapes = llama_shapes(**PRESETS[preset])
    torch.manual_seed(0)
    grads = [torch.randn(s) * 1e-3 for s in shapes]
    rows = []
    for name, make in CONFIGS.items():
        if only and not any(o in name for o in only):
            continue
        opt = make(make_params(shapes, grads))
        steps = {path: build(opt) for path, build in PATHS.items()}
        for step in steps.values():  # the compiled ones compile here
            for _ in range(warmup):
                step()
        with KernelClock() as clock:
            def timed(step) -> tuple[float, float]:
                inside = clock.seconds
                start = time.perf_counter()
                step()
                return time.perf_counter() - start, clock.seconds - inside
            times = rotated_rounds(steps, range(rounds), timed)
        eager = [total for total, _ in times["eager"]]
        for path, pairs in times.items():
            ratios = sorted(total / e for (total, _), e in zip(pairs, eager))
            rows.append({"optimizer": name, "path": path,
                         "ms_per_step": statistics.median(t for t, _ in pairs) * 1e3,
                         "vs_eager": statistics.median(ratios),
                         "vs_eager_quartiles": [ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]],
                         "host_ms": statistics.median(t - k for t, k in pairs) * 1e3,
                         "kernel_ms": statistics.median(k for _, k in pairs) * 1e3})
        del opt, steps
        torch._dynamo.reset()
    return {"preset": preset, "params": sum(torch.Size(s).numel() for s in shapes), "tensors": len(shapes),
            "rounds": rounds, "warmup": warmup, "machine": machine(), "rows": rows,
            "command": "python -m bench.compiled " + " ".join(sys.argv[1:])}


def table(result: dict) -> str:
    lines = [f"{result['preset']}: {result['params'] / 1e6:.1f}M params in {result['tensors']} tensors, one optimizer "
             f"stepped three ways, median of {result['rounds']} rotated rounds; {result['machine']['cpu']} "
             f"({result['machine']['fastopt_isa']} kernels), {result['machine']['threads']} threads", "",
             "| optimizer | step | ms/step | vs eager (quartiles) | in the kernels: ms | outside them: ms |",
             "|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        low, high = r["vs_eager_quartiles"]
        lines.append(f"| {r['optimizer']} | {r['path']} | {r['ms_per_step']:.1f} | {r['vs_eager']:.3f}× "
                     f"({low:.3f}–{high:.3f}) | {r['kernel_ms']:.1f} | {r['host_ms']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-110m", choices=sorted(PRESETS))
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="substrings of the configurations to run")
    add_study_options(parser, "compiled.json and compiled.md", "compiled")
    args = parse_study_args(parser, argv)
    if not fastopt.ops.library.CPU_KERNELS:
        parser.error("the C++ kernels are not built: this study times them (make build)")
    result = run(args.preset, args.rounds, args.warmup, args.only)
    text = table(result) + f"\n\nCommand: `{result['command']}`"
    print(text)
    out = publish(Path(args.out), "compiled", result, text, args.readme)
    print(f"\nwrote {out}/compiled.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
