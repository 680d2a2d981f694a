"""The SLURM launcher against a real SLURM: a one-node cluster started by scripts/slurm-local.sh.

The end-to-end test runs a tiny study through it, preempts one run's job mid-training (``scancel --signal=USR2``,
the signal SLURM sends before a time-out or preemption: the run checkpoints and its job is requeued, resuming it),
cancels the other run's job with ``scancel`` mid-training, re-runs the study (which resubmits it; the run resumes from its checkpoint), kills the study process
while that job is queued, re-runs it again (which must find the job instead of submitting it twice),
and checks that every run ends with the same weights and the same evaluation as a local study.
Skipped, with the reason, where SLURM cannot run (not root, or slurm-wlm/munge not installed:
``scripts/setup.sh`` installs them when it runs as root, as in CI).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file

from flopmatch.errors import UserError
from flopmatch.evaluation.run import EvalConfig
from flopmatch.study import slurm as slurm_module
from flopmatch.study.job import run_job
from flopmatch.study.presets import study_preset
from flopmatch.study.runner import check_gpu_split, not_started, study
from flopmatch.study.slurm import (
    SlurmConfig,
    SlurmLauncher,
    check_resources,
    job_outcome,
    node_resources,
    parse_extra,
    parse_slurm_time,
    read_jobs,
    squeue_jobs,
    squeue_states,
    worker_error,
    worker_warnings,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm-local.sh"
# Main settings only (no operating-point or post-hoc EMA sweep): what is tested is the jobs' life cycle, and the
# sweeps have their own tests. Budget 4e10: ~800 steps per run, a few seconds, so that a signal sent after step 20-40
# reaches a run still training (at 1e10 a fast host trained all 199 steps in 0.8 s, and the cancel came too late).
STUDY = ["study", "--preset", "tiny", "--objectives", "diffusion,masked", "--budgets", "4e10", "--eval-samples", "10",
         "--sweep-guidance", "none", "--eval-ema", "none", "--set", "train.checkpoint_every=10"]
VICTIM = "diffusion-d1-b4e10-s0"  # the run whose job is cancelled and whose study process is killed
PREEMPTED = "masked-d1-b4e10-s0"  # the run whose job is signalled as on a time-out or preemption, and requeued


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_missing() -> str | None:
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd); CI runs as root"
    for tool in ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "runuser"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} not installed (apt-get install -y slurm-wlm munge; scripts/setup.sh does it as root)"
    return None


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A running one-node cluster; yields the environment that points SLURM commands at it."""
    why = _slurm_missing()
    if why:
        pytest.skip(why)
    d = tmp_path_factory.mktemp("slurm")
    d.chmod(0o755)  # munged insists that every directory above its socket is searchable
    env = dict(os.environ, SLURMCTLD_PORT=str(_free_port()), SLURMD_PORT=str(_free_port()))
    out = subprocess.run([str(SCRIPT), "start", str(d)], capture_output=True, text=True, env=env, timeout=120)
    if out.returncode != 0:
        subprocess.run([str(SCRIPT), "stop", str(d)], capture_output=True, timeout=120)
        pytest.fail(f"scripts/slurm-local.sh start failed: {out.stderr.strip() or out.stdout.strip()}")
    try:
        yield dict(os.environ, SLURM_CONF=str(d / "slurm.conf"))
    finally:
        subprocess.run([str(SCRIPT), "stop", str(d)], capture_output=True, timeout=120)


@pytest.fixture
def preemptible(slurm_cluster):
    """Two more partitions on the cluster's node, for this test only: ``lowprio`` (PreemptMode=CANCEL: a job preempted
    there ends PREEMPTED, not requeued; MaxTime 1 h) and ``highprio`` (a higher PriorityTier: its jobs preempt
    ``lowprio``'s). Yields the cluster's environment; cancels their jobs and deletes them afterwards."""
    node = subprocess.run(["sinfo", "--noheader", "--format=%N"], env=slurm_cluster, capture_output=True, text=True,
                          check=True).stdout.split()[0]
    parts = {"lowprio": ["PriorityTier=1", "PreemptMode=CANCEL", "MaxTime=60"], "highprio": ["PriorityTier=10"]}
    for name, opts in parts.items():
        subprocess.run(["scontrol", "create", f"PartitionName={name}", f"Nodes={node}", *opts], env=slurm_cluster,
                       check=True)
    try:
        yield slurm_cluster
    finally:
        for name in parts:
            subprocess.run(["scancel", f"--partition={name}"], env=slurm_cluster, check=False)
        for name in parts:  # deleting a partition fails while a job of it is still ending
            for _ in range(100):
                if subprocess.run(["scontrol", "delete", f"PartitionName={name}"], env=slurm_cluster,
                                  capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)


