"""GaLore on this machine: fastopt against galore-torch (a test-only dependency, installed by `make`).

    python -m bench.galore [--size 4096] [--rank 512] [--steps 200] [--step-rank 256] [--gap 200]
                           [--preset llama-110m] [--readme README.md]

(a) One projector refresh of a size×size gradient at rank ``--rank``: the exact SVD (galore-torch's refresh, and
    fastopt's refresh="svd") against fastopt's refresh="randomized", warm-started from the previous projector as in
    training (and cold, for reference), alternating A B A B; medians, and the gradient energy each projector keeps.
(b) Mean optimizer step time over ``--steps`` steps, refreshes included (one refresh every ``--gap`` steps: the
    measured steps are the 2nd to the (steps+1)-th, so with the defaults exactly one refresh), on the LLaMA-like
    shapes of ``python -m bench``: the 2-D attention and MLP matrices in a GaLore group (rank ``--step-rank``,
    scale 0.25, proj_type "std"), AdamW on the embedding and the norms, as galore-torch's examples do. Contenders
    step in turns (one step each, rotating), so that they share the machine's state; the table shows the mean and the
    median step, the refresh step, and the optimizer state bytes per parameter.

Writes bench/results/galore.{json,md}; ``--readme`` puts the tables between <!-- bench:galore --> markers.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import sys
import time
import types
import warnings
from pathlib import Path

import torch

import fastopt
from bench.contenders import PRESETS, llama_shapes
from bench.run import add_study_options, machine, parse_study_args, publish, state_bytes
from fastopt.galore import projector as proj


def galore_torch(module: str = "adamw"):
    """A module of galore-torch, imported without its package ``__init__`` (which imports bitsandbytes for its 8-bit
    optimizer): the package directory is mounted under a private name. ``galore_torch("adamw").AdamW`` is the
    GaLoreAdamW of galore-torch; ``galore_torch("galore_projector").GaLoreProjector`` its projector."""
    spec = importlib.util.find_spec("galore_torch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("galore-torch is not installed (make deps installs it: pip install --no-deps galore-torch)")
    if "_galore_torch" not in sys.modules:
        package = types.ModuleType("_galore_torch")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["_galore_torch"] = package
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(f"_galore_torch.{module}")


def galore_torch_adamw(param_groups, **options) -> torch.optim.Optimizer:
    return galore_torch("adamw").AdamW(param_groups, no_deprecation_warning=True, **options)


def decaying_gradient(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A gradient with a power-law spectrum (σ_i ∝ 1/i), as LLM gradients roughly have: (A·diag(s))·B with Gaussian
    A (m×k) and B (k×n), k = min(m, n)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    s = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)
    return (torch.randn(m, k, generator=g) * s) @ torch.randn(k, n, generator=g) / k**0.5


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_refresh(size: int, rank: int, rounds: int) -> dict:
    """(a): medians of alternating SVD / randomized (warm, cold) refreshes of one size×size gradient."""
    grad = decaying_gradient(size, size)
    keep = proj.sides(grad.shape, "std")
    previous = proj.svd_projectors(decaying_gradient(size, size, seed=1) * 0.3 + grad, rank, keep)
    generator = torch.Generator().manual_seed(0)
    tasks = {
        "svd (galore-torch, fastopt refresh='svd')": lambda: proj.svd_projectors(grad, rank, keep),
        "randomized, warm-started (fastopt refresh='randomized')":
            lambda: proj.randomized_projectors(grad, rank, keep, previous, generator),
        "randomized, cold (first refresh)":
            lambda: proj.randomized_projectors(grad, rank, keep, (None, None), generator),
    }
    results = {name: fn() for name, fn in tasks.items()}  # warm-up, and the projectors for the energy column
    times = {name: [] for name in tasks}
    names = list(tasks)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed(tasks[name]))
    exact = proj.captured_energy(grad, *results[names[0]])
    svd_s = statistics.median(times[names[0]])
    rows = [{"refresh": name, "ms": statistics.median(times[name]) * 1e3,
             "speedup_vs_svd": svd_s / statistics.median(times[name]),
             "energy": proj.captured_energy(grad, *results[name]),
             "energy_vs_svd": proj.captured_energy(grad, *results[name]) / exact,
             "ms_all_rounds": [t * 1e3 for t in times[name]]} for name in names]
    return {"size": size, "rank": rank, "rounds": rounds, "rows": rows}


def galore_groups(params: list[torch.nn.Parameter], rank: int, gap: int) -> list[dict]:
    """galore-torch's recipe: the attention and MLP matrices projected, everything else (embedding, norms) plain."""
    vocab = params[0].shape[0]
    projected = [p for p in params if p.dim() == 2 and vocab not in p.shape]
    ids = {id(p) for p in projected}
    return [{"params": [p for p in params if id(p) not in ids]},
            {"params": projected, "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"}]


