"""The optimizer database the generic tests run over (like torch's OptimizerInfo): one entry per configuration.
A new optimizer adds its entries here and gets the state_dict, resume, validation, hook, closure, GradScaler
and mixed-dtype tests for free."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

import fastopt


@dataclass
class Case:
    id: str
    make: Callable[..., torch.optim.Optimizer]            # make(params, **overrides)
    torch_twin: Callable[..., torch.optim.Optimizer] | None = None  # the torch.optim equivalent, if any
    bad: list[tuple[dict, str]] = field(default_factory=list)       # (constructor kwargs, error regex)


ADAM_BAD = [
    (dict(lr=-1e-3), r"lr must be >= 0.0, got -0.001"),
    (dict(lr=torch.tensor(-1.0)), r"lr must be >= 0.0, got -1.0"),
    (dict(eps=-1e-8), r"eps must be >= 0.0, got -1e-08"),
    (dict(weight_decay=-0.1), r"weight_decay must be >= 0.0, got -0.1"),
    (dict(betas=(1.0, 0.999)), r"betas\[0\] must be \[0.0, 1.0\), got 1.0"),
    (dict(betas=(0.9, -0.1)), r"betas\[1\] must be \[0.0, 1.0\), got -0.1"),
    (dict(betas=(0.9,)), r"betas must be a pair"),
]

CASES = [
    Case("AdamW", lambda ps, **kw: fastopt.AdamW(ps, **{"lr": 1e-2, **kw}),
         lambda ps, **kw: torch.optim.AdamW(ps, **{"lr": 1e-2, **kw}), ADAM_BAD),
    Case("AdamW-amsgrad-maximize", lambda ps, **kw: fastopt.AdamW(ps, **{"lr": 1e-2, "amsgrad": True, "maximize": True, **kw}),
         lambda ps, **kw: torch.optim.AdamW(ps, **{"lr": 1e-2, "amsgrad": True, "maximize": True, **kw}), ADAM_BAD),
    Case("Adam-l2", lambda ps, **kw: fastopt.Adam(ps, **{"lr": 1e-2, "weight_decay": 0.1, **kw}),
         lambda ps, **kw: torch.optim.Adam(ps, **{"lr": 1e-2, "weight_decay": 0.1, **kw}), ADAM_BAD),
    Case("AdamW-bf16-states", lambda ps, **kw: fastopt.AdamW(ps, **{"lr": 1e-2, "state_bits": 16, **kw}), None,
         ADAM_BAD),
]
STATE_BITS_BAD = [
    (dict(state_bits=3), r"state_bits must be one of \(None, 32, 16, 8, 4\), got 3"),
    (dict(amsgrad=True), r"amsgrad is not supported with state_bits="),
    (dict(min_quant_size=-1), r"min_quant_size must be an integer >= 0, got -1"),
]
for _bits in (8, 4):  # min_quant_size=0: the small test models' tensors are quantized too
    CASES.append(Case(f"AdamW-{_bits}bit", lambda ps, _b=_bits, **kw: fastopt.AdamW(
        ps, **{"lr": 1e-2, "state_bits": _b, "min_quant_size": 0, **kw}), None, ADAM_BAD + STATE_BITS_BAD))
TWIN_CASES = [c for c in CASES if c.torch_twin is not None]
