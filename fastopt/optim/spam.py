"""fastopt.StableSPAM and fastopt.SPAM: thin classes over fastopt/ops/spam.py (math: docs/algorithms.md#stable-spam,
docs/algorithms.md#spam)."""
from __future__ import annotations

import torch

from fastopt.ops.common import as_number, check_compat, compute_dtype
from fastopt.ops.spam import spam_schedule, spam_step, stable_spam_schedule, stable_spam_step
from fastopt.optim.base import FusedOptimizer, check_adam_hyperparameters, check_range, is_schedule


def check_count(owner: str, name: str, value, low: int) -> None:
    """A number of steps: a whole number >= low (a float such as 500.0 from a schedule is fine; None: an unread
    tensor, see check_range)."""
    if value is None:
        return
    if is_schedule(value) or isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise ValueError(f"{owner}: {name} must be a whole number of steps, got {value!r}")
    check_range(owner, name, value, low)
    if as_number(value) != int(as_number(value)):
        raise ValueError(f"{owner}: {name} must be a whole number of steps, got {as_number(value)}")


class _SpamBase(FusedOptimizer):
    """What StableSPAM and SPAM share: Adam's moments and hyperparameters."""

    def _moment_names(self, group: dict) -> list[tuple[str, bool]]:
        return [("exp_avg", True), ("exp_avg_sq", False)]

    def _common(self, device: torch.device, hp: dict, grad_scale, found_inf) -> dict:
        beta1, beta2 = hp["betas"]
        lr = hp["lr"].to(device) if isinstance(hp["lr"], torch.Tensor) else hp["lr"]  # no-op when already there
        return dict(lr=lr, beta1=beta1, beta2=beta2, eps=hp["eps"], weight_decay=hp["weight_decay"],
                    grad_scale=None if grad_scale is None else grad_scale.to(device, non_blocking=True),
                    found_inf=None if found_inf is None else found_inf.to(device, non_blocking=True))


