"""Latency and throughput of several sampling settings, measured together so they can be compared.

A timing means something only next to timings taken under the same load. So every setting whose
numbers will be compared is measured in one phase, interleaved (the candidates alternate, so a change
of machine load during the phase hits all of them rather than whichever was timed last):

1. **warm-up**: one call per item (allocations, kernel selection; a compiled sampler also one at batch 2);
2. **best batch**: per item, a doubling ladder 1, 2, 4, ... up to ``max_batch``; each rung is the
   faster of two calls; the search goes on while throughput improves by more than ``MIN_GAIN`` and
   stops after ``PATIENCE`` rungs without such a gain, at out-of-memory, or when the item has used
   its ``search_budget_s``;
3. **burn-in**: one untimed round, every item making a round's calls: in a study's timing phase the first
   round's first items (the autoregressive ones) were measured 2.4-3.3x slower than in every later round, after
   the other items' batch searches; the paired tests read every round, so one such round flipped a ratio's sign;
4. **rounds**: ``rounds`` times, every item once, in an order rotated by one each round and reversed
   every other round (so no item is always first, or always timed right after the same other item);
   per item and round: latency = median of
   ``calls`` batch-1 calls, throughput = images/s of one call at its best batch.

An item's figures are medians over rounds, with every round kept (``latency_rounds``,
``throughput_rounds``) and the spread ``max / min - 1`` across rounds. Latency is text-to-pixels:
the sampler and the tokenizer's decode, with prompts already encoded (the frozen text encoder is a
separate line item, like its FLOPs). On CUDA, CUDA events time the calls; elsewhere
``time.perf_counter``. Results go to a JSON file (``TIMING``) with the machine they were taken on.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import torch

from flopmatch.device import autocast
from flopmatch.errors import UserError
from flopmatch.files import read_json

TIMING = "inference_timing.json"  # a study's timing phase writes <study>/inference_timing.json
TIMING_VERSION = 1
MIN_GAIN = 0.05  # a larger batch counts as better only if it raises throughput by more than 5 %
PATIENCE = 2  # rungs without such a gain before the batch search stops
BURN_IN = 1  # untimed rounds before the timed ones (module docstring); recorded in a study's timing file


@dataclass
class TimingItem:
    """One thing to time: a loaded sampler under one sampling setting. ``key`` names it in the results."""

    key: str
    sampler: object  # flopmatch.sample.Sampler
    sample: object  # flopmatch.config.SampleConfig


class Clock:
    """Wall time of a callable: CUDA events on a GPU (no host sync inside the timed region), else perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def _runner(item: TimingItem, prompt: str):
    """A function of (batch, seed) that samples and decodes one batch of ``prompt``, text encoded once per batch size."""
    s = item.sampler
    texts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def run(batch: int, seed: int) -> None:
        if batch not in texts:
            texts[batch] = (s.encoder.encode([prompt] * batch).to(s.device), s.encoder.encode([""] * batch).to(s.device))
        cond, uncond = texts[batch]
        g = torch.Generator(device=s.device).manual_seed(seed)
        with torch.no_grad(), autocast(s.device, s.bf16):
            z = s.objective.sample(s.net, cond, uncond, item.sample, g)
            s.tokenizer.decode(z.float() if z.is_floating_point() else z)

    return run


def _best_batch(run, clock: Clock, max_batch: int, budget_s: float) -> tuple[int, float]:
    """(batch, images/s) at the best rung of a doubling ladder (see the module docstring)."""
    start = time.perf_counter()
    best_b, best_ips, misses, b = 1, 1.0 / min(clock(lambda: run(1, i)) for i in range(2)), 0, 2
    while b <= max_batch and misses < PATIENCE and time.perf_counter() - start < budget_s:
        try:
            ips = b / min(clock(lambda: run(b, i)) for i in range(2))
        except torch.cuda.OutOfMemoryError:
            break
        if ips > best_ips * (1 + MIN_GAIN):
            best_b, best_ips, misses = b, ips, 0
        else:
            misses += 1
        b *= 2
    return best_b, best_ips


# Other processes keeping more than this many cores busy during timing rounds: the study warns, and the report's
# timing verdicts are at most "suggestive" (rounds pair away a shared load, not one that comes and goes within them).
BUSY_CORES = 0.5


def _cpu_ticks() -> tuple[float, float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process, monotonic time) now. From Linux ``/proc/stat``'s "cpu" line: user nice system idle iowait irq softirq steal (guest and
    guest_nice are already inside user and nice, so they are not added again)."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:9]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK"), time.process_time(), time.monotonic()


