"""fastopt.Adam and fastopt.AdamW: drop-in torch.optim.Adam / AdamW (same arguments, state keys and state_dict
layout; ``step`` is a float32 0-d tensor) on fused kernels. Math: fastopt/ops/adam.py, docs/algorithms.md#adamw-and-adam."""
from __future__ import annotations

import torch

from fastopt.ops import adam_step
from fastopt.optim.base import FusedOptimizer, check_adam_hyperparameters


class Adam(FusedOptimizer):
    """Adam with L2 weight decay coupled into the gradient (``decoupled_weight_decay=True`` makes it AdamW).

    Any of ``lr``, each beta, ``eps`` and ``weight_decay`` may be a float, a 0-d tensor or a schedule
    (``lr=fastopt.schedules.WSD(...)``). ``backend`` None runs each tensor on the fastest implementation for
    its device ("cpu": C++, "triton": GPU); "reference", "cpu" or "triton" forces one. Math is fp32 for
    every dtype. ``state_bits`` stores the moments in the param's dtype (None, torch's behaviour), fp32 (32),
    bf16 (16), or block-quantized 8-bit (2.03 bytes/param for both) or 4-bit (1.06 bytes/param); tensors
    under ``min_quant_size`` elements keep fp32 moments. Per param group, like the hyperparameters.
    ``independent_weight_decay=True`` decays by ``weight_decay`` itself, not ``lr·weight_decay`` (Wortsman et
    al. 2023: weight decay independent of the learning rate; schedule ``weight_decay`` to follow the lr shape).
    """
    hyperparameters = ("lr", "betas", "eps", "weight_decay")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 maximize=False, decoupled_weight_decay=False, independent_weight_decay=False, state_bits=None,
                 min_quant_size=4096, backend=None, foreach=None, fused=None, capturable=False, differentiable=False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        decoupled_weight_decay=decoupled_weight_decay, independent_weight_decay=independent_weight_decay,
                        state_bits=state_bits, min_quant_size=min_quant_size)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused, capturable=capturable,
                         differentiable=differentiable)

    def _fill_missing_options(self, group: dict) -> None:
        super()._fill_missing_options(group)
        for key in ("amsgrad", "maximize", "independent_weight_decay", "state_bits", "min_quant_size"):
            group.setdefault(key, self.defaults[key])
        group.setdefault("decoupled_weight_decay", self.defaults["decoupled_weight_decay"])

    def _check_hyperparameters(self, hp: dict) -> None:
        if hp.get("independent_weight_decay") and not hp.get("decoupled_weight_decay"):
            raise ValueError(f"{self._name}: independent_weight_decay=True needs decoupled weight decay (AdamW)")
        check_adam_hyperparameters(self._name, hp)

    def _galore_weight_decay(self, group: dict, hp: dict):
        """GaLore params: coupled decay enters the gradient before the projection; independent decay is wd itself."""
        if not group["decoupled_weight_decay"]:
            return "l2", hp["weight_decay"]
        return "before", hp["weight_decay"] if group["independent_weight_decay"] else hp["lr"] * hp["weight_decay"]

    def _moment_names(self, group: dict) -> list[tuple[str, bool]]:
        return [("exp_avg", True), ("exp_avg_sq", False)] + ([("max_exp_avg_sq", False)] if group["amsgrad"] else [])

    def _update(self, group, hp, buckets, grad_scale, found_inf) -> None:
        beta1, beta2 = hp["betas"]
        for b in buckets:
            device, backend = b.device, b.backend
            lr = hp["lr"]
            if isinstance(lr, torch.Tensor) and backend == "triton":
                lr = lr.to(device)  # no-op when the user's lr tensor already lives there
            adam_step(b.params, b.grads(), b.moments("exp_avg", True), b.moments("exp_avg_sq", False),
                      b.moments("max_exp_avg_sq", False) if group["amsgrad"] else [],
                      b.states("step"), lr=lr, beta1=beta1, beta2=beta2, eps=hp["eps"],
                      weight_decay=hp["weight_decay"],
                      decoupled=group["decoupled_weight_decay"], maximize=group["maximize"],
                      independent_decay=group["independent_weight_decay"],
                      grad_scale=None if grad_scale is None else grad_scale.to(device, non_blocking=True),
                      found_inf=None if found_inf is None else found_inf.to(device, non_blocking=True),
                      backend=backend, host=b.host)


class AdamW(Adam):
    """AdamW (decoupled weight decay, default 1e-2), drop-in for torch.optim.AdamW. See :class:`Adam`."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, independent_weight_decay=False, state_bits=None, min_quant_size=4096,
                 backend=None, foreach=None, fused=None, capturable=False, differentiable=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         decoupled_weight_decay=True, independent_weight_decay=independent_weight_decay,
                         state_bits=state_bits, min_quant_size=min_quant_size, backend=backend, foreach=foreach,
                         fused=fused, capturable=capturable, differentiable=differentiable)

    def _fill_missing_options(self, group: dict) -> None:
        super()._fill_missing_options(group)
        group["decoupled_weight_decay"] = True
