"""The run directory: the contract between stages, its layout, reading and writing in one module.

A run directory is everything a later stage (sampling, evaluation, the report) needs, and the only
thing it may read::

    runs/<name>/
      config.json                       the resolved RunConfig, written before step 0
      metrics.jsonl                     one JSON object per logged step (step, loss, lr, cumulative flops, ...)
      data.json                         what the training data was (source, counts, skipped files): a resume checks it
      checkpoint/checkpoint.safetensors model, EMA and optimizer tensors (full, whatever the sharding); scalar state in its metadata
      checkpoint/state.json             a human-readable copy of that scalar state
      ema-snapshots/<step>.safetensors  the power-function EMAs (train.ema_profiles) at evenly spaced steps, from which
                                        any post-hoc EMA is rebuilt (flopmatch.ema; weights "ema@SIGMA_REL")
      checkpoint-stable/                train.schedule=wsd: the same, saved where the cooldown starts
                                        (the state a larger budget continues from; flopmatch.growth)
      budgets/<budget>/                 a finished budget's result, kept when the run was continued to a
                                        larger one: checkpoint/, config.json, metrics.jsonl, eval.json, samples/
      tokenizer/                        the run's own tokenizer, so sampling needs nothing else
      eval.json                         metrics keyed by sampling settings, each with a manifest
      samples/<entry>/                  generated images (safetensors + grid.png) and their prompts
      tensorboard/, wandb/              optional views of metrics.jsonl (train.trackers; flopmatch.tracking)
      .lock                             held by the one process training the run (flopmatch.lock)

Training writes config, metrics, checkpoint and tokenizer through this module and holds ``.lock``;
``flopmatch eval`` writes ``eval.json`` and ``samples/``. Old run
directories stay readable: configs, network specs and tokenizer specs written by v0.1 are migrated
on read (:func:`flopmatch.config.from_dict`, :meth:`flopmatch.nets.NetSpec.from_dict`,
:meth:`flopmatch.tokenizers.base.TokenizerSpec.from_dict`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from flopmatch import dist
from flopmatch import ema as phema
from flopmatch.config import RunConfig, from_dict, to_dict
from flopmatch.errors import UserError
from flopmatch.files import (
    atomic_write_json,
    atomic_write_text,
    load_tensors,
    optimizer_state,
    optimizer_tensors,
    read_json,
    read_tensor_metadata,
    save_tensors,
    tensors_sha256,
)
from flopmatch.nets import NetSpec, Network

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint/checkpoint.safetensors"
STATE = "checkpoint/state.json"
STABLE_CHECKPOINT = "checkpoint-stable/checkpoint.safetensors"  # wsd runs: the state where the cooldown starts
BUDGETS = "budgets"  # finished budgets of a run that was continued to a larger one, by budget_tag()
TOKENIZER = "tokenizer"
EVAL = "eval.json"
DATA = "data.json"  # the training split: source, size, images skipped and converted by cause
SAMPLES = "samples"
EMA_SNAPSHOTS = "ema-snapshots"  # post-hoc EMA snapshots, one file per step (flopmatch.ema)
# Keys every checkpoint state has (resume and the report rely on them).
STATE_KEYS = ("step", "total_steps", "flops", "done", "net_spec")
# Config keys that change how a run is watched, split across processes or compiled, not what it computes
# (train.parallel and sample.compile change results by float rounding only, as the number of processes does): a resume
# may change them (config_diffs skips them).
NOT_IDENTITY = ("train.trackers", "train.parallel", "sample.compile", "train.log_every",  # log_every: rows, not numbers
                "train.checkpoint_every")  # checkpoint_every: when state is saved; a resume is exact from any step


# ----------------------------------------------------------------------------- config


def write_config(run: Path, cfg: RunConfig) -> None:
    """Write ``config.json`` (atomically); done once, before step 0."""
    atomic_write_json(Path(run) / CONFIG, to_dict(cfg))


def read_config(run: str | Path) -> RunConfig:
    """The run's config (keys of earlier versions migrated); missing, corrupt or invalid is a UserError."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"{run} is a file, not a run directory" if run.exists() else f"run directory {run} does not exist")
    if not (run / CONFIG).exists():
        raise UserError(f"{run} is not a run directory (no config.json); train one with `flopmatch train --out {run}`")
    return from_dict(RunConfig, read_json(run / CONFIG)).validate()