def busy_probe() -> tuple[float, float, float] | None:
    """A reading to pass to :func:`other_busy_cores` later (None where /proc/stat cannot be read: not Linux)."""
    try:
        return _cpu_ticks()
    except (OSError, ValueError, IndexError):
        return None


def other_busy_cores(since: tuple[float, float, float] | None) -> float | None:
    """Cores kept busy by processes other than this one since the reading ``since`` of :func:`busy_probe`.

    :func:`time_items` measures it over its timed rounds (not in a pause before and after them), so it is the load
    the timings saw and costs no time. From ``/proc/stat`` (all CPUs) minus this process's CPU time (its child
    processes count as others: they would disturb the timings as much): psutil would do it too, but is not a
    dependency for one number.
    """
    now = busy_probe()
    if since is None or now is None or now[2] <= since[2]:
        return None
    return max(0.0, ((now[0] - since[0]) - (now[1] - since[1])) / (now[2] - since[2]))


def time_items(items: list[TimingItem], rounds: int = 5, calls: int = 5, max_batch: int = 256,
               search_budget_s: float = 10.0, prompt: str = "a red circle", progress: bool = True,
               load: dict | None = None) -> dict:
    """Interleaved timing of ``items``: ``{key: {latency_s, latency_rounds, throughput_images_per_s, ...}}``.

    Latency in seconds per image at batch 1, throughput in images/s at the item's best batch; both
    medians over ``rounds`` rounds, with the rounds and their spread (see the module docstring).
    ``load``, if given, receives ``"other_busy_cores"``: the cores other processes kept busy during the rounds
    (:func:`other_busy_cores`; after the warm-up, whose compilation may run in helper processes, and the batch
    search), None where it cannot be measured.
    """
    if rounds < 1 or calls < 1 or max_batch < 1:
        raise UserError(f"timing needs rounds, calls and max_batch >= 1, got {rounds}, {calls}, {max_batch}")
    if len({it.key for it in items}) != len(items):
        raise UserError("timing items must have distinct keys")
    clocks = [Clock(it.sampler.device) for it in items]
    runs = [_runner(it, prompt) for it in items]
    for it, run in zip(items, runs):  # warm-up
        run(1, 0)
        if it.sample.compile and it.sample.kv_cache:  # a compiled sampler compiles again at its second batch size (then one
            run(2, 0)  # dynamic-size graph serves every size): here, not inside the batch search's time budget
    best = []
    for it, run, clock in zip(items, runs, clocks):
        best.append(_best_batch(run, clock, max_batch, search_budget_s))
        if progress:
            print(f"[timing] best batch of {it.key}: {best[-1][0]} ({best[-1][1]:.3g} images/s)", flush=True)
    lat: list[list[float]] = [[] for _ in items]
    thr: list[list[float]] = [[] for _ in items]
    for _ in range(BURN_IN):  # a round's calls, untimed (module docstring)
        for i, run in enumerate(runs):
            for c in range(calls):
                run(1, 1 + c)
            run(best[i][0], 99)
    probe = busy_probe()
    for r in range(rounds):
        for j in range(len(items)):
            i = (j + r) % len(items)  # rotated order ...
            i = i if r % 2 == 0 else len(items) - 1 - i  # ... reversed every other round
            run, clock, batch = runs[i], clocks[i], best[i][0]
            lat[i].append(statistics.median(clock(lambda: run(1, 1 + c)) for c in range(calls)))
            thr[i].append(batch / clock(lambda: run(batch, 100 + r)))
        if progress:
            print(f"[timing] round {r + 1}/{rounds} done", flush=True)
    if load is not None:
        load["other_busy_cores"] = other_busy_cores(probe)
    out = {}
    for i, it in enumerate(items):
        out[it.key] = {
            "latency_s": statistics.median(lat[i]), "latency_rounds": lat[i],
            "latency_spread": max(lat[i]) / min(lat[i]) - 1,
            "throughput_images_per_s": statistics.median(thr[i]), "throughput_rounds": thr[i],
            "throughput_spread": max(thr[i]) / min(thr[i]) - 1, "throughput_batch": best[i][0],
        }  # fmt: skip
    return out


def machine() -> dict:
    """What timings depend on besides the code: device, threads, CPU count and the load average."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    info = {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_avg_1min": load[0],
            "torch": torch.__version__}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def read_timing(study: str | os.PathLike) -> dict | None:
    """A study's timing phase results (``<study>/inference_timing.json``), or None if it has none."""
    path = os.path.join(study, TIMING)
    if not os.path.exists(path):
        return None
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("version") != TIMING_VERSION or not isinstance(doc.get("items"), list):
        raise UserError(f"{path} is not a timing file of this flopmatch version; delete it and re-run the study to re-time")
    return doc
