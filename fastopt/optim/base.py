"""FusedOptimizer: what every fastopt optimizer shares, so that each optimizer class stays a thin layer.

It owns: param groups and their validation; hyperparameters that are floats, 0-d tensors or schedules
(any callable ``sched(step) -> float``, evaluated once per ``step()`` at the number of earlier ``step()``
calls); lazy state init; a state_dict that holds only tensors, numbers, strings, lists and dicts;
GradScaler's fused protocol (``grad_scale`` / ``found_inf``); and the choice of backend per device.

It also owns how moments are stored (``state_bits``): in the param's dtype (None, as torch), fp32 (32),
bf16 (16), or block-quantized 8-/4-bit codes + fp32 scales (fastopt.quant) for tensors of at least
``min_quant_size`` elements; a quantized moment ``name`` is stored as ``name_codes`` and ``name_scales``.

A subclass names its schedulable ``hyperparameters`` and its moments (``_moment_names``), and defines
``_check_hyperparameters`` (errors that name the argument) and ``_update`` (one step for one group,
through ``fastopt.ops``); ``_init_state`` may add more state.
"""
from __future__ import annotations

import copy
import math
from collections import defaultdict
from typing import Any, Callable

import torch

from fastopt.ops import _backends
from fastopt.quant import formats as quant

