"""Device resolution under torchrun: each process takes the GPU of its local rank, and the ways to end up with every
rank on one GPU (a numbered device) or on a GPU that is not there (more processes than GPUs) are one-line errors.

No GPU here: CUDA's presence and count are patched (the one thing this logic reads from the hardware); the CUDA
path itself runs in scripts/gpu-check.sh on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from flopmatch.device import resolve_device
from flopmatch.errors import UserError


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    def launched(local_rank: int, world: int = 2):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    return launched


def test_under_torchrun_cuda_and_auto_are_the_local_ranks_gpu(two_gpus):
    two_gpus(1)
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")


def test_under_torchrun_a_numbered_gpu_is_refused(two_gpus):
    two_gpus(0)
    with pytest.raises(UserError, match="every process on one GPU; use cuda or auto"):
        resolve_device("cuda:0")


def test_more_processes_than_gpus_is_a_clear_error(two_gpus):
    two_gpus(2, world=3)
    for name in ("cuda", "auto"):
        with pytest.raises(UserError, match=r"this node has 2 GPU\(s\) visible; .*--nproc_per_node 2"):
            resolve_device(name)


def test_one_process_keeps_the_named_gpu(two_gpus):
    two_gpus(0, world=1)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 0)


def test_one_process_under_torchrun_may_name_its_gpu(two_gpus, monkeypatch):
    """torchrun --nproc_per_node 1 is a launch too (a process group of one), but no other process can share a GPU it
    names: cuda:1 is taken as given; with two processes a numbered GPU is still refused."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    two_gpus(0, world=1)
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and resolve_device("cuda") == torch.device("cuda", 0)
    two_gpus(0, world=2)
    with pytest.raises(UserError, match="would put every process on one GPU"):
        resolve_device("cuda:1")
