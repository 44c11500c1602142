"""The robot's build path: `colcon build` of the package in a fresh workspace gives the install tree
that `ros2 run` / `ros2 launch` use, with importable generated interfaces and bitmar_core (that
bitmar_core itself imports no ROS is checked with the rest of the layout, in test_layout.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ros_helpers import REPO

VENV = Path(sys.executable).resolve().parents[1] if (Path(sys.prefix) / "share" / "ament_cmake").exists() else Path(sys.prefix)


@pytest.mark.slow
def test_colcon_build_produces_the_install_tree(tmp_path):
    ws = tmp_path / "ws"
    (ws / "src").mkdir(parents=True)
    os.symlink(REPO, ws / "src" / "bitmar_ros")
    prefix = str(Path(sys.prefix))
    env = dict(os.environ, AMENT_PREFIX_PATH=prefix, CMAKE_PREFIX_PATH=prefix,
               PATH=f"{prefix}/bin:{os.environ['PATH']}")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [f"{prefix}/bin/colcon", "--log-base", str(ws / "log"), "build", "--base-paths", str(ws / "src"),
         "--build-base", str(ws / "build"), "--install-base", str(ws / "install"), "--event-handlers",
         "console_direct-", "--cmake-args", f"-DPython3_EXECUTABLE={sys.executable}", "-DBUILD_TESTING=OFF"],
        cwd=ws, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    inst = ws / "install" / "bitmar_ros"
    exe = inst / "lib" / "bitmar_ros" / "bitmar_node"
    assert exe.is_file() and os.access(exe, os.X_OK)
    assert (inst / "share" / "bitmar_ros" / "launch" / "bitmar.launch.py").is_file()
    assert sorted(p.name for p in (inst / "share" / "bitmar_ros" / "config").glob("*.yaml"))
    assert (inst / "share" / "ament_index" / "resource_index" / "packages" / "bitmar_ros").is_file()
    browser = inst / "lib" / "bitmar_ros" / "bitmar_memory_browser"
    assert browser.is_file() and os.access(browser, os.X_OK)

    site = next(inst.glob("lib/python3*/site-packages"))
    assert (site / "bitmar_browser" / "templates" / "base.html").is_file()  # the memory browser's files
    assert (site / "bitmar_browser" / "static" / "app.js").is_file()
    probe = ("import bitmar_ros, bitmar_core, bitmar_ros.msg as m, bitmar_ros.srv as s;"
             "from rclpy.serialization import serialize_message as ser, deserialize_message as de;"
             "d = m.Description(text='ok', token_index=4); assert de(ser(d), m.Description) == d;"
             "print(bitmar_ros.__file__); print(bitmar_core.__file__); print(s.QueryMemory.__name__)")
    run_env = dict(env, PYTHONPATH=str(site), LD_LIBRARY_PATH=f"{inst / 'lib'}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=run_env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[0].startswith(str(site)) and lines[1].startswith(str(site)) and lines[2] == "QueryMemory"
