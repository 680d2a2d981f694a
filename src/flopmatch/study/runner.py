"""Run a study end to end: plan, matched tokenizers, every run's training and evaluation, the report.

Planning is in ``plan.py``, one grid cell's work in ``job.py``, where jobs run in ``launchers.py``.

Layout of a study directory::

    study/
      study.json          the StudyConfig
      plan.json           every run with its analytic FLOPs and its training time at the preset's assumed FLOP/s
                          (written first; the calibrated estimate by stage is in timings.json)
      tokenizers/kl, lfq  the matched learned tokenizers (trained once)
      tokenizers/match.json, candidates/  --tokenizer-match: every candidate's PSNR and the choice (study/tokenizer_match.py)
      tokenizer_ceilings.json  each tokenizer's reconstructions scored as its generators are (study/ceilings.py)
      jobs/<run>.json     what a worker process runs
      logs/<run>.log      a worker's output
      slurm/jobs.json     --launcher slurm: run -> {id, job_name, folder} of its latest SLURM job (study/slurm/queue.py)
      slurm/<token>/<job id>/  submitit's files of that job; <token>: one private (0700) folder per study process
      runs/<run>/         ordinary run directories (config.json, metrics.jsonl, checkpoint/, eval.json, samples/)
      inference_timing.json  latency and throughput of every paradigm, timed together at the end
      report.html, report.md, results.csv, report_figures/   the report (flopmatch.report.build)
      timings.json        estimated and measured wall time by stage
      .lock               held by the study process (flopmatch.lock)

Every stage skips finished work (a finished run, an evaluated setting, a trained tokenizer) and
resumes interrupted work, so re-running ``flopmatch study`` after a crash or Ctrl-C continues.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

from flopmatch.config import RunConfig, from_dict
from flopmatch.device import resolve_device
from flopmatch.errors import UserError
from flopmatch.evaluation.ceilings import CEILINGS_FILE
from flopmatch.evaluation.run import EvalConfig
from flopmatch.files import atomic_write_json, read_json
from flopmatch.lock import LOCK_NAME, DirectoryLock, describe, holder, in_use, is_locked
from flopmatch.report.build import build_report
from flopmatch.rundir import CONFIG, read_state
from flopmatch.study.calibrate import calibrate_or_none
from flopmatch.study.estimate import Rates, estimate, format_estimate
from flopmatch.study.grow import check_same_machine, mixed_evaluators, reconcile
from flopmatch.study.job import chain_jobs, job_finished, timing_job
from flopmatch.study.launchers import make_launcher
from flopmatch.study.operating import selection_run, sweep_eval, sweep_settings
from flopmatch.study.plan import (
    RunPlan,
    ema_sweep,
    eval_settings,
    fmt_duration,
    format_plan,
    make_plan,
)
from flopmatch.study.presets import StudyConfig
from flopmatch.study.slurm import JOBS_FILE, SlurmConfig
from flopmatch.study.timing_phase import timing_needed, timing_stamp
from flopmatch.study.tokenizer_phase import check_prepared, prepare, prepare_job, prepared


def wait_for_writer(run: Path, timeout_s: float = 30.0) -> None:
    """Wait until no process holds ``run``'s lock (a stopping worker of an earlier study), or fail naming it."""
    deadline = time.monotonic() + timeout_s
    if not is_locked(run):
        return
    print(f"[study] waiting for {describe(holder(run))} to stop writing {run}")
    while is_locked(run):
        if time.monotonic() > deadline:
            raise UserError(f"{run} is still being written by {describe(holder(run))}; stop it, then re-run the study")
        time.sleep(0.5)


NOTHING_YET = ("study.json", "plan.json", LOCK_NAME, CEILINGS_FILE)  # what a study writes before its first result


