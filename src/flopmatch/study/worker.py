"""A study worker process: ``python -m flopmatch.study.worker JOBFILE`` runs one job file.

Started by :class:`~flopmatch.study.launchers.LocalWorkersLauncher`, one per concurrent job, with
``FLOPMATCH_THREADS`` torch threads.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from flopmatch.errors import UserError
from flopmatch.study.job import run_job


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: ``python -m flopmatch.study.worker JOBFILE``; exit 2 on a user error, 130 on Ctrl-C."""
    argv = sys.argv[1:] if argv is None else argv
    threads = os.environ.get("FLOPMATCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    try:
        run_job(json.loads(Path(argv[0]).read_text()), progress=False)
    except UserError as e:
        print(f"flopmatch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
