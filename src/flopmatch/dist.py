"""torch.distributed helpers: torchrun detection, rank queries, wrapping the network for DDP.

Launch with ``torchrun --nproc_per_node N -m flopmatch.cli train ...``; one process = one device.
The global batch (``train.batch_size``) is split evenly across ranks, so the FLOP budget and the
optimisation trajectory do not depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel


def is_launched() -> bool:
    """True when started by torchrun (WORLD_SIZE set)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> None:
    """Initialise the process group once (nccl on CUDA, gloo on CPU) if launched by torchrun."""
    if is_launched() and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


_MAIN_ONLY = threading.local()


@contextlib.contextmanager
def main_only():
    """A block that only the main rank runs: :func:`barrier` inside it does nothing (no other rank is there
    to meet it). Whatever the block reads collectively must already have been built by every rank."""
    _MAIN_ONLY.active = True
    try:
        yield
    finally:
        _MAIN_ONLY.active = False


def barrier() -> None:
    if torch_dist.is_initialized() and not getattr(_MAIN_ONLY, "active", False):
        torch_dist.barrier()


def wrap(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP-wrap ``net`` when running distributed; otherwise return it unchanged."""
    if not torch_dist.is_initialized():
        return net

    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The plain network behind DDP / torch.compile wrappers."""
    net = getattr(net, "_orig_mod", net)
    return getattr(net, "module", net)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (identity when not distributed)."""
    if torch_dist.is_initialized():
        x = x.clone()
        torch_dist.all_reduce(x)
        x /= world_size()
    return x
