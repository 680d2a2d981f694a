"""Optional experiment trackers beside ``metrics.jsonl``: TensorBoard and Weights & Biases.

``metrics.jsonl`` stays the source of truth (the report reads nothing else); a tracker is a view of the
same rows for people watching runs. ``train.trackers`` (``flopmatch train --track``) names zero or more:

- ``tensorboard``: event files in ``RUN/tensorboard/`` (``tensorboard --logdir RUN``, or a study's
  ``runs/`` folder to compare its runs). Each numeric field of a row is the scalar ``train/<field>``
  (``train/loss``, ``train/lr``, ``train/flops`` (cumulative), ``train/mfu``, ...) at the row's step,
  stored as float32 (TensorBoard's scalar type); the run config is the text ``config`` at the step each
  training call starts from.
- ``wandb``: a W&B run in ``RUN/wandb/``, offline unless ``WANDB_MODE`` says otherwise (no network, no
  account; upload later with ``wandb sync``), project ``$WANDB_PROJECT`` or "flopmatch", named after the
  run directory, its config the run config. Its id (and the last step logged to it) is kept in
  ``RUN/wandb/flopmatch.json`` so a resumed run logs to the same W&B run (offline, each training call writes
  an ``offline-run-*-ID`` folder with that id; ``wandb sync --append`` joins them). Needs the optional
  ``wandb`` extra.

Rows reach the trackers when they reach ``metrics.jsonl``: at each checkpoint, after it is saved (so the
curves move every ``train.checkpoint_every`` steps), so resuming an interrupted run never logs a step
twice (W&B would drop it, TensorBoard would draw both). A run continued to a larger budget does go back,
to where its cooldown started (:mod:`flopmatch.growth`; metrics.jsonl is cut back there too): a
TensorBoard writer starts with ``purge_step`` = its first step + 1, which hides whatever was logged past
it (a fresh start: whatever an attempt killed before its first checkpoint left), and W&B, whose steps
cannot go back, gets a new W&B run from there. Only the main rank logs. Trackers are not part of a run's
identity (:data:`flopmatch.rundir.NOT_IDENTITY`): a resume may add or drop them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from flopmatch import dist
from flopmatch.config import RunConfig, to_dict
from flopmatch.errors import UserError
from flopmatch.files import atomic_write_json, read_json

TENSORBOARD = "tensorboard"  # RUN/tensorboard/: event files
WANDB = "wandb"  # RUN/wandb/: W&B's own files, plus the run's W&B id
WANDB_STATE = "wandb/flopmatch.json"  # {"id": the run's W&B id, "step": the last step logged to it}
WANDB_INSTALL = "pip install 'flopmatch[wandb]' (or pip install -r requirements-wandb.lock)"


def check_trackers(names: list[str]) -> None:
    """Raise UserError if a named tracker's package is missing; checked before any expensive set-up."""
    if WANDB in names and importlib.util.find_spec("wandb") is None:
        raise UserError(f"train.trackers=wandb needs the wandb package: {WANDB_INSTALL}; or train without it "
                        "(`flopmatch train --track tensorboard`, or --set train.trackers=), also on a run whose saved "
                        "config.json lists wandb: trackers may change when a run resumes")


