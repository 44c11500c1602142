"""The layout the README and docs/ARCHITECTURE.md describe is the tree that exists: every package
and module is named where a newcomer looks for it, every path the docs name exists, the picture is
rendered from its source, and imports run one way (no package reaches back, no ROS in bitmar_core)."""
from __future__ import annotations

import ast
import html
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "bitmar_core"

# Which bitmar_core packages each may import: the model is the base; the robot side (inference,
# episodes) never imports training or evaluation; nothing imports back up.
ALLOWED = {
    "model": set(),
    "inference": {"model"},
    "episodes": {"inference", "model"},
    "data": {"inference"},
    "training": {"data", "inference", "model"},
    "evaluation": {"data", "inference", "model"},
}
ROS_MODULES = ("rclpy", "rosidl_runtime_py", "sensor_msgs", "std_msgs", "geometry_msgs", "nav_msgs",
               "builtin_interfaces", "diagnostic_msgs", "std_srvs", "lifecycle_msgs", "rcl_interfaces", "tf2_ros",
               "launch", "launch_ros", "bitmar_ros", "bitmar_browser", "rosbags")


def packages() -> set[str]:
    return {p.name for p in CORE.iterdir() if (p / "__init__.py").is_file()}


def modules() -> dict[str, set[str]]:
    """package → its module file names (without __init__.py)."""
    return {pkg: {f.name for f in (CORE / pkg).glob("*.py") if f.name != "__init__.py"} for pkg in packages()}


def imports_of(path: Path) -> list[str]:
    """Absolute names of everything a module imports (relative imports resolved)."""
    parts = ["bitmar_core", *path.relative_to(CORE).with_suffix("").parts]
    out = []
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            out += [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = parts[:len(parts) - n.level]
                name = ".".join(base + ([n.module] if n.module else []))
                # `from . import x` names submodules: keep them visible
                out += [f"{name}.{a.name}" for a in n.names] if not n.module else [name]
            else:
                out.append(n.module or "")
    return out


def test_bitmar_core_is_grouped_in_packages_with_no_loose_modules():
    assert packages() == set(ALLOWED)
    loose = {f.name for f in CORE.glob("*.py")} - {"__init__.py"}
    assert not loose, f"modules outside a package: {sorted(loose)}"


def test_imports_run_one_way_and_bitmar_core_never_imports_ros():
    bad = []
    for f in sorted(CORE.rglob("*.py")):
        rel = f.relative_to(CORE).parts
        pkg = rel[0] if len(rel) > 1 else None
        for name in imports_of(f):
            top = name.split(".")[0]
            if top in ROS_MODULES:
                bad.append(f"{f.relative_to(REPO)} imports {name} (bitmar_core knows nothing of ROS)")
            if top == "bitmar_core" and pkg is not None:
                parts = name.split(".")
                target = parts[1] if len(parts) > 1 else None
                if target != pkg and target not in ALLOWED[pkg]:
                    bad.append(f"{f.relative_to(REPO)} ({pkg}) imports {name}; {pkg} may import {sorted(ALLOWED[pkg])}")
    assert not bad, "\n".join(bad)


def _architecture_sections() -> dict[str, set[str]]:
    """`### \\`pkg/\\`` section of docs/ARCHITECTURE.md → the module names in its table's first column."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    out: dict[str, set[str]] = {}
    for m in re.finditer(r"^### `(\w+)/`[^\n]*\n(.*?)(?=^##)", text, re.M | re.S):
        names = set()
        for row in m.group(2).splitlines():
            if row.startswith("| `"):
                names |= set(re.findall(r"`(\w+\.py)`", row.split("|")[1]))
        out[m.group(1)] = names
    return out


def test_architecture_doc_names_every_module_in_its_package_and_nothing_else():
    assert _architecture_sections() == modules()


def _layout_rows() -> dict[str, str]:
    text = (REPO / "README.md").read_text()
    table = text[text.index("## Layout"):text.index("## The model")]
    rows = {}
    for row in table.splitlines():
        cells = row.split("|")
        if row.startswith("| `") and len(cells) > 2:
            for path in re.findall(r"`([^`]+)`", cells[1]):
                rows[path] = cells[2]
    return rows


def test_readme_layout_table_matches_the_tree():
    rows = _layout_rows()
    for path, what in rows.items():
        assert (REPO / path).exists(), f"README layout names {path}, which does not exist"
        where = REPO / path if (REPO / path).is_dir() else (REPO / path).parent
        for module in re.findall(r"`(\w+\.py)`", what):
            assert (where / module).is_file(), f"README layout row {path} names {module}, not in {where}"
    assert {f"bitmar_core/{p}/" for p in packages()} <= set(rows)
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    top = {line.split("/")[0] + "/" for line in tracked.splitlines() if "/" in line and not line.startswith(".")}
    assert top - {"bitmar_core/"} <= set(rows), f"top-level folders missing from the README layout: {top - set(rows)}"


def _doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "checkpoints" / "MODEL_CARD.md",
            *sorted((REPO / "bench").glob("*.md")), REPO / "tests" / "RELIABILITY.md"]


def _resolves(dotted: str) -> bool:
    """bitmar_core.pkg.module[.name]: the longest prefix is a module or package of the tree, and a
    name after it is defined (or imported) there."""
    parts = dotted.split(".")
    for k in range(len(parts), 1, -1):
        base = REPO.joinpath(*parts[:k])
        src = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if src.is_file():
            if k == len(parts):
                return True
            name = parts[k]
            defined = rf"^\s*(class|def) {name}\b|^{name}\s*[:=]|import[^\n]*\b{name}\b"
            return bool(re.search(defined, src.read_text(), re.M))
    return False


def test_every_module_path_and_name_the_docs_give_exists():
    missing = []
    for doc in _doc_files():
        text = doc.read_text()
        paths = re.findall(r"\b((?:bitmar_core|bitmar_ros|bitmar_browser|bench|tests|scripts)/[\w/]+\.\w+)", text)
        for path in set(paths):
            if not (REPO / path).exists():
                missing.append(f"{doc.relative_to(REPO)}: {path}")
        for dotted in set(re.findall(r"\bbitmar_core(?:\.\w+)+", text)):
            if not _resolves(dotted):
                missing.append(f"{doc.relative_to(REPO)}: {dotted}")
    assert not missing, "\n".join(sorted(missing))


def test_the_picture_is_rendered_from_its_source_and_names_real_paths():
    dot = (REPO / "docs" / "architecture.dot").read_text()
    svg = html.unescape((REPO / "docs" / "architecture.svg").read_text())
    svg_text = {t.strip() for t in re.findall(r"<text[^>]*>([^<]*)</text>", svg)}
    labels = re.findall(r'label="([^"]*)"', dot)
    assert len(labels) > 10
    for label in labels:
        for line in label.split("\\n"):
            assert line.strip() in svg_text, (f"docs/architecture.svg lacks {line!r} of docs/architecture.dot: "
                                              "run scripts/draw_architecture.sh")
        for path in re.findall(r"\b(?:bitmar_core|bitmar_ros|bitmar_browser)/[\w/]*(?:\.py)?", label):
            assert (REPO / path).exists(), f"docs/architecture.dot names {path}, which does not exist"
    for doc in ("README.md", "docs/ARCHITECTURE.md"):
        assert "architecture.svg)" in (REPO / doc).read_text(), f"{doc} does not show the picture"
