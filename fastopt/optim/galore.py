"""fastopt.GaLoreAdamW: galore-torch's GaLoreAdamW under the same name, arguments and defaults, on fastopt's AdamW.

GaLore itself is a capability of every fastopt optimizer (fastopt/optim/base.py, fastopt/galore/): this class only
sets galore-torch's defaults and, with ``compat="official"``, its AdamW's arithmetic.
"""
from __future__ import annotations

import math

import torch

from fastopt.galore import policy as galore
from fastopt.ops.common import as_number, check_compat
from fastopt.optim.adam import AdamW
from fastopt.optim.base import FusedOptimizer


class GaLoreAdamW(AdamW):
    """AdamW whose param groups with a ``rank`` keep their 2-D params' moments in a low-rank subspace of the
    gradient (GaLore, Zhao et al. 2024). Drop-in for ``galore_torch.GaLoreAdamW``: same defaults (eps 1e-6, no weight
    decay) and the same group options, ``{"params": ..., "rank": 128, "update_proj_gap": 200, "scale": 0.25,
    "proj_type": "std"}``; the keyword arguments ``rank`` (None: only groups that give one are projected),
    ``update_proj_gap``, ``scale``, ``proj_type``, ``refresh``, ``moments`` and ``stagger`` are defaults that a group's
    own value overrides. Non-2-D params and groups without a rank get plain AdamW.

    - ``refresh``: "svd" (galore-torch's exact projector), "randomized" (warm-started subspace iteration: the same
      subspace on decaying spectra, an order of magnitude faster on large matrices), "random" (a seeded random
      orthonormal basis, only the seed in the state). ``stagger=True`` spreads the layers' refreshes over the gap.
    - ``moments`` when the subspace changes: "keep" (galore-torch), "reset" (zeroed, fresh bias correction),
      "reproject" (m ← P_newᵀ·P_old·m; v by the squared map).
    - ``compat=None`` (default) is torch.optim.AdamW's arithmetic: eps added to the bias-corrected √v̂, weight decay
      before the update. ``compat="official"`` is galore-torch's (transformers' AdamW): eps added to √v before bias
      correction — with eps 1e-6 this changes the first steps' updates by percents when gradients are small — and
      p ← p − lr·wd·p after the update. Its bias correction of eps uses the optimizer's step count (galore-torch
      counts per param; the two agree unless a param skips steps).
    - ``state_bits`` (8/4-bit low-rank moments), schedules, ``backend``, ``amsgrad``, ``maximize`` as in
      :class:`fastopt.AdamW`. With GaLore groups, GradScaler unscales the gradients itself and skips step() on inf.

    Differences from galore-torch, beyond the options above: the state holds tensors only (projector matrices, or a
    seed, and a host-side step count ``proj_step``), so it loads with ``torch.load(weights_only=True)`` on any device;
    the projection and the update run as matmuls into the parameter (no full-size temporaries); a refresh on a
    non-finite gradient is skipped instead of failing in the SVD; ``proj_type="reverse_std"`` works for wide matrices
    at rank ≥ rows (galore-torch's project_back picks the wrong side there).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, amsgrad=False, *,
                 rank=None, update_proj_gap=200, scale=0.25, proj_type="std", refresh="svd", moments="keep",
                 stagger=False, compat=None, maximize=False, state_bits=None, min_quant_size=4096, backend=None,
                 foreach=None, fused=None, capturable=False, differentiable=False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        decoupled_weight_decay=True, independent_weight_decay=False, state_bits=state_bits,
                        min_quant_size=min_quant_size, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                        proj_type=proj_type, refresh=refresh, moments=moments, stagger=stagger, compat=compat)
        FusedOptimizer.__init__(self, params, defaults, backend=backend, foreach=foreach, fused=fused,
                                capturable=capturable, differentiable=differentiable)

    def _fill_missing_options(self, group: dict) -> None:
        super()._fill_missing_options(group)
        group.setdefault("compat", None)
        for key, value in galore.DEFAULTS.items():
            group.setdefault(key, value)

    def _check_hyperparameters(self, hp: dict) -> None:
        super()._check_hyperparameters(hp)
        check_compat(self._name, hp.get("compat"))

    def _galore_weight_decay(self, group: dict, hp: dict):
        rule, rate = super()._galore_weight_decay(group, hp)
        return ("after", rate) if group["compat"] == "official" else (rule, rate)

    def _step_rule_names(self, group: dict) -> tuple[str, ...]:
        return ("eps",) if group["compat"] == "official" else ()

    def _step_rules(self, group: dict, hp: dict, step: int) -> dict:
        """compat="official", transformers' AdamW: lr·√(1−β2^t)/(1−β1^t) · m/(√v + eps) is torch's form with
        eps/√(1−β2^t) for eps, t = step + 1 (the optimizer's count: galore-torch counts per param)."""
        if group["compat"] != "official":
            return {}
        beta2 = as_number(hp["betas"][1])
        return {"eps": as_number(hp["eps"]) / math.sqrt(1 - beta2 ** (step + 1))}

    def _update(self, group, hp, buckets, grad_scale, found_inf) -> None:
        if group["compat"] != "official":
            return super()._update(group, hp, buckets, grad_scale, found_inf)
        super()._update(group, {**hp, "weight_decay": 0.0}, buckets, grad_scale, found_inf)
        rate = hp["lr"] * hp["weight_decay"]
        if isinstance(rate, torch.Tensor) or rate != 0:  # decay after the update (none on a step GradScaler skips)
            for p in (p for b in buckets for p in b.params):
                skip = None if found_inf is None else found_inf.to(p.device, non_blocking=True)
                p.mul_(1 - rate if skip is None else 1 - rate * (1 - skip))


__all__ = ["GaLoreAdamW"]
