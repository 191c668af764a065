#!/usr/bin/env bash
# Installs Atelier into .venv and runs `atelier demo`: a real LoRA job end to end on the embedded
# service (SQLite, local storage, a worker child process), no other services needed.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[ml]'
exec .venv/bin/atelier demo "$@"
