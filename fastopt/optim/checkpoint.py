"""state_dict and load_state_dict of FusedOptimizer: torch's layout, plus what fastopt adds.

Saving: hyperparameters that are schedules become ``{SCHEDULE_KEY: spec}`` (``{SCHEDULE_KEY: None}`` when the
callable has no to_dict(); loading then keeps the schedule the optimizer was built with), and the optimizer's step
count is stored as ``step_count``, at the top and in each param group. Everything is a tensor, number, string, list or dict.

Loading takes torch's layout (a torch.optim.AdamW checkpoint) or fastopt's. Everything is checked before anything
changes: the param groups (their number, sizes, and the options this optimizer needs: a state_dict of another
optimizer lacks them), the hyperparameters' values, and every state tensor's keys and shapes. Hyperparameters come
from the checkpoint, as in torch; the storage options (state_bits, min_quant_size) stay this optimizer's, and
loaded moments are converted to them (an fp32 checkpoint is quantized for state_bits=4, a 4-bit one decoded for
state_bits=32, ...).
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from fastopt.galore import policy as galore
from fastopt.ops import sharding
from fastopt.quant import formats as quant

SCHEDULE_KEY = "__schedule__"
# The step count is saved at the top and in each param group: torch.distributed.checkpoint's get_state_dict keeps only
# "state" and "param_groups".
STEP_COUNT_KEY = "step_count"
# How an optimizer stores its state: kept on load_state_dict (a checkpoint's state is converted to it),
# unlike hyperparameters, which the checkpoint sets as in torch.
STORAGE_OPTIONS = ("state_bits", "min_quant_size")
HOST_STATE_KEYS = ("param_shape",) + galore.HOST_KEYS  # state tensors that stay on the CPU


def state_dict(opt, torch_state_dict: dict) -> dict:
    """``torch_state_dict`` (torch.optim.Optimizer.state_dict's) with schedules packed and the step count added."""
    sd = dict(torch_state_dict)
    step_count = opt._step_count
    sd["param_groups"] = [{**{k: _pack_schedule(v) for k, v in g.items()}, STEP_COUNT_KEY: step_count}
                          for g in sd["param_groups"]]
    sd["step_count"] = step_count
    return sd


def checked_groups(opt, state_dict: dict) -> list[dict]:
    """The param groups to load, validated against ``opt`` (raises ValueError naming what does not fit)."""
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or not isinstance(state_dict.get("state"), dict):
        raise ValueError(f"{opt._name}.load_state_dict: expected a dict with 'state' and 'param_groups' "
                         f"(an optimizer's state_dict), got keys {sorted(state_dict)}")
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"{opt._name}.load_state_dict: the state_dict has {len(groups)} param groups, "
                         f"this optimizer {len(opt.param_groups)}")
    loaded = []
    for g, (saved, mine) in enumerate(zip(groups, opt.param_groups)):
        if len(saved["params"]) != len(mine["params"]):
            raise ValueError(f"{opt._name}.load_state_dict: param group {g} has {len(saved['params'])} params in "
                             f"the state_dict, {len(mine['params'])} here")
        group = {**{k: _unpack_schedule(v, mine.get(k), k, opt._name) for k, v in saved.items()
                    if k != STEP_COUNT_KEY},
                 **{k: mine[k] for k in STORAGE_OPTIONS if k in mine}}
        # the keys in this group's order (a compiled step guards it), then any the state_dict adds
        group = {**{k: group[k] for k in mine if k in group}, **group}
        opt._fill_missing_options(group)
        missing = sorted(set(opt.defaults) - set(group))
        if missing:
            raise ValueError(f"{opt._name}.load_state_dict: param group {g} of the state_dict lacks {missing} (a "
                             f"state_dict of another optimizer? it has {sorted(k for k in saved if k != 'params')})")
        opt._check_options(group)
        opt._hyperparameters(group, saved_step_count(state_dict) or 0)  # raises on a bad value
        galore.check_options(opt._name, group)
        loaded.append(group)
    index = 0
    for saved, mine in zip(loaded, opt.param_groups):
        options = {**mine, **{k: v for k, v in saved.items() if k != "params"}}
        for saved_id, p in zip(saved["params"], mine["params"]):
            if saved_id in state_dict["state"]:
                _check_loaded_state(opt, p, options, state_dict["state"][saved_id], index)
            index += 1
    return loaded