def run_jobs(out: Path, scfg: StudyConfig, plans: list[RunPlan]) -> list[dict]:
    """One job per planned run (:mod:`flopmatch.study.job`): its run directory, config, and what to evaluate."""
    # timed later, together; FID's small-n bias is said once, in the report, not in every evaluation's log
    ecfg = EvalConfig(num_samples=scfg.eval_samples, features=list(scfg.features), timing=False, warn_small_n=False)
    jobs = []
    for p in plans:
        cfg = from_dict(RunConfig, p.config)
        jobs.append({"name": p.name, "run_dir": str(out / "runs" / p.name), "config": p.config, "eval": asdict(ecfg),
                     "settings": [asdict(s) for s in eval_settings(scfg, cfg)], "raw": scfg.eval_raw,
                     "ema": ema_sweep(scfg, p), "sweep": [asdict(s) for s in sweep_settings(scfg, cfg)] if selection_run(scfg, p)
                     else [], "sweep_eval": asdict(sweep_eval(ecfg, scfg))})
    return jobs


def finished_runs(out: Path, scfg: StudyConfig, plans: list[RunPlan], jobs: list[dict] | None = None) -> frozenset[str]:
    """Names of the planned runs already trained and evaluated in the study directory ``out`` (empty for a new one);
    ``jobs``: their :func:`run_jobs`, when the caller has them."""
    return frozenset(j["name"] for j in (jobs if jobs is not None else run_jobs(out, scfg, plans)) if job_finished(j))


def plan_status(out: Path, plans: list[RunPlan], done: frozenset[str]) -> dict[str, str]:
    """What each planned run of the study directory ``out`` still needs, for the plan table and the estimate: "done"
    (trained and evaluated: in ``done``, :func:`finished_runs`), "evaluate" (trained, settings to evaluate: a study
    that grew along an evaluation axis), "resume at step s" (stopped mid-training) or "new" (not begun)."""
    status = {}
    for p in plans:
        run = out / "runs" / p.name
        state = read_state(run) if (run / CONFIG).exists() else None  # None: not begun, or before its first checkpoint
        status[p.name] = ("done" if p.name in done else "evaluate" if state and state.get("done")
                          else f"resume at step {state['step']}" if state else "new")
    return status


def existing_study(out: Path, scfg: StudyConfig, check_lock: bool = True) -> tuple[StudyConfig, list | None, bool]:
    """What ``out`` already holds decides the study config: (config to run, the runs it adds or None, whether ``out``
    held only the settings of a study that produced nothing). UserError when this command would change the saved
    study incomparably (:func:`~flopmatch.study.grow.reconcile`) or ``out`` is not a study directory. Read-only
    (``flopmatch study --plan-only`` uses it too); ``check_lock`` also refuses a directory another study is creating."""
    if (out / "study.json").exists() and not_started(out):
        # A study that stopped before producing anything (a missing data folder, an earlier check) holds only its
        # settings: the corrected command replaces them instead of being refused as incomparable with nothing.
        if check_lock and is_locked(out):
            raise in_use(out, "study")
        print(f"[study] {out} holds the settings of a study that produced nothing yet; starting it with this command's")
        return scfg, None, True
    if (out / "study.json").exists():  # the same study again, or grown by new cells (see grow.py); else refused
        scfg, _, added = reconcile(read_json(out / "study.json"), scfg, out)
        return scfg, added, False
    if out.exists() and any(p for p in out.iterdir() if p.name not in ("study.json", "plan.json", LOCK_NAME)):
        if check_lock and is_locked(out):  # a study another process is creating right now
            raise in_use(out, "study")
        raise UserError(f"{out} exists and is not a flopmatch study directory; choose another --out")
    return scfg, None, False


