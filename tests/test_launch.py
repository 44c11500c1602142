"""The launch file: everything it references exists (executable, params file, checkpoint, topics the
node subscribes to), checked statically because `launch` is not installable here; and a
launch_testing test that runs where launch_testing is installed (a robot) and skips cleanly here."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ros_helpers import REPO

LAUNCH = REPO / "launch" / "bitmar.launch.py"


def _launch_calls():
    tree = ast.parse(LAUNCH.read_text())
    calls = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            calls.setdefault(node.func.id, []).append(node)
    return tree, calls


def _kw(call, name):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    raise KeyError(name)


def test_launch_node_action_points_at_things_the_package_installs():
    _, calls = _launch_calls()
    (node,) = calls["Node"]
    assert ast.literal_eval(_kw(node, "package")) == "bitmar_ros"
    exe = ast.literal_eval(_kw(node, "executable"))
    assert (REPO / "bin" / exe).is_file()  # CMakeLists installs bin/* to lib/bitmar_ros
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert 'file(GLOB BITMAR_EXECUTABLES "${CMAKE_CURRENT_SOURCE_DIR}/bin/*")' in cmake
    assert "DESTINATION lib/${PROJECT_NAME}" in cmake
    remapped = [ast.literal_eval(t.elts[0]) for t in _kw(node, "remappings").elts]
    node_src = (REPO / "bitmar_ros" / "node.py").read_text()
    for topic in remapped:
        assert f'"{topic}"' in node_src, f"the node has no topic {topic!r} to remap"


def test_launch_defaults_name_installed_files():
    from bitmar_ros.params import BY_NAME

    _, calls = _launch_calls()
    declared = {ast.literal_eval(c.args[0]): c for c in calls["DeclareLaunchArgument"]}
    assert {"config", "checkpoint", "store_dir", "image_topic", "text_topic", "namespace", "use_sim_time",
            "log_level"} <= set(declared)
    # os.path.join(share, "<dir>", "<file>") defaults must exist in the source tree that is installed.
    for name in ("config", "checkpoint"):
        join = _kw(declared[name], "default_value")
        parts = [ast.literal_eval(a) for a in join.args[1:]]
        assert (REPO.joinpath(*parts)).is_file(), f"launch default for {name} names a missing file {parts}"
    (node,) = calls["Node"]
    params = [d for d in _kw(node, "parameters").elts if isinstance(d, ast.Dict)][0]
    for key in params.keys:
        name = ast.literal_eval(key)
        assert name in BY_NAME or name == "use_sim_time", f"launch sets an undeclared parameter {name}"


def test_params_file_matches_declared_defaults():
    import yaml

    from bitmar_ros.params import PARAMS

    values = yaml.safe_load((REPO / "config" / "bitmar.yaml").read_text())["bitmar"]["ros__parameters"]
    assert set(values) == {p.name for p in PARAMS}
    for p in PARAMS:
        assert values[p.name] == p.default and type(values[p.name]) is type(p.default), p.name


def test_launch_testing_runs_the_node_where_available():
    launch_testing = pytest.importorskip("launch_testing", reason="launch_testing is not installable from PyPI here")
    pytest.importorskip("launch_ros")
    import launch_testing.markers  # noqa: F401  (a robot with ROS 2 runs: launch_test tests/launch/test_bitmar_launch.py)
    assert (REPO / "tests" / "launch" / "test_bitmar_launch.py").is_file()
