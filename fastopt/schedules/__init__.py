"""Learning-rate (and any hyperparameter) schedules as pure functions of the optimizer step.

    sched = WSD(peak=3e-4, total=10000, warmup=500, decay=0.2)
    sched(k)                       # value for the k-th optimizer.step(), k = 0, 1, ...
    sched.values(10000)            # the same, vectorized
    0.5 * sched, Join([...]), Cycle(sched), Ramp(0.0, 1.0, 500) * sched
    from_dict(json.loads(json.dumps(sched.to_dict()))) == sched
    as_lr_scheduler(torch.optim.AdamW(params, lr=0.0), sched)

See README.md beside this file.
"""

from .base import Cycle, Join, Phase, Piecewise, Product, Schedule, from_dict, schedule_type, schedule_types
from .catalog import REX, WSD, WSDS, Constant, Cosine, InfiniteLR, Linear, Ramp, Rewarm, Tabulated
from .law import AnnealingLaw, annealing_areas
from .refine import refine
from .spec import parse
from .torch_compat import ScheduleLR, as_lr_scheduler

__all__ = [
    "Schedule",
    "Piecewise",
    "Phase",
    "schedule_type",
    "schedule_types",
    "Constant",
    "Ramp",
    "Linear",
    "Cosine",
    "WSD",
    "WSDS",
    "InfiniteLR",
    "Rewarm",
    "REX",
    "Tabulated",
    "Join",
    "Cycle",
    "Product",
    "refine",
    "AnnealingLaw",
    "annealing_areas",
    "from_dict",
    "parse",
    "as_lr_scheduler",
    "ScheduleLR",
]
