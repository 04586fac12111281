"""Optimizer step throughput on this machine: fastopt against torch.optim (and installed peers).

    python -m bench [--preset llama-110m] [--rounds 10] [--only NAME ...] [--threads N] [--out bench/results]
    python -m bench --world-size 2 [--preset llama-20m]    per-rank steps on DTensor shards (bench/distributed.py)

Timing is paired: every round runs each contender's step once, in an order rotated per round (A B C, B C A,
...), after warm-up; the table reports medians. A streaming-bandwidth probe (an in-place ``a += b`` over as
many floats as there are parameters: 12 bytes/element) runs in the same rounds, so "of BW" compares each
contender with what this machine's memory delivered at the same moment. "RSS added" is the resident memory
each contender added when it was built and warmed up (its parameter copy, its state and whatever it keeps
between steps; gradients are shared): all contenders live in one process, so a per-contender peak is not
separable.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import fastopt
from bench.contenders import BASELINE, CONTENDERS, PRESETS, llama_shapes
from bench.gpu import PRESETS as GPU_PRESETS


def make_params(shapes, grads):
    params = [torch.nn.Parameter(torch.empty(s).normal_(0, 0.02)) for s in shapes]  # no temporaries: see rss_added
    for p, g in zip(params, grads):
        p.grad = g  # gradients are read-only for every contender: one shared set saves memory
    return params


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps per parameter (torchao's state tensors are subclasses that
    report their logical size: count their codes and scales instead)."""
    total = 0
    for state in opt.state.values():
        for t in state.values() if isinstance(state, dict) else ():  # some keep global counters in opt.state
            if not isinstance(t, torch.Tensor) or t.dim() == 0:
                continue
            parts = [getattr(t, name) for name in ("codes", "scale") if hasattr(t, name)] or [t]
            total += sum(x.numel() * x.element_size() for x in parts)
    return total


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 elsewhere), after handing freed heap memory back to
    the OS (glibc malloc_trim), so that differences count live memory only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    isa = fastopt.cpu_isa() if fastopt.ops.library.CPU_KERNELS else "n/a"
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "fastopt_isa": isa,
            "python": platform.python_version()}


@contextlib.contextmanager
def held_back(enabled: bool = True):
    """Holds back what is printed inside the block (file descriptors 1 and 2, and Python warnings): the peers print
    while they are imported, built and warmed up (torchao's "Failed to load ..." lines, deprecation warnings, torch's
    logs). Yields a list that gets the held-back lines when the block ends."""
    lines: list[str] = []
    if not enabled:
        yield lines
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as sink, open(sink.fileno(), "w", closefd=False) as text, \
            contextlib.redirect_stdout(text), contextlib.redirect_stderr(text), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.dup2(sink.fileno(), 1)  # what C code and subprocesses write
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            text.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            lines += sink.read().decode(errors="replace").splitlines()