def config_diffs(run: Path, cfg: RunConfig) -> list[str]:
    """The keys (``section.key``) whose values in ``cfg`` differ from the run's stored config; [] if equal.

    The stored config is read through :func:`read_config`, so a config.json written by an earlier
    version (old key names, keys added since with their defaults) compares equal to the same config written today.
    """
    return dict_diffs(to_dict(read_config(run)), to_dict(cfg))


def dict_diffs(old: dict, new: dict) -> list[str]:
    """The keys (``section.key``) whose values differ between two run-config dicts (``NOT_IDENTITY`` skipped)."""
    diffs = [f"{s}.{k}" for s in new if isinstance(new[s], dict) for k in new[s] if old.get(s, {}).get(k) != new[s][k]]
    diffs += [s for s in new if not isinstance(new[s], dict) and old.get(s) != new[s]]
    return [d for d in diffs if d not in NOT_IDENTITY]


DATA_IDENTITY = ("source", "image_size", "split", "split_rule", "size")  # data.json keys a resumed run must keep


def check_same_data(run: Path, info: dict) -> None:
    """Refuse to resume ``run`` on a training split that is not the one it started on: a run's data.json records its
    split's source, rule and size, and a source edited or laid out differently since (images added or removed, a
    test/ folder now held out) would silently change what the rest of the run trains on."""
    if not (run / DATA).exists():
        return  # written before step 0 since the first version; a run without it has nothing to compare
    saved = read_json(run / DATA)
    changed = [k for k in DATA_IDENTITY if k in saved and saved[k] != info.get(k)]
    if changed:
        what = "; ".join(f"{k} {saved[k]!r} -> {info.get(k)!r}" for k in changed)
        raise UserError(f"{run} started on other training data than its source gives now ({what}); restore the data "
                        f"it started on, or train again with a new --out")


def check_same_config(run: Path, cfg: RunConfig) -> None:
    """A run directory belongs to one config; refuse to resume it with a different one."""
    diffs = config_diffs(run, cfg)
    if "train.budget" in diffs and read_config(run).train.schedule != "cosine":
        # a new budget alone continues a wsd or constant run (flopmatch.growth): say what else changed
        others = [d for d in diffs if d != "train.budget"]
        raise UserError(f"{run} can continue to another budget only with its other settings unchanged, and "
                        f"{', '.join(others[:4])} differ{'s' if len(others) == 1 else ''}; keep the run's values "
                        f"(give only --budget), or use a new --out directory")
    if diffs:
        raise UserError(
            f"{run} holds a run with a different config ({', '.join(diffs[:4])} differ{'s' if len(diffs) == 1 else ''}); "
            f"use a new --out directory"
        )


# ----------------------------------------------------------------------------- metrics


