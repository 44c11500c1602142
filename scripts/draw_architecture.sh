#!/usr/bin/env bash
# Render docs/architecture.dot (the data-path picture in README.md and docs/ARCHITECTURE.md) to
# docs/architecture.svg. Needs Graphviz's `dot` (Debian/Ubuntu: apt-get install graphviz); run it
# after editing the .dot file and commit both (tests/test_layout.py checks they agree).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! command -v dot >/dev/null; then
  echo "draw_architecture.sh: Graphviz 'dot' not found; install it (apt-get install graphviz)" >&2
  exit 2
fi
dot -Tsvg "$ROOT/docs/architecture.dot" -o "$ROOT/docs/architecture.svg"
echo "wrote $ROOT/docs/architecture.svg"
