"""Distributed training and evaluation (CPU, gloo): 2 processes reach the 1-process weights on the same global
batch (DDP and FSDP2, FSDP2 with bf16 parameters too), a checkpoint written by 2 processes resumes with 1, 2-process
evaluation gives the 1-process numbers, and a run started under the old per-rank randomness is refused on resume.

The 2-process runs all happen in one launch (module fixture ``two_process``): two Python processes with the
environment torchrun gives its workers (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), each running
the same list of jobs through the library's own entry points (train, evaluate), so the process start-up
(~3 s of imports per process) is paid once. A hang (a collective one rank never reaches) fails the launch
after LAUNCH_TIMEOUT_S instead of blocking CI.

Tolerances: 2 processes are not bitwise equal to 1. Each rank back-propagates its half of the batch and the
ranks' gradients are then averaged (DDP's all-reduce, FSDP2's reduce-scatter), which sums the same terms in
another order than one backward pass over the whole batch, and masked's loss is a weighted sum where one
process takes a token mean; float32 rounding differs by ~1e-7 relative per step, and AdamW's m / sqrt(v)
passes it on. After 6 steps the weights differ by up to ~1e-6 absolute (measured maxima at WEIGHT_ATOL); the
tolerances sit ~10x above that and far below a real discrepancy: masked's loss normalised per rank (each rank's
own token mean, the bug the global weights fix) moved weights by 9e-3 in the same 6 steps. FSDP2 with bf16
parameters (``train.fsdp_param_dtype=bf16``) is compared with a 1-process torchrun launch of the same policy by a
relative norm instead (BF16_PARAMS_RELNORM, justified there).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from flopmatch import PARADIGMS
from flopmatch.errors import UserError
from flopmatch.files import atomic_write_json, load_tensors
from flopmatch.lock import DirectoryLock
from flopmatch.rundir import CHECKPOINT, copy_checkpoint, read_state
from flopmatch.study.job import job_finished
from flopmatch.study.slurm import WorkerJob
from flopmatch.train import TRAIN_RANDOMNESS, train
from tiny import tiny_run_config

TESTS = Path(__file__).resolve().parent
STEPS = 6  # training steps of every run here
STOP = 3  # the 2-process run that is resumed by 1 process stops after this many steps
# tiny_run_config logs every step and checkpoints only at the end (or where a run stops): each checkpoint of a
# sharded run is a gather, ~0.1 s of DTensor dispatch here.
SETS = ["train.lr=3e-3", "data.caption_dropout=0.25"]
# Measured maxima of |2-process - 1-process| after 6 steps over the 3 paradigms, DDP and FSDP2 (weights up to ~1 in
# size): model 1.2e-6, EMA 1.0e-6, optimizer moments 1.5e-8.
WEIGHT_ATOL, WEIGHT_RTOL = 1e-5, 1e-4
LOSS_RTOL = 1e-5  # logged losses (the mean of the ranks' losses vs one process's): 1e-7 relative measured
LAUNCH_TIMEOUT_S = 240
# (parallel, objective) of the 2-process runs compared with 1 process. FSDP2 skips autoregressive, whose loss has
# no randomness and the same normalisation as diffusion's: each sharded run costs ~2 s of DTensor dispatch here.
CASES = [("ddp", name) for name in PARADIGMS] + [("fsdp2", "diffusion"), ("fsdp2", "masked")]
# FSDP2 mixed precision (train.fsdp_param_dtype=bf16, which needs bf16 autocast): diffusion, whose continuous inputs
# (latents, time) are what casting module inputs to bf16 would round (flopmatch.dist.shard)
BF16_PARAMS = ["train.parallel=fsdp2", "train.precision=bf16", "train.fsdp_param_dtype=bf16"]
BF16_PARAMS_OBJECTIVE = "diffusion"
# Under bf16 (autocast, and the policy) 2 processes are further from 1 than in fp32: each rank's weight gradient comes
# out of a bf16 matmul, rounded to 8 bits before the ranks' halves are averaged, where 1 process rounds the whole
# batch's once. Adam's m / sqrt(v) turns that into up to +-lr (3e-3) on the few weights whose gradient is near 0 (a key
# bias's is exactly 0), so the elementwise max is no measure; the relative norm ||2-process - 1-process|| / ||1-process||
# over each kind of tensor is. Measured after 6 steps: 7.0e-4 (model, EMA, post-hoc EMAs), 6e-6 (moments), the same
# as bf16 autocast's own 2-vs-1 spread with fp32 parameters (7.7e-4). The bound sits ~4x above; a wrong gradient
# (one of half the batch) gives 2.9e-2. Losses: 3e-6 relative measured (that wrong gradient: > 0.1).
BF16_PARAMS_RELNORM = 3e-3
BF16_PARAMS_LOSS_RTOL = 1e-4
WSD0 = ["train.schedule=wsd", "train.decay_frac=1", "train.warmup_steps=0"]  # a cooldown over every step: a checkpoint at step 0

# A job of the launch (kind "probe"): one forward and backward of a tiny FSDP2-sharded network (2 blocks, under bf16
# autocast, as training runs it) with the collectives FSDP2 calls recorded: the dtype and bytes of what it
# all-gathers and reduce-scatters, the parameter dtypes a block computes with (a forward hook: FSDP2 swaps the
# gathered parameters in for the forward), the dtypes of the stored shards, of their gradients and of the full state
# dict a checkpoint would save, and what the EMA (sharded without the policy, as training shards it) computes with.
PROBE = textwrap.dedent("""
    def gather_probe(param_dtype):
        import copy
        import torch.distributed as td
        from flopmatch.device import autocast
        from tiny import fake_data, fake_text, make_tiny

        cpu = torch.device("cpu")
        dist.init(cpu)
        tiny = make_tiny("diffusion", depth=2, perturb=0.02)
        net, ema = tiny.net, copy.deepcopy(tiny.net).requires_grad_(False)
        seen = {"net": set(), "ema": set()}
        net.backbone.blocks[0].register_forward_hook(lambda m, i, o: seen["net"].update(str(p.dtype) for p in m.parameters()))
        ema.backbone.blocks[0].register_forward_hook(lambda m, i, o: seen["ema"].update(str(p.dtype) for p in m.parameters()))
        model = dist.wrap(net, cpu, "fsdp2", units=net.backbone.blocks,
                          param_dtype={"fp32": None, "bf16": torch.bfloat16}[param_dtype])
        dist.shard(ema, cpu, units=ema.backbone.blocks)
        calls, phase = {}, ["net"]  # "<phase> <collective>" -> {dtype: bytes this rank received}
        real = {"all_gather": td.all_gather_single, "reduce_scatter": td.reduce_scatter_single}

        def recorded(kind):
            def call(*args, **kwargs):  # the output tensor: first, by position or by name (output_tensor / output)
                out = args[0] if args else kwargs.get("output_tensor", kwargs.get("output"))
                got = calls.setdefault(f"{phase[0]} {kind}", {})
                got[str(out.dtype)] = got.get(str(out.dtype), 0) + out.numel() * out.element_size()
                return real[kind](*args, **kwargs)
            return call

        g = torch.Generator().manual_seed(dist.rank())
        x, text = fake_data(tiny.spec, 4, g), fake_text(4, g)
        td.all_gather_single, td.reduce_scatter_single = recorded("all_gather"), recorded("reduce_scatter")
        try:
            with autocast(cpu, True):
                tiny.objective.loss(model, x, text, g).backward()
                phase[0] = "ema"  # never run in training; run here to see what it would gather
                with torch.no_grad():
                    ema(x, text.states, text.pad, text.pooled, torch.rand(4, generator=g))
        finally:
            td.all_gather_single, td.reduce_scatter_single = real["all_gather"], real["reduce_scatter"]
        full = dist.full_state_dict(net)  # a collective: rank 0 holds the full tensors
        return {**calls, "seen": {k: sorted(v) for k, v in seen.items()},
                "shards": sorted({str(p.dtype) for p in net.parameters()}),
                "grads": sorted({str(p.grad.dtype) for p in net.parameters()}),
                "full": sorted({str(v.dtype) for v in full.values()}), "ema": sorted({str(p.dtype) for p in ema.parameters()})}
