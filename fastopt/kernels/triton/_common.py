"""What fastopt's Triton kernels share: rounding stores, hyperparameters read in the kernel, and multi-tensor launches.

**Multi-tensor launches.** One launch steps every tensor of a group (same dtypes, same moment storage), whatever their
number. Its programs are the tensors' blocks laid end to end: a block map (int32, one entry per program, cached per
list of sizes) names each program's tensor, and a table (int64, one row per tensor: its data pointers and counters'
pointers, then its element count and its first program) gives that tensor's pointers, which the kernel casts to the
element types of its typed ``*_like`` arguments. Both live on the device and are cached by their contents: a step
whose tensors have not moved uploads nothing, and a CUDA graph replays with the tables it was captured with (a table
that a launch reads while a graph is being captured is kept for the life of the process: the graph holds its address,
and the cache must never free it). Uploads go through pinned memory, asynchronously: nothing waits for the device.
A call given a ``Kept`` (fastopt/kernels/checks.py) that holds reuses its launch groups: of its tensors, it reads the
grads' data pointers and nothing else.

**Hyperparameters** reach every kernel in ``hp``, a float64 tensor on the params' device in the op's layout
(fastopt/ops/library.py HP_LAYOUTS), which the kernels read there: nothing recompiles when a value changes and nothing
reads the device. Tensor hyperparameters (a 0-d lr for CUDA graphs) are stacked into it on the device by the caller;
numbers come as a CPU tensor, uploaded once per distinct set of values (``device_hp``).
"""
from __future__ import annotations

import functools
import itertools
from collections import OrderedDict
from typing import Any

import torch
import triton
import triton.language as tl

from fastopt.kernels import checks

BLOCK = 1024        # elements per program of an update (quantized storage: whole quantization blocks, the same count)
NUM_WARPS = 4
_CACHE_SIZE = 1024  # tables, block maps and hp uploads kept per process (GaLore steps each projected param alone)


@triton.jit
def load(ptr, mask, FULL: tl.constexpr):
    """tl.load, masked unless the program's block lies wholly inside its tensor (FULL): an unmasked load of an
    aligned pointer is what the compiler turns into 128-bit accesses."""
    if FULL:
        return tl.load(ptr)
    return tl.load(ptr, mask=mask, other=0)


@triton.jit
def store(ptr, x, mask, FULL: tl.constexpr):
    if FULL:
        tl.store(ptr, x)
    else:
        tl.store(ptr, x, mask=mask)


@triton.jit
def store_rounded(ptr, x, mask, FULL: tl.constexpr):
    """Stores fp32 ``x`` in ``ptr``'s dtype, rounding to nearest even. bf16 is rounded explicitly (NaN stays
    NaN): Triton's interpreter truncates fp32→bf16, so this keeps interpreter and GPU results identical."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)
        store(ptr, rounded.to(tl.bfloat16, bitcast=True), mask, FULL)
    else:
        store(ptr, x.to(ptr.dtype.element_ty), mask, FULL)


@triton.jit
def program_tensor(table_ptr, block_map_ptr, COLUMNS: tl.constexpr, N: tl.constexpr, FIRST: tl.constexpr):
    """(this program's tensor, its table row, its element count, this program's block within it), with the table's
    element count in column N and the tensor's first program of this launch in column FIRST."""
    pid = tl.program_id(0)
    t = tl.load(block_map_ptr + pid)
    row = table_ptr + t.to(tl.int64) * COLUMNS
    return t, row, tl.load(row + N), pid - tl.load(row + FIRST)


@triton.jit
def column(row, index: tl.constexpr, like, ALIGNED: tl.constexpr):
    """Column ``index`` of a table row as a pointer of ``like``'s type; ALIGNED: the launch checked that it is a
    multiple of 16 bytes, and the compiler is told so (tables hide what a kernel argument would show)."""
    ptr = tl.load(row + index).to(like.dtype)
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def f32_column(row, index: tl.constexpr):
    """Column ``index`` of a table row as a float32 pointer (counters, statistics, quantization scales)."""
    return tl.load(row + index).to(tl.pointer_type(tl.float32))


