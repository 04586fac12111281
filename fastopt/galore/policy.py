"""When and how a GaLore parameter's projector is refreshed, and what its optimizer state holds.

Options of a param group (galore-torch's names, plus fastopt's ``refresh``, ``moments``, ``stagger``):
``rank`` (None: the group is not projected), ``update_proj_gap`` (steps between refreshes), ``scale`` (α of the
update), ``proj_type``, ``refresh`` ("svd" | "randomized" | "random"), ``moments`` ("keep" | "reset" |
"reproject": what happens to the low-rank moments when the subspace changes) and ``stagger``.

State of a projected parameter, tensors only (so that it loads with ``torch.load(weights_only=True)``, onto any
device): ``proj_step``, the GaLore step count (int64, kept on the host: reading it never waits for a device);
``proj_left`` (m×r) and/or ``proj_right`` (r×n) in the param's dtype, or, for ``refresh="random"``, only
``proj_seed`` (int64, host), from which the matrices are regenerated (and cached in memory, not in the state).

Refresh timing is galore-torch's: at GaLore step k (0-based) when k % update_proj_gap == 0. ``stagger=True``
offsets each parameter's schedule by a fraction of the gap taken from its position in the optimizer (golden-ratio
spacing, so any number of layers spreads evenly): after the first step, layers refresh on different steps instead
of all on the same one. A refresh on a gradient that is not finite is skipped: on the CPU (checked on the host)
the old projector is kept and the refresh is retried at the next step; on other devices, where a check would wait
for the device, the old projector is selected on the device (no retry). Before the first projector exists, the
projectors are zeros.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from fastopt.galore import projector as proj

REFRESH = ("svd", "randomized", "random")
MOMENTS = ("keep", "reset", "reproject")
# Group options and their defaults (galore-torch's; rank None: not projected).
DEFAULTS = dict(rank=None, update_proj_gap=200, scale=0.25, proj_type="std", refresh="svd", moments="keep",
                stagger=False)
HOST_KEYS = ("proj_step", "proj_seed")  # host-side integers: stay on the CPU whatever the param's device
_GOLDEN = 0.6180339887498949


class Refresh(NamedTuple):
    old: proj.Projectors
    new: proj.Projectors
    changed: bool | torch.Tensor  # False/True, or a 0-d bool tensor on the device (see the module docstring)


def is_projected(p: torch.Tensor, group: dict) -> bool:
    """GaLore applies to the 2-D params of a group that has a rank; everything else is optimized as usual."""
    return group.get("rank") is not None and p.dim() == 2


def _whole(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and float(value) == int(value)


def check_options(owner: str, options: dict) -> None:
    """Raises ValueError naming the option and its value (only groups with a rank are checked)."""
    if options.get("rank") is None:
        return
    rank, gap, scale = options["rank"], options["update_proj_gap"], options["scale"]
    if not _whole(rank) or rank < 1:
        raise ValueError(f"{owner}: rank must be an integer >= 1 (or None: no projection), got {rank!r}")
    if isinstance(gap, torch.Tensor) and gap.numel() == 1:
        gap = gap.item()  # validation happens when the group is added, not in step()
    if callable(gap) or not _whole(gap) or gap < 1:
        raise ValueError(f"{owner}: update_proj_gap must be an integer >= 1 in a group with a rank, got {gap!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"{owner}: scale must be a number > 0, got {scale!r}")
    for name, allowed in (("proj_type", proj.PROJ_TYPES), ("refresh", REFRESH), ("moments", MOMENTS)):
        if options[name] not in allowed:
            raise ValueError(f"{owner}: {name} must be one of {allowed}, got {options[name]!r}")
    if not isinstance(options["stagger"], bool):
        raise ValueError(f"{owner}: stagger must be True or False, got {options['stagger']!r}")


def init_state(shape: tuple[int, int], group: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """A projected parameter's GaLore state before its first step (projectors zero until the first refresh)."""
    state = {"proj_step": torch.zeros((), dtype=torch.int64)}
    if group["refresh"] == "random":
        state["proj_seed"] = torch.zeros((), dtype=torch.int64)
        return state
    left, right = proj.projector_shapes(shape, group["rank"], group["proj_type"])
    if left is not None:
        state["proj_left"] = torch.zeros(left, dtype=dtype, device=device)
    if right is not None:
        state["proj_right"] = torch.zeros(right, dtype=dtype, device=device)
    return state