""")

# One rank of the launch: the jobs in order, each through the library's entry points. Threads: 1, as in
# conftest (results must not depend on the core count, and 2 processes share 2 cores here).
WORKER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from flopmatch import dist
    from flopmatch.evaluation.run import EvalConfig, evaluate
    from flopmatch.sample import load_sampler
    from flopmatch.errors import UserError
    from flopmatch.train import train
    from tiny import tiny_run_config

    {probe}
    for job in json.loads({jobs!r}):
        if job["kind"] == "probe":
            print("PROBE", json.dumps(gather_probe(job["param_dtype"])), flush=True)
        elif job["kind"] == "train":
            cfg = tiny_run_config(job["objective"], job["steps"], sets=job["sets"])
            try:
                train(cfg, job["out"], progress=False, stop_after=job.get("stop_after"))
            except UserError as e:
                if not job.get("refused"):
                    raise
                print("REFUSED:", e, flush=True)
        else:
            settings = [load_sampler(job["run"]).cfg.sample]
            evaluate(job["run"], settings, EvalConfig(**job["ecfg"]), progress=False)
    dist.shutdown()  # as the flopmatch command does, then leaves as it does: gloo's threads may otherwise abort the exit
    dist.exit_process(0)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(jobs: list[dict], world: int = 2, timeout: float = LAUNCH_TIMEOUT_S, code: str | None = None,
           extra_env: dict | None = None) -> list[str]:
    """Run ``jobs`` in ``world`` processes started as torchrun starts its workers (or another script ``code``;
    ``extra_env`` added to their environment); fail on error or timeout. Returns each rank's output."""
    code = code or WORKER.format(tests=str(TESTS), jobs=json.dumps(jobs), probe=PROBE)
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", **(extra_env or {})}
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    try:
        outputs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        outputs = [p.communicate()[0] for p in procs]
        pytest.fail(f"{world}-process launch hung for {timeout:.0f}s; rank 0 said:\n{outputs[0][-3000:]}")
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{out[-3000:]}"
    return outputs


