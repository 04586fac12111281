"""Per-parameter stepping during the backward pass (GaLore's "per-layer" training), for any fastopt optimizer.

Each parameter is updated as soon as its gradient is complete, and its gradient is freed at once, so that the
full-size gradients of all layers never exist together (with GaLore, the optimizer states are low-rank too).
The training loop stays as it is::

    handle = fastopt.galore.step_in_backward(model, optimizer, accumulation_steps=4)
    for i, (x, y) in enumerate(loader):
        (loss_fn(model(x), y) / 4).backward()   # on every 4th micro-batch, params are updated here
        if (i + 1) % 4 == 0:
            optimizer.step()                    # advances the step count (schedules, Stable-SPAM's T), runs the
            optimizer.zero_grad()               # step hooks, and updates any param whose grad is still there
            scheduler.step()
    handle.remove()                             # back to plain step()

The result is exactly what ``optimizer.step()`` alone would give: each param is stepped with the hyperparameters
and step count of the step() that follows, and a param whose gradient did not arrive ``accumulation_steps`` times
since the last step() (unused in some micro-batch) keeps its gradient and is updated by step() as usual.
Not supported: GradScaler (the gradients are still scaled when the hooks run), closures that re-run backward, and
distributed gradients: DDP (a DistributedDataParallel model is refused) and FSDP2 (DTensor params are refused) reduce
the gradients after they are complete on a rank, so a hook would step with an unreduced one.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from fastopt.ops import sharding


class BackwardStepping:
    """The handle :func:`step_in_backward` returns; ``remove()`` detaches the hooks."""

    def __init__(self, params: list[torch.Tensor], optimizer, accumulation_steps: int):
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self._arrivals: dict[torch.Tensor, int] = {}  # gradients accumulated into each param since the last step()
        self._handles = [p.register_post_accumulate_grad_hook(self._on_gradient) for p in params]
        self._handles.append(optimizer.register_step_post_hook(lambda *args: self._arrivals.clear()))

    def _on_gradient(self, p: torch.Tensor) -> None:
        arrived = self._arrivals.get(p, 0) + 1
        self._arrivals[p] = arrived
        if arrived % self.accumulation_steps == 0:
            self.optimizer.step_param(p)
            p.grad = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def step_in_backward(model_or_params: torch.nn.Module | Iterable[torch.Tensor], optimizer,
                     accumulation_steps: int = 1) -> BackwardStepping:
    """Updates each of the params (those of a module that require grad) inside ``backward()`` on the
    ``accumulation_steps``-th gradient since the last ``optimizer.step()``, then frees its gradient. ``optimizer`` is
    a fastopt optimizer holding every one of these params. See the module docstring for the training loop."""
    if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"step_in_backward: accumulation_steps must be an integer >= 1, got {accumulation_steps!r}")
    if not hasattr(optimizer, "step_param"):
        raise TypeError(f"step_in_backward: optimizer must be a fastopt optimizer, got {type(optimizer).__name__}")
    if isinstance(model_or_params, torch.nn.parallel.DistributedDataParallel):
        raise ValueError("step_in_backward: the model is wrapped in DistributedDataParallel, which all-reduces the "
                         "gradients after they are complete on this rank: a param stepped in backward would use its "
                         "unreduced gradient; call optimizer.step() after backward() instead")
    params = model_or_params.parameters() if isinstance(model_or_params, torch.nn.Module) else model_or_params
    params = [p for p in params if p.requires_grad]
    for i, p in enumerate(params):
        if sharding.is_sharded(p):
            raise ValueError(f"step_in_backward: parameter {i} (shape {tuple(p.shape)}) is a DTensor (FSDP2): its "
                             "gradient is reduce-scattered into it after backward, not accumulated where the hook "
                             "runs; call optimizer.step() after backward() instead")
    held = {p for group in optimizer.param_groups for p in group["params"]}
    for i, p in enumerate(params):
        if p not in held:
            raise ValueError(f"step_in_backward: parameter {i} (shape {tuple(p.shape)}) is not in the optimizer")
    return BackwardStepping(params, optimizer, accumulation_steps)