@triton.jit
def advance_kernel(table_ptr, count, found_inf_ptr, COLUMNS: tl.constexpr, FIRST: tl.constexpr, SECOND: tl.constexpr,
                   HAS_FOUND_INF: tl.constexpr, R: tl.constexpr):
    """One program: every tensor's counters in columns FIRST (and SECOND, unless it is -1) += 1 − found_inf, as
    torch's fused optimizers count a step that GradScaler skips."""
    one = 1.0
    if HAS_FOUND_INF:
        one = tl.where(tl.load(found_inf_ptr) == 0, 1.0, 0.0)
    start = 0
    while start < count:
        t = start + tl.arange(0, R)
        live = t < count
        rows = table_ptr + t.to(tl.int64) * COLUMNS
        first = tl.load(rows + FIRST, mask=live, other=0).to(tl.pointer_type(tl.float32))
        tl.store(first, tl.load(first, mask=live) + one, mask=live)
        if SECOND >= 0:
            second = tl.load(rows + SECOND, mask=live, other=0).to(tl.pointer_type(tl.float32))
            tl.store(second, tl.load(second, mask=live) + one, mask=live)
        start += R


# ---- host side ------------------------------------------------------------------------------------------------------
_tables: OrderedDict = OrderedDict()  # the least recently used entry goes first when the cache is full
_captured: dict = {}  # entries read while a CUDA graph was being captured: never evicted


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _cached(key, build) -> tuple[torch.Tensor, Any]:
    """``build()`` gives a CPU tensor and what else its contents tell (None if nothing); both are cached by ``key``
    (which starts with the device), the tensor uploaded to that device."""
    entry = _captured.get(key) or _tables.get(key)
    device = key[0]
    if entry is None:
        host, info = build()
        if device.type == "cpu":
            entry = (host, host, info)
        else:  # pinned, so that the copy is asynchronous; kept with the result, which a copy in flight still reads
            host = host.pin_memory()
            entry = (host.to(device, non_blocking=True), host, info)
        _tables[key] = entry
        if len(_tables) > _CACHE_SIZE:
            _tables.popitem(last=False)
    elif key in _tables:
        _tables.move_to_end(key)
    if _capturing(device) and key not in _captured:  # a graph now holds its address: out of the evictable cache
        _captured[key] = _tables.pop(key, entry)
    return entry[0], entry[2]


def _by_dtypes(param_dtypes: list[int], state_dtypes: list[int]) -> list[list[int] | None]:
    """Tensor indices grouped by (param dtype, moment dtype), one launch each: ``[None]`` when all tensors share them
    (the usual case, found without a Python step per tensor)."""
    kinds = list(zip(param_dtypes, state_dtypes))
    if kinds.count(kinds[0]) == len(kinds):
        return [None]
    groups: dict[tuple, list[int]] = {}
    for i, kind in enumerate(kinds):
        groups.setdefault(kind, []).append(i)
    return list(groups.values())


