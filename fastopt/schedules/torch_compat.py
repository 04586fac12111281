"""Drive any torch optimizer's learning rate with a Schedule, through torch's own LRScheduler protocol."""

from __future__ import annotations

from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from .base import Schedule, from_dict


class ScheduleLR(LRScheduler):
    """Sets every param group's lr to `schedule(k)`, k = `last_epoch` = the number of `step()` calls so far.

    The schedule value IS the learning rate (absolute), not a multiplier of the group's initial lr as in LambdaLR.
    Built before the first `optimizer.step()` and stepped after each, the k-th optimizer step uses schedule(k).
    `schedules` holds one schedule per param group, or a single one shared by all groups (also by groups added
    later). `state_dict()` stores the schedules as `to_dict()` specs (plain data, loadable with
    `torch.load(weights_only=True)`), and `load_state_dict` restores them with the step count.
    """

    def __init__(self, optimizer: Optimizer, schedules: Sequence[Schedule], last_epoch: int = -1):
        self.schedules = tuple(schedules)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        if len(self.schedules) == 1:
            return [self.schedules[0](self.last_epoch)] * len(self.optimizer.param_groups)
        return [schedule(self.last_epoch) for schedule in self.schedules]

    _get_closed_form_lr = get_lr  # step(epoch) is exact too: the schedule is a closed form

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["schedules"] = [schedule.to_dict() for schedule in self.schedules]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        self.schedules = tuple(from_dict(spec) for spec in state.pop("schedules"))
        super().load_state_dict(state)


def as_lr_scheduler(optimizer: Optimizer, schedule: Schedule | Sequence[Schedule], last_epoch: int = -1) -> ScheduleLR:
    """A torch LRScheduler that sets each param group's lr to `schedule(k)` (absolute, not a multiplier).

    Works with any `torch.optim.Optimizer`: build it before training, call `.step()` after each
    `optimizer.step()`. Pass a list to give each param group its own schedule.
    """
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"as_lr_scheduler: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    schedules = list(schedule) if isinstance(schedule, (list, tuple)) else [schedule]
    for i, s in enumerate(schedules):
        if not isinstance(s, Schedule):
            raise TypeError(f"as_lr_scheduler: schedule[{i}] must be a fastopt Schedule, got {s!r}")
    groups = len(optimizer.param_groups)
    if isinstance(schedule, (list, tuple)) and len(schedules) != groups:
        raise ValueError(
            f"as_lr_scheduler: got {len(schedules)} schedules for {groups} param groups; pass one per group or one"
        )
    return ScheduleLR(optimizer, schedules, last_epoch)
