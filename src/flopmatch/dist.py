"""torch.distributed helpers: torchrun detection, rank queries, wrapping the network (DDP or FSDP2), full state dicts.

Launch with ``torchrun --nproc_per_node N -m flopmatch train ...``; one process = one device; the
backend follows the device (NCCL on CUDA, gloo on CPU). The global batch (``train.batch_size``) is
split evenly across ranks, so the FLOP budget and the optimisation trajectory do not depend on the
number of processes (training's randomness is drawn per global example; see :mod:`flopmatch.train`).

``train.parallel`` picks how: ``ddp`` keeps the whole network, gradients and optimizer state on every
rank and all-reduces (averages) gradients in backward; ``fsdp2`` (``torch.distributed.fsdp.fully_shard``,
one unit per Transformer block plus the root) keeps 1/N of each on every rank, all-gathering a block's
parameters for its forward and backward and reduce-scattering (averaging) its gradients. Both average
gradients over ranks, so both give the 1-process gradient of the global batch when each rank's loss is
its slice's share of the global-batch loss (the objectives' normalisation, :mod:`flopmatch.objectives`).
Under ``fsdp2`` the parameters may be all-gathered and computed in bf16 (``train.fsdp_param_dtype``, :func:`shard`).

Checkpoints hold full (unsharded) tensors in the 1-process format whatever the option (:func:`full_state_dict`,
:func:`full_optimizer_state_dict`, gathered to rank 0 on CPU), so a run written by N processes resumes with M,
under either option.

References: Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel Training" (DDP);
Zhao et al. 2023, "PyTorch FSDP" and torchtitan (per-block ``fully_shard``, DCP full state dicts).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

from flopmatch.errors import EchoedError, UserError

# FSDP2, DTensor and DCP are imported where used: together they add ~1 s to every command's start (measured
# 0.8 s for torch.distributed.fsdp alone), and only a sharded run needs them.


def is_launched() -> bool:
    """True when started by torchrun (TORCHELASTIC_RUN_ID set: one process too) or another launcher of several
    processes (WORLD_SIZE > 1).

    A one-process torchrun launch is distributed too (a process group of one, the network wrapped as asked): what
    ``torchrun --nproc_per_node 1`` users expect (torchtitan does the same), and the only way to run the NCCL, DDP and
    FSDP2 code paths on a machine with one GPU (scripts/gpu-check.sh)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


_CPU_GROUP: list = []  # [gloo group for host-side flags and waits (any_rank, entered_on_main, barrier)], made by init

# How long a rank waits in a host-side collective (barrier, flags) for the others: the main rank alone may decode a
# whole source, train the prompt scorer or compute an evaluation's metrics meanwhile (well over NCCL's 10-minute
# default watchdog for a large first decode), and a timed-out wait aborts the launch.
HOST_WAIT = datetime.timedelta(hours=2)

T = TypeVar("T")


def init(device: torch.device) -> None:
    """Initialise the process group once (nccl on CUDA, gloo on CPU) if launched by torchrun; on CUDA also a gloo
    group over the same ranks for host-side flags and waits (:func:`any_rank`, :func:`barrier`)."""
    if is_launched() and not torch_dist.is_initialized():
        if device.type == "cuda":  # NCCL collectives and FSDP2's mesh use the current device: this rank's own
            torch.cuda.set_device(device)
            torch_dist.init_process_group("nccl", device_id=device)  # device_id: no "barrier(): using the device" warning
            _CPU_GROUP[:] = [torch_dist.new_group(backend="gloo", timeout=HOST_WAIT)]
        else:
            torch_dist.init_process_group("gloo", timeout=HOST_WAIT)
            _CPU_GROUP[:] = [None]


def in_group() -> bool:
    """Whether this process is part of a process group (torchrun, any number of processes): the network is wrapped."""
    return torch_dist.is_initialized()


@contextlib.contextmanager
def entered_on_main(make: Callable[[], contextlib.AbstractContextManager]):
    """Enter the context manager ``make()`` on the main rank only (a directory lock), with every rank told whether
    that worked: when the main rank's entry raises, it raises its error and every other rank an EchoedError (the
    CLI prints the message once), so no rank goes on into a collective that the main rank has left (which fails
    there as a raw gloo/NCCL traceback, or hangs)."""
    with contextlib.ExitStack() as stack:
        error: BaseException | None = None
        if is_main():
            try:
                stack.enter_context(make())
            except BaseException as e:  # noqa: BLE001 - told to the other ranks, then raised again below
                error = e
        _tell_ranks(error)
        yield