def gap_of(hp: dict) -> int:
    """This step's update_proj_gap (a schedulable hyperparameter in StableSPAM, where it is also the reset interval)."""
    value = hp["update_proj_gap"]
    return int(value.item() if isinstance(value, torch.Tensor) else value)


def refresh_due(step: int, gap: int, position: int, stagger: bool) -> bool:
    """At GaLore step ``step`` (0-based): the first step always; then every ``gap`` steps, shifted per parameter
    when staggered."""
    offset = int((position * _GOLDEN) % 1.0 * gap) if stagger else 0
    return step == 0 or (step + offset) % gap == 0


def _seed(position: int, step: int) -> int:
    """A deterministic 63-bit seed per (parameter position, GaLore step): splitmix64's finalizer."""
    z = (position * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) >> 1


def projectors(p: torch.Tensor, state: dict, group: dict, cache: dict, position: int) -> proj.Projectors:
    """The projectors in use: from the state, or regenerated from ``proj_seed`` (cached per param position and
    seed)."""
    if group["refresh"] != "random":
        return state.get("proj_left"), state.get("proj_right")
    seed = int(state["proj_seed"])
    hit = cache.get(position)
    if hit is None or hit[0] != seed:
        keep = proj.sides(p.shape, group["proj_type"])
        projectors = proj.random_projectors(tuple(p.shape), group["rank"], keep, seed, p.device, p.dtype)
        hit = cache[position] = (seed, projectors)
    return hit[1]


def checks_on_host(t: torch.Tensor) -> bool:
    """Whether reading a flag of ``t``'s device costs nothing (CPU) or would wait for the device."""
    return t.device.type == "cpu"


def refresh(p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, position: int,
            cache: dict, rows: proj.RowShards | None = None) -> Refresh | None:
    """Computes new projectors from ``grad`` into ``state``; returns the old and new ones, or None when the refresh
    was skipped on the host because the gradient is not finite. ``rows``: ``grad`` is this rank's rows of a sharded
    param's gradient (a randomized refresh; ``state``'s projectors are whole), and finiteness is decided for the
    whole gradient."""
    keep = proj.sides(p.shape, group["proj_type"])
    step = int(state["proj_step"])
    if group["refresh"] == "random":
        old = projectors(p, state, group, cache, position) if step > 0 else (None, None)
        state["proj_seed"].fill_(_seed(position, step))
        return Refresh(old, projectors(p, state, group, cache, position), True)
    old = projectors(p, state, group, cache, position)  # zeros before the first refresh
    finite = torch.isfinite(grad).all()
    if rows is not None:  # every rank takes the same decision
        finite = rows.sum((~finite).to(torch.float32)) == 0
    on_host = checks_on_host(grad)
    if on_host and not finite:
        return None
    if not on_host:  # no host sync: compute from a cleaned gradient, then keep the old projector if it was not finite
        grad = torch.where(finite, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
    if group["refresh"] == "randomized":
        generator = torch.Generator(device=grad.device).manual_seed(_seed(position, step))
        new = proj.randomized_projectors(grad, group["rank"], keep, old if step > 0 else (None, None), generator,
                                         rows=rows)
    else:
        new = proj.svd_projectors(grad, group["rank"], keep)
    if not on_host:
        new = tuple(None if n is None else torch.where(finite, n, o) for n, o in zip(new, old))
    for key, value in zip(("proj_left", "proj_right"), new):
        if value is not None:
            state[key] = value.contiguous()
    return Refresh(old, (state.get("proj_left"), state.get("proj_right")), True if on_host else finite)