def preview(out: Path, scfg: StudyConfig, calibrate: bool = True, concurrent: int = 1,
            report_workers: int | None = None, log=print, slurm: SlurmConfig | None = None) -> dict[str, float]:
    """``flopmatch study --plan-only``: the plan and the estimated wall time of what is left, printed with ``log``;
    nothing is written. Refused as the study itself would be (:func:`existing_study`; with ``slurm``, the launcher's
    checks too). Returns the estimate."""
    scfg, _, _ = existing_study(out, scfg.validate(), check_lock=False)
    plans = make_plan(scfg, out)
    if slurm is not None:
        check_gpu_split(plans, slurm)
        make_launcher("slurm", 1, out, slurm).check()
    else:  # local runs train on this machine: as the study's runs did
        check_same_machine(out, plans)
    done = finished_runs(out, scfg, plans)  # an existing study: only what is left
    status = plan_status(out, plans, done)
    log(format_plan(plans, status))
    host = calibrate_or_none(scfg, plans, log) if calibrate and len(done) < len(plans) else None
    est = estimate(scfg, plans, out, host=host, concurrent=concurrent, report_workers=report_workers, finished=done,
                   trained=_trained(status), steps_done=_steps_done(out, status),
                   timing_done=not timing_needed(out, scfg, plans))
    if done:
        log(f"{len(done)} of {len(plans)} runs already trained and evaluated in {out}")
    log(format_estimate(est, calibrated=host is not None or len(done) == len(plans)))
    return est


def _trained(status: dict[str, str]) -> frozenset[str]:
    """The runs whose training is done, of a :func:`plan_status`."""
    return frozenset(name for name, s in status.items() if s in ("done", "evaluate"))


def _steps_done(out: Path, status: dict[str, str]) -> dict[str, int]:
    """The steps already trained of the runs a :func:`plan_status` says to resume."""
    return {name: read_state(out / "runs" / name)["step"] for name, s in status.items() if s.startswith("resume")}


def saved_study(out: Path) -> StudyConfig | None:
    """The settings of the study ``out`` holds (its study.json), or None where there is none or it produced nothing
    yet (:func:`not_started`: a command there starts afresh). ``flopmatch study`` takes them as the defaults of a
    command without ``--preset``, so growing a study names only what it adds."""
    if not (out / "study.json").exists() or not_started(out):
        return None
    # without its pinned floor budget: reconcile pins it again where runs there began, and a command whose --budgets
    # drops a mistyped floor budget that never began is then not refused as naming a budget it no longer has
    return replace(from_dict(StudyConfig, read_json(out / "study.json")), floor_budget=0.0)


def not_started(out: Path) -> bool:
    """Whether the study directory ``out`` holds nothing but its settings: no tokenizer, no run (its tokenizer
    ceilings file is keyed by each tokenizer's fingerprint and data, so another study's entries are re-measured).
    Job descriptions and logs count as nothing, and so does a ``slurm/`` folder without job ids (sbatch refused the
    first job): a corrected command may then replace the settings."""
    return all(p.name in NOTHING_YET or p.name in ("jobs", "logs") or (p.name == "slurm" and _no_job(p))
               for p in out.iterdir())


def _no_job(folder: Path) -> bool:
    """Whether a study's ``slurm/`` folder shows no submitted job: no job ids, and no job's folder (a study killed
    between sbatch and recording the id leaves the folder only)."""
    return not (folder / JOBS_FILE).exists() and not any(p.is_dir() for p in folder.iterdir())


