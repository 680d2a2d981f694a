"""Shared fixtures: an isolated cache directory, tiny configs and tiny networks (see tests/tiny.py),
and the FlopCounterMode mapping for CPU flash attention (see tests/flop_counting.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import tiny
from flop_counting import CUSTOM_MAPPING

# The tensors in these tests are tiny: intra-op threads only add synchronisation, which on a
# loaded 2-core machine made a width-16 training step ~30x slower. One thread is also what makes
# float results independent of the machine's core count.
torch.set_num_threads(1)


# The longest test files, longest first (by `--durations` of the whole suite, 2026-12-04). pytest-xdist
# (`--dist loadfile --no-loadscope-reorder`, pyproject.toml) hands files to its 2 workers in collection order, so these
# start first and the many short files fill in around them, instead of a 2-minute file starting last and running alone
# (longest-processing-time-first scheduling).
LONGEST_FIRST = ("test_study.py", "test_slurm.py", "test_eval_metrics.py", "test_report.py", "test_distributed.py",
                 "test_lock.py", "test_data_folder.py", "test_eval_clip.py", "test_crash.py", "test_scaling.py")


def pytest_collection_modifyitems(session, config, items):
    """Collect the test files of LONGEST_FIRST first (stable: the order inside a file is kept)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))


@pytest.fixture(scope="session", autouse=True)
def flopmatch_cache(tmp_path_factory):
    """FLOPMATCH_CACHE -> a fresh session-wide directory, so tests never touch ~/.cache/flopmatch.

    Except trained evaluators: ``evaluators/`` links to the persistent cache, so the attribute
    classifier and domain CLIP (minutes to train, keyed and checksummed) train once per machine.
    """
    persistent = Path(os.environ.get("FLOPMATCH_CACHE") or Path.home() / ".cache" / "flopmatch") / "evaluators"
    persistent.mkdir(parents=True, exist_ok=True)
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("flopmatch-cache")
    (path / "evaluators").symlink_to(persistent, target_is_directory=True)
    mp.setenv("FLOPMATCH_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def tiny_config():
    """Factory ``(objective="masked", budget_steps=6.0, sets=None) -> RunConfig`` of a sub-second run."""
    return tiny.tiny_run_config


@pytest.fixture(scope="session")
def tiny_model():
    """Factory ``(objective, depth=1, head_dim=16, grid=4, seed=0, perturb=0.0) -> Tiny(objective, net, spec)``."""
    return tiny.make_tiny


@pytest.fixture(scope="session")
def flop_mapping():
    """``custom_mapping`` for FlopCounterMode that counts CPU flash-attention forward and backward."""
    return CUSTOM_MAPPING


@pytest.fixture
def gen():
    """A CPU torch.Generator seeded with 0."""
    return torch.Generator().manual_seed(0)


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    """A fresh FLOPMATCH_CACHE per test (the data-source tests): cache hits and misses are then this test's own."""
    path = tmp_path / "cache"
    monkeypatch.setenv("FLOPMATCH_CACHE", str(path))
    return path
