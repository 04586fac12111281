"""FusedOptimizer: what every fastopt optimizer shares, so that each optimizer class stays a thin layer.

It owns: param groups and their validation; hyperparameters that are floats, 0-d tensors or schedules
(any callable ``sched(step) -> float``, evaluated once per ``step()`` at the number of earlier ``step()``
calls); lazy state init; how moments are stored (``state_bits``); GradScaler's fused protocol (``grad_scale`` /
``found_inf``); and the choice of backend per device. Two jobs live in their own modules and are called from here
through one method each: the state_dict and its conversions (fastopt/optim/checkpoint.py) and GaLore's stepping
(fastopt/galore/step.py, reached through the narrow ``Host`` interface that this class implements).

Moments are stored in the param's dtype (state_bits None, as torch), fp32 (32), bf16 (16), or block-quantized
8-/4-bit codes + fp32 scales (fastopt.quant) for tensors of at least ``min_quant_size`` elements; a quantized
moment ``name`` is stored as ``name_codes`` and ``name_scales``. A GaLore param's moments are low-rank
(``_moment_like``): sizes, quantization and state_dict checks follow the low-rank shape. GradScaler: an optimizer
with a GaLore group takes torch's standard protocol (GradScaler unscales the grads and skips step() on inf), so
that a skipped step leaves the projectors and their schedule untouched, as with galore-torch.

A subclass names its schedulable ``hyperparameters`` and its moments (``_moment_names``), and defines
``_check_hyperparameters`` (errors that name the argument) and ``_update`` (one step for one group,
through ``fastopt.ops``); ``_init_state`` may add more state, ``_fill_missing_options`` the defaults of options
that a checkpoint (e.g. torch's) may lack, and ``_galore_weight_decay`` where weight decay reaches a GaLore param.
"""
from __future__ import annotations

import math
from collections import defaultdict
from operator import attrgetter
from typing import Any, Callable

import torch

from fastopt.galore import policy as galore
from fastopt.galore import projector as galore_proj
from fastopt.galore.step import GaLoreStepper
from fastopt.kernels import checks
from fastopt.ops import _backends, library, sharding
from fastopt.ops.common import as_number
from fastopt.optim import checkpoint
from fastopt.optim.checkpoint import is_schedule
from fastopt.optim.plan import Bucket, StepPlan
from fastopt.quant import formats as quant

_grad, _is_sparse, _shape = attrgetter("grad"), attrgetter("is_sparse"), attrgetter("shape")
KERNEL_DTYPES = tuple(checks.KERNEL_DTYPES)  # what the cpu and triton kernels take
STATE_BITS = (None, 32, 16, 8, 4)  # None: moments in the param's dtype (torch's behaviour)


def resolve(value: Any, step: int) -> float | torch.Tensor:
    """A hyperparameter's value for this step: schedules are evaluated, tensors pass through."""
    if is_schedule(value):
        return float(value(step))
    if isinstance(value, torch.Tensor):
        return value
    return float(value)


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


def check_adam_hyperparameters(owner: str, hp: dict) -> None:
    """lr, eps and weight decay >= 0, each beta in [0, 1): what every Adam-based optimizer checks."""
    check_range(owner, "lr", hp["lr"], 0.0)
    check_range(owner, "eps", hp["eps"], 0.0)
    check_range(owner, "weight_decay", hp["weight_decay"], 0.0)
    for i, beta in enumerate(hp["betas"]):
        check_range(owner, f"betas[{i}]", beta, 0.0, 1.0, high_open=True)


