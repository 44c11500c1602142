#!/usr/bin/env bash
# The README's test command: set up (idempotent), then run the whole test suite, slow tests included.
# Extra arguments go to pytest (e.g. `-m "not slow"` for a quick local run).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
# shellcheck source=scripts/ros_env.sh
source "$ROOT/scripts/ros_env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
