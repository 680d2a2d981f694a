"""Bounded SLURM client commands: :func:`bounded` runs a command under coreutils' ``timeout``, and
:class:`BoundedExecutor` submits through submitit with its sbatch call so bounded (:data:`SBATCH_TIMEOUT_S`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import submitit

# sbatch answers in well under a second; longer only from a controller too busy to queue a study on (each try waits up
# to its MessageTimeout, 10 s by default, and sbatch retries while told "try again"). A job the controller registers
# after the limit (seen on scripts/slurm-local.sh's cluster) finds no pickle, which submitit moves into place only
# after sbatch returned: it waits a minute for one, then exits, no work done.
SBATCH_TIMEOUT_S = 120
TIMED_OUT = {124, 137}  # coreutils timeout's exit status when it stopped the command (137: it had to SIGKILL it)


def bounded(cmd: list[str], seconds: float) -> list[str]:
    """``cmd`` under coreutils' ``timeout`` (TERM after ``seconds``, KILL 5 s later; exit status 124 or 137), in the
    foreground so that Ctrl-C reaches it too; ``cmd`` as it is where ``timeout`` is missing."""
    if shutil.which("timeout") is None:
        return cmd
    return ["timeout", "--foreground", "--kill-after=5", f"{seconds:g}", *cmd]


class BoundedExecutor(submitit.SlurmExecutor):
    """submitit's SLURM executor with its sbatch call bounded by :data:`SBATCH_TIMEOUT_S`.

    submitit (1.5) runs ``sbatch SCRIPT`` through ``utils.CommandFunction`` with no timeout, from the command list
    ``_make_submission_command`` returns: the one hook that sees the command and nothing else of the submission.
    """

    def _make_submission_command(self, submission_file_path: Path) -> list[str]:
        return bounded(super()._make_submission_command(submission_file_path), SBATCH_TIMEOUT_S)
