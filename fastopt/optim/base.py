"""FusedOptimizer: what every fastopt optimizer shares, so that each optimizer class stays a thin layer.

It owns: param groups and their validation; hyperparameters that are floats, 0-d tensors or schedules
(any callable ``sched(step) -> float``, evaluated once per ``step()`` at the number of earlier ``step()``
calls); lazy state init; a state_dict that holds only tensors, numbers, strings, lists and dicts;
GradScaler's fused protocol (``grad_scale`` / ``found_inf``); and the choice of backend per device.

A subclass defines ``_init_state`` (the layout of one parameter's state), ``_check_hyperparameters``
(errors that name the argument) and ``_update`` (one step for one group, through ``fastopt.ops``).
"""
from __future__ import annotations

import copy
import math
from collections import defaultdict
from typing import Any, Callable

import torch

from fastopt.ops import _backends

# Where a schedule stands in a state_dict: {SCHEDULE_KEY: spec} (or {SCHEDULE_KEY: None} when the
# callable has no to_dict(); loading then keeps the schedule the optimizer was built with).
SCHEDULE_KEY = "__schedule__"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the cpu and triton kernels take


def is_schedule(value: Any) -> bool:
    return callable(value) and not isinstance(value, torch.Tensor)


def resolve(value: Any, step: int) -> float | torch.Tensor:
    """A hyperparameter's value for this step: schedules are evaluated, tensors pass through."""
    if is_schedule(value):
        return float(value(step))
    if isinstance(value, torch.Tensor):
        return value
    return float(value)


def as_number(value: float | torch.Tensor) -> float:
    """For validation only (host-side, outside step()): a 0-d tensor's value."""
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def check_range(owner: str, name: str, value: float | torch.Tensor, low: float, high: float = math.inf,
                high_open: bool = False) -> None:
    """Raises ValueError naming the argument unless low <= value <= high (or < high when high_open)."""
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise ValueError(f"{owner}: {name} must be a number, a 0-d tensor or a schedule, got a tensor of shape "
                         f"{tuple(value.shape)}")
    x = as_number(value)
    ok = low <= x and (x < high if high_open else x <= high)
    if not ok:
        interval = f"[{low}, {high})" if high_open else (f">= {low}" if high == math.inf else f"[{low}, {high}]")
        raise ValueError(f"{owner}: {name} must be {interval}, got {x}")


