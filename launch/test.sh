#!/usr/bin/env bash
# The test command: installs what the tests need (Debian libraries, .venv, test tools, FFCV), then runs them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/install.sh --test --ffcv
exec .venv/bin/python -m pytest "$@"
