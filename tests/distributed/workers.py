"""What the distributed tests run on each rank (tests/distributed/launch.py spawns them).

Every rank trains on the same batch, so the averaged gradient equals one process's bit for bit; the element-wise
steps are then bit-identical to one process on the whole model, whatever the world size. Stable-SPAM's norms and
a left GaLore projection (Lᵀ·G) are sums across shards, equal up to the order of the additions: their params are
compared within 1e-6, except that 0.1% of the elements may be off by up to 0.3·lr (a last-bit difference that rounds
a 4-bit code the other way moves its moment by a quantization step), and Stable-SPAM's statistics (max|g|, the
norm's moments: what sharding changes) within 1e-5 relative. Its configs here never reset the moments
(update_proj_gap=0): at a reset (t = 1) the update is about lr·sign(g) wherever |g| is near eps, which turns
last-bit differences into visible ones; resets are element-wise and tested per op. Each check compares with a
one-process run of the same optimizer (``reference``), computed on the rank itself.

GaLore's projections are matmuls over a shard's rows, whose summation order a BLAS may choose by the number of rows
(MKL does on Intel CPUs with AVX-512; on AMD ones these configs were bit-equal): the low-rank gradients then differ in
their last bits, and Stable-SPAM with 4-bit low-rank moments turns that into code flips that the back-projection
spreads over whole rows. That config is held to its update instead (UPDATE_CLOSE): ‖got − want‖ within 1% of
‖want − start‖ for every param, and its statistics within 1% — a missing or doubled reduction would be off by the
whole update.
"""
from __future__ import annotations

import os

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import fastopt
import fastopt.galore
import fastopt.schedules

TOTAL, SAVE_AT, SAVE_AGAIN_AT, SPIKE = 8, 3, 6, 4  # steps; the batch at SPIKE is 30x larger
QUANT = dict(min_quant_size=1024)

# name -> optimizer factory. The first layer's weight (301 x 256: rows of whole quantization blocks, uneven shards
# on 2 and 4 ranks) is quantized; the rest is under min_quant_size.
CONFIGS = {
    "torch-adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    "adamw-schedule": lambda ps: fastopt.AdamW(ps, lr=fastopt.schedules.WSD(1e-2, TOTAL, warmup=2)),
    "adamw-4bit": lambda ps: fastopt.AdamW(ps, lr=1e-2, state_bits=4, **QUANT),
    "adamw-8bit": lambda ps: fastopt.AdamW(ps, lr=1e-2, state_bits=8, **QUANT),
    "adamw-bf16": lambda ps: fastopt.AdamW(ps, lr=1e-2, state_bits=16),
    "adam-amsgrad": lambda ps: fastopt.Adam(ps, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "spam-4bit": lambda ps: fastopt.SPAM(ps, lr=1e-2, warmup_steps=2, threshold=2, DeltaT=4, grad_accu_steps=1,
                                         state_bits=4, **QUANT),
    "stable-spam-4bit": lambda ps: fastopt.StableSPAM(ps, lr=1e-2, update_proj_gap=0, total_T=TOTAL, state_bits=4,
                                                      **QUANT),
    "stable-spam-official": lambda ps: fastopt.StableSPAM(ps, lr=1e-2, update_proj_gap=0, compat="official"),
    "stable-spam-reference": lambda ps: fastopt.StableSPAM(ps, lr=1e-2, update_proj_gap=0, backend="reference"),
    "stable-spam-triton-4bit": lambda ps: fastopt.StableSPAM(ps, lr=1e-2, update_proj_gap=0, state_bits=4,
                                                             backend="triton", **QUANT),
    # GaLore on both weights: 301x256 is projected on the right (its rows stay local), 3x301 on the left (Lᵀ·G sums
    # over the ranks' rows); refreshes at steps 0, 3 and 6
    "galore-adamw": lambda ps: fastopt.AdamW([{"params": [ps[0], ps[2]], "rank": 8, "update_proj_gap": 3},
                                              {"params": [ps[1], ps[3]]}], lr=1e-2),
    "galore-left-randomized-4bit": lambda ps: fastopt.AdamW(
        [{"params": [ps[0]], "rank": 4, "update_proj_gap": 3, "proj_type": "left", "refresh": "randomized",
          "moments": "reproject"}, {"params": ps[1:]}], lr=1e-2, state_bits=4, **QUANT),
    "galore-right-randomized": lambda ps: fastopt.AdamW(
        [{"params": [ps[0]], "rank": 4, "update_proj_gap": 3, "refresh": "randomized", "moments": "reproject"},
         {"params": ps[1:]}], lr=1e-2),
    "galore-random-stable-spam": lambda ps: fastopt.StableSPAM(
        [{"params": [ps[0]], "rank": 128, "update_proj_gap": 3, "refresh": "random"}, {"params": ps[1:]}],
        lr=1e-2, update_proj_gap=0, state_bits=4, **QUANT),
}
# see the module docstring; a left GaLore projection Lᵀ·G is a sum over the ranks' rows, too
CLOSE = {name: 1e-6 for name in CONFIGS if name.startswith(("stable-spam", "galore"))}
UPDATE_CLOSE = {"galore-random-stable-spam": 1e-2}  # see the module docstring
STATISTICS = ("m_max", "m_norm", "v_norm")  # Stable-SPAM's per-tensor statistics


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 301), torch.nn.Tanh(), torch.nn.Linear(301, 3))