def _tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_tensors(run / CHECKPOINT)


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return [r["loss"] for r in rows]


def max_differences(a: Path, b: Path) -> dict[str, float]:
    """Largest |a - b| per kind of checkpoint tensor (model, ema, optim) of two runs with the same keys."""
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    out: dict[str, float] = {}
    for k in ta:
        kind = k.split(".", 1)[0]
        out[kind] = max(out.get(kind, 0.0), (ta[k].double() - tb[k].double()).abs().max().item())
    return out


def assert_same_run(got: Path, ref: Path) -> None:
    """Model, EMA and optimizer tensors allclose (WEIGHT_ATOL/RTOL), logged losses close (LOSS_RTOL), same step."""
    assert read_state(got)["step"] == read_state(ref)["step"] == STEPS and read_state(got)["done"]
    ta, tb = _tensors(got), _tensors(ref)
    assert ta.keys() == tb.keys() and any(k.startswith("ema.") for k in ta) and any(k.startswith("optim.") for k in ta)
    far = [k for k in ta if not torch.allclose(ta[k], tb[k], atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL)]
    assert not far, f"{got.name}: tensors differ from the 1-process run: {far[:5]}; max |diff| {max_differences(got, ref)}"
    assert _losses(got) == pytest.approx(_losses(ref), rel=LOSS_RTOL)


EVAL = {"num_samples": 7, "batch_size": 2, "kid_subset": 4, "kid_subsets": 3, "fid_boot": 5, "prompt_following": False,
        "timing": False, "seed": 1}  # 4 batches of sampling, the last one short: both ranks get work


