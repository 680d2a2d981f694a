"""Ctrl-C (SIGINT) as a request to stop at the next step boundary, so a training loop can save its state first.

Used by the generator's training loop (:mod:`flopmatch.train`) and the learned tokenizers'
(:mod:`flopmatch.tokenizers.train_ae`): a SIGINT (Ctrl-C, or the study's SLURM job asking its worker to
checkpoint on time-out or preemption) sets a flag the loop reads after each step; a second one raises at once.
"""

from __future__ import annotations

import signal
import threading

from flopmatch import dist


class InterruptFlag:
    """Within ``with``, SIGINT (Ctrl-C) sets a flag instead of raising; a second Ctrl-C raises at once.

    Only installed on the main thread (signal handlers cannot be set elsewhere). ``any()`` is
    all-reduced across ranks so every process stops at the same step, over a gloo group of CPU tensors
    (:func:`flopmatch.dist.any_rank`): read after every step, a flag on the GPU would be a host sync that drains the
    GPU's queue each step (and an NCCL collective between the step's own).
    """

    def __init__(self):
        self.flag = False
        self._old = None

    def _handler(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False

    def any(self) -> bool:
        if not dist.world_size() > 1:
            return self.flag
        return dist.any_rank(self.flag)