def sharded(m: torch.nn.Module) -> torch.nn.Module:
    for layer in m:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(m)
    return m


def batch(step: int) -> torch.Tensor:
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(1000 + step))
    return x * 30 if step == SPIKE else x


def train(m: torch.nn.Module, opt, steps: range) -> None:
    for step in steps:
        m(batch(step)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, torch.distributed.tensor.DTensor) else t.detach()


def reference(name: str, steps: int, cache: dict = {}) -> tuple[list[torch.Tensor], list[dict]]:  # noqa: B006
    """One process's params and per-param optimizer states after ``steps`` steps (cached per process)."""
    if (name, steps) not in cache:
        m = model()
        opt = CONFIGS[name](list(m.parameters()))
        train(m, opt, range(steps))
        cache[(name, steps)] = [p.detach().clone() for p in m.parameters()], [opt.state[p] for p in m.parameters()]
    return cache[(name, steps)]


def check(m: torch.nn.Module, opt, name: str, steps: int, where: str) -> None:
    params, states = reference(name, steps)
    for i, (p, want, state, start) in enumerate(zip(m.parameters(), params, states, model().parameters())):
        if name in UPDATE_CLOSE:
            off = ((whole(p) - want).norm() / (want - start.detach()).norm()).item()
            assert off <= UPDATE_CLOSE[name], f"{name}, {where}: param {i} differs from one process by {off:.2%} of " \
                                              "its update"
        else:
            assert_like_one_process(whole(p), want, CLOSE.get(name), f"{name}, {where}: param {i}")
        for key in STATISTICS:
            if key in state:
                got, expected = opt.state[p][key].item(), state[key].item()
                assert abs(got - expected) <= UPDATE_CLOSE.get(name, 1e-5) * abs(expected), f"{name}, {where}: {key} of param {i} is {got}, " \
                                                                    f"one process has {expected}"


def assert_like_one_process(got: torch.Tensor, want: torch.Tensor, close: float | None, what: str) -> None:
    """Equal bit for bit (close None), or within ``close`` but for 0.1% of the elements, which may be off by up to
    3e-3 (see the module docstring)."""
    errors = (got - want).abs()
    if close is None:
        assert errors.max() == 0, f"{what} differs from one process by {errors.max().item()}"
        return
    off = (errors > close).float().mean().item()
    assert off <= 1e-3 and errors.max() <= 3e-3, f"{what} differs from one process by up to {errors.max().item()}, " \
                                                 f"{off:.2%} of it over {close}"


