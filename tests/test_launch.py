"""The launch file: everything it references exists (executable, params file, checkpoint, topics the
node subscribes to), checked statically because `launch` is not installable here; and a
launch_testing test that runs where launch_testing is installed (a robot) and skips cleanly here."""
from __future__ import annotations

import ast

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
            "log_level", "lifecycle", "respawn"} <= set(declared)
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

    values = yaml.safe_load((REPO / "config" / "bitmar.yaml").read_text())["/**"]["ros__parameters"]
    assert set(values) == {p.name for p in PARAMS}
    for p in PARAMS:
        assert values[p.name] == p.default and type(values[p.name]) is type(p.default), p.name


def _launch_config_name(expr):
    """The argument name of ``LaunchConfiguration("name")``, else None."""
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id == "LaunchConfiguration":
        return ast.literal_eval(expr.args[0])
    return None


def test_launch_remaps_the_node_topics_to_its_arguments():
    """Each of the node's inputs is remapped to a launch argument whose default is another name
    (so a lost remapping cannot go unnoticed: the node would listen on `image` and `text`)."""
    _, calls = _launch_calls()
    (node,) = calls["Node"]
    declared = {ast.literal_eval(c.args[0]): c for c in calls["DeclareLaunchArgument"]}
    remaps = {ast.literal_eval(t.elts[0]): _launch_config_name(t.elts[1]) for t in _kw(node, "remappings").elts}
    assert remaps == {"image": "image_topic", "text": "text_topic"}
    for topic, arg in remaps.items():
        default = ast.literal_eval(_kw(declared[arg], "default_value"))
        assert default and default != topic, f"{arg} defaults to the node's own name {topic!r}"


def test_launch_passes_the_params_file_and_lifecycle_and_respawn():
    _, calls = _launch_calls()
    (node,) = calls["Node"]
    declared = {ast.literal_eval(c.args[0]): c for c in calls["DeclareLaunchArgument"]}
    params = _kw(node, "parameters").elts
    # The params file first, so the launch arguments after it override its values.
    assert _launch_config_name(params[0]) == "config"
    overrides = [d for d in params if isinstance(d, ast.Dict)][0]
    by_key = {ast.literal_eval(k): v for k, v in zip(overrides.keys, overrides.values)}
    assert {_launch_config_name(by_key[k]) for k in ("checkpoint", "store_dir", "use_sim_time")} == \
        {"checkpoint", "store_dir", "use_sim_time"}
    autostart = ast.unparse(by_key["autostart"])  # autostart unless lifecycle:=true
    assert "LaunchConfiguration('lifecycle')" in autostart and "!= 'true'" in autostart
    assert ast.literal_eval(_kw(declared["lifecycle"], "default_value")) == "false"
    assert _launch_config_name(_kw(node, "namespace")) == "namespace"
    assert _launch_config_name(_kw(node, "respawn")) == "respawn"
    assert ast.literal_eval(_kw(declared["respawn"], "default_value")) == "true"
    delay = _kw(node, "respawn_delay")
    tree, _ = _launch_calls()
    consts = {t.targets[0].id: ast.literal_eval(t.value) for t in tree.body
              if isinstance(t, ast.Assign) and isinstance(t.targets[0], ast.Name)}
    assert (consts[delay.id] if isinstance(delay, ast.Name) else ast.literal_eval(delay)) > 0


def test_params_file_applies_to_the_node_under_any_namespace():
    """rcl matches a params file's top-level keys against the node's full name: `bitmar` matches
    only /bitmar, so a namespaced node silently ran with the defaults. `/**` matches any."""
    import yaml

    doc = yaml.safe_load((REPO / "config" / "bitmar.yaml").read_text())
    assert list(doc) == ["/**"]


def test_launch_testing_test_remaps_passes_params_and_checks_exit_codes():
    """The launch_testing test (run on a robot) must be able to catch a broken launch file."""
    tree = ast.parse((REPO / "tests" / "launch" / "test_bitmar_launch.py").read_text())
    consts = {t.targets[0].id: ast.literal_eval(t.value) for t in tree.body
              if isinstance(t, ast.Assign) and isinstance(t.targets[0], ast.Name)
              and isinstance(t.value, ast.Constant)}
    assert consts["IMAGE_TOPIC"].rsplit("/", 1)[-1] != "image" and consts["TEXT_TOPIC"].rsplit("/", 1)[-1] != "text"
    src = ast.unparse(tree)
    for needle in ("'config': params", "'image_topic': IMAGE_TOPIC", "'text_topic': TEXT_TOPIC",
                   "'namespace': NAMESPACE", "post_shutdown_test", "assertExitCodes", "GetParameters"):
        assert needle in src, needle


def test_launch_testing_runs_the_node_where_available():
    launch_testing = pytest.importorskip("launch_testing", reason="launch_testing is not installable from PyPI here")
    pytest.importorskip("launch_ros")
    import launch_testing.markers  # noqa: F401  (a robot with ROS 2 runs: launch_test tests/launch/test_bitmar_launch.py)
    assert (REPO / "tests" / "launch" / "test_bitmar_launch.py").is_file()
