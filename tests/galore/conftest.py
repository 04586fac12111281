import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: threads gain nothing, and on a busy 2-core machine they wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
