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
# Stable-SPAM and SPAM (no torch twin). Small reset intervals so that the 10- to
# 30-step generic tests cross several momentum resets.
STABLE_SPAM_BAD = ADAM_BAD + [
    (dict(gamma1=1.0), r"gamma1 must be \[0.0, 1.0\), got 1.0"),
    (dict(gamma2=-0.5), r"gamma2 must be \[0.0, 1.0\), got -0.5"),
    (dict(gamma3=-0.1), r"gamma3 must be \[0.0, 1.0\), got -0.1"),
    (dict(update_proj_gap=-1), r"update_proj_gap must be >= 0, got -1.0"),
    (dict(update_proj_gap=2.5), r"update_proj_gap must be a whole number of steps, got 2.5"),
    (dict(total_T=0), r"total_T must be >= 1, got 0.0"),
    (dict(total_T="1000"), r"total_T must be a whole number of steps, got '1000'"),
    (dict(eta_min=1.5), r"eta_min must be \[0.0, 1.0\], got 1.5"),
    (dict(compat="paper"), r"compat must be one of \(None, 'official'\), got 'paper'"),
]
SPAM_BAD = ADAM_BAD + [
    (dict(warmup_steps=-1), r"warmup_steps must be >= 0, got -1.0"),
    (dict(threshold=-1), r"threshold must be >= 0.0, got -1.0"),
    (dict(DeltaT=-1), r"DeltaT must be >= 0, got -1.0"),
    (dict(grad_accu_steps=-1), r"grad_accu_steps must be >= 0, got -1.0"),
]
LOW_BIT_BAD = [bad for bad in STATE_BITS_BAD if "amsgrad" not in bad[0]]
CASES += [
    Case("StableSPAM", lambda ps, **kw: fastopt.StableSPAM(ps, **{"lr": 1e-2, "update_proj_gap": 5, **kw}), None,
         STABLE_SPAM_BAD),
    Case("StableSPAM-official", lambda ps, **kw: fastopt.StableSPAM(ps, **{
        "lr": 1e-2, "update_proj_gap": 5, "total_T": 20, "weight_decay": 0.1, "compat": "official", **kw}), None,
         STABLE_SPAM_BAD),
    Case("StableSPAM-4bit", lambda ps, **kw: fastopt.StableSPAM(ps, **{
        "lr": 1e-2, "update_proj_gap": 5, "state_bits": 4, "min_quant_size": 0, **kw}), None,
         STABLE_SPAM_BAD + LOW_BIT_BAD),
    Case("SPAM", lambda ps, **kw: fastopt.SPAM(ps, **{
        "lr": 1e-2, "weight_decay": 0.1, "DeltaT": 6, "warmup_steps": 3, "grad_accu_steps": 2, **kw}), None, SPAM_BAD),
    Case("SPAM-4bit", lambda ps, **kw: fastopt.SPAM(ps, **{
        "lr": 1e-2, "DeltaT": 6, "warmup_steps": 3, "grad_accu_steps": 2, "state_bits": 4, "min_quant_size": 0,
        **kw}), None, SPAM_BAD + LOW_BIT_BAD),
]
TWIN_CASES = [c for c in CASES if c.torch_twin is not None]