def load_state_dict(opt, state_dict: dict, torch_load) -> None:
    """Checks everything, then loads with ``torch_load`` (torch's Optimizer.load_state_dict) for the groups and
    places the state itself: torch's loader would cast floating state to each param's dtype."""
    groups = checked_groups(opt, state_dict)
    step_count = saved_step_count(state_dict)
    saved_state = state_dict["state"]
    held = dict(opt.state)
    torch_load({**state_dict, "param_groups": groups, "state": {}})
    opt._galore.clear()
    for saved, group in zip(groups, opt.param_groups):
        for saved_id, p in zip(saved["params"], group["params"]):
            if saved_id in saved_state:
                opt.state[p] = dict(saved_state[saved_id])
                _conform_state(opt, p, group, opt.state[p])
    _refill(opt, held)
    if step_count is None:  # a torch checkpoint: take the step count from the per-tensor steps
        steps = [float(s["step"]) for s in opt.state.values() if "step" in s]
        step_count = int(max(steps)) if steps else 0
    opt._step_count = int(step_count)


def _refill(opt, held: dict) -> None:
    """Where a param's loaded state has the keys of the state it ``held`` before loading, and each value is a plain
    tensor of the held one's dtype, shape and device, the loaded values are copied into the held tensors and the state
    keeps those: a compiled step holds the state tensors in its graph, guarded by identity (FusedOptimizer._init_group),
    so it keeps its graph across load_state_dict instead of compiling another one that holds another copy of the
    state. Values that share memory with a held tensor (a state_dict of this optimizer, its states reordered) are
    cloned before anything is copied."""
    refills = [(p, before, opt.state[p]) for p, before in held.items() if _refillable(before, opt.state.get(p))]
    held_memory = {t.untyped_storage().data_ptr() for _, before, _ in refills for t in before.values()}
    sources = [{key: value.clone() if value.untyped_storage().data_ptr() in held_memory else value
                for key, value in after.items() if value is not before[key]} for _, before, after in refills]
    for (p, before, _), values in zip(refills, sources):
        for key, value in values.items():
            before[key].copy_(value)
        opt.state[p] = before


def _refillable(held: dict, loaded: dict | None) -> bool:
    return bool(loaded) and loaded.keys() == held.keys() and all(map(_same_plain_tensor, held.values(),
                                                                     map(loaded.get, held)))


def _same_plain_tensor(a: Any, b: Any) -> bool:
    return (type(a) is torch.Tensor and type(b) is torch.Tensor
            and (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device))


def saved_step_count(state_dict: dict) -> int | None:
    """The optimizer's step count in a state_dict (None: a torch checkpoint, which has none)."""
    if state_dict.get(STEP_COUNT_KEY) is not None:
        return int(state_dict[STEP_COUNT_KEY])
    counts = {g.get(STEP_COUNT_KEY) for g in state_dict["param_groups"]} - {None}
    if len(counts) > 1:
        raise ValueError(f"load_state_dict: the param groups of the state_dict hold different step counts "
                         f"{sorted(counts)}; one optimizer has one")
    return int(counts.pop()) if counts else None


def state_layout(opt, p: torch.Tensor, group: dict) -> dict:
    """The state ``p`` gets in ``group``, its moments on the meta device: its keys, dtypes and shapes."""
    return opt._init_state(torch.empty_like(p, device="meta"), group)


def _shape_of(x: Any) -> Any:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def _check_loaded_state(opt, p: torch.Tensor, group: dict, state: dict, index: int) -> None:
    """Checks keys and shapes; a moment may come as a float tensor or quantized, whatever this optimizer keeps."""
    where = f"{opt._name}.load_state_dict: state of param {index}"
    if not isinstance(state, dict):
        raise ValueError(f"{where} is a {type(state).__name__}, expected a dict of tensors")
    if "param_shape" in state and state["param_shape"].tolist() != list(p.shape):
        raise ValueError(f"{where} is for a parameter of shape {tuple(state['param_shape'].tolist())}, "
                         f"this one has shape {tuple(p.shape)}")
    like = opt._moment_like(p, group)
    layout = state_layout(opt, p, group)
    expected = set(layout) - {"param_shape"}
    moment_keys = set()
    for name, _ in opt._moment_names(group):
        keys = {name, f"{name}_codes", f"{name}_scales"}
        expected -= keys
        moment_keys |= keys
        if name in state:
            got = state[name]
            if not isinstance(got, torch.Tensor) or got.shape != like.shape:
                raise ValueError(f"{opt._name}.load_state_dict: state[{name!r}] of param {index} has shape "
                                 f"{_shape_of(got)}, expected {tuple(like.shape)}")
        elif f"{name}_codes" in state and f"{name}_scales" in state:
            loaded_format(state, name, like.numel(), True, where)
        else:
            raise ValueError(f"{where} has keys {sorted(state)}, missing {name!r} (a state_dict from another "
                             "optimizer or configuration?)")
    others = set(state) - moment_keys - {"param_shape"}
    if others != expected:
        raise ValueError(f"{where} has keys {sorted(state)}, expected {sorted(layout)} "
                         "(a state_dict from another optimizer or configuration?)")
    for key in expected:  # e.g. GaLore projectors: their shapes follow the rank
        want, got = layout[key], state[key]
        if isinstance(want, torch.Tensor) and (not isinstance(got, torch.Tensor) or got.shape != want.shape):
            raise ValueError(f"{where}: {key!r} has shape {_shape_of(got)}, expected {tuple(want.shape)}")


