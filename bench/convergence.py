"""Convergence study: a small GPT-style byte-level language model trained with each optimizer.

    python -m bench.convergence [--steps 300] [--only NAME ...] [--out bench/results] [--seed 0] [--threads T]

The step benchmark (``python -m bench``) shows speed; this shows that the speed costs nothing in training: every
optimizer trains the same model (same init, same batches in the same order, same lr schedule) on Python's own
standard-library sources (on every machine, so nothing is downloaded; bytes are the tokens, vocab 256). The
optimizers train in lockstep, one step each in a rotated order, so that a busy machine slows them alike and the
time columns stay comparable. Writes convergence.json (curves, per-step times), convergence.md (the table) and
convergence.png (the loss curves side by side).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import os
import platform
import statistics
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import fastopt
from fastopt.schedules import Cosine, as_lr_scheduler


# --- the optimizers -------------------------------------------------------------------------------------------

class Entry(NamedTuple):
    """One contender: the class's import path, its keywords besides params and lr, and optionally how to split the
    model into param groups (GaLore-style optimizers want the matrices in a group of their own)."""
    path: str
    options: dict
    groups: Callable[[nn.Module], list] | None = None
    label: str | None = None  # the name in the table when one class runs twice (e.g. fused=True)
    default: bool = True      # False: runs only when named in --only

    @property
    def name(self) -> str:
        return self.label or self.path


ADAMW = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
ADAM = dict(ADAMW, weight_decay=0.0)  # coupled L2 decay of 0.1 would be another regularizer, not a comparison


def galore_groups(rank: int = 64, update_proj_gap: int = 100):
    """GaLore as its authors run it: the linear layers' weights in a group with a rank (here a quarter of the width),
    embeddings, norms and biases in a plain group."""
    def groups(model: nn.Module) -> list:
        matrices = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
        others = [p for p in model.parameters() if all(p is not q for q in matrices)]
        return [{"params": matrices, "rank": rank, "update_proj_gap": update_proj_gap, "scale": 0.25},
                {"params": others}]
    return groups

# A future optimizer is one line: Entry("fastopt.StableSPAM", ADAMW), Entry("torchao.optim.AdamW4bit", ADAMW), ...
# Entries whose import fails are skipped with a note. The first entry is the baseline the others are compared with.
OPTIMIZERS = [
    Entry("torch.optim.AdamW", ADAMW),
    Entry("fastopt.AdamW", ADAMW),
    Entry("fastopt.Adam", ADAM, default=False),
    Entry("fastopt.AdamW", dict(ADAMW, state_bits=8), label="fastopt.AdamW 8-bit states"),
    Entry("fastopt.AdamW", dict(ADAMW, state_bits=4), label="fastopt.AdamW 4-bit states"),
    # Stable-SPAM with a momentum reset every 100 steps, so that the run crosses two.
    Entry("fastopt.StableSPAM", dict(ADAMW, update_proj_gap=100)),
    # GaLore (rank 64 of 256, refresh every 100 steps): as galore-torch, and under Stable-SPAM with 4-bit moments
    # (there update_proj_gap is both the refresh and the momentum-reset interval).
    Entry("fastopt.GaLoreAdamW", ADAMW, groups=galore_groups()),
    Entry("fastopt.StableSPAM", dict(ADAMW, state_bits=4), groups=galore_groups(),
          label="fastopt.StableSPAM + GaLore, 4-bit states"),
    # A control for "how far does rounding alone move a run": torch's own fused kernel rounds differently from its
    # default path, and leaves its curve about when fastopt.AdamW does. Off by default to keep the run short.
    Entry("torch.optim.AdamW", dict(ADAMW, fused=True), label="torch.optim.AdamW:fused", default=False),
]
TRACK = 1e-4  # "tracks the baseline" = train loss within this relative distance of the baseline's


def load_class(path: str) -> type:
    """``"pkg.mod.Class"`` -> the class; ImportError when the package or the name is missing."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except AttributeError as e:
        raise ImportError(f"{module} has no {name}") from e


# --- the data -------------------------------------------------------------------------------------------------