def check_gpu_split(plans: list, slurm: SlurmConfig) -> None:
    """Under SLURM, before anything is written or queued: refuse a run whose ``train.device`` the jobs cannot give it
    (cuda with ``--gpus-per-run 0``: every job would start, import torch and fail; cuda:N where a job sees its GPUs as
    cuda:0.., or under torchrun, which puts each process on its own), and, with several GPUs per run, a batch size
    that ``slurm.gpus_per_run`` does not divide (torchrun splits each batch over them), naming the run. Warn when
    every run trains on the CPU while each job is given GPUs."""
    g = slurm.gpus_per_run
    for p in plans:
        device = p.config["train"]["device"]
        if device.startswith("cuda") and g == 0:
            raise UserError(f"{p.name}'s train.device {device} needs a GPU, and --gpus-per-run 0 gives its job none; "
                            f"use --gpus-per-run 1 or more, or --set train.device=cpu")
        index = int(device.partition(":")[2]) if device.startswith("cuda:") else None
        if index is not None and g > 1:
            raise UserError(f"{p.name}'s train.device {device} would put all {g} processes of its job on one GPU; "
                            f"use --set train.device=cuda (each process takes its own)")
        if index is not None and index >= g:
            raise UserError(f"{p.name}'s train.device {device}: a job with --gpus-per-run {g} sees its GPU as cuda:0; "
                            f"use --set train.device=cuda")
    if g and plans and all(p.config["train"]["device"] == "cpu" for p in plans):
        print(f"[study] warning: every run has train.device cpu, so each job's {g} GPU(s) (--gpus-per-run) sit idle; "
              f"--gpus-per-run 0 asks for none", flush=True)
    if g <= 1:
        return
    for p in plans:
        if p.config["train"]["batch_size"] % slurm.gpus_per_run:
            raise UserError(f"--gpus-per-run {slurm.gpus_per_run}: {p.name}'s train.batch_size "
                            f"{p.config['train']['batch_size']} does not split over {slurm.gpus_per_run} processes; "
                            "choose a --gpus-per-run that divides it (or, for a new study, another --set train.batch_size)")


def study(out: str | Path, scfg: StudyConfig, workers: int = 1, launcher: str = "local", progress: bool = True,
          retime: bool = False, slurm: SlurmConfig | None = None, calibrate_host: bool = True,
          report_workers: int | None = 1) -> dict:
    """Plan, train, evaluate, time and report a whole study in ``out``; re-running continues where it stopped.

    ``launcher``: "local" (``workers`` processes) or "slurm" (one job per run; ``slurm`` says where).
    ``retime``: measure the inference timings again even if the study has them (all paradigms together).
    ``calibrate_host``: time this machine on the plan's networks for the wall-time estimate (:mod:`.calibrate`;
    never under SLURM, whose runs execute elsewhere); False: the preset's assumed FLOP/s. ``report_workers``: processes
    for the report's trend fits (:func:`~flopmatch.report.bootstrap.bootstrap_all`; the ``flopmatch`` command: None).
    """
    out = Path(out)
    scfg.validate()
    scfg, added, fresh = existing_study(out, scfg)
    plans = make_plan(scfg, out)  # validates the grid before anything is written
    if launcher == "local":  # the runs' device exists here (under SLURM they run on other machines)
        for device in sorted({p.config["train"]["device"] for p in plans}):
            resolve_device(device)
        check_same_machine(out, plans)  # and new runs train as the study's others did
    if launcher == "slurm":
        check_gpu_split(plans, slurm or SlurmConfig())
    launch = make_launcher(launcher, workers, out, slurm)
    launch.check()  # e.g. SLURM reachable and the partition known, before minutes of tokenizer training
    if added:
        print(f"[study] growing the study in {out}: {len(added)} new run(s) ({', '.join(p.name for p in added[:4])}"
              f"{', ...' if len(added) > 4 else ''}); finished runs are kept")
    with DirectoryLock(out, "study"):  # one study process per directory
        if fresh:  # the mistaken settings' tokenizer ceilings (entries for token types this study may not use)
            (out / CEILINGS_FILE).unlink(missing_ok=True)
        return _study_locked(out, scfg, plans, launch, progress, retime, calibrate_host and not launch.attaches,
                             report_workers)