class StableSPAM(_SpamBase):
    """Stable-SPAM (Huang et al. 2025, arXiv 2502.17055): Adam on gradients tamed by AdaClip (entries above a
    running, bias-corrected max of max|g| are scaled down), AdaGN (each tensor's gradient rescaled to running
    statistics of its norm) and a momentum reset every ``update_proj_gap`` steps (0: never). ``gamma3`` is θ of
    AdaClip, ``gamma1``/``gamma2`` the AdaGN rates. ``total_T`` multiplies β1 and γ1 by the cosine factor s, from
    1.0 towards ``eta_min`` over total_T steps (CosineAnnealingLR(T_max=total_T+1, eta_min) at the step count T,
    not clamped past total_T); it does not touch the lr. Decoupled weight decay is applied first.

    Any of ``lr``, each beta, ``eps``, ``weight_decay``, the gammas and ``update_proj_gap`` may be a float, a 0-d
    tensor or a schedule (``sched(k)`` at the k-th step(), from 0; a schedule on β1 or γ1 is multiplied by s too,
    and ``update_proj_gap`` must take whole values: a reset happens when T is a multiple of its current value).
    On a GPU, tensor lr, betas, eps, weight decay and gammas stay on the device; a tensor ``update_proj_gap`` is
    read on the host at each step, since it decides which kernels run.

    ``compat="official"`` reproduces the authors' code (TianjinYellow/StableSPAM) step for step, quirks included.
    The default, ``compat=None``, fixes two of them:

    - the reset takes effect on its own step: at T % update_proj_gap == 0 the update uses zeroed moments with
      t = 1 (a fresh Adam step); the official code zeros the moments after that step's update (which still uses
      the old moments, with t = 1 bias correction), so the zeros are first used on the next step, with t = 2;
    - AdaClip and AdaGN bias-correct their statistics with their own counter (``state["stats_step"]``) that
      never resets; the official code uses Adam's t, which restarts at each reset, inflating the clip threshold
      by 1/(1−θ^t) (about 500x at t = 2, so AdaClip goes nearly dormant after every reset).

    Both modes keep the same state (``step`` = Adam's t, ``stats_step``, ``m_norm``, ``v_norm``, ``m_max`` as 0-d
    tensors; ``exp_avg``, ``exp_avg_sq`` as moments); before the first reset they agree bit for bit.
    ``state_bits`` / ``min_quant_size`` store the moments as in :class:`fastopt.AdamW` (4-bit, 8-bit, bf16, fp32);
    the scalar statistics stay float32 (float64 for float64 params). ``backend`` as in :class:`fastopt.AdamW`:
    each step reduces every gradient on its device (max|g|, then the norm of the clipped gradient, re-reading only
    the chunks that hold clipped entries) and then runs one fused pass per tensor; nothing waits for the host.
    """
    hyperparameters = ("lr", "betas", "eps", "weight_decay", "gamma1", "gamma2", "gamma3", "update_proj_gap")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, gamma1=0.7, gamma2=0.9,
                 gamma3=0.999, update_proj_gap=1000, total_T=None, eta_min=0.5, *, compat=None, state_bits=None,
                 min_quant_size=4096, backend=None, foreach=None, fused=None, capturable=False, differentiable=False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, gamma1=gamma1, gamma2=gamma2,
                        gamma3=gamma3, update_proj_gap=update_proj_gap, total_T=total_T, eta_min=eta_min,
                        compat=compat, state_bits=state_bits, min_quant_size=min_quant_size)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused, capturable=capturable,
                         differentiable=differentiable)

    def _check_hyperparameters(self, hp: dict) -> None:
        check_adam_hyperparameters(self._name, hp)
        for name in ("gamma1", "gamma2", "gamma3"):
            check_range(self._name, name, hp[name], 0.0, 1.0, high_open=True)
        check_count(self._name, "update_proj_gap", hp["update_proj_gap"], 0)
        if hp["total_T"] is not None:
            check_count(self._name, "total_T", hp["total_T"], 1)
        check_range(self._name, "eta_min", hp["eta_min"], 0.0, 1.0)
        check_compat(self._name, hp["compat"])

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = super()._init_state(p, group)
        state["stats_step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for key in ("m_norm", "v_norm", "m_max"):
            state[key] = torch.zeros((), dtype=compute_dtype(p), device=p.device)
        return state

    def _step_rule_names(self, group: dict) -> tuple[str, ...]:
        return ("scale", "reset")

    def _step_rules(self, group: dict, hp: dict, step: int) -> dict:
        """s (the cosine factor of β1 and γ1) and whether this step resets the moments: T = step + 1, as the
        official counter is incremented before the step (1 on the first step)."""
        total_T = None if hp["total_T"] is None else int(as_number(hp["total_T"]))
        s, reset = stable_spam_schedule(step + 1, total_T=total_T, eta_min=as_number(hp["eta_min"]),
                                        update_proj_gap=int(as_number(hp["update_proj_gap"])))
        return {"scale": s, "reset": float(reset)}

    def _update(self, group, hp, buckets, grad_scale, found_inf) -> None:
        for b in buckets:
            stable_spam_step(b.params, b.grads(), b.moments("exp_avg", True), b.moments("exp_avg_sq", False),
                             b.states("step"), b.states("stats_step"), b.states("m_norm"), b.states("v_norm"),
                             b.states("m_max"), gamma1=hp["gamma1"], gamma2=hp["gamma2"],
                             gamma3=hp["gamma3"], scale=hp["scale"], reset=hp["reset"], compat=hp["compat"],
                             backend=b.backend, host=b.host, **self._common(b.device, hp, grad_scale, found_inf))


class SPAM(_SpamBase):
    """SPAM (Huang et al. 2025, ICLR; TianjinYellow/SPAM-Optimizer): AdamW with a momentum reset every ``DeltaT``
    steps (0: never), after which the update is scaled by a cosine warmup from 0.01 back to 1 over
    ``warmup_steps`` steps, and spike-aware clipping: entries with g² > ``threshold``·v are clipped to
    sign(g)·sqrt(threshold·v) (threshold 0: off), from step ``grad_accu_steps`` on and paused for that many steps
    after each reset. Adam's bias correction keeps counting through resets; weight decay is applied after the
    update. Exactly the authors' algorithm, docs/algorithms.md#spam.

    Any of ``lr``, each beta, ``eps`` and ``weight_decay`` may be a float, a 0-d tensor or a schedule.
    ``state_bits`` / ``min_quant_size`` and ``backend`` as in :class:`fastopt.AdamW` (one fused pass per tensor).
    Note (as in the authors' code): a tensor whose first gradient arrives after step ``grad_accu_steps``, outside
    a pause, has v = 0, so clipping zeros its gradient until the next reset's pause.
    """
    hyperparameters = ("lr", "betas", "eps", "weight_decay")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, warmup_steps=150,
                 threshold=5000, DeltaT=500, grad_accu_steps=20, *, state_bits=None, min_quant_size=4096,
                 backend=None, foreach=None, fused=None, capturable=False, differentiable=False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps,
                        threshold=threshold, DeltaT=DeltaT, grad_accu_steps=grad_accu_steps, state_bits=state_bits,
                        min_quant_size=min_quant_size)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused, capturable=capturable,
                         differentiable=differentiable)

    def _check_hyperparameters(self, hp: dict) -> None:
        check_adam_hyperparameters(self._name, hp)
        check_range(self._name, "threshold", hp["threshold"], 0.0)
        for name in ("warmup_steps", "DeltaT", "grad_accu_steps"):
            check_count(self._name, name, hp[name], 0)

    def _galore_weight_decay(self, group: dict, hp: dict):
        """GaLore params decay after the update, as SPAM's own step does."""
        return "after", hp["lr"] * hp["weight_decay"]

    def _step_rule_names(self, group: dict) -> tuple[str, ...]:
        return ("scale", "reset", "clip")

    def _step_rules(self, group: dict, hp: dict, step: int) -> dict:
        """The update scale s, whether this step resets the moments, whether it clips spikes: SPAM's counter T is
        incremented after the step (0 on the first step)."""
        s, reset, clip = spam_schedule(step, warmup_steps=int(as_number(hp["warmup_steps"])),
                                       delta_t=int(as_number(hp["DeltaT"])),
                                       grad_accu_steps=int(as_number(hp["grad_accu_steps"])),
                                       threshold=as_number(hp["threshold"]))
        return {"scale": s, "reset": float(reset), "clip": float(clip)}

    def _update(self, group, hp, buckets, grad_scale, found_inf) -> None:
        for b in buckets:
            spam_step(b.params, b.grads(), b.moments("exp_avg", True), b.moments("exp_avg_sq", False),
                      b.states("step"), threshold=hp["threshold"], scale=hp["scale"], reset=hp["reset"],
                      clip=hp["clip"], backend=b.backend, host=b.host,
                      **self._common(b.device, hp, grad_scale, found_inf))


__all__ = ["SPAM", "StableSPAM"]
