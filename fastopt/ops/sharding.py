"""DTensor params (FSDP2's ``fully_shard``, docs/distributed.md): each rank steps its own shard with the same kernels.

A param may be a DTensor whose placements are ``Shard(0)`` on at most one mesh dimension and ``Replicate()`` on the
others (FSDP2, and HSDP's 2-D mesh); its grad has the same placements. The kernels see local tensors only: an op
replaces each DTensor by its local shard as it starts (``local``), so nothing is gathered for element-wise work.

State tensors carry the param's sharding, so that torch.distributed.checkpoint saves and reshards them: a float
moment is a DTensor like the param; a quantized moment is two DTensors in the param's row layout, codes of shape
(rows, row_size·bits/8) and scales of shape (rows, row_size/block), sharded on dim 0 as the param is. Row by row
they are exactly the global flat layout of a non-sharded param (blocks never straddle a row because a row holds a
whole number of blocks), so a state saved on N ranks loads on M and the numerics do not depend on the world size.
A sharded param whose rows do not hold a whole number of blocks keeps fp32 moments (``rows_hold_blocks``).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from fastopt.quant.formats import Quantized

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
except ImportError:  # a torch built without distributed support: nothing is ever a DTensor
    DTensor = ()


def is_sharded(t) -> bool:
    """Whether ``t`` is a DTensor (sharded or replicated over a device mesh)."""
    return isinstance(t, DTensor)


def any_sharded(tensors) -> bool:
    """Whether a DTensor is among ``tensors`` (by their types: one check per distinct type)."""
    return any(issubclass(kind, DTensor) for kind in set(map(type, tensors)))


def local(t):
    """The tensor the kernels take: a DTensor's local shard (the same storage), anything else as it is. Outside
    autograd (as in step()) it is the DTensor's own local tensor, the same object at every call, so that the kernels
    keep their checks between steps (fastopt/kernels/checks.py ``Kept``): ``to_local()`` returns a new view of it for a
    Parameter."""
    if not isinstance(t, DTensor):
        return t
    return t.to_local() if torch.is_grad_enabled() else t._local_tensor


def local_lists(*lists: list) -> list[list]:
    """The op arguments as the kernels take them: DTensors, and Quantized moments whose codes and scales are DTensors,
    replaced by their local shards (quantized ones flat, as the kernels index them). Lists without a DTensor pass
    as they are (an optimizer's moments, which its step plan holds as local shards already)."""
    if not any_sharded(lists[0]):
        return list(lists)
    return [list(map(local_moment, xs)) if _holds_sharded(xs) else xs for xs in lists]


def _holds_sharded(xs: list) -> bool:
    """Whether ``xs`` holds a DTensor, or a Quantized moment of DTensors."""
    if Quantized in set(map(type, xs)):
        return any(isinstance(x.codes, DTensor) for x in xs if isinstance(x, Quantized)) or any_sharded(xs)
    return any_sharded(xs)


def local_moment(x):
    if isinstance(x, Quantized) and isinstance(x.codes, DTensor):
        return Quantized(x.codes.to_local().view(-1), x.scales.to_local().view(-1), x.fmt)
    return local(x)


def unsupported(p) -> str | None:
    """Why fastopt cannot step DTensor ``p`` (None if it can, or if ``p`` is no DTensor)."""
    if not isinstance(p, DTensor):
        return None
    shards = [x for x in p.placements if not isinstance(x, Replicate)]
    if len(shards) > 1 or any(type(x) is not Shard or x.dim != 0 for x in shards):
        return (f"its placements are {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh; fastopt steps DTensors "
                "sharded on dim 0 over one mesh dimension (FSDP2's fully_shard, HSDP) and replicated over the others")
    return None


def placement_key(t) -> tuple | None:
    """What decides how ``t`` is stepped and reduced: its mesh and placements (None for a plain tensor). Cheaper than
    ``shard_group``: step() buckets params by it."""
    return (t.device_mesh, t.placements) if isinstance(t, DTensor) else None


def shard_group(p) -> dist.ProcessGroup | None:
    """The process group across which DTensor ``p`` is split (its Shard(0) mesh dimension); None if it is not."""
    if not isinstance(p, DTensor):
        return None
    for dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard):
            return p.device_mesh.get_group(dim)
    return None


def all_reduce_max(values: torch.Tensor, group) -> None:
    """In place, the elementwise max across ``group`` of non-negative float32/float64 ``values`` (maxima of |g|),
    keeping a NaN as the kernels' own max does: compared as their integer bit patterns, whose order is the floats'
    for non-negative values and puts NaN above inf (a float max over the wire may drop a NaN)."""
    dist.all_reduce(values.view(torch.int32 if values.element_size() == 4 else torch.int64), op=dist.ReduceOp.MAX,
                    group=group)


def rows_hold_blocks(p, block: int) -> bool:
    """Whether each row (p[i], flattened) of ``p`` holds a whole number of quantization blocks."""
    return p.dim() > 0 and p.shape[0] > 0 and (p.numel() // p.shape[0]) % block == 0


def like(p, local_tensor: torch.Tensor, global_shape: tuple[int, ...]) -> "DTensor":
    """``local_tensor`` (this rank's rows of a tensor of ``global_shape``) as a DTensor placed as ``p``."""
    shape = torch.Size(global_shape)
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return DTensor.from_local(local_tensor, p.device_mesh, p.placements, run_check=False, shape=shape, stride=stride)


def quantized_shapes(p, fmt) -> tuple[tuple[int, int], tuple[int, int]]:
    """Global shapes of a quantized moment of sharded ``p``: (codes, scales) in its row layout."""
    row = p.numel() // p.shape[0]
    return (p.shape[0], row * fmt.bits // 8), (p.shape[0], row // fmt.block)


def distribute_like(full: torch.Tensor, p) -> "DTensor":
    """A full (unsharded) tensor with ``p``'s rows as a DTensor placed as ``p``; every rank holds ``full`` already,
    so nothing is sent."""
    return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
