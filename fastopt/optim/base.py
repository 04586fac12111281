"""FusedOptimizer: what every fastopt optimizer shares, so that each optimizer class stays a thin layer.

It owns: param groups and their validation; hyperparameters that are floats, 0-d tensors or schedules
(any callable ``sched(step) -> float``, evaluated once per ``step()`` at the number of earlier ``step()``
calls); lazy state init; a state_dict that holds only tensors, numbers, strings, lists and dicts;
GradScaler's fused protocol (``grad_scale`` / ``found_inf``); and the choice of backend per device.

It also owns how moments are stored (``state_bits``): in the param's dtype (None, as torch), fp32 (32),
bf16 (16), or block-quantized 8-/4-bit codes + fp32 scales (fastopt.quant) for tensors of at least
``min_quant_size`` elements; a quantized moment ``name`` is stored as ``name_codes`` and ``name_scales``.

It also owns GaLore (fastopt.galore; ALGORITHMS.md §5) for every optimizer: the 2-D params of a group with a
``rank`` are optimized in a low-rank subspace of their gradient. For each such param, step() refreshes the projector
when due, projects the gradient (R = Lᵀ·G·Rtᵀ, a matmul), and runs the optimizer's own ``_update`` on a *shadow*:
a zero tensor of R's shape whose grad is R and whose state is the param's state (low-rank moments), with weight
decay 0. So every optimizer, backend and state_bits works on the low-rank moments unchanged. The shadow then holds
the update −lr·N, which one BLAS call (addmm) scales by α and adds to the param, weight decay folded into it
(where each optimizer applies it: ``_galore_weight_decay``). Moment sizes, quantization and state_dict checks
follow the low-rank shape (``_moment_like``). GradScaler: an optimizer with a GaLore group takes torch's standard
protocol (GradScaler unscales the grads and skips step() on inf), so that a skipped step leaves the projectors and
their schedule untouched, as with galore-torch.

A subclass names its schedulable ``hyperparameters`` and its moments (``_moment_names``), and defines
``_check_hyperparameters`` (errors that name the argument) and ``_update`` (one step for one group,
through ``fastopt.ops``); ``_init_state`` may add more state (scalars: a GaLore param's moments are low-rank).
"""
from __future__ import annotations

import copy
import math
from collections import defaultdict
from typing import Any, Callable

import torch

