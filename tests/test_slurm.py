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
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from flopmatch.errors import UserError
from flopmatch.study.job import run_job
from flopmatch.study.presets import study_preset
from flopmatch.study.runner import not_started, study
from flopmatch.study.slurm import SlurmConfig, check_resources, node_resources, parse_slurm_time, squeue_states

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
    preempted = json.loads(jobs.read_text())[PREEMPTED]
    subprocess.run(["scancel", "--signal=USR2", preempted], env=env, check=True)
    _wait(lambda: _step(out / "runs" / VICTIM) >= 40, "the victim to pass step 40", first)  # checkpoints every 10
    cancelled = json.loads(jobs.read_text())[VICTIM]
    subprocess.run(["scancel", cancelled], env=env, check=True)
    log = first.communicate(timeout=300)[0]
    assert first.returncode == 2, log
    assert f"{VICTIM} (slurm job {cancelled}" in log and "re-run to continue" in log
    assert "1 run(s) failed" in log and f"done: {PREEMPTED}" in log  # the preempted run finished in its requeued job
    assert "Traceback" not in log
    interrupted_at = _step(out / "runs" / VICTIM)
    assert interrupted_at > 0
    requeued = (out / "logs" / f"{PREEMPTED}.log").read_text()
    assert requeued.count(f"[slurm] job {preempted} ") == 2, requeued  # the same job ran twice: requeued, not resubmitted
    assert re.search(r"interrupted at step (\d+)/\d+; checkpoint saved", requeued), requeued
    stopped = re.search(r"interrupted at step (\d+)/", requeued).group(1)
    assert f"resuming at step {stopped}/" in requeued and json.loads(jobs.read_text())[PREEMPTED] == preempted

    # 2. re-run with the partition down (jobs queue but do not start): the cancelled run is resubmitted and
    #    stays queued; kill this study process, the job outlives it
    partition = ["scontrol", "update", "PartitionName=local"]
    subprocess.run([*partition, "State=DOWN"], env=env, check=True)
    second = _flopmatch([*STUDY, "--out", str(out), *slurm], env)
    _wait(lambda: json.loads(jobs.read_text())[VICTIM] != cancelled, "the resubmission", second)
    resubmitted = json.loads(jobs.read_text())[VICTIM]
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
    assert json.loads(jobs.read_text())[VICTIM] == resubmitted
    assert (out / "report.html").exists() and (out / "inference_timing.json").exists()
    assert not list((out / "slurm").glob(".submission_file_*"))  # submitit's links to the scripts: removed
    for phase in ("prepare-tokenizers", "timing-phase"):  # the study's phases ran as jobs too, not in the study process
        assert phase in json.loads(jobs.read_text()) and "[slurm] job" in (out / "logs" / f"{phase}.log").read_text()
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


SINFO = """gpu|64|gpu:a100:4(S:0-1)|512000
gpu|32|gpu:a100:2,mps:200|256000
cpu*|128|(null)|1024000
"""


def test_node_resources_read_from_sinfo():
    """The most one node offers, over a partition's node groups: CPUs, GPUs (typed or not, beside other GRES) and MB;
    no partition named: the default (starred) one; an unlisted partition: None."""
    assert node_resources(SINFO, "gpu") == {"cpus": 64, "gpus": 4, "mem_mb": 512000}
    assert node_resources(SINFO, None) == {"cpus": 128, "gpus": 0, "mem_mb": 1024000}
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


def test_a_recorded_job_id_of_another_job_is_not_waited_on(slurm_cluster, monkeypatch):
    """A job id in jobs.json that SLURM now gives to another job (ids reset or wrapped, the study moved) is not this
    study's: squeue_states leaves a job of another name out, as ended, so the run is submitted again."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster["SLURM_CONF"])
    jid = subprocess.run(["sbatch", "--parsable", "--job-name", "someone-else", "--hold", "--wrap", "sleep 60"],
                         env=slurm_cluster, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    try:
        assert squeue_states([jid]) == {jid: "PENDING"}
        assert squeue_states([jid], {jid: "someone-else"}) == {jid: "PENDING"}
        assert squeue_states([jid], {jid: "flopmatch-masked-d1-b4e10-s0"}) == {}
    finally:
        subprocess.run(["scancel", jid], env=slurm_cluster, check=False)
