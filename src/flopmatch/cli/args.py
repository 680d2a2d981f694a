"""Argument types of the CLI: every number and path a command takes is checked when it is parsed.

One validation layer for all commands: numbers that configure a run are parsed and range-checked
against :data:`flopmatch.config.RANGES` (the same table ``--set`` values and config files go through,
so a flag and its config key accept exactly the same values), other counts by the small types below,
and output paths must be creatable and writable before any work starts. A bad value is an argparse
error: one line naming the flag, exit status 2, nothing written.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import textwrap
import typing
from pathlib import Path

from flopmatch import config
from flopmatch.errors import UserError


def described(text: str, examples: str) -> dict:
    """``add_parser`` keywords for a subcommand's help page: ``text`` (what it does and what it writes; paragraphs
    separated by a blank line, each wrapped) above the options, ``examples`` (one command a line, kept as written)
    below them."""
    width = max(40, min(100, shutil.get_terminal_size().columns - 2))  # argparse wraps the options to columns - 2
    paragraphs = [textwrap.fill(" ".join(p.split()), width, break_on_hyphens=False) for p in text.strip().split("\n\n")]
    lines = textwrap.dedent(examples).strip("\n")
    return {"description": "\n\n".join(paragraphs), "epilog": "examples:\n" + textwrap.indent(lines, "  "),
            "formatter_class": argparse.RawDescriptionHelpFormatter}


DATA_HELP = ("training data: shapes (built-in), fashion-mnist (apt-get install dataset-fashion-mnist), "
             "emoji (apt-get install fonts-noto-color-emoji), folder:PATH (images with metadata.jsonl or "
             "metadata.csv, columns file_name,text, or a .txt caption beside each image; optional train/ and test/ "
             "sub-folders), wds:PATTERN "
             "(WebDataset tar shards of KEY.jpg/.png/.webp with KEY.txt, e.g. shards/{00000..00099}.tar), or "
             "hf:PATH (a Hugging Face dataset saved with save_to_disk, or parquet files; columns set by "
             "data.image_column and data.text_column)")


def data_source(text: str) -> str:
    """A ``--data`` value: a known source; a relative PATH in ``kind:PATH`` is made absolute (runs resume from anywhere)."""
    try:
        kind, arg = config.parse_source(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None
    return f"{kind}:{os.path.abspath(arg)}" if arg else kind


def config_value(section: type, name: str):
    """An argparse type for the config field ``section.name``: parsed as its type, checked against RANGES."""
    tp = typing.get_type_hints(section)[name]

    def parse(text: str):
        key = f"{config.SECTION_KEYS.get(section.__name__, section.__name__)}.{name}"
        try:
            value = config.parse_value(tp, text, key)
            tree = section(**{name: value})
            config.check_fields(tree, config.SECTION_KEYS.get(section.__name__, ""))
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("--set ")) from None
        return value

    parse.__name__ = tp.__name__  # argparse names the type in its messages
    return parse


def add_solver_args(p: argparse.ArgumentParser, default: str) -> None:
    """``--solver`` and ``--shift``: diffusion's ODE solver and SD3 time shift (flopmatch.objectives.ode)."""
    p.add_argument("--solver", type=config_value(config.SampleConfig, "solver"), metavar="{" + ",".join(config.SOLVERS) + "}",
                   help=f"diffusion: ODE solver; heun is 2nd order and costs 2*steps-1 network calls (default: {default})")
    p.add_argument("--shift", type=config_value(config.SampleConfig, "shift"),
                   help=f"diffusion: SD3 time shift of the sampling grid; 1 = uniform, > 1 = more steps at high noise (default: {default})")


def count(minimum: int = 1):
    """An argparse type for an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value.is_integer() and value >= minimum):
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return int(value)

    parse.__name__ = "int"
    return parse


def positive_seconds(text: str) -> float:
    """An argparse type for a finite duration in seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


WEIGHTS_HELP = ("which weights: ema (the EMA training kept; default), model (raw), or ema@SIGMA_REL, the post-hoc "
                "power-function EMA of that relative length (0 < SIGMA_REL <= 0.3, e.g. ema@0.1), rebuilt from the "
                "run's snapshots (EDM2)")


def weights_name(text: str) -> str:
    """An argparse type for ``--weights``: ema, model or ema@SIGMA_REL (checked again, with the run, by
    :func:`flopmatch.rundir.parse_weights`; here without loading torch)."""
    head, sep, tail = text.partition("@")
    if text in ("ema", "model"):
        return text
    try:
        ok = head == "ema" and bool(sep) and 0 < float(tail) <= 0.3
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"expected ema, model or ema@SIGMA_REL with SIGMA_REL in (0, 0.3], got {text!r}")
    return text


def raw_or_weights(args) -> str:
    """The weights ``--raw`` / ``--weights`` ask for; both at once, naming different weights, is a UserError."""
    if args.raw and args.weights not in ("ema", "model"):
        raise UserError(f"--raw and --weights {args.weights} name different weights; give one of them")
    return "model" if args.raw else args.weights


def number_list(kind: type, minimum: float, exclusive: bool = False):
    """An argparse type for a non-empty comma-separated list of finite numbers above ``minimum``."""

    def parse(text: str) -> list:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
        out = []
        for p in parts:
            try:
                v = float(p)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{p!r} is not a number (in {text!r})") from None
            low = v <= minimum if exclusive else v < minimum
            if not math.isfinite(v) or low or (kind is int and not v.is_integer()):
                what = "whole numbers" if kind is int else "finite numbers"
                raise argparse.ArgumentTypeError(f"expected {what} {'>' if exclusive else '>='} {minimum:g}, got {p!r}")
            out.append(kind(v))
        return out

    parse.__name__ = f"{kind.__name__} list"
    return parse


def _can_write_in(directory: Path) -> bool:
    """Whether a file can be created in ``directory``, by creating an anonymous temporary one there (removed at once).
    Why not os.access: it answers yes to root everywhere, also on read-only or virtual file systems (/proc)."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def _writable_parent(path: Path) -> None:
    """Raise ArgumentTypeError unless ``path`` could be created: its nearest existing ancestor is a writable directory."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{parent} is a file, so {path} cannot be created")
    if not _can_write_in(parent):
        raise argparse.ArgumentTypeError(f"cannot write in {parent} (read-only or no permission); choose another path")


def output_dir(text: str) -> str:
    """An argparse type for a directory a command will write into: not a file, creatable, writable."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} exists and is a file, not a directory")
    if path.is_dir():
        if not _can_write_in(path):
            raise argparse.ArgumentTypeError(f"cannot write in {path} (read-only or no permission)")
    else:
        _writable_parent(path)
    return text


def output_file(text: str) -> str:
    """An argparse type for a file a command will write: not a directory, in a writable place."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a directory; give a file name such as {path / 'samples.png'}")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot overwrite {path} (read-only)")
    _writable_parent(path)
    return text