# Where a schedule stands in a state_dict: {SCHEDULE_KEY: spec} (or {SCHEDULE_KEY: None} when the
# callable has no to_dict(); loading then keeps the schedule the optimizer was built with).
SCHEDULE_KEY = "__schedule__"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the cpu and triton kernels take
STATE_BITS = (None, 32, 16, 8, 4)  # None: moments in the param's dtype (torch's behaviour)
# How this optimizer stores its state: kept on load_state_dict (a checkpoint's state is converted to it),
# unlike hyperparameters, which the checkpoint sets as in torch.
STORAGE_OPTIONS = ("state_bits", "min_quant_size")


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
    """Raises ValueError naming the argument unless low <= value <= high (or < high when high_open).
    None stands for a tensor that step() does not read (it was checked when its group was added)."""
    if value is None:
        return
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
    hyperparameters: tuple[str, ...] = ()  # group options that may be schedules or 0-d tensors

    def __init__(self, params, defaults: dict, *, backend: str | None = None):
        _backends.check_backend(backend)
        self.backend = backend
        self._step_count = 0  # step() calls so far; schedules are evaluated at this index
        super().__init__(params, defaults)

    # ---- subclass interface -------------------------------------------------------------------
    def _moment_names(self, group: dict) -> list[tuple[str, bool]]:
        """(state key, signed) of each moment, e.g. [("exp_avg", True), ("exp_avg_sq", False)]."""
        return []

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        """Fresh state for parameter ``p`` (called on a meta tensor to learn the layout, too)."""
        state = {"step": torch.zeros((), dtype=torch.float32, device=p.device)}
        for name, signed in self._moment_names(group):
            state.update(self._new_moment(name, p, group, signed))
        if any(key.endswith("_codes") for key in state):  # codes alone do not tell the shape they belong to
            state["param_shape"] = torch.tensor(list(p.shape), dtype=torch.int64)
        return state

    def _check_hyperparameters(self, hp: dict) -> None:
        """Raises ValueError naming the argument; ``hp`` holds this step's resolved values."""

    def _update(self, group: dict, hp: dict, params: list[torch.Tensor], grad_scale, found_inf) -> None:
        """One step of ``params`` (all with grads and initialized state) of one group."""
        raise NotImplementedError

    # ---- moments --------------------------------------------------------------------------------
    @staticmethod
    def _storage(p: torch.Tensor, group: dict, signed: bool) -> torch.dtype | quant.QuantFormat:
        """How a moment of ``p`` is stored under the group's state_bits / min_quant_size."""
        bits = group.get("state_bits")
        if bits in (4, 8):
            return quant.FORMATS[(bits, signed)] if p.numel() >= group["min_quant_size"] else torch.float32
        return {None: p.dtype, 32: torch.float32, 16: torch.bfloat16}[bits]

    def _new_moment(self, name: str, p: torch.Tensor, group: dict, signed: bool) -> dict:
        storage = self._storage(p, group, signed)
        if isinstance(storage, quant.QuantFormat):
            q = quant.zeros(p.numel(), storage, p.device)
            return {f"{name}_codes": q.codes, f"{name}_scales": q.scales}
        return {name: torch.zeros_like(p, dtype=storage, memory_format=torch.contiguous_format)}

    def _moment(self, p: torch.Tensor, group: dict, name: str, signed: bool) -> torch.Tensor | quant.Quantized:
        """A moment as the ops take it: a float tensor, or codes + scales + format."""
        storage = self._storage(p, group, signed)
        state = self.state[p]
        if isinstance(storage, quant.QuantFormat):
            return quant.Quantized(state[f"{name}_codes"], state[f"{name}_scales"], storage)
        return state[name]

    # ---- hyperparameters ----------------------------------------------------------------------
    def _hyperparameters(self, group: dict, step: int, *, read_tensors: bool = True) -> dict:
        """The group's options with schedules evaluated at ``step``; betas become a tuple of values.
        step() passes read_tensors=False: 0-d tensor values were checked when their group was added, and reading
        one again (``.item()``) would make every step wait for the device."""
        hp = dict(group)
        hp.pop("params", None)
        for key in self.hyperparameters:
            value = group[key]
            hp[key] = tuple(resolve(b, step) for b in value) if key == "betas" else resolve(value, step)
        unread = lambda v: None if isinstance(v, torch.Tensor) and not read_tensors else v  # noqa: E731
        self._check_hyperparameters({k: tuple(map(unread, v)) if k == "betas" else unread(v) for k, v in hp.items()})
        return hp

    def _check_options(self, options: dict) -> None:
        """Storage options every optimizer shares."""
        bits = options.get("state_bits")
        if bits not in STATE_BITS:
            raise ValueError(f"{self._name}: state_bits must be one of {STATE_BITS}, got {bits!r}")
        size = options.get("min_quant_size", 0)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"{self._name}: min_quant_size must be an integer >= 0, got {size!r}")
        if bits in (4, 8) and options.get("amsgrad"):
            raise ValueError(f"{self._name}: amsgrad is not supported with state_bits={bits} (use 32, 16 or None)")

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
        self._check_options(options)
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
            hp = self._hyperparameters(group, self._step_count, read_tensors=False)
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
        and shapes against this optimizer before changing anything. Hyperparameters come from the checkpoint;
        the storage options (state_bits, min_quant_size) stay this optimizer's, and loaded moments are converted."""
        state_dict = dict(state_dict)
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{self._name}.load_state_dict: the state_dict has {len(groups)} param groups, "
                             f"this optimizer {len(self.param_groups)}")
        state_dict["param_groups"] = [
            {**{k: _unpack_schedule(v, mine.get(k), k, self._name) for k, v in saved.items()},
             **{k: mine[k] for k in STORAGE_OPTIONS if k in mine}}
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
        """Checks keys and shapes; a moment may come as a float tensor or quantized, whatever this optimizer keeps."""
        where = f"{self._name}.load_state_dict: state of param {index}"
        if "param_shape" in state and state["param_shape"].tolist() != list(p.shape):
            raise ValueError(f"{where} is for a parameter of shape {tuple(state['param_shape'].tolist())}, "
                             f"this one has shape {tuple(p.shape)}")
        expected = set(self._state_layout(p, group)) - {"param_shape"}
        for name, _ in self._moment_names(group):
            expected -= {name, f"{name}_codes", f"{name}_scales"}
            if name in state:
                got = state[name]
                if not isinstance(got, torch.Tensor) or got.shape != p.shape:
                    shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                    raise ValueError(f"{self._name}.load_state_dict: state[{name!r}] of param {index} has shape "
                                     f"{shape}, expected {tuple(p.shape)}")
            elif f"{name}_codes" in state and f"{name}_scales" in state:
                _loaded_format(state, name, p.numel(), True, where)
            else:
                raise ValueError(f"{where} has keys {sorted(state)}, missing {name!r} (a state_dict from another "
                                 "optimizer or configuration?)")
        others = {k for k in state if k != "param_shape"
                  and not any(k in (n, f"{n}_codes", f"{n}_scales") for n, _ in self._moment_names(group))}
        if others != expected:
            raise ValueError(f"{where} has keys {sorted(state)}, expected {sorted(self._state_layout(p, group))} "
                             "(a state_dict from another optimizer or configuration?)")

    def _conform_state(self, p: torch.Tensor, group: dict, state: dict) -> None:
        """After loading: every state tensor on the parameter's device, moments stored as this optimizer keeps them
        (an fp32 checkpoint is quantized for state_bits=4, a 4-bit one decoded for state_bits=32, ...)."""
        moments = self._moment_names(group)
        for name, signed in moments:
            if name in state:
                value = state.pop(name).to(device=p.device)
            else:
                fmt = _loaded_format(state, name, p.numel(), signed, "")
                codes, scales = state.pop(f"{name}_codes").to(p.device), state.pop(f"{name}_scales").to(p.device)
                value = quant.Quantized(codes, scales, fmt)
            want = self._storage(p, group, signed)
            if isinstance(want, quant.QuantFormat):
                if isinstance(value, quant.Quantized) and value.fmt == want:
                    stored = value
                else:
                    values = value.dequantize(p.numel()) if isinstance(value, quant.Quantized) else value
                    stored = quant.Quantized(*quant.encode(values.float(), want), want)
                state[f"{name}_codes"], state[f"{name}_scales"] = stored.codes.contiguous(), stored.scales.contiguous()
            else:
                values = value.dequantize(p.numel()).view(p.shape) if isinstance(value, quant.Quantized) else value
                state[name] = values.to(dtype=want, memory_format=torch.contiguous_format)
        names = {n for n, _ in moments}
        layout = self._state_layout(p, group)
        state.pop("param_shape", None)
        if "param_shape" in layout:
            state["param_shape"] = layout["param_shape"]
        for key, want in layout.items():
            if isinstance(want, torch.Tensor) and key not in names and not any(key.startswith(n + "_") for n in names):
                state[key] = state[key].to(device=want.device if key == "param_shape" else p.device, dtype=want.dtype,
                                           memory_format=torch.contiguous_format)


def _loaded_format(state: dict, name: str, n: int, signed: bool, where: str) -> quant.QuantFormat:
    """The format of a loaded quantized moment, recognized from its sizes."""
    codes, scales = state[f"{name}_codes"], state[f"{name}_scales"]
    for bits in (4, 8):
        fmt = quant.FORMATS[(bits, signed)]
        if codes.numel() == fmt.code_bytes(n) and scales.numel() == fmt.num_blocks(n) and codes.dtype == torch.uint8:
            return fmt
    raise ValueError(f"{where}: {name}_codes ({codes.numel()} bytes) and {name}_scales ({scales.numel()}) do not "
                     f"hold {n} elements in a 4- or 8-bit format")


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
