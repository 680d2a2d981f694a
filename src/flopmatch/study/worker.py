"""A study worker process: ``python -m flopmatch.study.worker JOBFILE`` runs one job file.

Started by :class:`~flopmatch.study.launchers.LocalWorkersLauncher`, one per concurrent job, and inside
each SLURM job by :class:`~flopmatch.study.slurm.WorkerJob`, with ``FLOPMATCH_THREADS`` torch threads.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from flopmatch import dist
from flopmatch.allocator import tune_allocator
from flopmatch.errors import EchoedError, UserError
from flopmatch.study.job import run_job

PARENT_ENV = "FLOPMATCH_PARENT_PID"  # set by the launcher: the study process this worker belongs to
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """Stop this worker (as Ctrl-C would: checkpoint, then exit) when the study process ``parent`` dies.

    Linux delivers SIGINT on the parent's death through prctl(PR_SET_PDEATHSIG); where that is not
    available, a daemon thread watches for the worker being re-parented and sends it. Either way a killed study leaves no worker
    writing into its directory for more than a second or two.
    """
    if os.getppid() != parent:  # the parent died before we got here
        raise KeyboardInterrupt
    try:
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGINT) == 0:
            return  # the kernel will send one SIGINT; a second would abort the checkpoint of the first
    except (OSError, AttributeError):
        pass  # not Linux: the watchdog below does it

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: ``python -m flopmatch.study.worker JOBFILE``; exit 2 on a user error, 130 on Ctrl-C."""
    argv = sys.argv[1:] if argv is None else argv
    tune_allocator()  # as the flopmatch command does (flopmatch.allocator)
    threads = os.environ.get("FLOPMATCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    # SIGTERM (scancel, a cluster stopping the job, kill) checkpoints like Ctrl-C: it is re-raised as SIGINT,
    # which the training loop turns into "checkpoint at the end of this step, then stop".
    # Once: SLURM and torchrun may both deliver it, and a second SIGINT means "stop now, no checkpoint".
    def on_term(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.raise_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, on_term)
    try:
        if os.environ.get(PARENT_ENV):
            die_with_parent(int(os.environ[PARENT_ENV]))
        run_job(json.loads(Path(argv[0]).read_text()), progress=False)
    except UserError as e:
        if not isinstance(e, EchoedError) or dist.is_main():  # another rank's error, said there: once per launch
            print(f"flopmatch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    dist.shutdown()  # under torchrun: before the interpreter exits (see there)
    return 0


if __name__ == "__main__":
    dist.exit_process(main())