def stdlib_corpus() -> tuple[bytes, dict]:
    """Every .py file of this Python's standard library (not site-packages), sorted by path and concatenated.

    Fixed for a given Python version, so a run is reproducible; the hash in the results says which corpus it was.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p.relative_to(root).as_posix() for p in root.rglob("*.py")
                    if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)))
    data = b"".join((root / f).read_bytes() for f in files)
    return data, {"root": str(root), "files": len(files), "bytes": len(data),
                  "sha256": hashlib.sha256(data).hexdigest(), "python": platform.python_version()}


class Batches:
    """Training windows at random offsets drawn once from the seed (so every optimizer sees the same batches in
    the same order), and validation windows evenly spread over the held-out last 5% of the corpus."""

    def __init__(self, data: bytes, steps: int, batch: int, context: int, seed: int, val_batches: int):
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        split = int(len(tokens) * 0.95)
        self.train, self.val = tokens[:split], tokens[split:]
        self.context = context
        g = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(len(self.train) - context - 1, (steps, batch), generator=g)
        starts = torch.linspace(0, len(self.val) - context - 1, val_batches * batch).long()
        self.val_offsets = starts.view(val_batches, batch)

    def _windows(self, tokens, offsets):
        chunk = tokens[offsets[:, None] + torch.arange(self.context + 1)].long()
        return chunk[:, :-1], chunk[:, 1:]

    def train_batch(self, step: int):
        return self._windows(self.train, self.offsets[step])

    def val_batches(self):
        return [self._windows(self.val, offsets) for offsets in self.val_offsets]


# --- the model ------------------------------------------------------------------------------------------------

class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x MLP, each added to the residual stream."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Decoder-only byte-level language model; the output head is the token embedding (tied)."""

    def __init__(self, context: int, dim: int, layers: int, heads: int, vocab: int = 256):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(dim)
        for m in self.modules():  # GPT-2's init: N(0, 0.02) weights, zero biases
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, idx):
        x = self.tok(idx) + self.pos.weight[: idx.shape[1]]
        return self.norm(self.blocks(x)) @ self.tok.weight.T

    def loss(self, x, y):
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())


# --- the study ------------------------------------------------------------------------------------------------

@dataclass
class Config:
    steps: int = 300
    batch: int = 16
    context: int = 128
    dim: int = 256
    layers: int = 3
    heads: int = 4
    peak_lr: float = 3e-3
    warmup: float = 0.1      # fraction of the steps
    final_lr: float = 0.1    # fraction of the peak
    seed: int = 0
    evals: int = 6           # validation points after step 0
    val_batches: int = 8
    last: int = 20           # "final train loss" = mean of the last this many steps

    def schedule(self):
        return Cosine(self.peak_lr, self.steps, warmup=round(self.warmup * self.steps),
                      final=self.final_lr * self.peak_lr)


class Run:
    """One optimizer training its own copy of the model; records loss and time of every step."""

    def __init__(self, entry: Entry, cls: type, model: nn.Module, config: Config):
        self.name, self.model = entry.name, model
        params = entry.groups(model) if entry.groups else model.parameters()
        schedule = config.schedule()
        if issubclass(cls, fastopt.FusedOptimizer):  # fastopt takes the schedule as lr
            self.opt, self.lr_scheduler = cls(params, lr=schedule, **entry.options), None
        else:  # others get torch's LRScheduler protocol
            self.opt = cls(params, lr=config.peak_lr, **entry.options)
            self.lr_scheduler = as_lr_scheduler(self.opt, schedule)
        self.losses, self.step_ms, self.opt_ms, self.val = [], [], [], []

    def step(self, x, y):
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = self.model.loss(x, y)
        loss.backward()
        mid = time.perf_counter()
        self.opt.step()
        if self.lr_scheduler:
            self.lr_scheduler.step()
        end = time.perf_counter()
        self.losses.append(loss.item())
        self.step_ms.append((end - start) * 1e3)
        self.opt_ms.append((end - mid) * 1e3)

    @torch.no_grad()
    def evaluate(self, step: int, batches) -> None:
        self.val.append((step, statistics.fmean(self.model.loss(x, y).item() for x, y in batches)))


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's state tensors; quantized tensor subclasses count their inner tensors."""
    def size(t):
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()
    return sum(size(t) for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))


