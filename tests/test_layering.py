"""The package's structure: the layering contract, no import cycles, a CLI that loads nothing heavy."""

from __future__ import annotations

import graphlib
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold():
    """Every import-linter contract in pyproject.toml is kept (layers low -> high, model code knows no stage)."""
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_no_import_cycles_between_modules():
    """The module import graph of flopmatch is acyclic (a cycle is reported with its modules)."""
    graph = grimp.build_graph("flopmatch", cache_dir=None)
    deps = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    graphlib.TopologicalSorter(deps).prepare()  # raises CycleError naming the cycle


def test_cli_parser_imports_no_heavy_packages():
    """Building the whole `flopmatch` parser (what --help does) imports neither torch nor numpy."""
    code = ("import sys; from flopmatch.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy', 'transformers', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_help_lists_every_subcommand():
    """`flopmatch --help` exits 0 and names each subcommand."""
    out = subprocess.run([sys.executable, "-m", "flopmatch", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for command in ("train", "sample", "flops", "tokenizer", "eval", "study", "report", "config", "bench"):
        assert command in out.stdout