class MatmulFloor:
    """Not an optimizer: only the two matmuls every GaLore step needs per projected matrix (R = G·Pᵀ into a buffer,
    p ← p + α·U·P in place), with fixed projectors. The floor any GaLore implementation pays on this machine."""

    def __init__(self, groups: list[dict]):
        self.jobs = []
        for group in groups:
            for p in group["params"] if group.get("rank") else []:
                keep = proj.sides(tuple(p.shape), group["proj_type"])
                projectors = proj.random_projectors(tuple(p.shape), group["rank"], keep, 0, p.device, p.dtype)
                shape = proj.projected_shape(tuple(p.shape), group["rank"], group["proj_type"])
                self.jobs.append((p, projectors, torch.empty(shape)))
        self.state: dict = {}

    @torch.no_grad()
    def step(self) -> None:
        for p, projectors, buffer in self.jobs:
            proj.project(p.grad, *projectors, out=buffer)
            proj.project_back_(p, buffer, *projectors, alpha=1e-30)  # computed (alpha 0 may skip it), no effect


STEP_CONTENDERS = {
    "fastopt.GaLoreAdamW (refresh='svd')": lambda groups: fastopt.GaLoreAdamW(groups, lr=1e-3),
    "fastopt.GaLoreAdamW (refresh='randomized')":
        lambda groups: fastopt.GaLoreAdamW(groups, lr=1e-3, refresh="randomized"),
    "fastopt.GaLoreAdamW (randomized, 4-bit states)":
        lambda groups: fastopt.GaLoreAdamW(groups, lr=1e-3, refresh="randomized", state_bits=4),
    "galore-torch GaLoreAdamW": lambda groups: galore_torch_adamw(groups, lr=1e-3),
    "matmul floor: project + project back only": MatmulFloor,
}
BASELINE = "galore-torch GaLoreAdamW"


def bench_steps(preset: str, rank: int, gap: int, steps: int, only: list[str] | None) -> dict:
    """(b): every contender's step times over ``steps`` steps after one warm-up step (which refreshes)."""
    shapes = llama_shapes(**PRESETS[preset])
    n = sum(torch.Size(s).numel() for s in shapes)
    torch.manual_seed(0)
    grads = [torch.randn(s) * 1e-3 for s in shapes]
    names = [name for name in STEP_CONTENDERS if not only or name == BASELINE or any(o in name for o in only)]
    opts, params = {}, {}
    for name in names:
        ps = [torch.nn.Parameter(torch.empty(s).normal_(0, 0.02)) for s in shapes]
        for p, g in zip(ps, grads):
            p.grad = g  # read-only for every contender: one shared set
        opts[name], params[name] = STEP_CONTENDERS[name](galore_groups(ps, rank, gap)), ps
    first = {name: timed(opts[name].step) for name in names}  # the first refresh, allocations
    times = {name: [] for name in names}
    try:
        from tqdm import tqdm
        progress = tqdm(range(steps), desc=f"{preset}: {len(names)} contenders", file=sys.stderr)
    except ImportError:
        progress = range(steps)
    for k in progress:
        for name in names[k % len(names):] + names[:k % len(names)]:
            times[name].append(timed(opts[name].step))
    base = statistics.mean(times[BASELINE]) if BASELINE in times else None
    projected = sum(p.numel() for g in galore_groups(params[names[0]], rank, gap)[1:] for p in g["params"])
    rows = []
    for name in names:
        mean = statistics.mean(times[name])
        refreshes = [i for i in range(steps) if (i + 1) % gap == 0]
        rows.append({"optimizer": name, "mean_ms": mean * 1e3, "median_ms": statistics.median(times[name]) * 1e3,
                     "refresh_step_ms": max(times[name][i] for i in refreshes) * 1e3 if refreshes else None,
                     "first_step_ms": first[name] * 1e3, "speedup_vs_galore_torch": base / mean if base else None,
                     "state_bytes_per_param": galore_state_bytes(opts[name]) / n,
                     "ms_all_steps": [t * 1e3 for t in times[name]]})
    return {"preset": preset, "params": n, "projected_params": projected, "rank": rank, "update_proj_gap": gap,
            "steps": steps, "rows": rows}