def append_metrics(run: Path, rows: list[dict]) -> None:
    """Append logged rows to ``metrics.jsonl`` (one JSON object per line)."""
    with open(Path(run) / METRICS, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _row_step(line: str) -> int | None:
    """The step of a metrics.jsonl line, or None for a blank or torn line (a kill mid-append)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def truncate_metrics(run: Path, step: int) -> None:
    """Drop logged rows after ``step``, so a resumed log equals an uninterrupted one."""
    path = Path(run) / METRICS
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if _row_step(ln) is not None and _row_step(ln) <= step]
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))


# ----------------------------------------------------------------------------- checkpoint


def save_checkpoint(run: Path, net, ema, opt, state: dict, name: str = CHECKPOINT, averages=()) -> None:
    """One atomic file with model, EMA and optimizer tensors; scalar state in its metadata.

    Call on every rank of a distributed run: under FSDP2 the shards are gathered (a collective) into full
    tensors, which rank 0 alone writes, so the file is the same as one process's and resumes with any number
    of processes and either ``train.parallel``. No RNG state: training's randomness is a function of
    (seed, step) (:mod:`flopmatch.train`). ``name``: the file inside the run (:data:`CHECKPOINT`, or
    :data:`STABLE_CHECKPOINT`); a human-readable ``state.json`` is written beside it. ``averages``: the
    post-hoc EMA's power-function averages (``train.ema_profiles`` order), saved as ``phema<j>.*``.
    """
    model_sd, ema_sd = dist.full_state_dict(net), dist.full_state_dict(ema)
    avg_sds = [dist.full_state_dict(a) for a in averages]
    opt_sd = dist.full_optimizer_state_dict(net, opt)
    if not dist.is_main():
        return
    tensors = {f"model.{k}": v for k, v in model_sd.items()}
    tensors |= {f"ema.{k}": v for k, v in ema_sd.items()}
    for j, sd in enumerate(avg_sds):
        tensors |= {f"phema{j}.{k}": v for k, v in sd.items()}
    opt_t, groups = optimizer_tensors(opt_sd)
    tensors |= opt_t
    meta = {"state": json.dumps(state), "param_groups": json.dumps(groups), "tensors_sha256": tensors_sha256(tensors)}
    save_tensors(Path(run) / name, tensors, metadata=meta)
    atomic_write_text((Path(run) / name).with_name("state.json"), json.dumps(state, indent=2) + "\n")  # human-readable copy


def copy_checkpoint(src: Path, dst: Path, state: dict) -> None:
    """Write checkpoint file ``src``'s tensors (checksum verified) to ``dst`` with scalar state ``state``.

    Atomic like :func:`save_checkpoint`, with the human-readable ``state.json`` beside ``dst``.
    Continuing a run installs its stable (or final) checkpoint this way, with ``done`` false.
    """
    tensors = load_checkpoint_tensors(src)
    meta = read_checkpoint_meta(src) | {"state": json.dumps(state)}
    save_tensors(dst, tensors, metadata=meta)
    atomic_write_text(Path(dst).with_name("state.json"), json.dumps(state, indent=2) + "\n")


def restore_checkpoint(run: Path, net, ema, opt, device, averages=()) -> None:
    """Load model, EMA and optimizer states saved by :func:`save_checkpoint` into live objects.

    Every rank reads the file; under FSDP2 each keeps its shards (``net`` and ``ema`` sharded already, ``opt``
    built over the shards). RNG tensors of checkpoints written before training's randomness became a function
    of (seed, step) are ignored (such runs are refused before this; :func:`flopmatch.train.check_randomness`).
    """
    path = Path(run) / CHECKPOINT
    # Sharded: read to the CPU and let each rank copy out its shard; otherwise straight to the device.
    tensors = load_checkpoint_tensors(path, device="cpu" if dist.is_sharded(net) else device)
    meta = read_checkpoint_meta(path)
    dist.load_full_state_dict(net, {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    dist.load_full_state_dict(ema, {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")})
    for j, avg in enumerate(averages):
        sd = {k[len(f"phema{j}."):]: v for k, v in tensors.items() if k.startswith(f"phema{j}.")}
        if not sd:
            raise UserError(f"{run} was started by an earlier flopmatch, without the post-hoc EMA's averages, so it "
                            f"cannot be continued; train it again with a new --out (as it is, it is still evaluated and "
                            f"sampled with its EMA or raw weights)")
        dist.load_full_state_dict(avg, sd)
    dist.load_full_optimizer_state_dict(net, opt, optimizer_state(tensors, json.loads(meta["param_groups"])))


def has_averages(path: Path, cfg: RunConfig) -> bool:
    """Whether checkpoint file ``path`` holds the post-hoc EMA averages that a run with ``cfg`` keeps (reads the
    header only); True when ``cfg`` keeps none."""
    if not (cfg.train.ema_snapshots and cfg.train.ema_profiles):
        return True
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except Exception as e:  # safetensors raises several types for damaged files
        raise UserError(f"corrupt checkpoint {path} ({e}); delete the run directory's checkpoint/ to restart") from None
    return all(any(k.startswith(f"phema{j}.") for k in keys) for j in range(len(cfg.train.ema_profiles)))


def load_checkpoint_tensors(path: Path, device="cpu") -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, checked against the sha256 stored at save time (v0.1 files have none)."""
    tensors = load_tensors(path, device=device)
    expected = read_checkpoint_meta(path).get("tensors_sha256")
    if expected is not None and tensors_sha256(tensors) != expected:
        raise UserError(f"corrupt checkpoint {path}: its tensor data does not match the checksum saved with it; "
                        f"restore the file, or delete {Path(path).parent} to train the run again from step 0")
    return tensors


def read_checkpoint_meta(path: Path) -> dict:
    """The metadata (JSON strings) of a checkpoint file, without loading tensors."""
    return read_tensor_metadata(path, fix="delete the run directory's checkpoint/ to restart")


def read_state(run: str | Path, name: str = CHECKPOINT) -> dict | None:
    """Scalar training state (step, flops, done, ...) of a run, or None before the first checkpoint.

    ``name``: which checkpoint file of the run (:data:`STABLE_CHECKPOINT` for a wsd run's stable one).
    """
    path = Path(run) / name
    if not path.exists():
        return None
    return _state(path)


def _state(path: Path) -> dict:
    """The scalar state in a checkpoint's metadata; unreadable or incomplete metadata is a UserError."""
    try:
        state = json.loads(read_checkpoint_meta(path)["state"])
        for key in STATE_KEYS:
            state[key]
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise UserError(f"corrupt checkpoint {path}: its metadata has no valid training state ({type(e).__name__}: {e}); "
                        f"delete {Path(path).parent} to train the run again from step 0") from None
    return state


def parse_weights(which: str) -> float | None:
    """Check a weights name: "ema" and "model" give None, "ema@SIGMA_REL" (a post-hoc EMA) its sigma_rel."""
    if which in ("ema", "model"):
        return None
    head, sep, tail = which.partition("@")
    try:
        sigma = float(tail) if head == "ema" and sep else None
    except ValueError:
        sigma = None
    if sigma is None or not 0 < sigma <= phema.SIGMA_REL_MAX:
        raise UserError(f"weights must be ema, model or ema@SIGMA_REL (a post-hoc EMA, sigma_rel in "
                        f"(0, {phema.SIGMA_REL_MAX}], e.g. ema@0.1), got {which!r}")
    return sigma


def canonical_weights(which: str) -> str:
    """A weights name in the one form eval.json keys and reports use: "ema@0.10" -> "ema@0.1"."""
    sigma = parse_weights(which)
    return which if sigma is None else f"ema@{sigma:g}"


def load_weights(run: str | Path, which: str = "ema", device="cpu") -> tuple[RunConfig, Network]:
    """Config and network of a run in eval mode, with its EMA (``which="ema"``, the default), raw (``"model"``)
    or post-hoc EMA weights (``"ema@0.1"``: the power-function EMA of relative length 0.1, rebuilt from the
    run's snapshots by :func:`posthoc_weights`)."""
    run = Path(run)
    sigma = parse_weights(which)
    cfg = read_config(run)
    if not (run / CHECKPOINT).exists():
        raise UserError(f"{run} has no checkpoint yet; (re)run `flopmatch train` on it first")
    state = _state(run / CHECKPOINT)
    spec = NetSpec.from_dict(state["net_spec"])
    net = Network(spec)
    tensors = load_checkpoint_tensors(run / CHECKPOINT)
    prefix = "ema." if sigma is not None else f"{which}."  # a post-hoc EMA keeps the EMA's buffers
    sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if sigma is not None:
        sd |= posthoc_weights(run, sigma, state["step"])[0]
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        raise UserError(f"checkpoint in {run} does not match its config ({str(e).splitlines()[0]})") from None
    return cfg, net.to(device).eval()


# ----------------------------------------------------------------------------- post-hoc EMA snapshots


def snapshot_file(run: str | Path, step: int) -> Path:
    """The post-hoc EMA snapshot of ``run`` at ``step``."""
    return Path(run) / EMA_SNAPSHOTS / f"{step:09d}.safetensors"


def save_snapshot(run: Path, averages, step: int, sigma_rels: list[float]) -> None:
    """Write the power-function averages' parameters at ``step`` as one atomic file (``<j>.<name>`` for average j).

    Call on every rank (under FSDP2 the shards are gathered, a collective); rank 0 writes. Buffers are left out:
    they are not averaged, and a rebuilt average takes them from the EMA.
    """
    sds = [dist.full_state_dict(a) for a in averages]
    if not dist.is_main():
        return
    params = {n for n, _ in averages[0].named_parameters()}
    tensors = {f"{j}.{k}": v for j, sd in enumerate(sds) for k, v in sd.items() if k in params}
    meta = {"step": str(step), "sigma_rels": json.dumps(list(sigma_rels))}
    save_tensors(snapshot_file(run, step), tensors, metadata=meta)


def snapshots(run: str | Path) -> list[tuple[int, Path]]:
    """(step, file) of a run's post-hoc EMA snapshots, by step."""
    folder = Path(run) / EMA_SNAPSHOTS
    found = [(int(p.stem), p) for p in folder.glob("*.safetensors") if p.stem.isdigit()] if folder.is_dir() else []
    return sorted(found)


def remove_snapshots_after(run: Path, step: int) -> None:
    """Delete snapshots taken after ``step``: a run resumed (or continued) from ``step`` takes them again."""
    for s, path in snapshots(run):
        if s > step:
            path.unlink(missing_ok=True)


def posthoc_solution(run: str | Path, sigma_rel: float, step: int) -> tuple[list[Path], list[float], phema.Solution]:
    """The snapshot files of ``run`` up to ``step``, the relative lengths of the averages they hold, and how to
    combine them into the power-function EMA of relative length ``sigma_rel`` at ``step``
    (:func:`flopmatch.ema.solve`; reads metadata only)."""
    found = [(s, p) for s, p in snapshots(run) if s <= step]
    if not found:
        raise UserError(f"{run} has no post-hoc EMA snapshots (trained with train.ema_snapshots=0, or by an earlier "
                        f"flopmatch); use weights ema or model, or train it again")
    metas = [read_checkpoint_meta(p) for _, p in found]
    try:
        sigmas = [json.loads(m["sigma_rels"]) for m in metas]
    except (KeyError, json.JSONDecodeError):
        raise UserError(f"{run}/{EMA_SNAPSHOTS} holds a file without post-hoc EMA metadata; delete the folder and "
                        f"train the run again to rebuild post-hoc EMAs") from None
    if any(x != sigmas[0] for x in sigmas):
        raise UserError(f"{run}/{EMA_SNAPSHOTS} mixes snapshots of different train.ema_profiles; delete the folder "
                        f"and train the run again to rebuild post-hoc EMAs")
    solution = phema.solve([s for s, _ in found], [phema.sigma_rel_to_gamma(x) for x in sigmas[0]], step,
                           phema.sigma_rel_to_gamma(sigma_rel))
    return [p for _, p in found], sigmas[0], solution


def posthoc_weights(run: str | Path, sigma_rel: float, step: int) -> tuple[dict[str, torch.Tensor], phema.Solution]:
    """The parameters of the power-function EMA of relative length ``sigma_rel`` at ``step``, rebuilt from the
    run's snapshots (:func:`posthoc_solution`), and the solution (its ``residual`` says how well the snapshots
    can form that average). Snapshots are read one at a time; the sum is accumulated in float64."""
    files, _, solution = posthoc_solution(run, sigma_rel, step)
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path, row in zip(files, solution.coefficients):
        for key, v in load_tensors(path).items():
            j, name = key.split(".", 1)
            dtypes[name] = v.dtype
            if row[int(j)]:
                total[name] = total.get(name, 0) + float(row[int(j)]) * v.double()
    return {k: v.to(dtypes[k]) for k, v in total.items()}, solution


# ----------------------------------------------------------------------------- tokenizer, evaluation, samples


def budget_tag(budget: float) -> str:
    """A budget in FLOPs as a directory name: the shortest exact decimal, ``3e12``, ``2.5e12``, ``1234567``."""
    for digits in range(1, 18):
        text = f"{budget:.{digits}g}"
        if float(text) == budget:
            break
    return text.replace("e+", "e")


def budget_dir(run: str | Path, budget: float) -> Path:
    """Where a finished budget's result is kept once its run was continued to a larger budget."""
    return Path(run) / BUDGETS / budget_tag(budget)


def run_label(run: str | Path) -> str:
    """A run's short name in messages: its directory's name, or ``R@3e12`` for a kept budget's result (:func:`budget_dir`)."""
    run = Path(run)
    return f"{run.parent.parent.name}@{run.name}" if run.parent.name == BUDGETS else run.name


def tokenizer_dir(run: str | Path) -> Path:
    """Where a run keeps its own copy of the tokenizer (so sampling needs nothing else)."""
    return Path(run) / TOKENIZER


def read_eval_entries(run: str | Path) -> dict:
    """The entries of ``eval.json`` (key -> entry), or {} when the run was never evaluated."""
    return read_eval_doc(Path(run) / EVAL)["entries"]


def read_eval_doc(path: Path, version: int = 0) -> dict:
    """A run's eval.json document ({"version", "entries": {key: entry}}), a new empty one (of ``version``) if there is
    none; a file of another shape is a UserError (in `eval`, found before sampling, not when the first entry is
    written)."""
    doc = read_json(path) if path.exists() else {"version": version, "entries": {}}
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), dict):
        raise UserError(f"{path} is not a flopmatch eval.json (no \"entries\" object); move it away and re-run")
    return doc


def sample_dir(run: str | Path, entry_key: str) -> Path:
    """The ``samples/`` subdirectory holding the images of one eval entry (``,`` -> ``_``, ``=`` -> ``-``)."""
    return Path(run) / SAMPLES / entry_key.replace(",", "_").replace("=", "-")