class FusedOptimizer(torch.optim.Optimizer):
    # GradScaler hands us grad_scale / found_inf instead of unscaling grads itself: kernels fold them in.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict, *, backend: str | None = None):
        _backends.check_backend(backend)
        self.backend = backend
        self._step_count = 0  # step() calls so far; schedules are evaluated at this index
        super().__init__(params, defaults)

    # ---- subclass interface -------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        """Fresh state for parameter ``p`` (called on a meta tensor to learn the layout, too)."""
        raise NotImplementedError

    def _check_hyperparameters(self, hp: dict) -> None:
        """Raises ValueError naming the argument; ``hp`` holds this step's resolved values."""

    def _update(self, group: dict, hp: dict, params: list[torch.Tensor], grad_scale, found_inf) -> None:
        """One step of ``params`` (all with grads and initialized state) of one group."""
        raise NotImplementedError

    # ---- hyperparameters ----------------------------------------------------------------------
    def _hyperparameters(self, group: dict, step: int) -> dict:
        """The group's options with schedules evaluated at ``step``; betas become a tuple of values."""
        hp = {}
        for key, value in group.items():
            if key == "params":
                continue
            if key == "betas":
                hp[key] = tuple(resolve(b, step) for b in value)
            elif is_schedule(value) or isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool):
                hp[key] = resolve(value, step)
            else:
                hp[key] = value
        self._check_hyperparameters(hp)
        return hp

    @property
    def _name(self) -> str:
        return type(self).__name__

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, after checking params and hyperparameters (nothing is added on error)."""
        param_group = dict(param_group)
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        param_group["params"] = params
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                continue  # torch's own check names this error
            if p.is_complex():
                raise ValueError(f"{self._name}: complex parameters are not supported (params[{i}] is {p.dtype}); "
                                 "optimize torch.view_as_real(p) instead")
            if not p.is_floating_point():
                raise ValueError(f"{self._name}: params[{i}] has dtype {p.dtype}; only floating-point parameters "
                                 "can be optimized")
            if self.backend in ("cpu", "triton") and p.dtype not in KERNEL_DTYPES:
                raise ValueError(f"{self._name}: backend={self.backend!r} takes float32, bfloat16 and float16 "
                                 f"params, params[{i}] is {p.dtype} (backend=None runs it on the reference path)")
        options = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        if "betas" in options and len(options["betas"]) != 2:
            raise ValueError(f"{self._name}: betas must be a pair (beta1, beta2), got {options['betas']!r}")
        self._hyperparameters(options, self._step_count)
        super().add_param_group(param_group)

    # ---- step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # Check everything first, so that a bad value raises before anything is updated.
        work = []
        for g, group in enumerate(self.param_groups):
            hp = self._hyperparameters(group, self._step_count)
            params = [p for p in group["params"] if p.grad is not None]
            for i, p in enumerate(params):
                if p.grad.is_sparse:
                    raise RuntimeError(f"{self._name}: sparse gradients are not supported "
                                       f"(param_groups[{g}]['params'][{i}])")
                if p.grad.shape != p.shape:
                    raise RuntimeError(f"{self._name}: gradient of shape {tuple(p.grad.shape)} for a parameter of "
                                       f"shape {tuple(p.shape)} (param_groups[{g}]['params'][{i}])")
            work.append((group, hp, params))
        for group, hp, params in work:
            for p in params:
                if not self.state[p]:
                    self.state[p].update(self._init_state(p, group))
            if params:
                self._update(group, hp, params, grad_scale, found_inf)
        self._step_count += 1
        return loss

    def _backend_for(self, p: torch.Tensor) -> str:
        """The implementation for this tensor: the forced one, or the fastest for its device and dtype."""
        if self.backend is None and p.dtype not in KERNEL_DTYPES:
            return "reference"  # e.g. float64: exact math on the reference path
        return _backends.resolve(self.backend, p.device)

    def _buckets(self, params: list[torch.Tensor]) -> dict[tuple[torch.device, str], list[torch.Tensor]]:
        """Params grouped by (device, backend): one multi-tensor op call per bucket."""
        buckets: dict[tuple[torch.device, str], list[torch.Tensor]] = defaultdict(list)
        for p in params:
            buckets[(p.device, self._backend_for(p))].append(p)
        return buckets

    # ---- state_dict ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["param_groups"] = [{k: _pack_schedule(v) for k, v in g.items()} for g in sd["param_groups"]]
        sd["step_count"] = self._step_count
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads torch's layout (e.g. a torch.optim.AdamW checkpoint) or ours; checks every state tensor's keys
        and shapes against this optimizer before changing anything."""
        state_dict = dict(state_dict)
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{self._name}.load_state_dict: the state_dict has {len(groups)} param groups, "
                             f"this optimizer {len(self.param_groups)}")
        state_dict["param_groups"] = [
            {k: _unpack_schedule(v, mine.get(k), k, self._name) for k, v in saved.items()}
            for saved, mine in zip(groups, self.param_groups)]
        index = 0
        for g, (saved, group) in enumerate(zip(state_dict["param_groups"], self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{self._name}.load_state_dict: param group {g} has {len(saved['params'])} params in "
                                 f"the state_dict, {len(group['params'])} here")
            options = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            for saved_id, p in zip(saved["params"], group["params"]):
                if saved_id in state_dict["state"]:
                    self._check_loaded_state(p, options, state_dict["state"][saved_id], index)
                index += 1
        step_count = state_dict.pop("step_count", None)
        # torch's loader would cast floating state to each param's dtype; place the state ourselves instead.
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            for saved_id, p in zip(saved["params"], group["params"]):
                if saved_id in saved_state:
                    self.state[p] = dict(saved_state[saved_id])
                    self._conform_state(p, group, self.state[p])
        if step_count is None:  # a torch checkpoint: take the step count from the per-tensor steps
            steps = [float(s["step"]) for s in self.state.values() if "step" in s]
            step_count = int(max(steps)) if steps else 0
        self._step_count = int(step_count)

    def _state_layout(self, p: torch.Tensor, group: dict) -> dict:
        return self._init_state(torch.empty_like(p, device="meta"), group)

    def _check_loaded_state(self, p: torch.Tensor, group: dict, state: dict, index: int) -> None:
        layout = self._state_layout(p, group)
        if set(state) != set(layout):
            raise ValueError(f"{self._name}.load_state_dict: state of param {index} has keys {sorted(state)}, "
                             f"expected {sorted(layout)} (a state_dict from another optimizer or configuration?)")
        for key, want in layout.items():
            got = state[key]
            if isinstance(want, torch.Tensor) and (not isinstance(got, torch.Tensor) or got.shape != want.shape):
                shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                raise ValueError(f"{self._name}.load_state_dict: state[{key!r}] of param {index} has shape {shape}, "
                                 f"expected {tuple(want.shape)}")

    def _conform_state(self, p: torch.Tensor, group: dict, state: dict) -> None:
        """After loading: each state tensor in the dtype this optimizer keeps, on the parameter's device."""
        for key, want in self._state_layout(p, group).items():
            if isinstance(want, torch.Tensor):
                state[key] = state[key].to(device=p.device, dtype=want.dtype, memory_format=torch.contiguous_format)


def _pack_schedule(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return type(value)(_pack_schedule(v) for v in value)
    if is_schedule(value):
        to_dict = getattr(value, "to_dict", None)
        return {SCHEDULE_KEY: to_dict() if to_dict is not None else None}
    return value


def _unpack_schedule(value: Any, current: Any, key: str, owner: str) -> Any:
    if isinstance(value, (tuple, list)):
        currents = current if isinstance(current, (tuple, list)) and len(current) == len(value) else [None] * len(value)
        return type(value)(_unpack_schedule(v, c, f"{key}[{i}]", owner) for i, (v, c) in enumerate(zip(value, currents)))
    if isinstance(value, dict) and SCHEDULE_KEY in value:
        spec = value[SCHEDULE_KEY]
        if spec is not None:
            from fastopt.schedules import from_dict

            return from_dict(copy.deepcopy(spec))
        if not is_schedule(current):
            raise ValueError(f"{owner}.load_state_dict: {key} was a schedule without to_dict() when saved; build the "
                             "optimizer with that schedule before loading")
        return current
    return value
