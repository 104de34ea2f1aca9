#!/usr/bin/env bash
# Install what the tests need, then lint, type-check and test.
# torch==2.13.0 is the CPU build; on a GPU machine install your own torch first and drop the pin.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0" -e ".[test]"
python -m ruff check src tests bench
python -m ruff format --check src tests bench
python -m mypy
python -m pytest "$@"