class FusedOptimizer(torch.optim.Optimizer):
    hyperparameters: tuple[str, ...] = ()  # group options that may be schedules or 0-d tensors

    def __init__(self, params, defaults: dict, *, backend: str | None = None, foreach: bool | None = None,
                 fused: bool | None = None, capturable: bool = False, differentiable: bool = False):
        _backends.check_backend(backend)
        self.backend = self._backend_from_torch_flags(backend, foreach=foreach, fused=fused,
                                                      differentiable=differentiable)
        defaults = {**defaults, **dict(foreach=foreach, fused=fused, capturable=capturable,
                                       differentiable=differentiable)}
        # step() calls so far (schedules are evaluated at this index): a tensor, so that a compiled step() takes it as
        # data instead of recompiling for each new value
        self._steps_taken = torch.zeros((), dtype=torch.int64)
        self._galore = GaLoreStepper()
        self._host = library.register_host(self, values=FusedOptimizer._host_values,
                                           galore_step=FusedOptimizer._galore_op_step)
        self._index: dict = {}  # param -> (group index, position among all params), kept by add_param_group
        self._plans: dict[int, StepPlan] = {}  # id(group) -> the group's step plan, kept while it holds
        super().__init__(params, defaults)

    def _backend_from_torch_flags(self, backend: str | None, *, foreach, fused, differentiable) -> str | None:
        """torch.optim's implementation flags, with fastopt's meanings (docs: README, "torch's flags"): fused None or
        True is fastopt's fused kernels (what backend=None picks); fused=False is the unfused pure-torch reference
        path (backend="reference"); foreach and capturable change nothing (every fastopt step takes lists of tensors,
        keeps its state on the params' device and never synchronizes with it); differentiable=True is refused."""
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if differentiable:
            raise NotImplementedError(f"{self._name}: differentiable=True is not supported (fastopt's steps run under "
                                      "no_grad); use torch.optim for a differentiable optimizer step")
        if fused is False:
            if backend not in (None, "reference"):
                raise ValueError(f"{self._name}: fused=False runs the unfused reference implementation, which "
                                 f"contradicts backend={backend!r}")
            return "reference"
        if fused and backend == "reference":
            raise ValueError(f"{self._name}: fused=True contradicts backend='reference' (the unfused implementation)")
        return backend

    @property
    def _step_count(self) -> int:
        return int(self._steps_taken)

    @_step_count.setter
    def _step_count(self, value: int) -> None:
        self._steps_taken.fill_(value)

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
            if sharding.is_sharded(p) and "proj_left" in state:  # its rows are the param's: sharded as they are
                left = state["proj_left"]
                local = torch.zeros((sharding.local(p).shape[0], left.shape[1]), dtype=left.dtype, device=left.device)
                state["proj_left"] = sharding.like(p, local, tuple(left.shape))
        return state

    def _check_hyperparameters(self, hp: dict) -> None:
        """Raises ValueError naming the argument; ``hp`` holds this step's resolved values."""

    def _step_rules(self, group: dict, hp: dict, step: int) -> dict:
        """Values this optimizer derives on the host from the step count (``step`` earlier steps) and ``hp``, e.g.
        whether this step resets the moments; they reach ``_update`` in ``hp``. Keys as ``_step_rule_names``."""
        return {}

    def _step_rule_names(self, group: dict) -> tuple[str, ...]:
        return ()

    def _update(self, group: dict, hp: dict, buckets: list[Bucket], grad_scale, found_inf) -> None:
        """One step of one group's params (all with grads and initialized state): one fused op call per bucket."""
        raise NotImplementedError

    # ---- moments --------------------------------------------------------------------------------
    @staticmethod
    def _storage(p: torch.Tensor, group: dict, signed: bool) -> torch.dtype | quant.QuantFormat:
        """How a moment of ``p`` is stored under the group's state_bits / min_quant_size."""
        bits = group.get("state_bits")
        if bits in (4, 8):
            fmt = quant.FORMATS[(bits, signed)]
            if p.numel() < group["min_quant_size"]:  # a DTensor's numel is the whole param's: no shard decides
                return torch.float32
            if sharding.is_sharded(p) and not sharding.rows_hold_blocks(p, fmt.block):
                return torch.float32  # its blocks would straddle shards (fastopt/ops/sharding.py)
            return fmt
        return {None: p.dtype, 32: torch.float32, 16: torch.bfloat16}[bits]

    def _new_moment(self, name: str, p: torch.Tensor, group: dict, signed: bool) -> dict:
        storage = self._storage(p, group, signed)
        if isinstance(storage, quant.QuantFormat) and sharding.is_sharded(p):
            codes_shape, scales_shape = sharding.quantized_shapes(p, storage)
            local_rows = sharding.local(p).shape[0]
            codes = torch.zeros(local_rows, codes_shape[1], dtype=torch.uint8, device=p.device)
            scales = torch.zeros(local_rows, scales_shape[1], dtype=torch.float32, device=p.device)
            return {f"{name}_codes": sharding.like(p, codes, codes_shape),
                    f"{name}_scales": sharding.like(p, scales, scales_shape)}
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
        if sharding.is_sharded(p) and not galore_proj.sides(tuple(p.shape), group["proj_type"])[0]:
            # right projection of a sharded param: the low-rank rows are the param's rows, sharded as they are
            local_rows = sharding.local(p).shape[0]
            return sharding.like(p, torch.empty((local_rows, shape[1]), dtype=p.dtype, device=p.device), shape)
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
            reason = sharding.unsupported(p)
            if reason is not None:
                raise ValueError(f"{self._name}: params[{i}] (shape {tuple(p.shape)}) is a DTensor that fastopt cannot "
                                 f"step: {reason}")
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
        self._reindex()

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
        if torch.compiler.is_compiling():
            hps = self._compiled_hyperparameters()
        else:
            step = self._step_count
            hps = [self._group_hyperparameters(group, step) for group in self.param_groups]
        work = []
        for g, (group, hp) in enumerate(zip(self.param_groups, hps)):
            params = [p for p in group["params"] if p.grad is not None]
            self._check_grads(params, f"param_groups[{g}]['params']")
            work.append((group, hp, params))
        if torch.compiler.is_compiling():
            self._init_group()
        for group, hp, params in work:
            self._step_params(group, hp, params, grad_scale, found_inf, keep_plan=True)
        self._steps_taken.add_(1)
        return loss

    # ---- the host part of a step ----------------------------------------------------------------------------
    def _group_hyperparameters(self, group: dict, step: int) -> dict:
        """The group's options for the step after ``step`` earlier ones: schedules evaluated and checked, and the
        optimizer's step rules added. 0-d tensor values are passed through unread (they were checked when their
        group was added; reading one again would make every step wait for the device)."""
        hp = self._hyperparameters(group, step, read_tensors=False)
        hp.update(self._step_rules(group, hp, step))
        return hp

    def _host_layout(self, group: dict) -> list[str]:
        """What the host computes for a group at each step: its schedulable hyperparameters that are not tensors
        ("betas.0" for a beta) and the step rules' values."""
        names = []
        for key in self.hyperparameters:
            if key == "betas":
                names += [f"betas.{i}" for i, b in enumerate(group["betas"]) if not isinstance(b, torch.Tensor)]
            elif not isinstance(group[key], torch.Tensor):
                names.append(key)
        return list(dict.fromkeys(names + list(self._step_rule_names(group))))

    def _host_values(self, step: int) -> list[float]:
        """The host part of the step after ``step`` earlier ones, as floats in ``_host_layout`` order; a compiled
        step() runs it through the opaque op fastopt::host_values."""
        values = []
        for group in self.param_groups:
            hp = self._group_hyperparameters(group, step)
            values += [float(hp["betas"][int(n[6:])] if n.startswith("betas.") else hp[n]) for n in self._host_layout(group)]
        return values

    def _compiled_hyperparameters(self) -> list[dict]:
        """The groups' hyperparameters inside a compiled step(): what depends on the step count comes from one call of
        fastopt::host_values (opaque to the compiler, so it runs at every step: schedules, step rules and plain
        numbers, which an LRScheduler may change, are data in the graph); tensors pass through; the rest are the
        group's constant options."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and sharding.is_sharded(p):
                    raise RuntimeError(f"{self._name}: a compiled step() does not take DTensor params yet (a "
                                       f"{tuple(p.shape)} param is one): call step() eagerly under FSDP2")
                backend = self._backend_for(p) if p.grad is not None else "cpu"
                if backend == "reference" or backend == "triton" and p.device.type == "cpu":
                    raise RuntimeError(f"{self._name}: a compiled step() runs fastopt's fused ops (the C++ kernels for "
                                       "CPU params of float32, bfloat16 or float16, Triton for GPU params); a "
                                       f"{p.dtype} param on {p.device} takes the {backend!r} backend"
                                       f"{' in the interpreter' if backend == 'triton' else ''}, which torch.compile "
                                       "cannot run: call step() eagerly")
        layouts = [self._host_layout(group) for group in self.param_groups]
        total = sum(map(len, layouts))
        values = torch.ops.fastopt.host_values(self._steps_taken, self._host, total) if total else None
        hps, i = [], 0
        for group, layout in zip(self.param_groups, layouts):
            hp = {key: group[key] for key in group.keys() if key != "params" and key not in layout}
            betas = [None if f"betas.{k}" in layout else b for k, b in enumerate(group["betas"])] if "betas" in group else None
            for name in layout:
                if name.startswith("betas."):
                    betas[int(name[6:])] = values[i]
                else:
                    hp[name] = values[i]
                i += 1
            if betas is not None:
                hp["betas"] = tuple(betas)
            hps.append(hp)
        return hps

    @torch.no_grad()
    def step_param(self, p: torch.Tensor) -> None:
        """Updates one parameter now, with its current grad, exactly as the next step() would (same hyperparameters,
        schedules at the same step count); step() then skips it if its grad has been set to None. This is what
        ``fastopt.galore.step_in_backward`` calls from a gradient hook. GradScaler is not supported here."""
        if p.grad is None:
            return
        g, position = self._locate(p)
        group = self.param_groups[g]
        self._check_grad(p, f"param_groups[{g}], param at position {position}")
        hp = self._group_hyperparameters(group, self._step_count)
        self._step_params(group, hp, [p], None, None)

    def _check_grads(self, params: list[torch.Tensor], where: str) -> None:
        """``_check_grad`` of every param, over whole lists first: the params one by one only when one fails, to name
        it (``where`` names the list)."""
        if torch.compiler.is_compiling():  # traced once, then guarded: the plain loop
            return self._check_each_grad(params, where)
        grads = list(map(_grad, params))
        if (any(map(_is_sparse, grads)) or list(map(_shape, grads)) != list(map(_shape, params))
                or (sharding.any_sharded(params) or sharding.any_sharded(grads))
                and list(map(sharding.placement_key, grads)) != list(map(sharding.placement_key, params))):
            self._check_each_grad(params, where)

    def _check_each_grad(self, params: list[torch.Tensor], where: str) -> None:
        for i, p in enumerate(params):
            self._check_grad(p, f"{where}[{i}]")

    def _check_grad(self, p: torch.Tensor, where: str) -> None:
        if p.grad.is_sparse:
            raise RuntimeError(f"{self._name}: sparse gradients are not supported ({where})")
        if sharding.placement_key(p) != sharding.placement_key(p.grad):
            found = tuple(p.grad.placements) if sharding.is_sharded(p.grad) else "a plain tensor"
            want = tuple(p.placements) if sharding.is_sharded(p) else "a plain tensor"
            raise RuntimeError(f"{self._name}: the gradient is {found}, its parameter {want} ({where}): a sharded "
                               "param's gradient must be sharded as the param")
        if p.grad.shape != p.shape:
            raise RuntimeError(f"{self._name}: gradient of shape {tuple(p.grad.shape)} for a parameter of shape "
                               f"{tuple(p.shape)} ({where})")

    def _step_params(self, group: dict, hp: dict, params: list[torch.Tensor], grad_scale, found_inf, *,
                     keep_plan: bool = False) -> None:
        plan = self._plan(group, params, keep_plan)
        if plan.plain:
            self._update(group, hp, plan.buckets, grad_scale, found_inf)
        if plan.projected:
            if grad_scale is not None or found_inf is not None:  # GradScaler unscales for us (see the docstring)
                raise RuntimeError(f"{self._name}: GaLore groups take unscaled gradients (grad_scale/found_inf given)")
            if torch.compiler.is_compiling():
                self._compiled_galore_step(group, plan.projected)
            else:
                self._galore.step(self, group, hp, plan.projected, [p.grad for p in plan.projected],
                                  [self.state[p] for p in plan.projected], [self._position(p) for p in plan.projected])

    def _init_group(self) -> None:
        """Creates the state of the params that have a grad and no state yet, in every group.

        torch.optim's optimizers have a method of this name, and torch.compile treats a call of it specially in every
        torch.optim.Optimizer: it runs the call eagerly instead of tracing it, then guards each param and state tensor
        by identity alone and holds it in the graph as a constant. A compiled step() calls it once, for every group,
        before it reads any state: the state is then created outside the graph, the first call compiles the steady
        step, and a step checks its tensors by id instead of by shape and stride. The quantization maps the ops read
        are made here too, for the same reason (a map made while tracing would recompile the next step)."""
        for group in self.param_groups:
            self._init_states(group, [p for p in group["params"] if p.grad is not None])
            for device in {p.device for p in group["params"]}:
                for fmt in quant.FORMATS.values():
                    fmt.table(device)

    def _init_states(self, group: dict, params: list[torch.Tensor]) -> None:
        """A fresh state (``_init_state``) for each of ``params`` that has none."""
        for p in params:
            if not self.state[p]:
                self.state[p].update(self._init_state(p, group))

    def _plan(self, group: dict, params: list[torch.Tensor], keep: bool) -> StepPlan:
        """The step plan of ``params`` (fastopt/optim/plan.py), their state initialized: step() keeps one per group
        and reuses it while it holds; a compiled step() builds it as it traces (the optimizer is not mutated), its
        buckets keeping their kernels' checks under the optimizer's host id."""
        compiled = torch.compiler.is_compiling()
        if not compiled and len(self._plans) > len(self.param_groups):  # groups were removed: let go of their plans
            self._plans = {id(g): self._plans[id(g)] for g in self.param_groups if id(g) in self._plans}
            self._reindex()  # and of their params, which the index of positions holds
        plan = self._plans.get(id(group)) if keep and not compiled else None
        if plan is not None and plan.holds(self, group, params):
            return plan
        self._init_states(group, params)
        plan = StepPlan(self, group, params, keep)
        if keep and not compiled:
            plan.keep(self)
            self._plans[id(group)] = plan
        return plan

    def _locate(self, p: torch.Tensor) -> tuple[int, int]:
        """(index of p's group, p's position among all params in group order): positions place staggered refreshes
        and seed random projections, so they depend only on the order of the params, as a state_dict does.
        add_param_group keeps the index; it is rebuilt here only outside a compiled step (which must not mutate the
        optimizer), for params put into a group's list by hand."""
        if p not in self._index and not torch.compiler.is_compiling():
            self._reindex()
        if p not in self._index:
            raise ValueError(f"{self._name}: this parameter (shape {tuple(p.shape)}) is not in the optimizer")
        return self._index[p]

    def _reindex(self) -> None:
        self._index.clear()
        for g, group in enumerate(self.param_groups):
            for q in group["params"]:
                self._index[q] = (g, len(self._index))

    # ---- GaLore (fastopt/galore/step.py calls these: its Host interface) -------------------------------------
    def _galore_weight_decay(self, group: dict, hp: dict) -> tuple[str, float | torch.Tensor]:
        """How weight decay reaches a GaLore param (its low-rank step runs without it): ("before", rate):
        p ← p·(1 − rate) before the update, as AdamW (the default: rate = lr·weight_decay); ("after", rate): after it
        (galore-torch, SPAM); ("l2", wd): g ← g + wd·p before the projection (Adam's coupled decay)."""
        return "before", hp["lr"] * hp["weight_decay"]

    def _position(self, p: torch.Tensor) -> int:
        return self._locate(p)[1]

    def _compiled_galore_step(self, group: dict, params: list[torch.Tensor]) -> None:
        """A group's GaLore params inside a compiled step(): the opaque op fastopt::galore_step, given every tensor
        of their state, calls back into ``_galore_op_step`` (the eager GaLore step) at run time."""
        index = next(g for g, candidate in enumerate(self.param_groups) if candidate is group)
        state = [self.state[p][key] for p in params for key in sorted(self.state[p])]
        torch.ops.fastopt.galore_step(params, [p.grad for p in params], state, self._steps_taken, self._host, index)

    def _galore_op_step(self, index: int, params: list[torch.Tensor], grads: list[torch.Tensor],
                        state: list[torch.Tensor], step: int) -> None:
        """fastopt::galore_step: the GaLore step of group ``index`` at step count ``step``, on the op's tensors (which
        under torch.compile may be copies of the params and state): ``state`` holds each param's state values by
        the sorted keys of its state dict (a compiled step creates the state before its graph runs: _init_group). A
        refresh that replaces a projector is written into the op's tensor in place, and the state dicts keep their
        tensors."""
        group = self.param_groups[index]
        projected = [p for p in group["params"] if p.grad is not None and galore.is_projected(p, group)]
        layouts = [sorted(self.state[p]) for p in projected]
        if len(projected) != len(params) or len(state) != sum(map(len, layouts)):
            raise RuntimeError(f"{self._name}: fastopt.galore_step was given {len(params)} params and {len(state)} "
                               f"state tensors for group {index}, which has {len(projected)} GaLore params with grads "
                               "(the optimizer changed after compiling?)")
        values = iter(state)
        states = [{key: next(values) for key in keys} for keys in layouts]
        given = [dict(s) for s in states]
        hp = self._group_hyperparameters(group, step)
        self._galore.step(self, group, hp, params, grads, states, [self._position(p) for p in projected])
        for now, before in zip(states, given):
            for key, tensor in before.items():
                if now[key] is not tensor:
                    tensor.copy_(now[key])

    def _low_rank_step(self, group: dict, hp: dict, shadow: torch.Tensor) -> None:
        self._update(group, hp, self._buckets(group, [shadow]), None, None)

    def _stored_moments(self, p: torch.Tensor, group: dict, state: dict) -> list[tuple[Any, bool]]:
        like = self._moment_like(p, group)  # the low-rank shape: sizes and storage follow it
        return [(self._stored_moment(state, like, group, name, signed), signed)
                for name, signed in self._moment_names(group)]

    def _backend_for(self, p: torch.Tensor) -> str:
        """The implementation for this tensor: the forced one, or the fastest for its device and dtype."""
        if self.backend is None and p.dtype not in KERNEL_DTYPES:
            return "reference"  # e.g. float64: exact math on the reference path
        return _backends.resolve(self.backend, p.device)

    def _buckets(self, group: dict, params: list[torch.Tensor], keep: bool = False) -> list[Bucket]:
        """Params grouped by device, backend and DTensor mesh and placements (plain tensors: none), so that each
        bucket's shards reduce over one process group: one multi-tensor op call per bucket. ``keep``: buckets of a
        plan that steps them again, whose kernels keep their checks (plan.Bucket)."""
        buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        backends: dict[tuple, str] = {}  # per (device, dtype): resolved once, not per param
        for p in params:
            kind = (p.device, p.dtype)
            backend = backends.get(kind) or backends.setdefault(kind, self._backend_for(p))
            buckets[(p.device, backend, sharding.placement_key(p))].append(p)
        return [Bucket(self, group, device, backend, ps, keep) for (device, backend, _), ps in buckets.items()]

    # ---- state_dict (fastopt/optim/checkpoint.py) ------------------------------------------------------------
    def state_dict(self) -> dict:
        return checkpoint.state_dict(self, super().state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads torch's layout (e.g. a torch.optim.AdamW checkpoint) or ours, after checking all of it against
        this optimizer: a state_dict of another optimizer or for other shapes raises and changes nothing.
        Hyperparameters come from the checkpoint; the storage options (state_bits, min_quant_size) stay this
        optimizer's, and loaded moments are converted to them."""
        checkpoint.load_state_dict(self, state_dict, super().load_state_dict)

    def __setstate__(self, state: dict) -> None:  # also runs at the end of torch's load_state_dict
        super().__setstate__(state)
        self._plans = {}  # they no longer hold: let go of the state they keep
        for group in self.param_groups:
            self._fill_missing_options(group)

    def _fill_missing_options(self, group: dict) -> None:
        """Sets the options a loaded param group may lack (a torch checkpoint has no state_bits) to their defaults."""
        for key in ("foreach", "fused", "capturable", "differentiable"):
            group.setdefault(key, self.defaults[key])
