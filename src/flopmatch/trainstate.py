"""The resumable state of a small training loop that runs to completion inside one command: the learned
tokenizers' (:mod:`flopmatch.tokenizers.train_ae`) and the cached evaluators' (attribute classifier, class
classifier, domain CLIP in :mod:`flopmatch.evaluation`).

A generator run checkpoints through its run directory (:mod:`flopmatch.rundir`); these loops have no run
directory, only an output folder that holds nothing until they finish. :class:`TrainingState` saves their
whole state there (modules, optimizers, LR schedulers, random generators and whatever the loop adds: its
batch order, its log) every :data:`SAVE_EVERY_S` seconds and when Ctrl-C arrives (or the SIGINT a study's
SLURM job sends its worker on time-out or preemption), and continues from it on the next call: bit for bit
the training an uninterrupted call does, because every source of randomness and every optimizer moment is
restored. One safetensors file (never a pickle), written atomically; scalars in its metadata as JSON.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from flopmatch.errors import UserError
from flopmatch.files import load_tensors, optimizer_state, optimizer_tensors, read_tensor_metadata, save_tensors
from flopmatch.interrupt import InterruptFlag

STATE_FILE = "training-state.safetensors"  # the state file's usual name, in the output folder while unfinished
SAVE_EVERY_S = 600.0  # a periodic save bounds what a hard kill (kill -9, a lost node) costs to ~10 minutes
STATE_VERSION = 1


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched) -> None:
    """One step of the evaluators' loops: gradients of ``loss``, the optimizer's step, then the LR schedule's."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


class EpochOrder:
    """Batches of indices into ``n`` items without replacement: a fresh permutation (drawn from ``generator``) each time
    the current one has fewer than ``batch`` left. Part of a :class:`TrainingState` (``orders``), so a resumed loop
    draws the batches an uninterrupted one does."""

    def __init__(self, n: int, batch: int, generator: torch.Generator):
        self.n, self.batch, self.generator = n, batch, generator
        self.perm, self.pos = torch.randperm(n, generator=generator), 0

    def next(self) -> torch.Tensor:
        """The next batch's indices, (batch,) int64."""
        if self.pos + self.batch > len(self.perm):
            self.perm, self.pos = torch.randperm(self.n, generator=self.generator), 0
        idx = self.perm[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return idx


class TrainingState:
    """``with TrainingState(path, identity, ...) as ts:`` around a loop ``for step in range(ts.step, steps)``, calling
    ``ts.end_of_step(step, steps, tensors=..., meta=...)`` after each step and ``ts.finish()`` once the result is
    written.

    ``path``: the state file (None: nothing is saved or resumed; Ctrl-C still stops at a step's end). ``identity``: a
    JSON-able description of the training (config, data digest) that a saved state must match to be continued; a
    mismatch is a UserError naming ``what_differs(saved, identity)`` (the caller's words). ``modules``,
    ``optimizers``, ``schedulers`` and ``generators`` are restored in place on entry; ``ts.tensors`` and ``ts.meta``
    then hold what the loop saved of its own (empty when starting afresh).
    """

    def __init__(self, path: Path | None, identity: dict, *, modules: dict, optimizers: dict, generators: dict,
                 schedulers: dict | None = None, orders: dict[str, EpochOrder] | None = None, what_differs=None):
        self.path, self.identity = path, identity
        self.modules, self.optimizers, self.generators = modules, optimizers, generators
        self.schedulers, self.orders = schedulers or {}, orders or {}
        self.what_differs = what_differs or (lambda saved, now: "other settings or data")
        self.step, self.tensors, self.meta, self.resumed = 0, {}, {}, False
        self._stop = InterruptFlag()
        self._saved_at = time.perf_counter()

    def __enter__(self) -> TrainingState:
        if self.path is not None and self.path.exists():
            self._load()
        self._stop.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        return self._stop.__exit__(*exc)

    def _load(self) -> None:
        path = self.path
        meta = read_tensor_metadata(path, fix=f"delete {path} to train from step 0")
        state = json.loads(meta.get("state", "{}"))
        if state.get("version") != STATE_VERSION:
            raise UserError(f"{path} was saved by another flopmatch version; delete it to train from step 0")
        if state.get("identity") != self.identity:
            raise UserError(f"{path.parent} holds an unfinished training of {self.what_differs(state.get('identity') or {}, self.identity)}; "
                            f"give the same to continue it, or use another output directory (or delete {path.name})")
        tensors = load_tensors(path)

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        for name, module in self.modules.items():
            module.load_state_dict(part(f"module.{name}."), strict=True)
        for name, opt in self.optimizers.items():
            opt.load_state_dict(optimizer_state(tensors, state["param_groups"][name], f"optim.{name}"))
        for name, sched in self.schedulers.items():
            sched.load_state_dict(state["schedulers"][name])
        for name, gen in self.generators.items():
            gen.set_state(tensors[f"rng.{name}"])
        torch.set_rng_state(tensors["rng.torch"])
        for name, order in self.orders.items():
            order.perm, order.pos = tensors[f"order.{name}"], state["orders"][name]
        self.step, self.meta, self.tensors, self.resumed = state["step"], state["meta"], part("loop."), True

    def end_of_step(self, step: int, steps: int, tensors=None, meta=None) -> None:
        """After step ``step`` (0-based) of ``steps``: save when Ctrl-C came or SAVE_EVERY_S passed, then raise
        KeyboardInterrupt if Ctrl-C came (not after the last step: the result is then about to be written).
        ``tensors`` and ``meta``: callables giving the loop's own state (tensors; JSON-able scalars), called only
        when saving."""
        last = step + 1 >= steps
        if self.path is not None and not last and (self._stop.flag or time.perf_counter() - self._saved_at >= SAVE_EVERY_S):
            self._save(step + 1, tensors() if tensors else {}, meta() if meta else {})
        if self._stop.flag and not last:
            if self.path is not None:
                print(f"{self.path.parent}: stopped after step {step + 1}/{steps} with its state saved; the same "
                      f"command continues it", file=sys.stderr)
            raise KeyboardInterrupt

    @property
    def stopping(self) -> bool:
        """Whether Ctrl-C came during this step (the state is saved at its end)."""
        return self._stop.flag

    def _save(self, next_step: int, loop_tensors: dict, loop_meta: dict) -> None:
        tensors, groups = {}, {}
        for name, module in self.modules.items():
            tensors |= {f"module.{name}.{k}": v for k, v in module.state_dict().items()}
        for name, opt in self.optimizers.items():
            opt_t, groups[name] = optimizer_tensors(opt.state_dict(), f"optim.{name}")
            tensors |= opt_t
        for name, gen in self.generators.items():
            tensors[f"rng.{name}"] = gen.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        tensors |= {f"order.{name}": order.perm for name, order in self.orders.items()}
        tensors |= {f"loop.{k}": v for k, v in loop_tensors.items()}
        state = {"version": STATE_VERSION, "identity": self.identity, "step": next_step, "param_groups": groups,
                 "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
                 "orders": {n: o.pos for n, o in self.orders.items()}, "meta": loop_meta}
        save_tensors(self.path, tensors, metadata={"state": json.dumps(state)})
        self._saved_at = time.perf_counter()

    def finish(self) -> None:
        """The result is written: the state is no longer needed."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