def _conform_state(opt, p: torch.Tensor, group: dict, state: dict) -> None:
    """After loading: every state tensor on the parameter's device, moments stored as this optimizer keeps them and
    sharded as the param (fastopt/ops/sharding.py). A moment that torch.distributed.checkpoint loaded into this
    optimizer's own state fits already and stays as it is; any other is converted on whole tensors (a sharded one
    is gathered first) and then placed as the param."""
    moments = opt._moment_names(group)
    like = opt._moment_like(p, group)
    layout = state_layout(opt, p, group)
    for name, signed in moments:
        keys = [name] if name in layout else [f"{name}_codes", f"{name}_scales"]
        if all(k in state and _fits(state[k], layout[k]) for k in keys):
            for k in keys:
                state[k] = state[k].to(device=p.device)
            continue
        if name in state:
            value = _whole(state.pop(name)).to(device=sharding.local(p).device)
        else:
            fmt = loaded_format(state, name, like.numel(), signed, "")
            codes, scales = (_whole(state.pop(f"{name}_{k}")).reshape(-1).to(sharding.local(p).device)
                             for k in ("codes", "scales"))
            value = quant.Quantized(codes, scales, fmt)
        want = opt._storage(like, group, signed)
        if isinstance(want, quant.QuantFormat):
            if isinstance(value, quant.Quantized) and value.fmt == want:
                stored = value
            else:
                values = value.dequantize(like.numel()) if isinstance(value, quant.Quantized) else value
                stored = quant.Quantized(*quant.encode(values.float(), want), want)
            state[f"{name}_codes"] = _placed(stored.codes, layout[f"{name}_codes"], p)
            state[f"{name}_scales"] = _placed(stored.scales, layout[f"{name}_scales"], p)
        else:
            quantized = isinstance(value, quant.Quantized)
            values = value.dequantize(like.numel()).view(like.shape) if quantized else value
            state[name] = _placed(values.to(dtype=want), layout[name], p)
    names = {n for n, _ in moments}
    state.pop("param_shape", None)
    if "param_shape" in layout:
        state["param_shape"] = layout["param_shape"]
    for key, want in layout.items():
        if isinstance(want, torch.Tensor) and key not in names and not any(key.startswith(n + "_") for n in names):
            value = state[key]
            if sharding.is_sharded(want) and _fits(value, want):  # e.g. a sharded param's left projector, from DCP
                continue
            value = _whole(value).to(device="cpu" if key in HOST_STATE_KEYS else sharding.local(p).device,
                                     dtype=want.dtype)
            state[key] = _placed(value, want, p)


def _fits(t: Any, want: torch.Tensor) -> bool:
    """Whether loaded tensor ``t`` is stored as the (meta) layout tensor ``want``: dtype, shape and sharding."""
    if not isinstance(t, torch.Tensor) or t.dtype != want.dtype or t.shape != want.shape:
        return False
    if sharding.is_sharded(want) != sharding.is_sharded(t):
        return False
    return not sharding.is_sharded(t) or (t.placements == want.placements and t.device_mesh == want.device_mesh)


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of all of ``t``'s values (a DTensor is gathered)."""
    return t.full_tensor() if sharding.is_sharded(t) else t


def _placed(t: torch.Tensor, want: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Whole tensor ``t`` in the layout of ``want`` (its shape; sharded as ``p`` when ``want`` is a DTensor)."""
    t = t.reshape(want.shape).contiguous()
    return sharding.distribute_like(t, p) if sharding.is_sharded(want) else t


def loaded_format(state: dict, name: str, n: int, signed: bool, where: str) -> quant.QuantFormat:
    """The format of a loaded quantized moment, recognized from its sizes."""
    codes, scales = state[f"{name}_codes"], state[f"{name}_scales"]
    for bits in (4, 8):
        fmt = quant.FORMATS[(bits, signed)]
        if codes.numel() == fmt.code_bytes(n) and scales.numel() == fmt.num_blocks(n) and codes.dtype == torch.uint8:
            return fmt
    raise ValueError(f"{where}: {name}_codes ({codes.numel()} bytes) and {name}_scales ({scales.numel()}) do not "
                     f"hold {n} elements in a 4- or 8-bit format")


def is_schedule(value: Any) -> bool:
    return callable(value) and not isinstance(value, torch.Tensor)


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