def scalars(row: dict) -> dict[str, float]:
    """The numeric fields of a metrics row except ``step``, as ``train/<field>`` -> value (bools and text dropped)."""
    return {f"train/{k}": float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _wait_for_next_second(folder: Path) -> None:
    """Sleep (under 1 second) until the clock's second is past the creation second of every event file in ``folder``.

    TensorBoard reads a run's event files in name order, and a name starts with its creation second (then
    host, pid and a per-process counter compared as text). A writer started in the same second as the
    last one (a resume right after an interruption, as in tests) could sort before it, and its purge
    would then hide the wrong steps.
    """
    seconds = [int(part[3]) for p in folder.glob("events.out.tfevents.*") if (part := p.name.split("."))[3].isdigit()]
    if seconds and (wait := max(seconds) + 1 - time.time()) > 0:
        time.sleep(wait)


class TensorBoardSink:
    """Scalars and the config text in ``RUN/tensorboard/`` through torch's SummaryWriter."""

    def __init__(self, run: Path, cfg: RunConfig, step: int):
        _wait_for_next_second(run / TENSORBOARD)
        # purge_step hides events at steps >= it that earlier writers left (TensorBoard's restart rule):
        # on resume, anything past the checkpoint this call starts from; on a fresh start (step 0), everything.
        self.writer = SummaryWriter(log_dir=str(run / TENSORBOARD), purge_step=step + 1 if step else 0)
        # Markdown: indented four spaces, the JSON shows as a code block.
        text = "\n".join("    " + line for line in json.dumps(to_dict(cfg), indent=2).splitlines())
        self.writer.add_text("config", text, global_step=step)

    def log(self, values: dict[str, float], step: int) -> None:
        """Add each ``tag -> value`` as a float32 scalar at ``step`` (training steps)."""
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run in ``RUN/wandb/`` (offline by default) whose id is stored in the run directory."""

    def __init__(self, run: Path, cfg: RunConfig, step: int):
        # wandb is the optional `wandb` extra and takes seconds to import: imported only when asked for.
        try:
            import wandb
        except ImportError:
            raise UserError(f"train.trackers=wandb needs the wandb package: {WANDB_INSTALL}") from None
        (run / WANDB).mkdir(parents=True, exist_ok=True)
        self.state_path = run / WANDB_STATE
        saved = read_json(self.state_path) if self.state_path.exists() else {}
        self.run_id, self.logged = saved.get("id", ""), saved.get("step", 0)
        if not self.run_id or step < self.logged:
            # First time; or the run went back to an earlier step (continued to a larger budget from where its
            # cooldown started): W&B drops steps that go back, so the rest goes to a W&B run of its own.
            self.run_id, self.logged = secrets.token_hex(6), 0  # W&B ids: lowercase letters and digits; 48 random bits
            self._save()  # before the W&B run starts, so a crash cannot lose the id
        mode = os.environ.get("WANDB_MODE") or "offline"  # offline unless the user chose: training never needs the network
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or "flopmatch", dir=str(run), id=self.run_id,
                name=run.resolve().name, config=to_dict(cfg), mode=mode,
                # resume="allow": the same id continues the run online (offline, W&B writes a new segment with
                # the id). allow_val_change: a resume may change the keys outside a run's identity (trackers).
                resume="allow", allow_val_change=True,
                # console="off": the console is tqdm's progress bar, and metrics.jsonl already holds every row.
                settings=wandb.Settings(console="off", quiet=True),
            )
        except Exception as e:  # wandb raises its own types (no API key online, bad project, ...)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            hint = "" if mode == "offline" else f"; WANDB_MODE is {mode!r}, unset it to log offline"
            raise UserError(f"could not start the W&B run in {run / WANDB} ({msg}){hint}") from None

    def _save(self) -> None:
        atomic_write_json(self.state_path, {"id": self.run_id, "step": self.logged})

    def log(self, values: dict[str, float], step: int) -> None:
        """Log ``tag -> value`` as one W&B history row at ``step`` (training steps; must not go back)."""
        self.run.log(values, step=step)
        self.logged = max(self.logged, step)

    def flush(self) -> None:
        # W&B's own service process writes (and, online, uploads) in the background; this records the step reached.
        self._save()

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


SINKS = {TENSORBOARD: TensorBoardSink, WANDB: WandbSink}


class Trackers:
    """The trackers ``cfg.train.trackers`` names for the run in ``run``; none on ranks other than the main one.

    ``step``: the step this training call starts from (0, or the step of the checkpoint it resumes).
    A context manager: leaving it closes every tracker (a W&B run is marked failed if an exception left it).
    """

    def __init__(self, run: str | Path, cfg: RunConfig, step: int):
        self.sinks: list = []
        if not dist.is_main():
            return
        check_trackers(cfg.train.trackers)
        try:
            for name in dict.fromkeys(cfg.train.trackers):  # in order, each once
                self.sinks.append(SINKS[name](Path(run), cfg, step))
        except BaseException:
            self.close(failed=True)
            raise

    def log(self, row: dict, step: int | None = None) -> None:
        """Forward the numeric fields of one metrics.jsonl row at ``step`` (training steps; default ``row["step"]``)."""
        if not self.sinks:
            return
        values = scalars(row)
        for sink in self.sinks:
            sink.log(values, row["step"] if step is None else step)

    def flush(self) -> None:
        """Write what was logged to disk now, as durable as the metrics.jsonl rows it mirrors."""
        for sink in self.sinks:
            sink.flush()

    def close(self, failed: bool = False) -> None:
        """Close every tracker (idempotent); ``failed`` marks a W&B run as crashed."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close(failed)

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close(failed=exc_type is not None and not issubclass(exc_type, KeyboardInterrupt))
        return False
