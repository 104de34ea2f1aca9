#!/usr/bin/env bash
# Install what the tests need, then lint, type-check and test.
#
#   bash scripts/test.sh [pytest args]           the versions in constraints.txt (what the suite passed with)
#   bash scripts/test.sh --newest [pytest args]  the newest versions pyproject.toml allows, upgraded in the
#                                                current environment, to see drift before users meet it
#
# torch==2.13.0 is the CPU build, pinned here and not in constraints.txt; on a GPU machine install your own
# torch first and drop the pin.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--newest" ]]; then
    shift
    python -m pip install --quiet --upgrade pip
    python -m pip install --quiet --upgrade --upgrade-strategy eager "torch==2.13.0" -e ".[test]"
    python -m pip freeze --exclude-editable | grep -v '^torch==' | diff constraints.txt - || true
else
    python -m pip install --quiet --upgrade pip
    python -m pip install --quiet -c constraints.txt "torch==2.13.0" -e ".[test]"
fi
# a real browser for tests/test_report_html.py (Debian's chromium), where this machine can install one;
# elsewhere that test is skipped with the reason
if ! command -v chromium >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "could not install chromium; the browser test will be skipped"
fi
python -m ruff check src tests bench
python -m ruff format --check src tests bench
python -m mypy
# two worker processes (pytest-xdist), a test file per worker at a time: most tests run one thread
# (tests/conftest.py), so a 2-core machine runs two at once; LOWBIT_TEST_WORKERS=0 runs in one process
python -m pytest -n "${LOWBIT_TEST_WORKERS:-2}" --dist loadfile "$@"