def _study_locked(out: Path, scfg: StudyConfig, plans: list, launch, progress: bool, retime: bool,
                  calibrate_host: bool, report_workers: int | None) -> dict:
    """The study proper, run while this process holds the study directory's lock (see :func:`study`)."""
    atomic_write_json(out / "study.json", asdict(scfg))
    atomic_write_json(out / "plan.json", [asdict(p) for p in plans])
    jobs = run_jobs(out, scfg, plans)
    done = finished_runs(out, scfg, plans, jobs)  # a resumed or grown study: only the rest is estimated
    status = plan_status(out, plans, done)
    print(format_plan(plans, status))
    todo = [p for p in plans if p.name not in done]
    host = calibrate_or_none(scfg, plans) if calibrate_host and todo else None  # every architecture: finished ones are timed too
    est = estimate(scfg, plans, out, host=host, concurrent=launch.concurrent, report_workers=report_workers,
                   finished=done, trained=_trained(status), steps_done=_steps_done(out, status),
                   timing_done=not timing_needed(out, scfg, plans, retime))
    already = f"{len(done)} of {len(plans)} runs already trained and evaluated; " if done else ""
    print(f"[study] {already}{format_estimate(est, calibrated=host is not None or not todo)}")
    t0 = time.perf_counter()
    # the tokenizers and each one's reconstruction ceiling (a tokenizer below the classifier floor is refused)
    if not launch.attaches:
        prepare(out, scfg, progress)
    else:  # SLURM: on a compute node, as a job
        if not prepared(out, scfg):
            try:
                launch.run_phase(prepare_job(out), lambda: prepared(out, scfg), "the tokenizer phase")
            except UserError:
                check_prepared(out, scfg)  # the job's floor refusal, said here rather than only in its log
                raise
        check_prepared(out, scfg)  # also on every re-run: the ceilings file outlives a refusal
    t_tokenizers = time.perf_counter()
    jobs = chain_jobs(jobs)  # wsd / constant runs: one chain per (paradigm, depth, seed) shares its stable phase
    finished = [0]

    def on_done(job):
        finished[0] += 1
        print(f"[study] {finished[0]}/{len(jobs)} done: {job['name']} ({fmt_duration(time.perf_counter() - t0)} elapsed)")

    if not launch.attaches:  # a local worker of an earlier, killed study may still be stopping: let it checkpoint
        for job in (sub for j in jobs for sub in j.get("chain", [j])):  # (SLURM jobs still running are waited for)
            wait_for_writer(Path(job["run_dir"]))
    failed = launch.run(jobs, on_done)
    if failed:
        raise UserError(f"{len(failed)} run(s) failed: {'; '.join(failed)}; fix and re-run to continue")
    mixed = mixed_evaluators(out, plans)  # a study grown on another machine (its runs' own settings are checked before)
    if mixed:
        print(mixed, flush=True)
    t_runs = time.perf_counter()
    if timing_needed(out, scfg, plans, retime):  # a quiet phase: no run is training now
        before = timing_stamp(out)
        # done when the file holds the wanted timings and, with --retime, was written again: a failed re-timing
        # must not pass for a finished one just because the old file is still there
        launch.run_phase(timing_job(out, retime), lambda: not timing_needed(out, scfg, plans)
                         and (not retime or timing_stamp(out) != before), "the timing phase")
    t_timing = time.perf_counter()
    result = build_report(out, n_boot=scfg.n_boot, workers=report_workers)
    t_end = time.perf_counter()
    measured = {"tokenizers": t_tokenizers - t0, "runs": t_runs - t_tokenizers, "timing": t_timing - t_runs,
                "report": t_end - t_timing, "total": t_end - t0}
    atomic_write_json(out / "timings.json", {
        "estimated_s": est, "measured_s": measured, "rates": asdict(Rates()), "host": host.to_dict() if host else None,
        "note": "measured: this invocation only (a resumed study skips finished work); set-up other than the "
                "tokenizers (captions, evaluators, reference features) happens inside the first runs",
    })
    print(f"[study] report: {out / 'report.html'}; took {fmt_duration(measured['total'])} (tokenizers "
          f"{fmt_duration(measured['tokenizers'])}, runs {fmt_duration(measured['runs'])}, timing "
          f"{fmt_duration(measured['timing'])}, report "
          f"{fmt_duration(measured['report'])}); estimated {fmt_duration(est['total'])}")
    return result