@pytest.fixture(scope="module")
def two_process(tmp_path_factory):
    """1-process reference runs (made here, in this process) and everything the 2-process launch wrote.

    Returns (root, seconds the launch took). Runs: ``one-<objective>``: 1 process; ``ddp-<objective>``,
    ``fsdp2-<objective>``: 2 processes; ``<parallel>-stopped``: 2 processes stopped after STOP steps;
    ``resumed-by-fsdp2``: 1 process stopped after STOP steps, finished by 2; ``one-wsd0`` / ``fsdp2-wsd0``: a
    wsd run saving its stable checkpoint at step 0, by 1 and 2 processes; ``eval-1`` / ``eval-2``:
    copies of ``one-masked`` evaluated by 1 (in the test) and 2 processes; ``locked``: a run another process holds,
    refused first (each rank's output in ``root/refused-<rank>.txt``), the launch going on after it.
    """
    root = tmp_path_factory.mktemp("dist")
    for name in PARADIGMS:  # also warms the data caches the children read
        train(tiny_run_config(name, STEPS, sets=SETS), root / f"one-{name}", progress=False)
    for copy in ("eval-1", "eval-2"):
        shutil.copytree(root / "one-masked", root / copy)
    train(tiny_run_config("masked", STEPS, sets=SETS), root / "resumed-by-fsdp2", progress=False, stop_after=STOP)
    train(tiny_run_config("masked", STEPS, sets=[*SETS, *WSD0]), root / "one-wsd0", progress=False)
    jobs = [{"kind": "train", "objective": "masked", "steps": STEPS, "out": str(root / "locked"), "sets": SETS,
             "refused": True}]
    jobs += [{"kind": "train", "objective": name, "steps": STEPS, "out": str(root / f"{parallel}-{name}"),
              "sets": [*SETS, f"train.parallel={parallel}"]} for parallel, name in CASES]
    jobs += [{"kind": "train", "objective": "masked", "steps": STEPS, "out": str(root / f"{parallel}-stopped"),
              "sets": [*SETS, f"train.parallel={parallel}"], "stop_after": STOP} for parallel in ("ddp", "fsdp2")]
    jobs.append({"kind": "train", "objective": "masked", "steps": STEPS, "out": str(root / "resumed-by-fsdp2"),
                 "sets": [*SETS, "train.parallel=fsdp2"]})
    jobs.append({"kind": "train", "objective": "masked", "steps": STEPS, "out": str(root / "fsdp2-wsd0"),
                 "sets": [*SETS, *WSD0, "train.parallel=fsdp2"]})
    jobs.append({"kind": "eval", "run": str(root / "eval-2"), "ecfg": EVAL})
    jobs.append({"kind": "train", "objective": BF16_PARAMS_OBJECTIVE, "steps": STEPS, "out": str(root / "fsdp2-bf16-params"),
                 "sets": [*SETS, *BF16_PARAMS]})
    jobs += [{"kind": "probe", "param_dtype": dtype} for dtype in ("fp32", "bf16")]
    t0 = time.perf_counter()
    with DirectoryLock(root / "locked", "run"):  # held by this process: rank 0 of the launch is refused the run
        outputs = launch(jobs)
    for rank, out in enumerate(outputs):
        (root / f"refused-{rank}.txt").write_text(out)
        probes = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("PROBE ")]
        (root / f"probe-{rank}.json").write_text(json.dumps(dict(zip(("fp32", "bf16"), probes, strict=True))))
    return root, time.perf_counter() - t0


@pytest.fixture(scope="module")
def one_process_launch(tmp_path_factory):
    """The runs of one 1-process torchrun launch (TORCHELASTIC_RUN_ID set, WORLD_SIZE 1: a process group of one):
    ``fsdp2-world1``, masked under FSDP2; ``fsdp2-bf16-params-world1``, FSDP2 with bf16 parameters (BF16_PARAMS)."""
    root = tmp_path_factory.mktemp("world1")
    launch([{"kind": "train", "objective": "masked", "steps": STEPS, "out": str(root / "fsdp2-world1"),
             "sets": [*SETS, "train.parallel=fsdp2"]},
            {"kind": "train", "objective": BF16_PARAMS_OBJECTIVE, "steps": STEPS, "out": str(root / "fsdp2-bf16-params-world1"),
             "sets": [*SETS, *BF16_PARAMS]}], world=1, extra_env={"TORCHELASTIC_RUN_ID": "test"})
    return root


