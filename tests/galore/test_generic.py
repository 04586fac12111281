"""The generic optimizer tests of tests/optim/test_common.py (state_dict round trips with weights_only=True and
bit-for-bit resume, validation, sparse and complex params, closures and hooks, GradScaler, tensor lr), run over
GaLore configurations: every optimizer class, every refresh, every moments policy, low-bit states. The test model's
weights are (32, 12) and (5, 32): a tall and a wide matrix, projected at rank 4 with a refresh every 5 steps, so the
10- to 30-step tests cross several refreshes."""
import pytest

import fastopt
from tests.optim import test_common as common
from tests.optim.cases import ADAM_BAD, LOW_BIT_BAD, SPAM_BAD, STABLE_SPAM_BAD, Case

GALORE = dict(rank=4, update_proj_gap=5, scale=0.25)
GALORE_BAD = [
    (dict(rank=0), r"rank must be an integer >= 1 \(or None: no projection\), got 0"),
    (dict(rank=2.5), r"rank must be an integer >= 1 \(or None: no projection\), got 2.5"),
    (dict(update_proj_gap=0), r"update_proj_gap must be an integer >= 1 in a group with a rank, got 0"),
    (dict(scale=-1.0), r"scale must be a number > 0, got -1.0"),
    (dict(proj_type="diagonal"), r"proj_type must be one of \('std', 'reverse_std', 'left', 'right', 'full'\), "
                                 r"got 'diagonal'"),
    (dict(refresh="qr"), r"refresh must be one of \('svd', 'randomized', 'random'\), got 'qr'"),
    (dict(moments="zero"), r"moments must be one of \('keep', 'reset', 'reproject'\), got 'zero'"),
    (dict(stagger="yes"), r"stagger must be True or False, got 'yes'"),
]
GALORE_ADAMW_BAD = ADAM_BAD + GALORE_BAD + [(dict(compat="paper"), r"compat must be one of \(None, 'official'\), "
                                                                   r"got 'paper'")]


def galore_adamw(**options):
    return lambda ps, **kw: fastopt.GaLoreAdamW(ps, **{"lr": 1e-2, **GALORE, **options, **kw})


CASES = [
    Case("GaLoreAdamW", galore_adamw(weight_decay=0.1), None, GALORE_ADAMW_BAD),
    Case("GaLoreAdamW-official", galore_adamw(weight_decay=0.1, compat="official"), None, GALORE_ADAMW_BAD),
    Case("GaLoreAdamW-randomized-reproject-stagger", galore_adamw(refresh="randomized", moments="reproject",
                                                                 stagger=True, proj_type="full"), None, GALORE_BAD),
    Case("GaLoreAdamW-random-reset", galore_adamw(refresh="random", moments="reset", weight_decay=0.1), None,
         GALORE_BAD),
    Case("GaLoreAdamW-4bit", galore_adamw(state_bits=4, min_quant_size=0, moments="reproject"), None,
         GALORE_BAD + LOW_BIT_BAD),
    Case("Adam-l2-GaLore", lambda ps, **kw: fastopt.Adam(ps, **{"lr": 1e-2, "weight_decay": 0.1, **kw}), None,
         ADAM_BAD),
    Case("StableSPAM-GaLore-4bit", lambda ps, **kw: fastopt.StableSPAM(ps, **{
        "lr": 1e-2, "update_proj_gap": 5, "state_bits": 4, "min_quant_size": 0, **kw}), None,
         STABLE_SPAM_BAD + LOW_BIT_BAD),
    Case("SPAM-GaLore", lambda ps, **kw: fastopt.SPAM(ps, **{
        "lr": 1e-2, "weight_decay": 0.1, "DeltaT": 6, "warmup_steps": 3, "grad_accu_steps": 2, **kw}), None, SPAM_BAD),
]


# A group without a rank is not projected, and its GaLore options are not checked: give the bad ones a rank.
WITH_RANK = [(kw if "rank" in kw else {"rank": 4, **kw}, message) for kw, message in GALORE_BAD]


def as_galore(case: Case) -> Case:
    """Optimizers that do not take GaLore keyword arguments get them per group, as galore-torch users pass them."""
    if case.id.startswith("GaLoreAdamW"):
        return case

    def make(params, **kw):
        params = list(params)
        if params and isinstance(params[0], dict):
            return case.make(params, **kw)
        galore = {k: kw.pop(k) for k in list(kw) if k in fastopt.galore.DEFAULTS}
        return case.make([{"params": params, **GALORE, **galore}], **kw)
    return Case(case.id, make, None, case.bad + WITH_RANK)


CASES = [as_galore(c) for c in CASES]
TESTS = [common.test_resume_is_bit_for_bit, common.test_bad_hyperparameters_raise_and_change_nothing,
         common.test_sparse_gradient_raises_before_any_update, common.test_complex_and_integer_params_rejected,
         common.test_state_dict_from_another_optimizer_or_shape_is_rejected, common.test_closure_hooks_and_zero_grad,
         common.test_grad_scaler]


@pytest.mark.parametrize("test", TESTS, ids=[t.__name__.removeprefix("test_") for t in TESTS])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_generic(case, test):
    test(case)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_step_never_reads_a_tensor_lr(case, monkeypatch):
    """GaLore's refresh timing reads host-side counters by design (docs/algorithms.md#galore-state): only the lr is
    watched here."""
    common.test_step_never_reads_a_tensor_lr(case, monkeypatch, only_the_lr=True)