def run_on_main(fn: Callable[[], T]) -> T | None:
    """``fn()`` on the main rank only (inside :func:`main_only`) while the others wait: its result there, None on
    the others. When it raises, the main rank raises its error and every other rank an EchoedError (said once by
    the CLI), not an error of its own about what the main rank did not leave behind."""
    result, error = None, None
    if is_main():
        with main_only():
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - told to the other ranks, then raised again
                error = e
    _tell_ranks(error)
    return result


def _tell_ranks(error: BaseException | None) -> None:
    """Collective: every rank learns whether the main rank's ``error`` is None; the main rank raises it, the others an
    EchoedError of its text (broadcast_object_list pickles the text between our own processes)."""
    if torch_dist.is_initialized():
        said = None if error is None else str(error) if isinstance(error, UserError) else (
            f"the main process failed ({type(error).__name__}: {error}); see its error")
        box = [said]
        torch_dist.broadcast_object_list(box, src=0, group=_CPU_GROUP[0] if _CPU_GROUP else None)
        if box[0] is not None and not is_main():
            raise EchoedError(box[0])
    if error is not None:
        raise error


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (a collective: every rank calls it at the same point). On CPU tensors
    over gloo, so reading it in a training step costs no device sync (an NCCL all-reduce of a CUDA tensor then
    ``.item()`` would wait for the GPU's queue every step)."""
    if not torch_dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    torch_dist.all_reduce(t, group=_CPU_GROUP[0] if _CPU_GROUP else None)
    return bool(t.item() > 0)


# How long a rank other than 0 waits for rank 0's copy of a user error before saying its own: longer than two ranks
# reaching the same check can lag each other on a loaded machine (an error of its own is only said this much later).
ERROR_WAIT_S = 10.0


def said_on_main(message: str) -> bool:
    """Whether rank 0 of this torchrun launch prints the user error ``message`` itself, so this rank need not repeat it.

    A check of the command line, a config or the data fails alike on every rank; each rank would print the same line.
    Rank 0 posts its message to the launch's key-value store (torchrun's agent TCPStore, at MASTER_ADDR:MASTER_PORT,
    there before any process group and after a rank has left) and answers False: it always speaks. Another rank waits
    up to ERROR_WAIT_S for that post and answers whether it is the same message; an error of its own (a path missing
    on its node, a GPU too few) is still said. False outside torchrun or where the store cannot be reached.
    """
    if not is_launched() or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return False  # no store that outlives rank 0 (e.g. ranks started by srun): every rank says its own
    key = f"flopmatch/user-error/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"  # a restarted launch posts anew
    wait = datetime.timedelta(seconds=ERROR_WAIT_S)
    try:
        store = torch_dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                    timeout=wait, wait_for_workers=False)
        if int(os.environ.get("RANK", "0")) == 0:
            store.set(key, message)
            return False
        store.wait([key], wait)
        return store.get(key).decode() == message
    except (RuntimeError, KeyError, ValueError):  # no store, or no post in time (DistStoreError is a RuntimeError)
        return False


# What gloo says when the process at the other end of a connection is gone (killed, or crashed): pair.cc's read and
# write errors. Matched on the text: gloo raises them as plain RuntimeErrors.
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Socket closed")


def peer_lost(error: BaseException) -> bool:
    """Whether ``error`` is this torchrun worker losing another process of its launch (a peer killed or crashed
    mid-collective: gloo's connection errors, torch's DistNetworkError and DistStoreError), rather than a fault of
    its own. The CLI says it in one line: the peer's own log holds the cause, and a traceback here would only
    point at the collective that noticed."""
    if not is_launched() or not isinstance(error, RuntimeError):
        return False
    if isinstance(error, torch_dist.DistNetworkError | torch_dist.DistStoreError):
        return torch_dist.is_initialized()  # before that, this rank's own start failed (a port in use): its traceback stays
    text = str(error)
    return "gloo" in text and any(s in text for s in _PEER_GONE)