def tracking_steps(losses: list[float], base: list[float]) -> int:
    """How many steps the curve stays within TRACK of the baseline's. Training is chaotic: any difference in
    rounding grows until the curves differ as much as two seeds would, so this (not the largest difference over
    the run) is what says whether two implementations compute the same thing."""
    return next((i for i, (a, b) in enumerate(zip(losses, base)) if abs(a - b) > TRACK * abs(b)), len(losses))


def study(config: Config, entries: list[Entry], progress: bool = True) -> dict:
    """Trains one model per importable entry in lockstep; returns curves, times, the table rows and the setup."""
    start = time.perf_counter()
    data, corpus = stdlib_corpus()
    runnable, skipped = [], []
    for entry in entries:
        try:
            runnable.append((entry, load_class(entry.path)))
        except ImportError as e:
            skipped.append(f"{entry.name}: skipped, {e}")
    torch.manual_seed(config.seed)
    template = GPT(config.context, config.dim, config.layers, config.heads)
    runs = [Run(entry, cls, copy.deepcopy(template), config) for entry, cls in runnable]
    batches = Batches(data, config.steps, config.batch, config.context, config.seed, config.val_batches)
    val = batches.val_batches()
    eval_at = {round(i * config.steps / config.evals) for i in range(config.evals + 1)}

    steps = range(config.steps)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc=f"convergence: {len(runs)} optimizers", file=sys.stderr)
    for step in steps:
        if step in eval_at:
            for run in runs:
                run.evaluate(step, val)
        x, y = batches.train_batch(step)
        for i in range(len(runs)):  # rotated order, so none is always first after the batch is built
            run = runs[(step + i) % len(runs)]
            run.step(x, y)
    for run in runs:
        run.evaluate(config.steps, val)

    params = sum(p.numel() for p in template.parameters())
    base = runs[0].losses if runs else []
    rows = [{"optimizer": run.name,
             "train_loss": statistics.fmean(run.losses[-config.last:]),
             "val_loss": run.val[-1][1],
             "max_rel_diff_vs_baseline": max(abs(a - b) / b for a, b in zip(run.losses, base)) if i else None,
             "steps_tracking_baseline": tracking_steps(run.losses, base) if i else None,
             "ms_per_step": statistics.median(run.step_ms),
             "ms_per_opt_step": statistics.median(run.opt_ms),
             "state_bytes_per_param": state_bytes(run.opt) / params} for i, run in enumerate(runs)]
    curves = {run.name: {"train_loss": run.losses, "val_loss": run.val, "step_ms": run.step_ms,
                         "opt_step_ms": run.opt_ms} for run in runs}
    return {"config": asdict(config), "params": params, "corpus": corpus, "machine": machine(),
            "seconds": time.perf_counter() - start, "baseline": runs[0].name if runs else None,
            "rows": rows, "curves": curves, "skipped": skipped}


# --- the outputs ----------------------------------------------------------------------------------------------

def machine() -> dict:
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   cpu)
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "fastopt": fastopt.__version__, "python": platform.python_version()}


def table(result: dict) -> str:
    c, corpus = result["config"], result["corpus"]
    lines = [f"GPT, {result['params'] / 1e6:.2f}M params ({c['layers']} layers, dim {c['dim']}, context "
             f"{c['context']}), batch {c['batch']}, {c['steps']} steps, lr {c['peak_lr']:g} cosine "
             f"(warmup {c['warmup']:.0%}, final {c['final_lr']:g}×peak), seed {c['seed']}, fp32; corpus: "
             f"Python {corpus['python']} stdlib .py files, {corpus['bytes'] / 1e6:.1f} MB, last 5% held out "
             f"(sha256 {corpus['sha256'][:12]}); {result['machine']['cpu']}, {result['machine']['threads']} threads",
             "",
             f"| optimizer | train loss (last {c['last']}) | val loss | steps within {TRACK:.0e} of "
             f"{result['baseline']} | ms/step | ms/opt.step | state bytes/param |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        tracked = "—" if r["steps_tracking_baseline"] is None else r["steps_tracking_baseline"]
        lines.append(f"| {r['optimizer']} | {r['train_loss']:.4f} | {r['val_loss']:.4f} | {tracked} | "
                     f"{r['ms_per_step']:.0f} | {r['ms_per_opt_step']:.1f} | {r['state_bytes_per_param']:.2f} |")
    notes = [f"- {note}" for note in result["skipped"]]
    lines += [""] + notes + [""] * bool(notes)
    lines.append(f"Steps within {TRACK:.0e}: how many first steps have a train loss within {TRACK:.0e} (relative) "
                 "of the baseline's; after that, rounding differences grow (as between torch's default and fused "
                 "AdamW: `--only torch.optim.AdamW torch.optim.AdamW:fused`), so compare the final losses. "
                 "ms/step: median forward + backward + step; ms/opt.step: median of `optimizer.step()` alone (plus "
                 f"the LRScheduler's step for torch). Wall time of the whole study: {result['seconds']:.0f} s.")
    return "\n".join(lines)


def smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing), so the start is not dragged to 0."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out


