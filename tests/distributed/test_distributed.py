"""FSDP2, DDP and torch.distributed.checkpoint on gloo, spawned ranks on 127.0.0.1 (the code path NCCL takes on GPUs).

Each test spawns its ranks once and runs every optimizer configuration in them (tests/distributed/workers.py).
"""
import os

import pytest
import torch

from tests.distributed import launch, workers


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """DCP checkpoints of every config: saved on 2 ranks at SAVE_AT (each config also equals one process and resumes
    bit for bit on 2 ranks), resumed on 4 ranks and saved again at SAVE_AGAIN_AT."""
    root = str(tmp_path_factory.mktemp("dcp"))
    launch.run(2, workers.fsdp_train_save_resume, root)
    launch.run(4, workers.fsdp_resharded, root, "first", range(workers.SAVE_AT, workers.SAVE_AGAIN_AT), "again")
    return root


def test_fsdp2_equals_one_process_and_resumes_resharded_2_to_4(checkpoints):
    for name in workers.RESHARDED:
        assert os.path.isdir(os.path.join(checkpoints, name, "again"))


def test_fsdp2_resumes_resharded_4_to_2(checkpoints):
    launch.run(2, workers.fsdp_resharded, checkpoints, "again", range(workers.SAVE_AGAIN_AT, workers.TOTAL), None)


# every fastopt config but the Triton one: loading is the same for every backend, and the interpreter is slow
@pytest.mark.parametrize("name", [n for n in workers.CONFIGS if n not in ("torch-adamw", "stable-spam-triton-4bit")])
def test_consolidated_checkpoint_loads_without_distributed(checkpoints, tmp_path, name, one_thread):
    """dcp_to_torch_save's single file loads into a non-distributed optimizer, which goes on as one process would
    (on one thread, as the ranks run: the matmuls must sum alike)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.distributed.checkpoint.state_dict import set_state_dict

    dcp_to_torch_save(os.path.join(checkpoints, name, "first"), tmp_path / "one.pt")
    saved = torch.load(tmp_path / "one.pt", weights_only=True)
    m = workers.model()
    opt = workers.CONFIGS[name](list(m.parameters()))
    set_state_dict(m, opt, model_state_dict=saved["model"], optim_state_dict=saved["optim"])
    workers.train(m, opt, range(workers.SAVE_AT, workers.TOTAL))
    workers.check(m, opt, name, workers.TOTAL, "consolidated, resumed in one process")


def test_consolidated_fp32_checkpoint_loads_into_torch_adamw(checkpoints, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.distributed.checkpoint.state_dict import set_state_dict

    dcp_to_torch_save(os.path.join(checkpoints, "adamw-schedule", "first"), tmp_path / "one.pt")
    saved = torch.load(tmp_path / "one.pt", weights_only=True)
    m = workers.model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    set_state_dict(m, opt, model_state_dict=saved["model"], optim_state_dict=saved["optim"])
    assert opt.state[next(m.parameters())]["step"] == workers.SAVE_AT
    assert torch.equal(opt.state[next(m.parameters())]["exp_avg"],
                       saved["optim"]["state"]["0.weight"]["exp_avg"])


def test_sharded_state_layout_and_refusals():
    launch.run(2, workers.fsdp_layout_and_errors)


def test_hsdp_mixed_params_and_empty_shards_equal_one_process():
    launch.run(2, workers.fsdp_hsdp_mixed_and_empty_shards)


def test_grad_scaler_under_fsdp2_equals_one_process():
    launch.run(2, workers.fsdp_grad_scaler)


def test_ddp_equals_one_process():
    launch.run(2, workers.ddp_train)