def shutdown() -> None:
    """Destroy the process group, if any; call once per process after its last collective, on success only.

    Without it gloo's worker threads still hold their last work (tensors with Python references) when the
    interpreter finalises, and the process can abort after its work is done ("terminate called without an
    active exception", SIGABRT; pytorch/pytorch#190489): seen as a rare failure of a finished 2-process run.
    Not on an error (torchtitan's rule): another rank may still be inside a collective, and destroying under
    it can deadlock; torchrun stops the others then.
    """
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()  # every group, the gloo flag group too
        _CPU_GROUP.clear()


def exit_process(status: int) -> None:
    """Exit with ``status``: ``sys.exit``, except in a torchrun worker, which flushes its output and leaves by
    ``os._exit``, skipping the interpreter's finalisation. Call after :func:`shutdown`.

    Why: a finished torchrun worker sometimes aborted at exit after all its work, its process group destroyed
    (``terminate called without an active exception``, SIGABRT, so torchrun exits 1): a C++ thread of
    torch.distributed still joinable when the interpreter tears down (pytorch/pytorch#190489). Measured with
    2-process FSDP2 runs on a loaded 2-core machine: 2 of 16 aborted this way; 0 of 30 leaving by os._exit. Nothing
    of ours waits for finalisation (files are written atomically and closed, trackers closed in their ``with``), so
    skipping it loses nothing.
    """
    if is_launched():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said there
                pass
        os._exit(status)
    sys.exit(status)


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a SLURM allocation or taskset), else the machine's
    count (no affinity call: macOS)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


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
    """Every rank waits here for the others (a host-side wait: over the gloo group on CUDA, so a rank waiting while the
    main one writes a checkpoint or decodes data is bounded by HOST_WAIT, not NCCL's watchdog, and no GPU queue is
    drained for it)."""
    if torch_dist.is_initialized() and not getattr(_MAIN_ONLY, "active", False):
        torch_dist.barrier(group=_CPU_GROUP[0] if _CPU_GROUP else None)


# ----------------------------------------------------------------------------- wrapping


def wrap(net: torch.nn.Module, device: torch.device, parallel: str = "ddp", units: Iterable[torch.nn.Module] = (),
         param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The module that runs forward and backward: ``net`` itself in one process; else DDP around it, or
    (``parallel="fsdp2"``) ``net`` sharded in place by :func:`shard` over ``units`` and the root, its parameters
    all-gathered in ``param_dtype`` (None: their own dtype; see :func:`shard`).

    Under FSDP2 ``net``'s parameters become DTensor shards, so build the optimizer after this call.
    """
    if not torch_dist.is_initialized():
        return net
    if parallel == "fsdp2":
        return shard(net, device, units, param_dtype=param_dtype)
    if parallel != "ddp":
        raise ValueError(f"unknown parallel mode {parallel!r}; choose ddp or fsdp2")
    if param_dtype is not None:  # DDP keeps whole fp32 parameters: nothing is all-gathered
        raise ValueError("param_dtype applies to parallel='fsdp2' only")
    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def shard(module: torch.nn.Module, device: torch.device, units: Iterable[torch.nn.Module] = (),
          param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """FSDP2 in place: ``fully_shard`` each of ``units`` (the Transformer blocks), then ``module`` (the stems, head
    and whatever the units leave). Each parameter is split along dim 0 over all ranks; returns ``module``.

    Per block: a block's parameters are all-gathered just before it runs and freed after, so peak memory holds
    one block's full parameters rather than the network's (torchtitan's and the FSDP2 docs' recipe). Also used for
    the EMA, which is never run: it stays sharded exactly like the network, so its update is shard by shard (shard
    it without ``param_dtype``: nothing of it is gathered for compute).

    ``param_dtype`` (e.g. ``torch.bfloat16``): FSDP2 mixed precision (``MixedPrecisionPolicy``, torchtitan's
    ``mixed_precision_param=bfloat16`` / ``mixed_precision_reduce=float32``). Each shard is cast to it before the
    all-gather, so a block's parameters travel and are used in forward and backward in that dtype (half the bytes
    of fp32 for bf16); their gradients are cast back to fp32 before the reduce-scatter, so gradient averaging,
    clipping, AdamW, the EMA and the checkpoints see fp32 shards as without it. None: parameters are gathered
    in their own dtype (fp32), the numerics of DDP.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # FSDP2 warns when a sharded module returns a view (diffusion's output is a reshape of its head's): an in-place
    # op on that view would skip FSDP's pre-backward hook. The objectives only read the network's output (their
    # losses are computed out of place, in fp32), so the warning, printed in every such run, would only alarm.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    # cast_forward_inputs=False (torchtitan keeps FSDP's default, True; its inputs are token ids): training runs
    # under bf16 autocast (flopmatch.device.autocast), which already casts each matmul's inputs. Casting every
    # sharded module's floating inputs too would round to bf16's 8 bits what autocast leaves fp32: diffusion's time t
    # before its sinusoidal embedding and the latents at the root (the residual stream is bf16 under autocast
    # already). Embedding tables are bf16 under the policy, so the token paradigms' token embeddings are bf16 too.
    policy = (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
              if param_dtype is not None else MixedPrecisionPolicy())
    mesh = init_device_mesh(device.type, (world_size(),))
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    return fully_shard(module, mesh=mesh, mp_policy=policy)


