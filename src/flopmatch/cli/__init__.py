"""The ``flopmatch`` command: parsing only; each subcommand calls one library function.

One module per group of subcommands (``run``: train, sample, flops; ``tokenizer``; ``eval``; ``study``;
``report``; ``compare``; ``config``; ``data``; ``bench``), each with a ``register(subparsers)``. They import nothing heavy at the top: a command
imports its implementation when it runs, so ``flopmatch --help`` never loads torch.

User errors (:class:`~flopmatch.errors.UserError`) print one line ``flopmatch: error: ...`` and exit
with status 2; Ctrl-C exits 130 after the running stage has saved what it can.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys

from flopmatch import __version__
from flopmatch.allocator import tune_allocator
from flopmatch.cli import bench, compare, config, data, report, run, study, tokenizer
from flopmatch.cli import eval as eval_cli
from flopmatch.errors import EchoedError, UserError


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (``flopmatch: error: ...``) and exit status 2, like UserError."""

    def error(self, message: str):
        if message.endswith("expected one argument"):  # e.g. `--budgets -1e9`: argparse reads the value as a flag
            flag = message.partition(":")[0].removeprefix("argument ").split("/")[-1]
            message += f" (if its value starts with '-', write {flag}=VALUE)"
        say_error(f"{self.prog}: error: {message} (see {self.prog} --help)")  # under torchrun every rank parses it
        self.exit(2)

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an argument no parser took is reported by the subcommand it was given to, so the line
        points at that subcommand's help (``flopmatch train --help``), not the top-level one."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            _innermost(self, parsed).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def _innermost(parser: argparse.ArgumentParser, parsed: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the subcommand ``parsed`` chose: ``flopmatch tokenizer train``'s for that command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(parsed, action.dest, None) in action.choices:
            return _innermost(action.choices[getattr(parsed, action.dest)], parsed)
    return parser


def shutdown_distributed() -> None:
    """Under torchrun (train, eval): destroy the process group before the interpreter exits
    (:func:`flopmatch.dist.shutdown` says why). Looked up, not imported: a command that never loaded
    ``flopmatch.dist`` has no process group, and importing it would load torch into every command."""
    loaded = sys.modules.get("flopmatch.dist")
    if loaded is not None:
        loaded.shutdown()


def entry() -> None:
    """The ``flopmatch`` console script and ``python -m flopmatch``: :func:`main`, then exit with its status; a
    torchrun worker (a process that loaded ``flopmatch.dist``) by :func:`flopmatch.dist.exit_process`."""
    status = main()
    loaded = sys.modules.get("flopmatch.dist")  # looked up as in shutdown_distributed
    if loaded is not None:
        loaded.exit_process(status)
    sys.exit(status)


def say_error(line: str, echoed: bool = False) -> None:
    """Print a user error's ``line`` on stderr once per torchrun launch (every time outside one).

    Rank 0 says every error, then posts it (:func:`said_on_main`). Another rank says only an error of its own: one
    rank 0 also met, or an ``echoed`` one (rank 0's, told to it: EchoedError), it leaves unsaid, and for that it first
    waits for rank 0's post. Leaving at once, it could make torchrun stop rank 0 (a worker exited) before rank 0
    printed the line."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(line, file=sys.stderr, flush=True)
        said_on_main(line)
    elif not said_on_main(line) and not echoed:
        print(line, file=sys.stderr, flush=True)


def said_on_main(message: str) -> bool:
    """Whether torchrun's rank 0 prints this user error itself (:func:`flopmatch.dist.said_on_main`). Imported here,
    on an error under torchrun only (WORLD_SIZE > 1): the error may come before the command loaded torch."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    from flopmatch import dist  # torch: only on this path, so that `flopmatch --help` never loads it

    return dist.said_on_main(message)


def peer_lost(error: RuntimeError) -> bool:
    """Whether ``error`` is a torchrun worker losing another process (:func:`flopmatch.dist.peer_lost`)."""
    loaded = sys.modules.get("flopmatch.dist")
    return loaded is not None and loaded.peer_lost(error)


def is_main_rank() -> bool:
    """False on a torchrun process other than rank 0 (looked up like :func:`shutdown_distributed`)."""
    loaded = sys.modules.get("flopmatch.dist")
    return loaded is None or loaded.is_main()


def build_parser() -> argparse.ArgumentParser:
    """The whole ``flopmatch`` argument parser."""
    parser = OneLineParser(prog="flopmatch", description="Compute-matched comparison of image-synthesis paradigms.")
    parser.add_argument("--version", action="version", version=f"flopmatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)
    for module in (run, tokenizer, data, eval_cli, study, report, compare, config, bench):
        module.register(sub)
    return parser


# errors of a path the user chose or the machine refused, not of flopmatch: said in one line (exit 2)
REFUSED_PATH = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EEXIST, errno.EISDIR,
                errno.ENOTDIR, errno.ENAMETOOLONG}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flopmatch`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) and usage errors (2): a status, like every other outcome
        return e.code if isinstance(e.code, int) else 2
    tune_allocator()  # every command's tensors: keep freed pages instead of faulting them in every step
    try:
        status = args.func(args) or 0
        shutdown_distributed()
        return status
    except UserError as e:
        say_error(f"flopmatch: error: {e}", echoed=isinstance(e, EchoedError))
        return 2
    except RuntimeError as e:
        if not peer_lost(e):  # anything else may be a bug: its traceback stays
            raise
        # gloo's text: "[.../pair.cc:553] Connection closed by peer [127.0.0.1]:10970. This is typically ...": its gist
        cause = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip().splitlines()[0]).split(". ")[0][:200]
        print(f"flopmatch: error: another process of this torchrun launch stopped ({cause}); its own log says why. "
              "What was saved is kept (a training run's last checkpoint): run the same command again to go on", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if is_main_rank():  # under torchrun every rank is interrupted: one line
            print("flopmatch: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which closed it: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # a path the system refused (permission, read-only, full disk, a file in the way): one line
        if e.filename is None or e.errno not in REFUSED_PATH:  # anything else may be a bug: its traceback stays
            raise
        target = f"{e.filename} -> {e.filename2}" if e.filename2 else f"{e.filename}"
        print(f"flopmatch: error: {e.strerror or e}: {target}; choose another path or fix this one", file=sys.stderr)
        return 2
