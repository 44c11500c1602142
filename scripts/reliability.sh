#!/usr/bin/env bash
# The long reliability run (tests/test_reliability.py, marker `long`): minutes of 30 Hz camera +
# caption load, 25 SIGKILLs in a row, a few thousand fuzz cases; its figures replace the "latest
# long run" block of tests/RELIABILITY.md. CI runs the short form with the rest of the suite.
#
# Knobs (environment): BITMAR_LOAD_S (default 300 s of load), BITMAR_KILLS (25),
# BITMAR_FUZZ_EXAMPLES (500 hypothesis examples per camera transport), BITMAR_KILL_SEED (replay).
# Extra arguments go to pytest, e.g. `scripts/reliability.sh -k sigkill`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
# shellcheck source=scripts/ros_env.sh
source "$ROOT/scripts/ros_env.sh"
cd "$ROOT"
export BITMAR_LONG=1
figures="$(mktemp -t bitmar-reliability-XXXXXX.json)"
export BITMAR_RELIABILITY_JSON="$figures"
rc=0
"$ROOT/.venv/bin/python" -m pytest tests/test_reliability.py -m long -s -p no:cacheprovider "$@" || rc=$?
"$ROOT/.venv/bin/python" "$ROOT/tests/helpers/reliability_report.py" "$figures" "$ROOT/tests/RELIABILITY.md" "$rc"
rm -f "$figures"
exit "$rc"