def galore_state_bytes(opt: torch.optim.Optimizer) -> int:
    """State tensor bytes, galore-torch's projector objects included (their matrices are not tensors in the state)."""
    total = state_bytes(opt)
    for state in opt.state.values():
        matrix = getattr(state.get("projector"), "ortho_matrix", None)
        for t in matrix if isinstance(matrix, list) else [matrix] if matrix is not None else []:
            total += t.numel() * t.element_size()
    return total


def tables(result: dict) -> str:
    a, b, m = result["refresh"], result["steps"], result["machine"]
    lines = [f"(a) One projector refresh of a {a['size']}×{a['size']} gradient (spectrum σᵢ ∝ 1/i) at rank "
             f"{a['rank']}, fp32, median of {a['rounds']} alternating rounds; {m['cpu']}, {m['threads']} threads", "",
             "| refresh | ms | speed-up vs SVD | energy kept ‖PᵀG‖²/‖G‖² | vs SVD's |", "|---|---:|---:|---:|---:|"]
    for r in a["rows"]:
        lines.append(f"| {r['refresh']} | {r['ms']:.0f} | {r['speedup_vs_svd']:.1f}× | {r['energy']:.4f} | "
                     f"{r['energy_vs_svd']:.4f} |")
    lines += ["", f"(b) Optimizer step on the {b['preset']} shapes ({b['params'] / 1e6:.1f}M params, "
              f"{b['projected_params'] / 1e6:.1f}M of them in GaLore matrices), rank {b['rank']}, update_proj_gap "
              f"{b['update_proj_gap']}, fp32: {b['steps']} steps each (after one warm-up step), one refresh among them",
              "", "| optimizer | mean ms/step | speed-up vs galore-torch | median ms/step | refresh step ms | "
              "state bytes/param |", "|---|---:|---:|---:|---:|---:|"]
    for r in b["rows"]:
        speedup = f"{r['speedup_vs_galore_torch']:.2f}×" if r["speedup_vs_galore_torch"] else "—"
        refresh = f"{r['refresh_step_ms']:.0f}" if r["refresh_step_ms"] else "—"
        lines.append(f"| {r['optimizer']} | {r['mean_ms']:.0f} | {speedup} | {r['median_ms']:.0f} | {refresh} | "
                     f"{r['state_bytes_per_param']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="(a) gradient size")
    parser.add_argument("--rank", type=int, default=512, help="(a) rank")
    parser.add_argument("--rounds", type=int, default=3, help="(a) alternating rounds")
    parser.add_argument("--preset", default="llama-110m", choices=sorted(PRESETS), help="(b) shapes")
    parser.add_argument("--step-rank", type=int, default=256, help="(b) rank")
    parser.add_argument("--gap", type=int, default=200, help="(b) update_proj_gap")
    parser.add_argument("--steps", type=int, default=200, help="(b) timed steps per contender")
    parser.add_argument("--only", nargs="*", help="(b) substrings of contender names (galore-torch always runs)")
    add_study_options(parser, "galore.json and galore.md", "galore")
    args = parse_study_args(parser, argv)
    import fastopt._ext

    fastopt._ext.load()
    command = " ".join(["python -m bench.galore", *(sys.argv[1:] if argv is None else argv)])
    result = {"refresh": bench_refresh(args.size, args.rank, args.rounds),
              "steps": bench_steps(args.preset, args.step_rank, args.gap, args.steps, args.only),
              "machine": machine(), "command": command}
    text = tables(result) + f"\n\nCommand: `{result['command']}`"
    print(text)
    out = publish(Path(args.out), "galore", result, text, args.readme)
    print(f"\nwrote {out}/galore.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