def run(preset: str, rounds: int, warmup: int, only: list[str] | None, verbose: bool = False) -> dict:
    shapes = llama_shapes(**PRESETS[preset])
    n = sum(torch.Size(s).numel() for s in shapes)
    wanted = [c for c in CONTENDERS if not only or any(o in c.name for o in only)]
    contenders = [c for c in wanted if c.available()]
    not_installed = [c.name for c in wanted if c not in contenders]
    torch.manual_seed(0)
    grads = [torch.randn(s) * 1e-3 for s in shapes]
    # Contenders are built one after another and warmed up at once, so that the resident memory each one adds
    # (its copy of the parameters, its state, anything it keeps between steps) can be read off.
    with held_back(not verbose) as peer_output:
        for c in contenders:  # one-time process costs (thread pools, JIT builds, imports) must not count as RSS
            tiny = [torch.nn.Parameter(torch.zeros(4096))]
            tiny[0].grad = torch.zeros(4096)
            c.make(tiny).step()
        opts, rss_added = {}, {}
        for c in contenders:
            before = rss_bytes()
            opts[c.name] = c.make(make_params(shapes, grads))
            for _ in range(warmup):
                opts[c.name].step()
            rss_added[c.name] = rss_bytes() - before
    if peer_output:
        print(f"(the contenders printed {len(peer_output)} lines while loading and warming up: the peers' import "
              "notices and warnings; --verbose shows them)", file=sys.stderr)
    stream_a, stream_b = torch.randn(n), torch.randn(n)
    tasks = {name: opt.step for name, opt in opts.items()}
    tasks["stream"] = lambda: stream_a.add_(stream_b)
    for _ in range(warmup):
        tasks["stream"]()
    try:
        from tqdm import tqdm
        progress = tqdm(range(rounds), desc=f"{preset}: {len(contenders)} contenders", file=sys.stderr)
    except ImportError:
        progress = range(rounds)
    times = rotated_rounds(tasks, progress, timed)

    stream_s = statistics.median(times["stream"])
    stream_gbs = 12 * n / stream_s / 1e9
    base = statistics.median(times[BASELINE]) if BASELINE in times else None
    rows = []
    for c in contenders:
        t = statistics.median(times[c.name])
        gbs = c.bytes_per_param * n / t / 1e9
        rows.append({"optimizer": c.name, "ms_per_step": t * 1e3, "vs_torch_fused": (t / base) if base else None,
                     "params_per_s": n / t, "gb_per_s": gbs, "of_bandwidth": gbs / stream_gbs,
                     "state_bytes_per_param": state_bytes(opts[c.name]) / n,
                     "rss_added_mb": rss_added[c.name] / 2**20,
                     "ms_all_rounds": [x * 1e3 for x in times[c.name]]})
    return {"preset": preset, "params": n, "tensors": len(shapes), "rounds": rounds, "warmup": warmup,
            "stream_gb_per_s": stream_gbs, "machine": machine(), "rows": rows, "not_installed": not_installed,
            "command": "python -m bench " + " ".join(sys.argv[1:])}


def rotated_rounds(tasks: dict, rounds, timer) -> dict[str, list[float]]:
    """Each task's times, ``timer(task)`` once per round, the order rotated by one each round (no task always runs
    after the same one)."""
    times = {name: [] for name in tasks}
    names = list(tasks)
    for r in rounds:
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timer(tasks[name]))
    return times


