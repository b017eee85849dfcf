#!/usr/bin/env bash
# Prepare, on a machine with network access, the Python packages the GPU check needs and the lent GPU
# machine lacks (it has torch, triton, transformers, but no hydra-core/omegaconf, and no network):
# pure-Python wheels for its Python 3.12, in .whl/ (git-ignored; carried with the working tree).
#   bash benchmarks/gpu/wheels.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl hydra-core==1.3.2 omegaconf==2.3.0
# antlr4-python3-runtime 4.9.3 (omegaconf's parser runtime, the version it pins) is published as a
# source archive only: build its pure-Python wheel here.
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -l .whl