def _flopmatch(args: list[str], env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flopmatch", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _step(run: Path) -> int:
    """The last step logged in ``run``'s metrics.jsonl (0 before the first row)."""
    try:
        rows = (run / "metrics.jsonl").read_text().splitlines()
        return json.loads(rows[-1])["step"] if rows else 0
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _wait(cond, what: str, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the study exited ({proc.returncode}) before {what}:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _jid(jobs: Path, run: str) -> str:
    """The SLURM job id jobs.json records for ``run``."""
    return json.loads(jobs.read_text())[run]["id"]


def _results(study: Path) -> dict:
    """Per run: every tensor of the final checkpoint (weights, EMA, optimizer) and every metric of every setting.

    Tensors, not the checkpoint file's sha256: the file also records wall-clock fields.
    """
    out = {}
    for run in sorted((study / "runs").iterdir()):
        entries = json.loads((run / "eval.json").read_text())["entries"]
        tensors = load_file(run / "checkpoint" / "checkpoint.safetensors")
        out[run.name] = {"tensors": {k: v.numpy().tobytes() for k, v in tensors.items()},
                         "metrics": {k: e["metrics"] for k, e in entries.items()}}
    return out


@pytest.mark.slow
def test_study_through_real_slurm_survives_scancel_and_its_own_restart(slurm_cluster, tmp_path, monkeypatch):
    env = dict(slurm_cluster, FLOPMATCH_THREADS="1")  # one thread per run everywhere: bit-identical floats
    monkeypatch.setenv("SLURM_CONF", env["SLURM_CONF"])  # for squeue_states in this process
    slurm = ["--launcher", "slurm", "--gpus-per-run", "0", "--cpus-per-run", "1", "--slurm-poll", "0.5"]
    out = tmp_path / "slurm"

    # 1. preempt one run's job mid-training: it checkpoints, SLURM requeues the same job, and the run resumes there.
    #    Cancel the victim's job mid-training: the study waits for the other run, then fails naming the victim.
    first = _flopmatch([*STUDY, "--out", str(out), *slurm], env)
    jobs = out / "slurm" / "jobs.json"
    _wait(lambda: _step(out / "runs" / PREEMPTED) >= 20, "the preempted run to pass step 20", first)
    preempted = _jid(jobs, PREEMPTED)
    subprocess.run(["scancel", "--signal=USR2", preempted], env=env, check=True)
    _wait(lambda: _step(out / "runs" / VICTIM) >= 40, "the victim to pass step 40", first)  # checkpoints every 10
    cancelled = _jid(jobs, VICTIM)
    subprocess.run(["scancel", cancelled], env=env, check=True)
    log = first.communicate(timeout=300)[0]
    assert first.returncode == 2, log
    # the failure says which job, in which state, why (the worker wrote no error: it was stopped) and where its log is
    assert (f"{VICTIM} (job {cancelled}, CANCELLED): no error in its log (stopped from outside" in log
            and f"log: {out / 'logs' / VICTIM}.log" in log and "re-run to continue" in log), log
    assert "[study] slurm, the tokenizer phase: 1 job(s) submitted" in log and "[study] slurm, runs: 2 job(s)" in log
    assert re.search(rf"\[study\] slurm: running: .*{PREEMPTED} \(job {preempted}", log), log
    assert "1 run(s) failed" in log and f"done: {PREEMPTED}" in log  # the preempted run finished in its requeued job
    assert "Traceback" not in log
    interrupted_at = _step(out / "runs" / VICTIM)
    assert interrupted_at > 0
    requeued = (out / "logs" / f"{PREEMPTED}.log").read_text()
    assert requeued.count(f"[slurm] job {preempted} ") == 2, requeued  # the same job ran twice: requeued, not resubmitted
    assert re.search(r"interrupted at step (\d+)/\d+; checkpoint saved", requeued), requeued
    stopped = re.search(r"interrupted at step (\d+)/", requeued).group(1)
    assert f"resuming at step {stopped}/" in requeued and _jid(jobs, PREEMPTED) == preempted
    assert "the job is requeued and resumes the run by itself" in requeued  # not the worker's "re-run" advice alone

    # 2. re-run with the partition down (jobs queue but do not start): the cancelled run is resubmitted and
    #    stays queued; kill this study process, the job outlives it
    partition = ["scontrol", "update", "PartitionName=local"]
    subprocess.run([*partition, "State=DOWN"], env=env, check=True)
    second = _flopmatch([*STUDY, "--out", str(out), *slurm], env)
    _wait(lambda: _jid(jobs, VICTIM) != cancelled, "the resubmission", second)
    resubmitted = _jid(jobs, VICTIM)
    second.send_signal(signal.SIGKILL)
    second.wait()
    assert squeue_states([resubmitted]).get(resubmitted) == "PENDING"

    # 3. re-run again: the queued job is found, not submitted twice; once the partition is up the study completes
    third = _flopmatch([*STUDY, "--out", str(out), *slurm], env)
    seen = []
    for line in third.stdout:  # until the study has looked for its jobs
        seen.append(line)
        if "job(s) submitted" in line:
            break
    assert "0 job(s) submitted, 1 found queued or running" in seen[-1], "".join(seen)
    subprocess.run([*partition, "State=UP"], env=env, check=True)
    log = "".join(seen) + third.communicate(timeout=300)[0]
    assert third.returncode == 0, log
    assert "waiting for" not in log  # the queued job is the run's writer: attached to, not waited out
    assert _jid(jobs, VICTIM) == resubmitted
    assert (out / "report.html").exists() and (out / "inference_timing.json").exists()
    assert not list((out / "slurm").rglob(".submission_file_*"))  # submitit's links to the scripts: removed
    assert not list((out / "slurm").rglob("*_result.pkl"))  # submitit's results: never read, not left behind
    for phase in ("prepare-tokenizers", "timing-phase"):  # the study's phases ran as jobs too, not in the study process
        assert phase in json.loads(jobs.read_text()) and "[slurm] job" in (out / "logs" / f"{phase}.log").read_text()
    # each study process submitted into a private folder of its own; the timing phase had its node to itself
    recs = read_jobs(out / "slurm")
    assert len({r["folder"].split("/")[0] for r in recs.values()}) == 3 and (out / "slurm").stat().st_mode & 0o077 == 0
    script = (out / "slurm" / recs["timing-phase"]["folder"] / f"{recs['timing-phase']['id']}_submission.sh").read_text()
    assert "#SBATCH --exclusive" in script and "wckey" not in script, script
    resumed = (out / "logs" / f"{VICTIM}.log").read_text()
    assert "resuming at step" in resumed, resumed  # it continued from its checkpoint, it did not start over
    assert interrupted_at < _step(out / "runs" / VICTIM)  # the cancel interrupted it: it had steps left to train

    # The reference: the same jobs run here, in this process (one thread, like the jobs' workers).
    ref = tmp_path / "local"
    for path in sorted((out / "jobs").glob("*-s0.json")):
        job = json.loads(path.read_text())
        run_job({**job, "run_dir": str(ref / "runs" / job["name"])}, progress=False)
    assert _results(out) == _results(ref)  # bit-identical weights and optimizer state, the same metrics as locally


def test_slurm_time_strings():
    assert parse_slurm_time("90") == 90
    assert parse_slurm_time("4:00:00") == 240
    assert parse_slurm_time("1-00:30") == 1470
    assert parse_slurm_time("2-3") == 2 * 1440 + 180
    assert parse_slurm_time("10:30") == 11  # MM:SS, rounded up to whole minutes
    for bad in ("", "abc", "1:2:3:4", "-5", "0"):
        with pytest.raises(UserError):
            parse_slurm_time(bad)


def test_slurm_flags_without_the_slurm_launcher_are_refused(tmp_path):
    out = subprocess.run([sys.executable, "-m", "flopmatch", "study", "--preset", "tiny", "--partition", "gpu",
                          "--out", str(tmp_path / "s")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == "flopmatch: error: --partition applies only with --launcher slurm"
    assert not (tmp_path / "s").exists()


def test_missing_squeue_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UserError, match="squeue not found"):
        squeue_states(["1"])


def test_unknown_partition_is_refused_before_any_work(slurm_cluster, tmp_path):
    out = subprocess.run([sys.executable, "-m", "flopmatch", "study", "--preset", "tiny", "--launcher", "slurm",
                          "--partition", "nope", "--out", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=120, env=slurm_cluster)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == "flopmatch: error: SLURM has no partition 'nope'; `sinfo` lists them"
    assert not (tmp_path / "s").exists()


def test_gpus_that_do_not_split_the_batch_are_refused_before_any_work(tmp_path):
    """A run on G GPUs splits each batch over G torchrun processes: a batch size G does not divide is refused at once
    (naming the run, its batch size and the flag), not after the jobs were queued and failed on the cluster."""
    scfg = study_preset("tiny")
    scfg.overrides += ["train.batch_size=8"]
    with pytest.raises(UserError, match=r"--gpus-per-run 3: .*train.batch_size 8 does not split over 3 processes"):
        study(tmp_path / "s", scfg, launcher="slurm", slurm=SlurmConfig(gpus_per_run=3), progress=False)
    assert not (tmp_path / "s").exists()


SINFO = """gpu|64|gpu:a100:4(S:0-1)|512000|2-00:00:00
gpu|32|gpu:a100:2,mps:200|256000|2-00:00:00
cpu*|128|(null)|1024000|infinite
debug|8|(null)|16000|1:00:00
"""


def test_node_resources_read_from_sinfo():
    """The most one node offers, over a partition's node groups: CPUs, GPUs (typed or not, beside other GRES) and MB;
    no partition named: the default (starred) one; an unlisted partition: None."""
    assert node_resources(SINFO, "gpu") == {"cpus": 64, "gpus": 4, "mem_mb": 512000, "time_min": 2880}
    assert node_resources(SINFO, None) == {"cpus": 128, "gpus": 0, "mem_mb": 1024000, "time_min": None}
    assert node_resources(SINFO, "nope") is None and node_resources("gpu|8|gpu:2|1000\n", None) is None
    check_resources(SlurmConfig(partition="gpu", gpus_per_run=4, cpus_per_run=64, mem_gb=500), SINFO)
    for cfg, match in ((SlurmConfig(), r"--gpus-per-run 1: the nodes of the default partition have no GPUs \(sinfo\); "
                                       r"use --gpus-per-run 0 to train on CPUs, or another --partition"),
                       (SlurmConfig(partition="gpu", gpus_per_run=8), r"have at most 4 GPUs .*use --gpus-per-run 4,"),
                       (SlurmConfig(gpus_per_run=0, cpus_per_run=200), r"--cpus-per-run 200: .* at most 128 CPUs"),
                       (SlurmConfig(partition="gpu", mem_gb=600), r"--slurm-mem-gb 600: .* at most 500 GB")):
        with pytest.raises(UserError, match=match):
            check_resources(cfg, SINFO)


def test_a_directory_left_by_a_refused_first_submission_takes_a_corrected_command(tmp_path):
    """sbatch refusing the study's first job leaves settings, job descriptions and logs but no job id: the directory
    has no result, so a corrected command may replace the settings; one with job ids has begun."""
    out = tmp_path / "s"
    for name in ("study.json", "plan.json", "jobs/prepare-tokenizers.json", "logs/prepare-tokenizers.log"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("{}")
    (out / "slurm").mkdir()
    assert not_started(out)
    (out / "slurm" / "7").mkdir()  # a job's folder: sbatch took it, the study died before recording its id
    assert not not_started(out)
    (out / "slurm" / "7").rmdir()
    (out / "slurm" / "jobs.json").write_text('{"prepare-tokenizers": "7"}')
    assert not not_started(out)


def test_resources_no_node_has_and_plan_only_flags_are_refused_before_any_work(slurm_cluster, tmp_path):
    """Against the one-node cluster (2 CPUs, no GPUs): the default --gpus-per-run 1, more CPUs than a node has, and
    --plan-only with a bad partition or time are each one line, exit 2, nothing written (they were an sbatch error
    after the study had written its directory, a job queued for ever, and an accepted plan)."""
    cases = {("--gpus-per-run", "1"): "--gpus-per-run 1: the nodes of the default partition have no GPUs",
             ("--gpus-per-run", "0", "--cpus-per-run", "64"): "--cpus-per-run 64: the nodes of the default partition "
                                                               "have at most",
             ("--plan-only", "--partition", "nope"): "SLURM has no partition 'nope'",
             ("--plan-only", "--slurm-time", "bogus"): "--slurm-time"}
    for flags, start in cases.items():
        out = subprocess.run([sys.executable, "-m", "flopmatch", "study", "--preset", "tiny", "--launcher", "slurm",
                              *flags, "--out", str(tmp_path / "s")], capture_output=True, text=True, timeout=120,
                             env=slurm_cluster)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, (flags, out.stderr)
        assert start in out.stderr, (flags, out.stderr)
        assert not (tmp_path / "s").exists()


def test_a_recorded_job_id_of_another_job_is_not_waited_on(slurm_cluster, monkeypatch, tmp_path):
    """A job id in jobs.json that SLURM now gives to another job (ids reset or wrapped, the study moved) is not this
    study's: squeue_states leaves a job of another name out, as ended, so the run is submitted again."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster["SLURM_CONF"])
    jid = subprocess.run(["sbatch", "--parsable", "--job-name", "someone-else", "--hold", "--wrap", "sleep 60"],
                         env=slurm_cluster, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    # a job an earlier flopmatch submitted (jobs.json: run -> id, job name flopmatch-<run>) is still found as this study's
    old = subprocess.run(["sbatch", "--parsable", "--job-name", "flopmatch-masked-d1-b4e10-s0", "--hold", "--wrap",
                          "sleep 60"], env=slurm_cluster, capture_output=True, text=True, check=True).stdout.split(";")[0].strip()
    try:
        assert squeue_states([jid]) == {jid: "PENDING"}
        assert squeue_states([jid], {jid: "someone-else"}) == {jid: "PENDING"}
        assert squeue_states([jid], {jid: "flopmatch-masked-d1-b4e10-s0"}) == {}
        (tmp_path / "jobs.json").write_text(json.dumps({"masked-d1-b4e10-s0": old}))
        rec = read_jobs(tmp_path)["masked-d1-b4e10-s0"]
        assert rec == {"id": old, "job_name": "flopmatch-masked-d1-b4e10-s0", "folder": old}
        assert squeue_states([old, jid], {old: rec["job_name"], jid: "flopmatch-masked-d1-b4e10-s0-abcdef"}) == {old: "PENDING"}
    finally:
        subprocess.run(["scancel", jid, old], env=slurm_cluster, check=False)


def test_a_controller_that_keeps_timing_out_ends_the_wait(monkeypatch):
    """squeue timing out counts as a failed call: the study waits through a few (jobs read as alive), then gives up
    with one line instead of waiting for ever."""
    def timeout(*args, **kw):
        raise subprocess.TimeoutExpired(args[0], 60)
    monkeypatch.setattr(subprocess, "run", timeout)
    for _ in range(4):
        assert squeue_states(["3"]) == {"3": "NO ANSWER"}
    with pytest.raises(UserError, match=r"squeue failed 5 times in a row \(no answer within 60 s\)"):
        squeue_states(["3"])


def test_time_above_the_partitions_limit_and_several_problems_are_one_line():
    """--slurm-time above the partition's time limit (sinfo %l) would pend for ever: refused naming the limit; no limit
    (infinite) passes; every problem of one command is said at once."""
    check_resources(SlurmConfig(gpus_per_run=0, time_min=10 * 1440), SINFO)  # infinite
    check_resources(SlurmConfig(partition="debug", gpus_per_run=0, cpus_per_run=8, time_min=60), SINFO)
    with pytest.raises(UserError, match=r"^--slurm-time 4:00:00 exceeds the time limit of partition 'debug', 1:00:00 "
                                        r"\(sinfo\); use --slurm-time 1:00:00 or less"):
        check_resources(SlurmConfig(partition="debug", gpus_per_run=0, cpus_per_run=8), SINFO)
    with pytest.raises(UserError, match=r"^--gpus-per-run 1: .*; --cpus-per-run 16: .*; --slurm-time 4:00:00 exceeds"):
        check_resources(SlurmConfig(partition="debug", cpus_per_run=16), SINFO)


def test_the_workers_error_and_warnings_are_read_from_the_jobs_part_of_the_log():
    """The run's log holds every job of the run: the reason is the failed job's own last `flopmatch: error:` line,
    else its last exception line; None when that job wrote neither or never started. A finished job's warnings are
    its own too."""
    log = ("[slurm] job 5 on n1: python -m flopmatch.study.worker x.json\nflopmatch: error: an old job's error\n"
           "[slurm] job 9 on n1: python -m flopmatch.study.worker x.json\nTraceback (most recent call last):\n"
           "  File \"x.py\", line 1\ntorch.OutOfMemoryError: CUDA out of memory\n[rank0]: flopmatch: error: device "
           "cuda requested but CUDA is not available\nflopmatch: error: the last one\n")
    assert worker_error(log, "9") == "the last one" and worker_error(log, "5") == "an old job's error"
    assert worker_error(log.replace("flopmatch: error: the last one\n", "").replace("[rank0]: flopmatch", "x"), "9") \
        == "torch.OutOfMemoryError: CUDA out of memory"
    assert worker_error(log, "7") is None and worker_error("[slurm] job 7 on n1: ...\nstep 3\n", "7") is None
    # a requeued job starts twice under one id: its warnings are from both starts, said once each
    requeued = ("[slurm] job 3 on n1: w\n[study] warning: busy node\n[slurm] job 3: stopped for SLURM's time-out\n"
                "[slurm] job 3 on n2: w\n[study] warning: busy node\nwarning: FID from n = 10\n[slurm] job 4 on n1: w\n"
                "warning: a later job's\n")
    assert worker_warnings(requeued, "3") == ["[study] warning: busy node", "warning: FID from n = 10"]


def test_extra_sbatch_options_and_the_job_records_of_an_earlier_flopmatch():
    """--slurm-extra: KEY=VALUE or a bare flag; an option with a flag of its own is refused naming it. jobs.json of an
    earlier flopmatch (run -> id) reads as jobs named flopmatch-<run> with their files in slurm/<id>/."""
    assert parse_extra(["reservation=r1", "--mail_type=FAIL", "requeue"]) == {"reservation": "r1", "mail-type": "FAIL",
                                                                             "requeue": True}
    for bad, match in (("time=10", "use --slurm-time"), ("job-name=x", "flopmatch sets it"), ("=x", "KEY=VALUE"),
                       ("qos=", "KEY=VALUE"), ("gres=gpu:2", "use --gpus-per-run"), ("no-requeue", "flopmatch sets it"),
                       ("mem-per-cpu=4G", "use --slurm-mem-gb")):
        with pytest.raises(UserError, match=match):
            parse_extra([bad])


def test_jobs_that_cannot_run_as_configured_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """train.device cuda with --gpus-per-run 0 (every job would start and fail), and a login node lacking some SLURM
    commands (a traceback, or an sbatch error after the study began), are one line each with nothing written."""
    scfg = study_preset("tiny")
    scfg.overrides += ["train.device=cuda"]
    with pytest.raises(UserError, match=r"train.device cuda needs a GPU, and --gpus-per-run 0 gives its job none"):
        study(tmp_path / "s", scfg, launcher="slurm", slurm=SlurmConfig(gpus_per_run=0), progress=False)
    plan = [SimpleNamespace(name="r", config={"train": {"device": "cuda:1", "batch_size": 8}})]
    with pytest.raises(UserError, match="sees its GPU as cuda:0"):
        check_gpu_split(plan, SlurmConfig(gpus_per_run=1))
    plan[0].config["train"]["device"] = "cpu"
    check_gpu_split(plan, SlurmConfig(gpus_per_run=1))
    assert "each job's 1 GPU(s) (--gpus-per-run) sit idle" in capsys.readouterr().out
    some = tmp_path / "bin"
    some.mkdir()
    for tool in ("sinfo", "squeue"):
        (some / tool).symlink_to(shutil.which(tool) or "/bin/true")
    monkeypatch.setenv("PATH", str(some))
    with pytest.raises(UserError, match=r"^sbatch, srun, scontrol not found: --launcher slurm needs"):
        study(tmp_path / "s", study_preset("tiny"), launcher="slurm", slurm=SlurmConfig(gpus_per_run=0), progress=False)
    assert not (tmp_path / "s").exists()


def test_a_time_limit_above_the_partitions_is_refused_by_the_real_sinfo(slurm_cluster, tmp_path, monkeypatch):
    """Against the cluster with its partition limited to an hour: the default --slurm-time 4:00:00 is refused (it would
    pend for ever as PartitionTimeLimit), naming the limit; an hour passes; nothing is written."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster["SLURM_CONF"])
    partition = ["scontrol", "update", "PartitionName=local"]
    subprocess.run([*partition, "MaxTime=60"], env=slurm_cluster, check=True)
    try:
        with pytest.raises(UserError, match=r"--slurm-time 4:00:00 exceeds the time limit of the default partition, "
                                            r"1:00:00 \(sinfo\)"):
            SlurmLauncher(tmp_path / "s", SlurmConfig(gpus_per_run=0, cpus_per_run=1)).check()
        SlurmLauncher(tmp_path / "s", SlurmConfig(gpus_per_run=0, cpus_per_run=1, time_min=60)).check()
    finally:
        subprocess.run([*partition, "MaxTime=INFINITE"], env=slurm_cluster, check=True)
    assert not (tmp_path / "s").exists()


def test_failed_jobs_are_reported_one_per_line_with_the_workers_error(slurm_cluster, tmp_path, monkeypatch, capsys):
    """Two jobs that fail in their worker, submitted held (--slurm-extra hold): the progress shows each run pending
    with squeue's reason and its job id; once released, each failure is its own line with the job id, its state, the
    worker's error (a `flopmatch: error:` line; a traceback's last line) and the log. The jobs ran with the
    --slurm-setup line, the extra options and no wckey, under job names unique to the study directory, from a private
    submitit folder of this process, which keeps no result pickle."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster["SLURM_CONF"])
    out = tmp_path / "s"
    cfg = SlurmConfig(gpus_per_run=0, cpus_per_run=1, poll_s=0.3, setup=["echo setup-ran"],
                      extra=parse_extra(["hold", "comment=flopmatch-test"]))
    launcher = SlurmLauncher(out, cfg)
    launcher.check()
    assert not out.exists()
    jobs = [{"name": "bad-config", "config": {"nope": 1}, "run_dir": str(out / "runs" / "bad-config")},
            {"name": "bad-crash", "run_dir": str(out / "runs" / "bad-crash")}]  # no config: a KeyError in the worker
    result: list = []
    thread = threading.Thread(target=lambda: result.append(launcher.run(jobs, lambda j: None, lambda j: False, True)))
    thread.start()
    said = ""
    deadline = time.monotonic() + 60
    while said.count("JobHeldUser") < 1 or "bad-crash (job" not in said:
        assert time.monotonic() < deadline and thread.is_alive(), said
        said += capsys.readouterr().out
        time.sleep(0.1)
    recs = read_jobs(out / "slurm")
    ids = {name: r["id"] for name, r in recs.items()}
    assert squeue_jobs(list(ids.values()))[ids["bad-config"]] == ("PENDING", "JobHeldUser")
    comment = subprocess.run(["squeue", "--noheader", "-o", "%k", "-j", ids["bad-config"]], env=slurm_cluster,
                             capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run(["scontrol", "release", *ids.values()], env=slurm_cluster, check=True)
    thread.join(timeout=120)
    said += capsys.readouterr().out
    assert not thread.is_alive() and comment == "flopmatch-test"
    assert "[study] slurm, runs: 2 job(s) submitted, 0 found" in said
    assert f"[study] slurm: pending (JobHeldUser): bad-config (job {ids['bad-config']}), bad-crash (job " in said, said
    assert sorted(result[0]) == [f"bad-config (job {ids['bad-config']}, FAILED)", f"bad-crash (job {ids['bad-crash']}, FAILED)"]
    lines = [line for line in said.splitlines() if line.startswith("[study] slurm: failed: ")]
    assert len(lines) == 2, said
    for line in lines:
        name = line.split()[3]
        folder = out / "slurm" / recs[name]["folder"]
        assert line.endswith(f"; log: {out / 'logs' / name}.log and {folder}/"), line
        assert recs[name]["job_name"] == f"flopmatch-{name}-{launcher.tag}" and folder.parent.name == launcher.token
        assert "setup-ran" in (folder / f"{folder.name}_0_log.out").read_text()
        assert "wckey" not in (folder / f"{folder.name}_submission.sh").read_text()
    assert any(": unknown config key nope; valid keys:" in line for line in lines), lines
    assert any(line.split("): ", 1)[1].startswith("KeyError: 'config'") for line in lines), lines
    assert (out / "slurm").stat().st_mode & 0o777 == 0o700 and (out / "slurm" / launcher.token).stat().st_mode & 0o777 == 0o700
    assert not list((out / "slurm").rglob("*_result.pkl"))


def test_a_partition_list_is_checked_partition_by_partition(capsys):
    """--partition a,b (sbatch starts the job in the first that can run it): refused only when no listed partition
    could run the jobs, naming each and why; one that cannot is a warning; an unknown or empty name is refused."""
    cfg = SlurmConfig(partition="debug,gpu", gpus_per_run=4, cpus_per_run=8, time_min=120)
    assert check_resources(cfg, SINFO) == [
        "[study] warning: partition 'debug' cannot run these jobs (--gpus-per-run 4: the nodes of partition 'debug' "
        "have no GPUs (sinfo); --slurm-time 2:00:00 exceeds the time limit of partition 'debug', 1:00:00 (sinfo)); "
        "they start in 'gpu'"]
    assert check_resources(SlurmConfig(partition=" gpu , cpu", gpus_per_run=0), SINFO) == []
    with pytest.raises(UserError, match=r"^no partition of --partition debug,cpu can run these jobs: --gpus-per-run 1: "
                                        r"the nodes of partition 'debug' have no GPUs \(sinfo\); --gpus-per-run 1: the "
                                        r"nodes of partition 'cpu' have no GPUs \(sinfo\)\. Ask for less"):
        check_resources(SlurmConfig(partition="debug,cpu", time_min=60), SINFO)
    with pytest.raises(UserError, match=r"^SLURM has no partition 'nope', 'gone'; `sinfo` lists them$"):
        check_resources(SlurmConfig(partition="gpu,nope,gone"), SINFO)
    with pytest.raises(UserError, match=r"^--partition 'gpu,': an empty name in the list"):
        check_resources(SlurmConfig(partition="gpu,"), SINFO)
    launcher = SlurmLauncher(Path("s"), SlurmConfig(partition="gpu, debug"))
    assert launcher.sbatch_params({"name": "r"})["partition"] == "gpu,debug"


def test_a_partition_list_against_the_real_sinfo(preemptible, tmp_path, monkeypatch, capsys):
    """Against the cluster (lowprio: MaxTime 1 h): lowprio,local with the default 4 h passes with a warning naming
    lowprio; lowprio alone is refused; an unknown name in a list is refused; nothing is written."""
    monkeypatch.setenv("SLURM_CONF", preemptible["SLURM_CONF"])
    SlurmLauncher(tmp_path / "s", SlurmConfig(partition="lowprio,local", gpus_per_run=0, cpus_per_run=1)).check()
    assert capsys.readouterr().out == ("[study] warning: partition 'lowprio' cannot run these jobs (--slurm-time 4:00:00 "
                                       "exceeds the time limit of partition 'lowprio', 1:00:00 (sinfo)); they start in "
                                       "'local'\n")
    for partition, match in (("lowprio", r"^--slurm-time 4:00:00 exceeds the time limit of partition 'lowprio'"),
                             ("local,nope", r"^SLURM has no partition 'nope'")):
        with pytest.raises(UserError, match=match):
            SlurmLauncher(tmp_path / "s", SlurmConfig(partition=partition, gpus_per_run=0, cpus_per_run=1)).check()
    assert not (tmp_path / "s").exists()


def test_job_states_preempted_is_resubmitted_not_failed():
    """A job's squeue state decides what the study does: alive states wait; a finished run is done whatever the state;
    PREEMPTED (PreemptMode=CANCEL: not requeued), NODE_FAIL and BOOT_FAIL are resubmitted, as is an earlier study process's job unless
    cancelled; other ends with work left are failures."""
    for state in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED", "NO ANSWER"):
        assert job_outcome(state, lambda: pytest.fail("asked")) == "wait"
    assert job_outcome("PREEMPTED", lambda: True) == "done" and job_outcome(None, lambda: True) == "done"
    for state in ("PREEMPTED", "NODE_FAIL", "BOOT_FAIL"):
        assert job_outcome(state, lambda: False) == "resubmit"
    assert job_outcome("FAILED", lambda: False, attached=True) == "resubmit"
    for state in ("FAILED", "CANCELLED", "TIMEOUT", None):
        assert job_outcome(state, lambda: False) == "failed"
    assert job_outcome("CANCELLED", lambda: False, attached=True) == "failed"


@pytest.mark.slow
def test_a_preempted_job_is_resubmitted_and_its_run_resumes(preemptible, tiny_config, tmp_path, monkeypatch, capsys):
    """A real preemption with PreemptMode=CANCEL: a job of a higher-priority partition takes the node, the run's job
    checkpoints (SIGTERM) and ends PREEMPTED, not requeued. The study submits the run again, a new job that resumes
    from the checkpoint; only that job's cancellation (scancel, once it resumed) is a failure."""
    env = preemptible
    monkeypatch.setenv("SLURM_CONF", env["SLURM_CONF"])
    out = tmp_path / "s"
    # a budget the run never spends here: the test needs it training when preempted, however fast the host
    cfg = tiny_config("diffusion", budget_steps=1e6, sets=["train.checkpoint_every=100"])
    job = {"name": "pre", "run_dir": str(out / "runs" / "pre"), "config": asdict(cfg), "eval": asdict(EvalConfig()),
           "settings": []}
    launcher = SlurmLauncher(out, SlurmConfig(partition="lowprio", gpus_per_run=0, cpus_per_run=1, time_min=30,
                                              poll_s=0.3))
    result: list = []
    thread = threading.Thread(target=lambda: result.append(launcher.run([job], lambda j: None, fresh=True)))
    thread.start()
    log = out / "logs" / "pre.log"

    def wait(cond, what: str) -> None:
        deadline = time.monotonic() + 90
        while not cond():
            assert time.monotonic() < deadline and thread.is_alive(), f"{what}: {capsys.readouterr().out}"
            time.sleep(0.05)

    wait(lambda: _step(out / "runs" / "pre") >= 5, "training")
    first = read_jobs(out / "slurm")["pre"]["id"]
    subprocess.run(["sbatch", "--partition=highprio", "--exclusive", "--output=/dev/null", "--wrap", "true"], env=env,
                   check=True, capture_output=True)
    wait(lambda: "resuming at step" in log.read_text(), "the resubmitted job to resume the run")
    stopped = int(re.search(r"interrupted at step (\d+)/", log.read_text()).group(1))
    assert f"resuming at step {stopped}/" in log.read_text()
    wait(lambda: _step(out / "runs" / "pre") > stopped, "the resumed run to train")  # a scancel in its training loop
    second = read_jobs(out / "slurm")["pre"]["id"]
    subprocess.run(["scancel", second], env=env, check=True)
    thread.join(timeout=60)
    said = capsys.readouterr().out
    assert not thread.is_alive() and squeue_states([first, second]) == {first: "PREEMPTED", second: "CANCELLED"}
    assert (f"[study] slurm: pre: job {first} was preempted (not requeued by SLURM); submitted again as job "
            in said), said
    assert "resuming from the run's checkpoint" in said and f"[slurm] job {second} " in log.read_text()
    assert len(result[0]) == 1 and result[0][0].startswith(f"pre (job {second}, CANCELLED): no error in its log"), result


def test_an_unresponsive_controller_bounds_sbatch(slurm_cluster, tmp_path, monkeypatch):
    """sbatch against a controller that does not answer (slurmctld stopped, SIGSTOP) is stopped after
    SBATCH_TIMEOUT_S: one line naming sbatch, the limit and what to check; no job id recorded, no submitit files."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster["SLURM_CONF"])
    monkeypatch.setattr(slurm_module.commands, "SBATCH_TIMEOUT_S", 2)  # the sbatch call's limit
    monkeypatch.setattr(slurm_module.launcher, "SBATCH_TIMEOUT_S", 2)  # and the message that names it
    out = tmp_path / "s"
    launcher = SlurmLauncher(out, SlurmConfig(gpus_per_run=0, cpus_per_run=1))
    job = {"name": "hung", "run_dir": str(out / "runs" / "hung")}
    pid = int((Path(slurm_cluster["SLURM_CONF"]).parent / "slurmctld.pid").read_text())
    os.kill(pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(UserError, match=r"^sbatch did not answer within 2 s submitting hung: the SLURM controller "
                                            r"is down or overloaded; check that `squeue` answers, then re-run"):
            launcher.run([job], lambda j: None, fresh=True)
        assert time.monotonic() - start < 9  # sbatch itself gives up only after MessageTimeout, 10 s here
    finally:
        os.kill(pid, signal.SIGCONT)
        # a submission the controller reads once it runs again would be a job that waits for its pickle: not left
        subprocess.run(["scancel", f"--name={launcher._job_name(job)}"], env=slurm_cluster, check=False)
    assert not (out / "slurm" / "jobs.json").exists() and os.listdir(out / "slurm") == []


def test_a_request_sbatch_would_refuse_is_refused_before_any_work(slurm_cluster, tmp_path, monkeypatch):
    """sbatch --test-only of a run's job script: an unknown constraint or reservation (as a mistyped QOS or account is
    where accounting enforces them) is one line before any job is submitted; a partition that is down passes (jobs
    wait in the queue for it)."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster["SLURM_CONF"])
    base = {"gpus_per_run": 0, "cpus_per_run": 1}
    for cfg, match in ((SlurmConfig(constraint="nofeature", **base), r"\(Invalid feature specification; "),
                       (SlurmConfig(extra={"reservation": "nope"}, **base), r"\(Requested reservation is invalid; ")):
        with pytest.raises(UserError, match=r"^sbatch refuses these jobs " + match + r"sbatch --test-only\): check "
                                            r"--slurm-account, --slurm-qos"):
            SlurmLauncher(tmp_path / "s", cfg).check()
    partition = ["scontrol", "update", "PartitionName=local"]
    subprocess.run([*partition, "State=DOWN"], env=slurm_cluster, check=True)
    try:
        SlurmLauncher(tmp_path / "s", SlurmConfig(**base)).check()
    finally:
        subprocess.run([*partition, "State=UP"], env=slurm_cluster, check=True)
    assert not (tmp_path / "s").exists()


def test_a_jobs_start_does_not_import_torch():
    """Each SLURM job imports this module to unpickle its WorkerJob before it starts the worker (which imports torch):
    the module itself imports no torch, ~2 s of every job's start and requeue."""
    code = "import sys, flopmatch.study.slurm; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"
