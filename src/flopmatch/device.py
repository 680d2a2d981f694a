"""Device and numeric precision: where to run and whether bf16 autocast pays off there."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import time

import torch

from flopmatch.dist import is_launched, local_rank
from flopmatch.errors import UserError

DEVICE_TYPES = ("cpu", "cuda", "mps")  # where flopmatch runs; torch names more (xla, meta, ...) that it does not support


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> this rank's CUDA device if available else CPU; otherwise the named device, checked to exist here
    (a UserError naming the problem otherwise). Under torchrun "cuda" is this rank's GPU, cuda:LOCAL_RANK (one
    process per GPU), and a numbered one is refused: every rank would take the same GPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return _rank_gpu()
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in DEVICE_TYPES:
        raise UserError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N (mps on Apple silicon)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name} requested but CUDA is not available to this PyTorch (a CPU-only build, or "
                            f"no GPU); use device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {name} requested but this process sees {torch.cuda.device_count()} CUDA device(s) "
                            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}); use one of them or auto")
        if is_launched():
            if dev.index is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
                return dev  # one process (torchrun --nproc_per_node 1): the GPU it names is its own
            if dev.index is not None:
                raise UserError(f"device {name} under torchrun would put every process on one GPU; use cuda or auto "
                                "(each process takes the GPU of its local rank)")
            return _rank_gpu()
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {name} requested but MPS is not available (Apple silicon with a PyTorch built for "
                        f"it); use device cpu or auto")
    return dev


def _rank_gpu() -> torch.device:
    """cuda:LOCAL_RANK, checked against the GPUs this process sees (torchrun started more processes than GPUs?)."""
    n = torch.cuda.device_count()
    if local_rank() >= n:
        raise UserError(f"process of local rank {local_rank()} but this node has {n} GPU(s) visible; start at most "
                        f"{n} process(es) per node (torchrun --nproc_per_node {n})")
    return torch.device("cuda", local_rank())


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16), from /proc/cpuinfo.

    A fixed property of the machine, so every process agrees: it decides precision "auto" on the CPU
    (:func:`bf16_is_faster`) and keys caches (the text encoder's caption states, the evaluators' precision). False where unknown.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def bf16_is_faster(device_type: str) -> bool:
    """Does bf16 autocast run clearly faster than fp32 on this kind of device? A fixed property of the machine.

    CUDA: whether the GPU supports bf16. CPU: whether it has bf16 dot-product instructions
    (:func:`cpu_has_native_bf16`); with them a bf16 matmul took 0.22-0.23x fp32's time here, without them
    (AVX2-only) bf16 is slower. An earlier version timed 8 matmuls once per process instead, which on a loaded
    machine answered differently between processes: identical `train` commands, and the runs of one study, trained
    in different precisions.
    """
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device_type == "cpu" and cpu_has_native_bf16()


MATMUL_MIN_S = 0.01  # a timed peak matmul lasts at least this long (10 ms): launch and timer overheads vanish
MATMUL_MAX_S = 0.15  # ... and grows past that while the FLOP rate still grows with size, up to a call this long
MATMUL_MAX_N = 16384  # the largest side tried (three bf16 matrices: 1.5 GiB; fp32: 3 GiB)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA kernels run asynchronously; a no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_times(device: torch.device, dtype: torch.dtype, n: int, calls: int = 3) -> list[float]:
    """Seconds of each of ``calls`` (n, n) @ (n, n) matmuls in ``dtype`` on ``device`` (2 n^3 FLOPs each), after
    one untimed warm-up call. Random operands from a private generator: the global RNG is untouched."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g).to(dtype)  # (n, n)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)  # (n, n)
    a @ b  # warm-up: kernel choice, allocation, clocks
    times = []
    for _ in range(calls):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def matmul_peak(device: torch.device, dtype: torch.dtype, min_s: float = MATMUL_MIN_S,
                max_n: int = MATMUL_MAX_N) -> tuple[int, float]:
    """(n, FLOP/s): the fastest square matmul over sides doubling from 128 (at most ``max_n``) while a call
    takes under ``min_s``, or while doubling still raises the FLOP rate by > 10 % and a call takes under
    ``MATMUL_MAX_S``. Each side's rate is its fastest of 3 calls.

    Why not time alone: on a loaded CPU a multi-threaded fp32 matmul can have a floor of a scheduler tick
    (16 ms measured with 2 threads at load 3 on 2 cores) whatever its size, so a 256 x 256 matmul already
    lasts 10 ms at a hundredth of the peak.
    """
    n, best_n, best = 128, 128, 0.0
    while True:
        t = min(matmul_times(device, dtype, n))
        rate = 2 * n**3 / t
        grew = rate > 1.1 * best
        if rate > best:
            best_n, best = n, rate
        if n >= max_n or (t >= min_s and not (grew and t < MATMUL_MAX_S)):
            return best_n, best
        n *= 2


@functools.cache
def peak_matmul_flops(device: torch.device, bf16: bool) -> float:
    """Measured once per process: :func:`matmul_peak` in bf16 (or fp32), the denominator of MFU (model FLOPs
    utilisation) in training's metrics rows. ~0.3 s where the peak is reached at ~10 ms per call; up to ~5 s on a
    loaded CPU whose fp32 peak needs a 4096-wide matmul."""
    n, rate = matmul_peak(device, torch.bfloat16 if bf16 else torch.float32)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # give the operands' memory back before training allocates
    return rate


def memory_bytes(device: torch.device) -> int:
    """Total memory of ``device`` in bytes: the GPU's, or the machine's physical RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run_bf16(precision: str, device: torch.device, state: dict | None) -> bool:
    """Autocast precision for a run: "auto" reuses what the run recorded (its checkpoint ``state``) when on
    the same kind of device, so a run never changes precision between resume, sampling and evaluation;
    otherwise :func:`use_bf16` decides (and the result gets recorded by training)."""
    if precision == "auto" and state and "bf16" in state and state.get("device_type", device.type) == device.type:
        return bool(state["bf16"])
    return use_bf16(precision, device)


def use_bf16(precision: str, device: torch.device) -> bool:
    """Resolve a precision setting ("auto" | "bf16" | "fp32") for a device."""
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    return bf16_is_faster(device.type)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast context for ``device`` (a no-op context when disabled). Weights stay fp32."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def evaluator_precision() -> str:
    """The precision ("bf16" | "fp32") the cached CPU evaluators (attribute classifier, class classifier, domain
    CLIP) train in: bf16 autocast where bf16 is fast here (AMX / AVX-512 bf16), else fp32. Without native bf16
    (e.g. an AVX2-only CPU) oneDNN's bf16 convolutions run ~200x slower (measured on an AVX2 EPYC: 20 s per step of
    the attribute classifier instead of ~0.1 s), so a hard-coded bf16 made the first study on such a machine take
    hours. The name goes into the evaluator's cache key (:func:`evaluator_suffix`): an fp32-trained evaluator is
    another evaluator, and its info records which one scored a run."""
    # From the CPU's flags, not a timing: the name keys a cache every process must agree on, and a timed ratio near
    # its threshold (AVX512-BF16 without AMX, a loaded machine) could differ between processes.
    return "bf16" if cpu_has_native_bf16() else "fp32"


def evaluator_suffix(precision: str) -> str:
    """The cache-directory suffix of an evaluator trained in ``precision``: "" for bf16 (the names caches already
    have), "-fp32" otherwise."""
    return "" if precision == "bf16" else f"-{precision}"
