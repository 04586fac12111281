"""One GaLore step for the projected params of a group, on top of any fastopt optimizer (docs/algorithms.md#galore).

For each param: refresh the projector when due (policy.py), project the gradient (R = Lᵀ·G·Rtᵀ, one matmul into a
reused buffer), run the optimizer's own step on a *shadow* — a zero tensor of R's shape whose grad is R and whose
state is the param's state (the low-rank moments), with weight decay 0 — and add the update the shadow now holds
(−lr·N) back into the param with one addmm, scaled by α, the weight decay folded in where the optimizer applies
it. So every optimizer, backend and state format works on the low-rank moments unchanged.

The optimizer is reached through the narrow :class:`Host` interface only, and the params' grads, state dicts and
positions come as arguments: a compiled step() runs this same code inside an opaque op, on the tensors the op was
given (fastopt/ops/library.py, ``galore_step``).
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from fastopt.galore import policy
from fastopt.galore import projector as proj
from fastopt.ops import sharding
from fastopt.ops.common import compute_dtype
from fastopt.quant import formats as quant


class Host(Protocol):
    """What a GaLore step needs from the optimizer that owns the params."""

    state: dict

    def _low_rank_step(self, group: dict, hp: dict, shadow: torch.Tensor) -> None:
        """The optimizer's own step of ``shadow`` (its grad and state set), with ``hp`` as given."""

    def _moment_like(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """An empty tensor shaped (and sharded) as ``p``'s low-rank moments."""

    def _stored_moments(self, p: torch.Tensor, group: dict, state: dict) -> list[tuple[Any, bool]]:
        """(moment as the ops take it: a tensor or quant.Quantized, signed) for each of ``p``'s (low-rank) moments in
        ``state``."""

    def _galore_weight_decay(self, group: dict, hp: dict) -> tuple[str, float | torch.Tensor]:
        """Where the decay goes: ("before", rate) p ← p·(1 − rate) before the update; ("after", rate) after it;
        ("l2", wd) g ← g + wd·p before the projection (Adam's coupled decay)."""


class GaLoreStepper:
    """Steps GaLore params and keeps what lives in memory only: the random projectors regenerated from their seeds,
    and two reused low-rank buffers per shape (no allocation, no page faults per step)."""

    def __init__(self) -> None:
        self.cache: dict = {}    # position -> (seed, projectors) of refresh="random"; ("rows", position) -> its rows
        self.buffers: dict = {}  # (role, shape, dtype, device) -> buffer

    def clear(self) -> None:
        """Forget the regenerated projectors (after loading a state_dict: the seeds may have changed)."""
        self.cache.clear()

    def step(self, host: Host, group: dict, hp: dict, params: list[torch.Tensor], grads: list[torch.Tensor],
             states: list[dict], positions: list[int]) -> None:
        """One step of ``params`` with ``grads``, their state dicts and their positions among all params in group
        order (positions place staggered refreshes and seed random ones, and key the regenerated projectors)."""
        gap = policy.gap_of(hp)
        rule, rate = host._galore_weight_decay(group, hp)
        l2 = rule == "l2" and not _is_zero(rate)
        shadow_hp = {**hp, "weight_decay": 0.0}
        for p, grad, state, position in zip(params, grads, states, positions):
            step = int(state["proj_step"])
            advance = True
            if policy.refresh_due(step, gap, position, group["stagger"]):
                seen = grad + rate * p if l2 else grad  # the gradient Adam's coupled decay sees
                change = self._refresh(p, seen, state, group, position)
                advance = change is not None  # a skipped refresh (non-finite gradient) is retried next step
                if change is not None and step > 0:
                    self._carry_moments(host, p, group, state, change)
            left, right = self._local_projectors(p, state, group, position)
            shape = proj.projected_shape(tuple(p.shape), group["rank"], group["proj_type"])
            # a sharded param's R: sharded as its rows for a right projection, else whole on every rank
            like = host._moment_like(p, group) if sharding.is_sharded(p) else None
            local_shape = shape if like is None else tuple(sharding.local(like).shape)
            ranks = sharding.shard_group(p)  # the ranks holding p's other rows (None: p is whole here)
            low = _project(sharding.local(grad), left, right, ranks, out=self._scratch("low", local_shape, p))
            if l2:
                low.add_(_project(sharding.local(p), left, right, ranks) * rate)
            shadow = self._scratch("shadow", local_shape, p).zero_()
            if sharding.is_sharded(like):
                shadow, low = (sharding.like(p, t, shape) for t in (shadow, low))
            shadow.grad = low
            host.state[shadow] = state  # the same dict: the optimizer updates the param's low-rank moments
            try:
                host._low_rank_step(group, shadow_hp, shadow)
            finally:
                del host.state[shadow]
                shadow.grad = None
            _apply_low_rank_update(sharding.local(p), sharding.local(shadow), left, right, group["scale"], rule, rate)
            if advance:
                state["proj_step"] += 1

    def _refresh(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict,
                 position: int) -> policy.Refresh | None:
        """policy.refresh; for a sharded param on whole projectors, and for "svd" on the whole gradient (an all-gather
        at refreshes only: every rank then computes one process's projectors), for "randomized" on this rank's rows
        (all-reduces of m×k and n×k blocks); it keeps the left projector's rows."""
        if not sharding.is_sharded(p):
            return policy.refresh(p, grad, state, group, position, self.cache)
        whole = dict(state)
        if "proj_left" in whole:
            whole["proj_left"] = whole["proj_left"].full_tensor()
        rows = None
        if group["refresh"] == "svd":  # the exact SVD of the whole gradient
            grad = grad.full_tensor()
        elif group["refresh"] == "randomized":  # products with this rank's rows, made whole by all-reduces
            grad, rows = sharding.local(grad), _Rows(p)
        change = policy.refresh(p, grad, whole, group, position, self.cache, rows=rows)
        if "proj_left" in whole:
            state["proj_left"] = sharding.distribute_like(whole["proj_left"], p)
        if "proj_right" in whole:
            state["proj_right"] = whole["proj_right"]
        return change

    def _local_projectors(self, p: torch.Tensor, state: dict, group: dict, position: int) -> proj.Projectors:
        """The projectors as this rank applies them: a sharded param's left projector by its own rows (the right one
        is whole on every rank)."""
        left, right = policy.projectors(p, state, group, self.cache, position)
        if left is None or not sharding.is_sharded(p) or sharding.is_sharded(left):
            return sharding.local(left), right
        key = ("rows", position)  # a regenerated random projector: its rows, cut once per seed
        hit = self.cache.get(key)
        if hit is None or hit[0] is not left:
            hit = self.cache[key] = (left, sharding.local(sharding.distribute_like(left, p)))
        return hit[1], right

    def _scratch(self, role: str, shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """A reused low-rank buffer per (role, shape, dtype, device): memory only, never in the state."""
        key = (role, shape, like.dtype, like.device)  # like: a param (a DTensor's device is its shard's)
        buffer = self.buffers.get(key)
        if buffer is None:
            buffer = self.buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buffer

    @staticmethod
    def _carry_moments(host: Host, p: torch.Tensor, group: dict, state: dict, change: policy.Refresh) -> None:
        """The low-rank moments when the subspace changes: kept as they are ("keep", galore-torch), zeroed with their
        step count ("reset": the next step is a fresh bias-corrected one), or carried into the new basis
        ("reproject": first moments m ← Mₗ·m·Mᵣ, second moments by the squared maps; see projector.reproject)."""
        policy_name = group["moments"]
        if policy_name == "keep":
            return
        moments = [(sharding.local_moment(m), signed) for m, signed in host._stored_moments(p, group, state)]
        if policy_name == "reset":  # on a device, "changed" is a 0-d bool tensor: zero by multiplying, no host read
            unchanged = None if change.changed is True else ~change.changed
            tensors = [state["step"]]
            for moment, _ in moments:
                tensors += [moment.codes, moment.scales] if isinstance(moment, quant.Quantized) else [moment]
            for t in tensors:
                t.zero_() if unchanged is None else t.mul_(unchanged.to(t.dtype))
            return
        basis = proj.change_of_basis(change.old, change.new)
        for moment, signed in moments:
            if isinstance(moment, quant.Quantized):
                shape = tuple(sharding.local(host._moment_like(p, group)).shape)  # this rank's rows, if sharded
                values = moment.dequantize(shape[0] * shape[1]).view(shape)
                moment.assign(proj.reproject(values, basis, squared=not signed))
            else:
                moment.copy_(proj.reproject(moment.to(compute_dtype(moment)), basis, squared=not signed))


class _Rows:
    """proj.RowShards of a param sharded on dim 0 (torch.chunk's split, as DTensor's Shard(0)): this rank's rows
    [start, stop) of ``total``, and all-reduces over the ranks holding the others."""

    def __init__(self, p: torch.Tensor) -> None:
        import torch.distributed as dist

        self.group = sharding.shard_group(p)
        size, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.total = p.shape[0]
        chunk = -(-self.total // size)
        self.start = min(rank * chunk, self.total)
        self.stop = min(self.start + chunk, self.total)
        if self.stop - self.start != sharding.local(p).shape[0]:
            raise RuntimeError(f"a sharded param of {self.total} rows holds {sharding.local(p).shape[0]} on this rank, "
                               f"not torch.chunk's {self.stop - self.start}: its rows are not split as Shard(0)")

    def mine(self, whole: torch.Tensor) -> torch.Tensor:
        return whole[self.start:self.stop]

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        whole = local.new_zeros((self.total, *local.shape[1:]))
        whole[self.start:self.stop] = local
        return self.sum(whole)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x


def _project(grad: torch.Tensor, left, right, ranks, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """proj.project on this rank's rows of the gradient: with a left projector and sharded rows, Lᵀ·G (·Rtᵀ) is a sum
    over the ranks' rows (one all-reduce of R: r×n, or r×r for "full"); a right projection is local (R's rows are
    G's)."""
    if left is None or ranks is None:
        return proj.project(grad, left, right, out=out)
    import torch.distributed as dist

    low = proj.project(grad, left, right, out=out)  # this rank's part of the sum (r×n, or r×r for "full")
    dist.all_reduce(low, group=ranks)
    return low


def _apply_low_rank_update(p, update, left, right, scale, rule, rate) -> None:
    """p ← p + α·(L·U·Rt) with the weight decay rule folded into addmm's β (a tensor rate on a device, which the host
    must not read, decays in a separate pass; on the CPU it is read, so that a tensor and a number round alike)."""
    if isinstance(rate, torch.Tensor) and rate.device.type == "cpu":
        rate = float(rate)
    if rule == "l2" or _is_zero(rate):
        proj.project_back_(p, update, left, right, alpha=scale)
    elif isinstance(rate, torch.Tensor):
        if rule == "before":
            p.mul_(1 - rate)
        proj.project_back_(p, update, left, right, alpha=scale)
        if rule == "after":
            p.mul_(1 - rate)
    else:
        keep = 1.0 - rate
        proj.project_back_(p, update, left, right, beta=keep, alpha=scale * (keep if rule == "after" else 1))


def _is_zero(value: Any) -> bool:
    return not isinstance(value, torch.Tensor) and value == 0
