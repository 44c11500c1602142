#!/usr/bin/env bash
# The README's main command: set up (idempotent), then run the node on the bundled demo bag with the
# bundled checkpoint, showing streamed descriptions, stored episodes and memory queries.
# Extra arguments go to bitmar_ros.demo (e.g. --rate 2, --query "a green star", --store-dir DIR).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
# shellcheck source=scripts/ros_env.sh
source "$ROOT/scripts/ros_env.sh"
cd "$ROOT"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$ROOT/.venv/bin/python" -m bitmar_ros.demo "$@"