def _pick(values: list, idx: list[int] | None, count: int) -> list:
    """Entries ``idx`` of a column of ``count`` (all of them for None); an empty column (a list the op was not given)
    gives zeros, the table's "absent"."""
    if not values:
        return [0] * (count if idx is None else len(idx))
    return values if idx is None else [values[i] for i in idx]


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _layout(sizes: tuple[int, ...], blocks: tuple[int, ...]) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Per entry of ``blocks`` (elements per program): each tensor's program count and first program, and the total."""
    counts = [[-(-n // block) for n in sizes] for block in blocks]
    return counts, [[0, *itertools.accumulate(c)][:-1] for c in counts], [sum(c) for c in counts]


def _pointers(column: list) -> tuple[int, ...]:
    """A table column as ints, with one map over it: tensors by data pointer, ints as they are."""
    return tuple(map(torch.Tensor.data_ptr, column)) if column and isinstance(column[0], torch.Tensor) else tuple(column)


GRADS = 1  # the grads' column in every op's table: the one column that a kept launch reads again at each call


class Launch:
    """Multi-tensor launches over one group of tensors. ``columns`` holds the table's columns, one entry per tensor
    (tensors, by data pointer, or ints: 0 where the launch lacks it); the table adds each tensor's element count
    (``sizes``, checked) and, per entry of ``blocks`` (elements per program), its first program. ``for_grads`` reads
    the grads' data pointers and finds this call's table (``table``, ``aligned``) and block maps (``maps[k]``, with
    ``programs[k]`` programs); what the pointers and sizes determine (the table's other columns, the block maps,
    whether the streamed tensors are aligned) is computed only when a table is first built. Tables are cached by their
    contents."""

    def __init__(self, columns: list[list], sizes: tuple[int, ...], device: torch.device, idx: list[int] | None,
                 blocks: tuple[int, ...] = (BLOCK,), streams: int = 0):
        if any(len(values) != len(sizes) for values in columns):  # zip below would drop rows: a table to crash on
            raise ValueError(f"Launch: columns of {list(map(len, columns))} entries; each needs one per tensor")
        self._counts, self._firsts, self.programs = _layout(sizes, blocks)
        self.columns = len(columns) + 1 + len(blocks)
        self.count = len(sizes)
        self._idx, self._sizes, self._streams = idx, sizes, streams
        self._pointers = [() if k == GRADS else _pointers(col) for k, col in enumerate(columns)]
        self._key = (device, "table", blocks, streams, sizes, *self._pointers)  # and the grads' pointers
        self._map_keys = [(device, "map", block, sizes) for block in blocks]
        self.table = self.aligned = self.maps = None

    def for_grads(self, grads: list[torch.Tensor]) -> Launch:
        """This launch set up for ``grads`` (all of the op's; this group's are picked)."""
        grad_pointers = _pointers(grads if self._idx is None else [grads[i] for i in self._idx])

        def build() -> tuple[torch.Tensor, bool]:
            pointers = [grad_pointers if k == GRADS else column for k, column in enumerate(self._pointers)]
            values = list(itertools.chain.from_iterable(zip(*pointers, self._sizes, *self._firsts)))
            # the first `streams` columns are the tensors the kernels stream through: 16-byte aligned (as fresh torch
            # allocations are; a view may not be) lets the kernels use 128-bit accesses
            aligned = not any(map((15).__and__, itertools.chain(*pointers[:self._streams])))
            return torch.tensor(values, dtype=torch.int64), aligned

        self.table, self.aligned = _cached((*self._key, grad_pointers), build)
        self.maps = [_cached(key, lambda c=c: (torch.repeat_interleave(
            torch.arange(len(c), dtype=torch.int32), torch.tensor(c, dtype=torch.int64)), None))[0]
            for key, c in zip(self._map_keys, self._counts)]
        return self


def launch_groups(columns: list[list], checked: tuple[list[int], list[int], list[int]], device: torch.device, *,
                  blocks: tuple[int, ...] = (BLOCK,), streams: int = 0) -> list[tuple[int, Launch]]:
    """(the index of one of its tensors, Launch) per group of tensors with the same dtypes: ``columns`` are the
    table's columns over all the op's tensors (params first, grads second, first moments third; an empty list for
    one the op was not given), ``checked`` what ``fastopt.kernels.checks.step_tensors`` returned for them (sizes and
    dtypes). Each call sets its launches up with ``Launch.for_grads``. The result holds no tensor (a Kept keeps it
    and must keep nothing alive): the index finds this call's param and moment, which give the kernels their types."""
    numels, param_dtypes, state_dtypes = checked
    groups = []
    for idx in _by_dtypes(param_dtypes, state_dtypes):
        picked = [_pick(values, idx, len(numels)) for values in columns]
        groups.append((0 if idx is None else idx[0],
                       Launch(picked, tuple(_pick(numels, idx, len(numels))), device, idx, blocks, streams)))
    return groups


def checked_launches(kept, columns: list[list], layout: dict, op: str, device: torch.device, params, grads,
                     *step_args) -> list[tuple[torch.Tensor, torch.Tensor, Launch]]:
    """(a param, a moment, Launch) per group of ``launch_groups(columns, ..., **layout)`` for one call of step op
    ``op``, each set up for ``grads``: its tensors checked once while ``kept`` holds (fastopt.kernels.checks.checked_once,
    given ``step_args`` after the grads)."""
    groups = checks.checked_once(kept, lambda checked: launch_groups(columns, checked, device, **layout), op, device,
                                 params, grads, *step_args)
    return [(columns[0][i], columns[2][i], launch.for_grads(grads)) for i, launch in groups]


def advance(launch: Launch, first: int, second: int = -1, found_inf: torch.Tensor | None = None) -> None:
    """Counters of columns ``first`` (and ``second``) of every tensor of ``launch`` += 1 − found_inf: one launch."""
    if launch.count:
        advance_kernel[(1,)](launch.table, launch.count, launch.table if found_inf is None else found_inf,
                             COLUMNS=launch.columns, FIRST=first, SECOND=second, HAS_FOUND_INF=found_inf is not None,
                             R=128, num_warps=NUM_WARPS)


def device_hp(hp: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``hp`` (float64) on ``device``: as it is if it is there, else uploaded (cached by its values)."""
    if hp.device == device:
        return hp
    values = tuple(hp.tolist())  # a CPU tensor: reading it waits for nothing
    return _cached((device, "hp", values), lambda: (torch.tensor(values, dtype=torch.float64), None))[0]
