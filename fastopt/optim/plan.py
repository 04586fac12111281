"""A group's step plan: what a step needs besides the grads and this step's hyperparameters.

Its params split into GaLore-projected ones and plain ones, the plain ones into buckets (one fused op call each:
same device, backend and sharding), and each bucket's moments and counters gathered into the lists the ops take.
Building this costs a few dict lookups and checks per param, more than the fused step of a small tensor, so the
optimizer keeps one plan per group and reuses it while it holds: the same params have grads, in the same order, and
every plain param's state is the same dict holding the same tensors (a loaded state_dict, a reset ``opt.state[p]``
or a moment replaced by hand make a new plan). Values changed in place need nothing: the ops read the tensors. The
kernels keep their checks of a kept plan's tensors between steps (fastopt/kernels/checks.py ``Kept``); a tensor moved to
other storage in place (``t.data = ...``) is checked again.
"""
from __future__ import annotations

from itertools import chain
from operator import is_
from typing import TYPE_CHECKING, Any

import torch

from fastopt.galore import policy as galore
from fastopt.ops import sharding

if TYPE_CHECKING:
    from fastopt.optim.base import FusedOptimizer


class Bucket:
    """Params that one fused op call steps, with their state gathered into lists on first use."""

    def __init__(self, opt: FusedOptimizer, group: dict, device: torch.device, backend: str, params: list,
                 keep: bool):
        self.device, self.backend, self.params = device, backend, params
        self._opt, self._group = opt, group
        self._lists: dict[Any, list] = {}
        # for a bucket stepped again: the optimizer's id, under which the kernels keep their checks of these tensors
        # between steps (the ops' ``host``)
        self.host: int | None = opt._host if keep else None

    def moments(self, name: str, signed: bool) -> list:
        """Moment ``name`` of each param as the ops take it: a float tensor, or codes + scales (quant.Quantized); a
        sharded param's as its local shard (what the kernels step)."""
        key = (name, signed)
        if key not in self._lists:
            self._lists[key] = [sharding.local_moment(self._opt._moment(p, self._group, name, signed))
                                for p in self.params]
        return self._lists[key]

    def states(self, key: str) -> list[torch.Tensor]:
        """State entry ``key`` of each param (e.g. the 0-d "step" counters)."""
        if key not in self._lists:
            self._lists[key] = [self._opt.state[p][key] for p in self.params]
        return self._lists[key]

    def grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params]


class StepPlan:
    def __init__(self, opt: FusedOptimizer, group: dict, params: list[torch.Tensor], keep: bool):
        self.group, self.params, self.backend, self.state = group, params, opt.backend, opt.state
        self.plain = [p for p in params if not galore.is_projected(p, group)]
        self.projected = [p for p in params if galore.is_projected(p, group)]
        self.buckets = opt._buckets(group, self.plain, keep)
        self._states = self._sizes = self._values = None

    def keep(self, opt: FusedOptimizer) -> None:
        """Notes what holds() compares: each param's state dict, and the plain params' state values (GaLore's change
        at a refresh, which replaces the projectors)."""
        self._states = [opt.state[p] for p in chain(self.plain, self.projected)]
        self._sizes = list(map(len, self._states))
        self._values = list(chain.from_iterable(map(dict.values, self._states[:len(self.plain)])))

    def holds(self, opt: FusedOptimizer, group: dict, params: list[torch.Tensor]) -> bool:
        """Whether this plan steps ``params`` (those of ``group`` with grads) as a new one would."""
        if self._states is None or group is not self.group or opt.state is not self.state or opt.backend != self.backend:
            return False
        if len(params) != len(self.params) or not all(map(is_, params, self.params)):
            return False
        states = list(map(opt.state.get, chain(self.plain, self.projected)))
        return (all(map(is_, states, self._states)) and list(map(len, states)) == self._sizes
                and all(map(is_, chain.from_iterable(map(dict.values, states[:len(self.plain)])), self._values)))