def is_sharded(module: torch.nn.Module) -> bool:
    """True for a module sharded by :func:`shard` (FSDP2)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # never imported: nothing is sharded
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The plain network behind DDP / torch.compile wrappers (an FSDP2 module is its own network)."""
    net = getattr(net, "_orig_mod", net)
    return getattr(net, "module", net)


def full_tensor(x: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (e.g. clip_grad_norm_'s total norm under FSDP2); other tensors unchanged."""
    tensor = sys.modules.get("torch.distributed.tensor")  # never imported: no DTensor exists
    return x.full_tensor() if tensor is not None and isinstance(x, tensor.DTensor) else x


# ----------------------------------------------------------------------------- full (unsharded) state


def _options(gather: bool):
    """DCP's options for full state dicts. Gathering: full tensors on CPU, on rank 0 only (other ranks get {}), so a
    sharded network is never whole on a device. Loading: every rank passes the full tensors and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=gather)


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with full tensors. Under FSDP2 a collective (call on every rank) whose result only
    rank 0 holds (CPU tensors; {} elsewhere); otherwise the module's own state dict, on every rank."""
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options(gather=True))


def load_full_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`full_state_dict`: every rank passes the same full tensors; under FSDP2 each keeps its shard."""
    if not is_sharded(module):
        module.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, state, options=_options(gather=False))


def _param_names(module: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order: ``opt.state_dict()`` numbers parameters 0, 1, ... across its
    groups in this order, and DCP keys them by these names."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for group in opt.param_groups for p in group["params"]]


def full_optimizer_state_dict(module: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """``opt.state_dict()`` with full tensors: ``{"state": {index: {name: tensor}}, "param_groups": [...]}``, the
    1-process format whatever the sharding. Under FSDP2 a collective like :func:`full_state_dict` (rank 0 holds
    the result; ``state`` is {} elsewhere)."""
    sd = opt.state_dict()
    # Not sharded, or no moments yet (step 0: nothing to gather; DCP would create them by a zero-gradient step of
    # the live optimizer, leaving it at step 1).
    if not is_sharded(module) or not opt.state:
        return sd
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    # DCP keys state by parameter name; translate to the optimizer's own numbering (same groups, same order).
    full = get_optimizer_state_dict(module, opt, options=_options(gather=True))
    index = {name: i for i, name in enumerate(_param_names(module, opt))}
    return {"state": {index[name]: st for name, st in (full.get("state") or {}).items()}, "param_groups": sd["param_groups"]}


def load_full_optimizer_state_dict(module: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of :func:`full_optimizer_state_dict`: every rank passes the same full state."""
    # No moments yet (a checkpoint of step 0): the optimizer's own loader. DCP's would first create the state it
    # loads into by a zero-gradient step, leaving step=1 and zero moments where an uninterrupted run has none.
    if not is_sharded(module) or not state["state"]:
        opt.load_state_dict(state)
        return
    names = _param_names(module, opt)
    groups, start = [], 0
    for group in state["param_groups"]:  # the numbering runs through the groups in order
        groups.append({**group, "params": names[start : start + len(group["params"])]})
        start += len(group["params"])
    by_name = {"state": {names[int(i)]: st for i, st in state["state"].items()}, "param_groups": groups}
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(module, opt, by_name, options=_options(gather=False))


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (identity when not distributed)."""
    if torch_dist.is_initialized():
        x = x.clone()
        torch_dist.all_reduce(x)
        x /= world_size()
    return x