def save(m: torch.nn.Module, opt, path: str) -> None:
    model_sd, optim_sd = get_state_dict(m, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def load(name: str, path: str):
    """A fresh sharded model and optimizer, resumed from the DCP checkpoint at ``path``."""
    m = sharded(model())
    opt = CONFIGS[name](list(m.parameters()))
    model_sd, optim_sd = get_state_dict(m, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(m, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return m, opt


# ---- FSDP2 + DCP: train and save on 2 ranks, reshard onto 4, back onto 2 -------------------------------------------
def fsdp_train_save_resume(rank: int, world: int, root: str) -> None:
    """Each config: equals one process; saved at SAVE_AT; resumed on the same world size bit for bit."""
    for name in CONFIGS:
        m = sharded(model())
        opt = CONFIGS[name](list(m.parameters()))
        train(m, opt, range(SAVE_AT))
        save(m, opt, os.path.join(root, name, "first"))
        train(m, opt, range(SAVE_AT, TOTAL))
        check(m, opt, name, TOTAL, f"{world} ranks")
        uninterrupted = [whole(p) for p in m.parameters()]
        m, opt = load(name, os.path.join(root, name, "first"))
        train(m, opt, range(SAVE_AT, TOTAL))
        for i, (p, want) in enumerate(zip(m.parameters(), uninterrupted)):
            assert torch.equal(whole(p), want), f"{name}: resumed on {world} ranks, param {i} differs"
        if isinstance(opt, fastopt.FusedOptimizer):
            assert opt._step_count == TOTAL, f"{name}: step count {opt._step_count} after resuming"


# Resharding is the same for every backend: the Triton interpreter config (slow) resumes on 2 ranks only.
RESHARDED = [name for name in CONFIGS if name != "stable-spam-triton-4bit"]


def fsdp_resharded(rank: int, world: int, root: str, load_from: str, steps: range, save_as: str | None) -> None:
    """Each config: resumed from a checkpoint saved on another world size, trained on, equal to one process."""
    for name in RESHARDED:
        m, opt = load(name, os.path.join(root, name, load_from))
        train(m, opt, steps)
        check(m, opt, name, steps.stop, f"saved on another world size, resumed on {world} ranks")
        if save_as is not None:
            save(m, opt, os.path.join(root, name, save_as))


# ---- what sharded state looks like, and what is refused --------------------------------------------------------
def fsdp_layout_and_errors(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    aligned = torch.nn.Parameter(distribute_tensor(torch.randn(41, 256), mesh, [Shard(0)]))
    ragged = torch.nn.Parameter(distribute_tensor(torch.randn(41, 25), mesh, [Shard(0)]))
    opt = fastopt.AdamW([aligned, ragged], state_bits=4, min_quant_size=0)
    for p in (aligned, ragged):
        p.grad = distribute_tensor(torch.randn(p.shape), mesh, [Shard(0)])
    opt.step()
    codes, scales = opt.state[aligned]["exp_avg_codes"], opt.state[aligned]["exp_avg_scales"]
    assert isinstance(codes, DTensor) and codes.shape == (41, 128) and scales.shape == (41, 2)
    assert codes.placements == aligned.placements and codes.to_local().shape[0] == aligned.to_local().shape[0]
    # rows of 25 elements hold no whole 128-element block: fp32 moments, sharded as the param
    assert set(opt.state[ragged]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.state[ragged]["exp_avg"].dtype == torch.float32 and opt.state[ragged]["exp_avg"].placements == (Shard(0),)

    _raises(Exception, "does not take DTensor params", lambda: torch.compile(opt.step, fullgraph=True,
                                                                            backend="aot_eager")())

    by_columns = torch.nn.Parameter(distribute_tensor(torch.randn(8, 6), mesh, [Shard(1)]))
    _raises(ValueError, "placements", lambda: fastopt.AdamW([by_columns]))
    _raises(ValueError, "DTensor (FSDP2)", lambda: fastopt.galore.step_in_backward([aligned], fastopt.AdamW([aligned])))
    plain_grad = fastopt.AdamW([aligned])
    aligned.grad = torch.zeros(aligned.shape)
    _raises(RuntimeError, "sharded as the param", plain_grad.step)
    assert not plain_grad.state, "a refused step() changed the state"


def fsdp_hsdp_mixed_and_empty_shards(rank: int, world: int) -> None:
    """One optimizer holding a param sharded on a 1-D mesh, one on HSDP's 2-D mesh (replicated, then sharded), one
    whose single row leaves the other ranks an empty (quantized) shard, and a plain tensor: equal to one process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    flat = init_device_mesh("cpu", (world,))
    hsdp = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    placed = [lambda t: distribute_tensor(t, flat, [Shard(0)]), lambda t: distribute_tensor(t, hsdp, [Replicate(), Shard(0)]),
              lambda t: distribute_tensor(t, flat, [Shard(0)]), lambda t: t]
    shapes = [(3, 256), (5, 256), (1, 256), (7,)]
    factories = {
        "adamw-4bit": (lambda ps: fastopt.AdamW(ps, lr=1e-2, state_bits=4, min_quant_size=0), None),
        "stable-spam-4bit": (lambda ps: fastopt.StableSPAM(ps, lr=1e-2, update_proj_gap=0, state_bits=4,
                                                           min_quant_size=0), 1e-6),
        "stable-spam-reference": (lambda ps: fastopt.StableSPAM(ps, lr=1e-2, update_proj_gap=0, backend="reference"),
                                  1e-6),
    }
    for name, (factory, close) in factories.items():
        torch.manual_seed(0)
        plain = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        sharded = [torch.nn.Parameter(place(p.detach().clone())) for place, p in zip(placed, plain)]
        optimizers = [factory(plain), factory(sharded)]
        for step in range(4):
            grads = [torch.randn(s, generator=torch.Generator().manual_seed(10 * step + i)) * (30 if step == 2 else 1)
                     for i, s in enumerate(shapes)]
            for p, q, g in zip(plain, sharded, grads):
                p.grad = g
                q.grad = place_like(g, q)
            for opt in optimizers:
                opt.step()
        for i, (p, q) in enumerate(zip(plain, sharded)):
            assert_like_one_process(whole(q), p.detach(), close, f"{name}: param {i} ({shapes[i]})")


def fsdp_grad_scaler(rank: int, world: int) -> None:
    """torch.amp.GradScaler under FSDP2 (the fused protocol of AdamW and StableSPAM, torch's for a GaLore group), with
    an overflowing step that it skips: equal to one process (bit for bit but for GaLore's projections, see the module
    docstring), and the scale halved alike."""
    for name in ("adamw-4bit", "stable-spam-4bit", "galore-adamw"):
        models = [sharded(model()), model()]
        optimizers = [CONFIGS[name](list(m.parameters())) for m in models]
        scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in models]
        for step in range(4):
            for m, opt, scaler in zip(models, optimizers, scalers):
                x = batch(step) * (float("inf") if step == 2 else 1)
                scaler.scale(m(x).square().mean()).backward()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
        assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0**9
        for i, (p, q) in enumerate(zip(*(m.parameters() for m in models))):
            assert_like_one_process(whole(p), q.detach(), CLOSE.get(name), f"{name} with GradScaler: param {i}")


def place_like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, distribute_tensor

    return distribute_tensor(t, p.device_mesh, p.placements) if isinstance(p, DTensor) else t


def _raises(kind, words: str, fn) -> None:
    try:
        fn()
    except kind as e:
        assert words in str(e), f"{kind.__name__} without {words!r}: {e}"
    else:
        raise AssertionError(f"no {kind.__name__} ({words})")


# ---- DDP ------------------------------------------------------------------------------------------------------------
DDP_CONFIGS = ("adamw-4bit", "adam-amsgrad", "spam-4bit", "stable-spam-4bit", "galore-adamw",
               "galore-left-randomized-4bit", "galore-random-stable-spam")


def ddp_train(rank: int, world: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model())
    _raises(ValueError, "DistributedDataParallel",
            lambda: fastopt.galore.step_in_backward(ddp, fastopt.AdamW(ddp.parameters())))
    for name in DDP_CONFIGS:
        m = DistributedDataParallel(model())
        opt = CONFIGS[name](list(m.parameters()))
        train(m, opt, range(TOTAL))
        check(m.module, opt, name, TOTAL, "DDP")