def plot(result: dict, path: Path) -> None:
    """One panel per optimizer (baseline drawn faintly behind each), then each one's distance from the baseline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves, rows, base = result["curves"], {r["optimizer"]: r for r in result["rows"]}, result["baseline"]
    names = list(curves)
    panels = len(names) + (len(names) > 1)
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 4), squeeze=False)
    axes = axes[0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name, color in zip(axes, names, colors):
        if name != base:
            ax.plot(smooth(curves[base]["train_loss"]), color="0.7", lw=1, label=f"{base} (train)")
        ax.plot(smooth(curves[name]["train_loss"]), color=color, lw=1.5, label="train (smoothed)")
        steps, losses = zip(*curves[name]["val_loss"])
        ax.plot(steps, losses, "o", color=color, ms=4, label="validation")
        r = rows[name]
        ax.set_title(f"{name}\n{r['ms_per_step']:.0f} ms/step, opt.step {r['ms_per_opt_step']:.1f} ms, "
                     f"{r['state_bytes_per_param']:.1f} B/param", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if ax is not axes[0]:
            ax.sharey(axes[0])
    axes[0].set_ylabel("loss (nats/byte)")
    if len(names) > 1:
        ax = axes[-1]
        for name, color in zip(names[1:], colors[1:]):
            diff = [abs(a - b) / b for a, b in zip(curves[name]["train_loss"], curves[base]["train_loss"])]
            ax.semilogy([max(d, 1e-9) for d in diff], color=color, lw=1, label=name)
        ax.axhline(TRACK, color="0.5", ls="--", lw=0.8)
        ax.set_title(f"|train loss − {base}| / {base}\n(per step, unsmoothed; 0 drawn at 1e-9)", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out: Path, readme: str | None = None) -> None:
    """convergence.{json,md,png} in ``out`` (and the table into the README's convergence block)."""
    from bench.run import publish

    command = f"\n\nCommand: `{result['command']}`" if "command" in result else ""
    publish(out, "convergence", result, table(result) + command, readme)
    plot(result, out / "convergence.png")


def main(argv=None) -> int:
    from bench.run import add_study_options, parse_study_args

    parser = argparse.ArgumentParser(prog="python -m bench.convergence", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=Config.steps)
    parser.add_argument("--only", nargs="*", metavar="NAME", help="optimizers to run, by name: "
                        + ", ".join(e.name for e in OPTIMIZERS))
    parser.add_argument("--seed", type=int, default=Config.seed)
    add_study_options(parser, "convergence.{json,md,png}", "convergence")
    args = parse_study_args(parser, argv)
    entries = [e for e in OPTIMIZERS if e.default]
    if args.only:
        unknown = set(args.only) - {e.name for e in OPTIMIZERS}
        if unknown:
            parser.error(f"unknown optimizer(s) {sorted(unknown)}; choose from {[e.name for e in OPTIMIZERS]}")
        entries = [e for e in OPTIMIZERS if e.name in args.only]

    result = study(Config(steps=args.steps, seed=args.seed), entries)
    if not result["rows"]:
        raise SystemExit("no optimizer to run:\n" + "\n".join(result["skipped"]))
    result["command"] = " ".join(["python -m bench.convergence", *(sys.argv[1:] if argv is None else argv)])
    print(table(result))
    write(result, Path(args.out), args.readme)
    print(f"\nwrote {args.out}/convergence.{{json,md,png}} in {result['seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