def table(result: dict) -> str:
    lines = [f"{result['preset']}: {result['params'] / 1e6:.1f}M params in {result['tensors']} tensors, "
             f"fp32, median of {result['rounds']} paired rounds; streaming bandwidth measured in the same rounds: "
             f"{result['stream_gb_per_s']:.1f} GB/s; {result['machine']['cpu']}, {result['machine']['threads']} threads",
             "",
             "| optimizer | ms/step | time vs torch fused | params/s | GB/s | of BW | state bytes/param | RSS added |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        ratio = f"{r['vs_torch_fused']:.2f}×" if r["vs_torch_fused"] else "—"
        lines.append(f"| {r['optimizer']} | {r['ms_per_step']:.1f} | {ratio} | {r['params_per_s'] / 1e9:.2f} G | "
                     f"{r['gb_per_s']:.1f} | {r['of_bandwidth']:.0%} | {r['state_bytes_per_param']:.2f} | "
                     f"{r['rss_added_mb']:.0f} MiB |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """A horizontal bar chart of ms/step, each bar labelled with its time relative to torch's fused AdamW."""
    from matplotlib.figure import Figure

    rows = sorted(result["rows"], key=lambda r: r["ms_per_step"])
    fig = Figure(figsize=(9, 0.5 * len(rows) + 1.5))
    ax = fig.add_subplot()
    bars = ax.barh([r["optimizer"] for r in rows], [r["ms_per_step"] for r in rows],
                   color=["tab:blue" if r["optimizer"].startswith("fastopt") else "tab:gray" for r in rows])
    for bar, r in zip(bars, rows):
        label = f" {r['ms_per_step']:.0f} ms" + (f" ({r['vs_torch_fused']:.2f}×)" if r["vs_torch_fused"] else "")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, label, va="center", fontsize=8)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("ms per optimizer step (log scale; lower is better)")
    ax.set_title(f"{result['preset']}: {result['params'] / 1e6:.0f}M params, {result['machine']['cpu']}, "
                 f"{result['machine']['threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, choices=sorted(set(PRESETS) | set(GPU_PRESETS)),
                        help="parameter shapes (default: llama-110m; llama-20m with --world-size; both of "
                             f"{sorted(GPU_PRESETS)} with --device cuda)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: the GPU benchmark (bench/gpu.py, what make gpu-check runs)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="step DTensor shards on this many ranks instead (bench/distributed.py)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="substrings of contender names to run (the baseline included)")
    parser.add_argument("--verbose", action="store_true",
                        help="show what the contenders print while loading (held back by default)")
    add_study_options(parser, "<preset>.json and <preset>.md", "PRESET")
    args = parse_study_args(parser, argv)
    if args.device == "cuda":
        from bench import gpu

        if args.preset and args.preset not in GPU_PRESETS:
            parser.error(f"--device cuda takes --preset {' or '.join(sorted(GPU_PRESETS))}")
        return gpu.main(args)
    if args.preset and args.preset not in PRESETS:
        parser.error(f"--preset {args.preset} is a GPU preset (--device cuda)")
    if args.world_size:
        return distributed_main(args)
    args.preset = args.preset or "llama-110m"
    only = args.only + [BASELINE] if args.only else None
    result = run(args.preset, args.rounds, args.warmup, only, args.verbose)
    text = table(result) + f"\n\nCommand: `{result['command']}`"
    print(text)
    if result["not_installed"]:
        print(f"\nnot installed, so not run: {', '.join(result['not_installed'])} (`make bench` installs them)",
              file=sys.stderr)
    out = publish(Path(args.out), args.preset, result, text, args.readme)
    try:
        plot(result, out / f"{args.preset}.png")
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    print(f"\nwrote {out}/{args.preset}.json, .md and .png", file=sys.stderr)
    return 0


def distributed_main(args: argparse.Namespace) -> int:
    from bench import distributed

    preset = args.preset or distributed.DEFAULT_PRESET
    result = distributed.run(args.world_size, preset, args.rounds, args.warmup, args.only)
    text = distributed.table(result) + f"\n\nCommand: `{result['command']}`"
    print(text)
    name = f"distributed-{preset}-{args.world_size}-ranks"
    out = publish(Path(args.out), name, result, text, args.readme)
    print(f"\nwrote {out}/{name}.json and .md", file=sys.stderr)
    return 0


def add_study_options(parser: argparse.ArgumentParser, files: str, block: str) -> None:
    """The options every study of bench/ takes: --threads, --out (the folder for `files`) and --readme (the README
    whose <!-- bench:block --> markers get the table). `parse_study_args` applies --threads."""
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--out", default="bench/results", help=f"folder for {files}")
    parser.add_argument("--readme", default=None, help="also put the table into this README, between "
                        f"<!-- bench:{block} --> and <!-- /bench:{block} -->")


def parse_study_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def publish(out: Path, name: str, result: dict, text: str, readme: str | None) -> Path:
    """Writes a study's results as out/name.json and out/name.md (``text``) and, given a README, puts ``text``
    between its <!-- bench:name --> markers. Returns ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{name}.md").write_text(text + "\n")
    if readme:
        update_readme(Path(readme), name, text)
    return out


def update_readme(path: Path, preset: str, text: str) -> None:
    """Replaces the README block between the preset's markers, so that its numbers are what this run printed."""
    begin, end = f"<!-- bench:{preset} -->", f"<!-- /bench:{preset} -->"
    readme = path.read_text()
    if begin not in readme:  # only the default preset's table lives in the README
        print(f"{path} has no {begin} marker: README not changed", file=sys.stderr)
        return
    head, rest = readme.split(begin, 1)
    tail = rest.split(end, 1)[1] if end in rest else rest
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


if __name__ == "__main__":
    sys.exit(main())