from fastopt.galore import policy as galore
from fastopt.galore import projector as galore_proj
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
HOST_STATE_KEYS = ("param_shape",) + galore.HOST_KEYS  # state tensors that stay on the CPU


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
    hyperparameters: tuple[str, ...] = ()  # group options that may be schedules or 0-d tensors

    def __init__(self, params, defaults: dict, *, backend: str | None = None):
        _backends.check_backend(backend)
        self.backend = backend
        self._step_count = 0  # step() calls so far; schedules are evaluated at this index
        self._galore_cache: dict = {}  # param -> (seed, projectors) of refresh="random"; memory only, never saved
        self._galore_buffers: dict = {}  # reused low-rank buffers of GaLore steps (see _scratch)
        self._index: dict = {}  # param -> (group index, position among all params); rebuilt when a param is missing
        super().__init__(params, defaults)

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """GradScaler hands us grad_scale / found_inf instead of unscaling grads itself (kernels fold them in),
        unless a group is projected by GaLore: then GradScaler unscales and skips step() on inf (see above)."""
        return not any(group.get("rank") is not None for group in self.param_groups)

    # ---- subclass interface -------------------------------------------------------------------
    def _moment_names(self, group: dict) -> list[tuple[str, bool]]:
        """(state key, signed) of each moment, e.g. [("exp_avg", True), ("exp_avg_sq", False)]."""
        return []

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        """Fresh state for parameter ``p`` (called on a meta tensor to learn the layout, too)."""
        like = self._moment_like(p, group)
        state = {"step": torch.zeros((), dtype=torch.float32, device=p.device)}
        for name, signed in self._moment_names(group):
            state.update(self._new_moment(name, like, group, signed))
        # Quantized codes, or low-rank moments, do not tell the shape of the param they belong to.
        if like is not p or any(key.endswith("_codes") for key in state):
            state["param_shape"] = torch.tensor(list(p.shape), dtype=torch.int64)
        if like is not p:
            state.update(galore.init_state(tuple(p.shape), group, p.device, p.dtype))
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
        return self._stored_moment(self.state[p], p, group, name, signed)

    def _stored_moment(self, state: dict, like: torch.Tensor, group: dict, name: str,
                       signed: bool) -> torch.Tensor | quant.Quantized:
        storage = self._storage(like, group, signed)
        if isinstance(storage, quant.QuantFormat):
            return quant.Quantized(state[f"{name}_codes"], state[f"{name}_scales"], storage)
        return state[name]

    @staticmethod
    def _moment_like(p: torch.Tensor, group: dict) -> torch.Tensor:
        """A tensor shaped as ``p``'s moments (sizes and storage follow it): ``p`` itself, or for a GaLore param an
        empty low-rank tensor on its device."""
        if not galore.is_projected(p, group):
            return p
        shape = galore_proj.projected_shape(tuple(p.shape), group["rank"], group["proj_type"])
        return torch.empty(shape, dtype=p.dtype, device=p.device)

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
        if options.get("rank") is not None:  # a GaLore group: galore-torch's defaults for the options not given
            for key, value in galore.DEFAULTS.items():
                if key not in options:
                    param_group[key] = options[key] = value
        if "betas" in options and len(options["betas"]) != 2:
            raise ValueError(f"{self._name}: betas must be a pair (beta1, beta2), got {options['betas']!r}")
        self._check_options(options)
        self._hyperparameters(options, self._step_count)
        galore.check_options(self._name, options)
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
            self._step_params(group, hp, params, grad_scale, found_inf)
        self._step_count += 1
        return loss

    @torch.no_grad()
    def step_param(self, p: torch.Tensor) -> None:
        """Updates one parameter now, with its current grad, exactly as the next step() would (same hyperparameters,
        schedules at the same step count); step() then skips it if its grad has been set to None. This is what
        ``fastopt.galore.step_in_backward`` calls from a gradient hook. GradScaler is not supported here."""
        if p.grad is None:
            return
        g, position = self._locate(p)
        group = self.param_groups[g]
        where = f"(param_groups[{g}], param at position {position})"
        if p.grad.is_sparse:
            raise RuntimeError(f"{self._name}: sparse gradients are not supported {where}")
        if p.grad.shape != p.shape:
            raise RuntimeError(f"{self._name}: gradient of shape {tuple(p.grad.shape)} for a parameter of shape "
                               f"{tuple(p.shape)} {where}")
        hp = self._hyperparameters(group, self._step_count, read_tensors=False)
        self._step_params(group, hp, [p], None, None)

    def _step_params(self, group: dict, hp: dict, params: list[torch.Tensor], grad_scale, found_inf) -> None:
        for p in params:
            if not self.state[p]:
                self.state[p].update(self._init_state(p, group))
        plain = [p for p in params if not galore.is_projected(p, group)]
        if plain:
            self._update(group, hp, plain, grad_scale, found_inf)
        if len(plain) < len(params):
            if grad_scale is not None or found_inf is not None:  # GradScaler unscales for us (see the docstring)
                raise RuntimeError(f"{self._name}: GaLore groups take unscaled gradients (grad_scale/found_inf given)")
            self._galore_step(group, hp, [p for p in params if galore.is_projected(p, group)])

    def _locate(self, p: torch.Tensor) -> tuple[int, int]:
        """(index of p's group, p's position among all params in group order): positions place staggered refreshes
        and seed random projections, so they depend only on the order of the params, as a state_dict does."""
        if p not in self._index:
            self._index = {}
            for g, group in enumerate(self.param_groups):
                for q in group["params"]:
                    self._index[q] = (g, len(self._index))
        if p not in self._index:
            raise ValueError(f"{self._name}: this parameter (shape {tuple(p.shape)}) is not in the optimizer")
        return self._index[p]

    # ---- GaLore ---------------------------------------------------------------------------------
    def _galore_weight_decay(self, group: dict, hp: dict) -> tuple[str, float | torch.Tensor]:
        """How weight decay reaches a GaLore param (its low-rank step runs without it): ("before", rate):
        p ← p·(1 − rate) before the update, as AdamW (the default: rate = lr·weight_decay); ("after", rate): after it
        (galore-torch, SPAM); ("l2", wd): g ← g + wd·p before the projection (Adam's coupled decay)."""
        return "before", hp["lr"] * hp["weight_decay"]

    def _galore_step(self, group: dict, hp: dict, params: list[torch.Tensor]) -> None:
        """One step of GaLore params, one param at a time (so that two reused low-rank buffers serve them all: no
        allocation, no page faults): refresh when due, R = project(G), the optimizer's own step on a low-rank shadow,
        then p ← β·p + α·(L·U·Rt), the decay folded into β (one addmm)."""
        gap = galore.gap_of(hp)
        rule, rate = self._galore_weight_decay(group, hp)
        l2 = rule == "l2" and not _is_zero(rate)
        shadow_hp = {**hp, "weight_decay": 0.0}
        for p in params:
            state = self.state[p]
            step = int(state["proj_step"])
            position = self._locate(p)[1]
            advance = True
            if galore.refresh_due(step, gap, position, group["stagger"]):
                grad = p.grad + rate * p if l2 else p.grad  # the gradient Adam's coupled decay sees
                change = galore.refresh(p, grad, state, group, position, self._galore_cache)
                advance = change is not None  # a skipped refresh (non-finite gradient) is retried next step
                if change is not None and step > 0:
                    self._carry_moments(p, group, state, change)
            left, right = galore.projectors(p, state, group, self._galore_cache)
            shape = galore_proj.projected_shape(tuple(p.shape), group["rank"], group["proj_type"])
            low = galore_proj.project(p.grad, left, right, out=self._scratch("low", shape, p))
            if l2:
                low.add_(galore_proj.project(p, left, right) * rate)
            shadow = self._scratch("shadow", shape, p).zero_()
            shadow.grad = low
            self.state[shadow] = state  # the same dict: the optimizer updates the param's low-rank moments
            try:
                self._update(group, shadow_hp, [shadow], None, None)
            finally:
                del self.state[shadow]
                shadow.grad = None
            self._apply_low_rank_update(p, shadow, left, right, group["scale"], rule, rate)
            if advance:
                state["proj_step"] += 1

    @staticmethod
    def _apply_low_rank_update(p, update, left, right, scale, rule, rate) -> None:
        """p ← p + α·(L·U·Rt) with the weight decay rule folded into addmm's β (a tensor rate, which the host must not
        read, decays in a separate pass)."""
        if rule == "l2" or _is_zero(rate):
            galore_proj.project_back_(p, update, left, right, alpha=scale)
        elif isinstance(rate, torch.Tensor):
            if rule == "before":
                p.mul_(1 - rate)
            galore_proj.project_back_(p, update, left, right, alpha=scale)
            if rule == "after":
                p.mul_(1 - rate)
        else:
            keep = 1.0 - rate
            galore_proj.project_back_(p, update, left, right, beta=keep, alpha=scale * (keep if rule == "after" else 1))

    def _scratch(self, role: str, shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """A reused low-rank buffer per (role, shape, dtype, device): memory only, never in the state."""
        key = (role, shape, like.dtype, like.device)
        buffer = self._galore_buffers.get(key)
        if buffer is None:
            buffer = self._galore_buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buffer

    def _carry_moments(self, p: torch.Tensor, group: dict, state: dict, change: galore.Refresh) -> None:
        """The low-rank moments when the subspace changes: kept as they are ("keep", galore-torch), zeroed with their
        step count ("reset": the next step is a fresh bias-corrected one), or carried into the new basis
        ("reproject": first moments m ← Mₗ·m·Mᵣ, second moments by the squared maps; see projector.reproject)."""
        policy = group["moments"]
        if policy == "keep":
            return
        like = self._moment_like(p, group)
        if policy == "reset":  # on a device, "changed" is a 0-d bool tensor: zero by multiplying, without a host read
            unchanged = None if change.changed is True else ~change.changed
            tensors = [state["step"]]
            for name, signed in self._moment_names(group):
                moment = self._stored_moment(state, like, group, name, signed)
                tensors += [moment.codes, moment.scales] if isinstance(moment, quant.Quantized) else [moment]
            for t in tensors:
                t.zero_() if unchanged is None else t.mul_(unchanged.to(t.dtype))
            return
        basis = galore_proj.change_of_basis(change.old, change.new)
        for name, signed in self._moment_names(group):
            moment = self._stored_moment(state, like, group, name, signed)
            if isinstance(moment, quant.Quantized):
                values = moment.dequantize(like.numel()).view(like.shape)
                moment.assign(galore_proj.reproject(values, basis, squared=not signed))
            else:
                compute = torch.float64 if moment.dtype == torch.float64 else torch.float32
                moment.copy_(galore_proj.reproject(moment.to(compute), basis, squared=not signed))

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
        self._galore_cache.clear()
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
        like = self._moment_like(p, group)
        layout = self._state_layout(p, group)
        expected = set(layout) - {"param_shape"}
        for name, _ in self._moment_names(group):
            expected -= {name, f"{name}_codes", f"{name}_scales"}
            if name in state:
                got = state[name]
                if not isinstance(got, torch.Tensor) or got.shape != like.shape:
                    shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                    raise ValueError(f"{self._name}.load_state_dict: state[{name!r}] of param {index} has shape "
                                     f"{shape}, expected {tuple(like.shape)}")
            elif f"{name}_codes" in state and f"{name}_scales" in state:
                _loaded_format(state, name, like.numel(), True, where)
            else:
                raise ValueError(f"{where} has keys {sorted(state)}, missing {name!r} (a state_dict from another "
                                 "optimizer or configuration?)")
        others = {k for k in state if k != "param_shape"
                  and not any(k in (n, f"{n}_codes", f"{n}_scales") for n, _ in self._moment_names(group))}
        if others != expected:
            raise ValueError(f"{where} has keys {sorted(state)}, expected {sorted(layout)} "
                             "(a state_dict from another optimizer or configuration?)")
        for key in expected:  # e.g. GaLore projectors: their shapes follow the rank
            want, got = layout[key], state[key]
            if isinstance(want, torch.Tensor) and (not isinstance(got, torch.Tensor) or got.shape != want.shape):
                shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                raise ValueError(f"{where}: {key!r} has shape {shape}, expected {tuple(want.shape)}")

    def _conform_state(self, p: torch.Tensor, group: dict, state: dict) -> None:
        """After loading: every state tensor on the parameter's device, moments stored as this optimizer keeps them
        (an fp32 checkpoint is quantized for state_bits=4, a 4-bit one decoded for state_bits=32, ...)."""
        moments = self._moment_names(group)
        like = self._moment_like(p, group)
        for name, signed in moments:
            if name in state:
                value = state.pop(name).to(device=p.device)
            else:
                fmt = _loaded_format(state, name, like.numel(), signed, "")
                codes, scales = state.pop(f"{name}_codes").to(p.device), state.pop(f"{name}_scales").to(p.device)
                value = quant.Quantized(codes, scales, fmt)
            want = self._storage(like, group, signed)
            if isinstance(want, quant.QuantFormat):
                if isinstance(value, quant.Quantized) and value.fmt == want:
                    stored = value
                else:
                    values = value.dequantize(like.numel()) if isinstance(value, quant.Quantized) else value
                    stored = quant.Quantized(*quant.encode(values.float(), want), want)
                state[f"{name}_codes"], state[f"{name}_scales"] = stored.codes.contiguous(), stored.scales.contiguous()
            else:
                quantized = isinstance(value, quant.Quantized)
                values = value.dequantize(like.numel()).view(like.shape) if quantized else value
                state[name] = values.to(dtype=want, memory_format=torch.contiguous_format)
        names = {n for n, _ in moments}
        layout = self._state_layout(p, group)
        state.pop("param_shape", None)
        if "param_shape" in layout:
            state["param_shape"] = layout["param_shape"]
        for key, want in layout.items():
            if isinstance(want, torch.Tensor) and key not in names and not any(key.startswith(n + "_") for n in names):
                state[key] = state[key].to(device="cpu" if key in HOST_STATE_KEYS else p.device, dtype=want.dtype,
                                           memory_format=torch.contiguous_format)


def _is_zero(value: Any) -> bool:
    return not isinstance(value, torch.Tensor) and value == 0


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
