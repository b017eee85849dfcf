import pytest
import torch


@pytest.fixture(autouse=True)
def one_intraop_thread():
    """The models here are tiny: a second OpenMP thread only spins against the other processes
    sharing the CPU (a step took 1.3 s with 2 threads, 0.01 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