def test_a_run_refused_on_rank_0_is_refused_on_every_rank(two_process):
    """Only rank 0 takes the run's lock; when it is refused (another process holds the run), every rank raises the
    same one-line UserError, instead of the others going on into a collective rank 0 has left (a raw gloo
    traceback), and the launch goes on in step: every later job of the same launch succeeds (launch checks that)."""
    root, _ = two_process
    for rank in range(2):
        out = (root / f"refused-{rank}.txt").read_text()
        (line,) = [x for x in out.splitlines() if x.startswith("REFUSED:")]
        assert "is in use" in line and "locked" in line, out[-2000:]
        assert "Traceback" not in out and "gloo" not in out.lower(), out[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("parallel,name", CASES)
def test_two_processes_reach_the_one_process_weights(parallel, name, two_process):
    """2 processes (DDP or FSDP2) end with the 1-process run's model, EMA and optimizer state and log its losses."""
    root, _ = two_process
    got = root / f"{parallel}-{name}"
    assert_same_run(got, root / f"one-{name}")
    state = read_state(got)
    assert state["world_size"] == 2 and state["parallel"] == parallel and state["train_randomness"] == TRAIN_RANDOMNESS
    assert state["flops"] == read_state(root / f"one-{name}")["flops"]  # the budget is the global batch's
    assert not any(k.startswith("rng.") for k in _tensors(got))  # randomness is (seed, step): nothing to save


@pytest.mark.slow
def test_a_one_process_torchrun_launch_is_wrapped_and_trains_as_a_plain_run(two_process, one_process_launch):
    """torchrun --nproc_per_node 1 (TORCHELASTIC_RUN_ID set, WORLD_SIZE 1) makes a process group of one and wraps the
    network as asked (how a one-GPU machine runs the NCCL, DDP and FSDP2 paths), reaching the plain run's weights."""
    root, _ = two_process
    out = one_process_launch / "fsdp2-world1"
    state = read_state(out)
    assert (state["world_size"], state["parallel"]) == (1, "fsdp2")
    assert_same_run(out, root / "one-masked")


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_process_checkpoint_resumes_with_one_process(parallel, two_process, tmp_path):
    """A run stopped after STOP steps by 2 processes and finished by 1 (no torchrun) ends at the 1-process weights."""
    root, _ = two_process
    run = tmp_path / "run"
    shutil.copytree(root / f"{parallel}-stopped", run)
    assert read_state(run)["step"] == STOP and read_state(run)["world_size"] == 2
    # Resumed under the default train.parallel=ddp: for the FSDP2 checkpoint, the other option too.
    state = train(tiny_run_config("masked", STEPS, sets=SETS), run, progress=False)
    assert state["done"] and state["world_size"] == 1
    assert_same_run(run, root / "one-masked")


@pytest.mark.slow
def test_one_process_checkpoint_resumes_with_two_fsdp2_processes(two_process):
    """A run stopped after STOP steps by 1 process and finished by 2 under FSDP2 (each loading its shards of the
    full tensors, optimizer state included) ends at the 1-process weights."""
    root, _ = two_process
    run = root / "resumed-by-fsdp2"
    assert read_state(run)["world_size"] == 2 and read_state(run)["parallel"] == "fsdp2"
    assert_same_run(run, root / "one-masked")


@pytest.mark.slow
def test_fsdp2_checkpoint_before_the_first_step(two_process):
    """FSDP2 saving a checkpoint before any optimizer step (wsd's stable state at step 0) leaves the optimizer alone
    (DCP would create its state by a zero-gradient step) and writes the 1-process file: initial weights, no moments."""
    from flopmatch.rundir import STABLE_CHECKPOINT

    root, _ = two_process
    assert_same_run(root / "fsdp2-wsd0", root / "one-wsd0")
    one, two = load_tensors(root / "one-wsd0" / STABLE_CHECKPOINT), load_tensors(root / "fsdp2-wsd0" / STABLE_CHECKPOINT)
    assert read_state(root / "fsdp2-wsd0", STABLE_CHECKPOINT)["step"] == 0 and not any(k.startswith("optim.") for k in two)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def relative_differences(got: Path, ref: Path) -> dict[str, float]:
    """||got - ref|| / ||ref|| per kind of checkpoint tensor (model, ema, optim, phema<i>), each kind's tensors as one vector."""
    ta, tb = _tensors(got), _tensors(ref)
    assert ta.keys() == tb.keys()
    out = {}
    for kind in {k.split(".", 1)[0] for k in ta}:
        keys = [k for k in ta if k.split(".", 1)[0] == kind]
        diff = torch.cat([(ta[k].double() - tb[k].double()).flatten() for k in keys])
        out[kind] = (diff.norm() / torch.cat([tb[k].double().flatten() for k in keys]).norm()).item()
    return out


@pytest.mark.slow
def test_two_processes_with_bf16_parameters_reach_the_one_process_launch(two_process, one_process_launch, tmp_path):
    """FSDP2 with bf16 parameters (train.fsdp_param_dtype=bf16): 2 processes end at the weights of a 1-process torchrun
    launch with the same policy (BF16_PARAMS_RELNORM) and log its losses; both checkpoints hold fp32 tensors only; a
    resume that changes the setting is refused."""
    root, _ = two_process
    got, ref = root / "fsdp2-bf16-params", one_process_launch / "fsdp2-bf16-params-world1"
    assert read_state(got)["done"] and read_state(ref)["done"] and read_state(got)["bf16"]
    assert (read_state(got)["world_size"], read_state(ref)["world_size"]) == (2, 1)
    for run in (got, ref):
        assert {t.dtype for t in _tensors(run).values() if t.is_floating_point()} == {torch.float32}
    far = {k: d for k, d in relative_differences(got, ref).items() if d > BF16_PARAMS_RELNORM}
    assert not far, f"2 processes differ from 1 by a relative norm {far}; max |diff| {max_differences(got, ref)}"
    assert _losses(got) == pytest.approx(_losses(ref), rel=BF16_PARAMS_LOSS_RTOL)
    fp32 = tiny_run_config(BF16_PARAMS_OBJECTIVE, STEPS, sets=[*SETS, *BF16_PARAMS[:-1]])  # the same, fp32 parameters
    with pytest.raises(UserError, match=r"different config \(train.fsdp_param_dtype differs\)"):
        train(fp32, got, progress=False)


@pytest.mark.slow
def test_fsdp2_bf16_parameters_are_gathered_and_used_in_bf16(two_process):
    """With the bf16 policy each rank all-gathers the network's parameters in bf16 (half the fp32 policy's bytes) and a
    block computes with bf16 parameters, while gradients are reduce-scattered in fp32 and the stored shards, their
    gradients, the full state dict and the EMA (sharded without the policy) stay fp32."""
    root, _ = two_process
    for rank in range(2):
        probe = json.loads((root / f"probe-{rank}.json").read_text())
        fp32, bf16 = probe["fp32"], probe["bf16"]
        assert list(fp32["net all_gather"]) == ["torch.float32"] and list(bf16["net all_gather"]) == ["torch.bfloat16"]
        assert bf16["net all_gather"]["torch.bfloat16"] * 2 == fp32["net all_gather"]["torch.float32"] > 0
        assert bf16["net reduce_scatter"] == fp32["net reduce_scatter"] and list(bf16["net reduce_scatter"]) == ["torch.float32"]
        assert bf16["ema all_gather"] == fp32["ema all_gather"] and list(bf16["ema all_gather"]) == ["torch.float32"]
        assert bf16["seen"] == {"net": ["torch.bfloat16"], "ema": ["torch.float32"]}
        assert fp32["seen"] == {"net": ["torch.float32"], "ema": ["torch.float32"]}
        for kind in ("shards", "grads", "ema"):
            assert bf16[kind] == ["torch.float32"], (kind, bf16[kind])
        assert bf16["full"] == (["torch.float32"] if rank == 0 else [])  # gathered to rank 0 only


@pytest.mark.parametrize("sets,expected", [
    (["train.precision=bf16", "train.fsdp_param_dtype=bf16"], "applies to FSDP2 only, and train.parallel is ddp"),
    (["train.parallel=fsdp2", "train.fsdp_param_dtype=bf16"], "computes in bf16, and train.precision is fp32"),
    (BF16_PARAMS, "needs a torchrun launch"),
    ([*BF16_PARAMS, "train.precision=auto"], "train.precision=auto is fp32 on this cpu"),
])
def test_bf16_parameters_are_refused_where_they_cannot_apply(sets, expected, tmp_path, monkeypatch):
    """train.fsdp_param_dtype=bf16 is refused in one line naming the fix: under ddp (nothing is gathered), with fp32
    precision (the network would compute in bf16 without autocast), outside a torchrun launch (nothing is sharded),
    and where precision auto is fp32 (here: a CPU without bf16 instructions); nothing of the run is written."""
    monkeypatch.setattr("flopmatch.device.cpu_has_native_bf16", lambda: False)
    with pytest.raises(UserError) as e:
        train(tiny_run_config("masked", STEPS, sets=[*SETS, *sets]), tmp_path / "run", progress=False)
    assert expected in str(e.value) and "\n" not in str(e.value) and "fp32" in str(e.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_process_eval_equals_one_process(two_process):
    """`flopmatch eval` under 2 processes (each sampling every other batch) writes the 1-process metrics and images."""
    from flopmatch.evaluation.run import EvalConfig, evaluate
    from flopmatch.sample import load_sampler

    root, _ = two_process
    one = root / "eval-1"
    evaluate(one, [load_sampler(one).cfg.sample], EvalConfig(**EVAL), progress=False)
    (k1, e1), = json.loads((one / "eval.json").read_text())["entries"].items()
    (k2, e2), = json.loads((root / "eval-2" / "eval.json").read_text())["entries"].items()
    assert k1 == k2 and e1["metrics"] == e2["metrics"]
    m1, m2 = e1["manifest"], e2["manifest"]
    assert m1["generated_images_sha256"] == m2["generated_images_sha256"] and m1["num_samples"] == 7
    assert not list((root / "eval-2").rglob("shard-*"))  # the ranks' shards are cleaned up


@pytest.mark.slow
def test_a_multi_gpu_slurm_jobs_command_trains_as_one_process(two_process, tmp_path, monkeypatch):
    """What the SLURM job of a run with several GPUs executes (:class:`WorkerJob` with 2 processes: a real torchrun
    starting the study worker), here on CPU with gloo: the run trains to the 1-process weights, leaving no torchrun
    log folders in the node's temporary directory. (No setting to evaluate: evaluation under 2 processes is
    test_two_process_eval_equals_one_process's.)"""
    root, _ = two_process
    (tmp_path / "node-tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "node-tmp"))  # the job's processes inherit it
    cfg = tiny_run_config("masked", STEPS, sets=SETS)
    job = {"name": "two", "config": asdict(cfg), "run_dir": str(tmp_path / "two"), "eval": EVAL, "settings": []}
    atomic_write_json(tmp_path / "two.json", job)
    worker = WorkerJob(str(tmp_path / "two.json"), str(tmp_path / "two.log"), procs=2, threads=2)
    assert worker.command()[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                     f"--log-dir={os.devnull}"]
    returned = []  # the worker returns, or raises when torchrun exits non-zero

    def call() -> None:
        worker()
        returned.append(True)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(LAUNCH_TIMEOUT_S)
    log = (tmp_path / "two.log").read_text()
    if thread.is_alive():
        proc = worker._proc
        if proc is not None:
            proc.terminate()  # torchrun stops its workers on SIGTERM
        pytest.fail(f"the 2-process worker hung for {LAUNCH_TIMEOUT_S}s:\n{log[-3000:]}")
    assert returned, log[-3000:]
    assert read_state(tmp_path / "two")["world_size"] == 2
    assert_same_run(tmp_path / "two", root / "one-masked")
    assert job_finished(job)
    assert not list((tmp_path / "node-tmp").glob("torchelastic_*"))


def _as_old_run(run: Path) -> None:
    """Rewrite a run's checkpoint state as a checkpoint of the old per-rank randomness has it (no ``train_randomness``)."""
    state = read_state(run)
    del state["train_randomness"]
    copy_checkpoint(run / CHECKPOINT, run / CHECKPOINT, state)


def test_resuming_a_run_of_the_old_randomness_is_refused(tmp_path):
    """An unfinished run started under the per-rank randomness is refused on resume with a one-line error naming the
    fix; continuing a finished one to a larger budget too; a finished one is still reported as finished."""
    cfg = tiny_run_config("masked", 4, sets=["train.schedule=constant", "train.warmup_steps=0"])
    run = tmp_path / "run"
    train(cfg, run, progress=False, stop_after=2)
    _as_old_run(run)
    before = (run / CHECKPOINT).read_bytes()
    with pytest.raises(UserError, match=r"earlier flopmatch .*version that started it.* new --out") as e:
        train(cfg, run, progress=False)
    assert "\n" not in str(e.value) and (run / CHECKPOINT).read_bytes() == before

    done = tmp_path / "done"
    train(cfg, done, progress=False)
    _as_old_run(done)
    assert train(cfg, done, progress=False)["done"]  # finished: nothing to redo, nothing refused
    bigger = tiny_run_config("masked", 6, sets=["train.schedule=constant", "train.warmup_steps=0"])
    with pytest.raises(UserError, match="earlier flopmatch"):
        train(bigger, done, progress=False)
    assert not (done / "budgets").exists()  # refused before the continuation moved anything


def _torchrun(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 ARGS``, one thread per process; its output captured."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", f"--log-dir={os.devnull}",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
@pytest.mark.parametrize("case", ["held", "alike", "flag"])
def test_a_torchrun_refusal_is_said_once(tmp_path, case):
    """`torchrun -m flopmatch train` refused, every rank stopping with exit 2, the message printed once for the launch
    and no traceback of a rank: ``held``, a run another process holds (rank 0's refusal, told to the others);
    ``alike``, a config every rank refuses by itself (a global batch the 2 processes cannot split); ``flag``, a bad
    flag value, refused by every rank's argument parser before any process group exists."""
    from flopmatch.config import to_dict

    sets = SETS + (["train.batch_size=7"] if case == "alike" else [])
    (tmp_path / "cfg.json").write_text(json.dumps(to_dict(tiny_run_config("masked", STEPS, sets=sets))))
    args = ["-m", "flopmatch", "train", "--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "held"), "--quiet"]
    args += ["--budget", "abc"] if case == "flag" else []
    with DirectoryLock(tmp_path / "held", "run") if case == "held" else contextlib.nullcontext():
        done = _torchrun(args)
    said = done.stdout + done.stderr
    expected = {"held": "is in use", "alike": "must be divisible by the 2 processes", "flag": "expected float"}[case]
    assert done.returncode != 0 and said.count(": error: ") == 1 and expected in said, said[-3000:]
    assert "[rank" not in said and "exitcode  : 2" in said, said[-3000:]  # both ranks exited 2; no rank's traceback


SAID_ON_MAIN = textwrap.dedent("""
    import os
    from flopmatch import dist
    if os.environ["RANK"] == "0":
        print("rank 0 says it:", not dist.said_on_main("the same error"), flush=True)
    else:
        print("rank 1 repeats it:", not dist.said_on_main("the same error"), flush=True)
        print("rank 1 says its own:", not dist.said_on_main("an error of its own"), flush=True)
""")


@pytest.mark.slow
def test_another_rank_says_an_error_unless_rank_0_says_the_same(tmp_path):
    """dist.said_on_main through a real torchrun's store: rank 0 always says its error; rank 1 is quiet about the
    same message and still says one of its own (an error only its node or GPU has must not be lost)."""
    (tmp_path / "said.py").write_text(SAID_ON_MAIN)
    done = _torchrun([str(tmp_path / "said.py")], cwd=tmp_path)
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-3000:]
    assert "rank 0 says it: True" in said and "rank 1 says its own: True" in said, said[-3000:]
    assert "rank 1 repeats it: False" in said, said[-3000:]


PEER_LOST = textwrap.dedent("""
    import os, time
    import torch
    from flopmatch import dist
    dist.init(torch.device("cpu"))
    dist.barrier()
    if dist.rank() == 1:
        os._exit(0)  # gone without a word, as a killed or crashed peer is
    time.sleep(1.0)
    try:
        dist.all_reduce_mean(torch.ones(1))
        print("NO ERROR", flush=True)
    except RuntimeError as e:
        print("PEER LOST:", dist.peer_lost(e), "|", type(e).__name__, str(e).splitlines()[0][:200], flush=True)
        print("A BUG OF ITS OWN:", dist.peer_lost(RuntimeError("expected all tensors to be on the same device")), flush=True)
    os._exit(0)
""")


def test_a_lost_peer_is_told_from_a_bug(tmp_path):
    """A collective whose peer process has gone (exited mid-launch, as a kill -9 leaves it) raises an error that
    dist.peer_lost recognises, so the CLI says it in one line; another RuntimeError is not mistaken for it."""
    out = launch([], code=PEER_LOST)[0]
    assert "PEER LOST: True" in out and "A BUG OF ITS OWN: False" in out, out[-3000:]
