"""The commands the README and docs/ print exist after the README's set-up and run as printed.

Every `.venv/bin/<command>` and `python -m <module>` named in README.md and docs/*.md answers
`--help` from the venv the set-up made, and the one-minute smoke run of docs/TRAINING.md (the block
after its `smoke-run` marker) runs verbatim: a few training steps, then an evaluation of the result.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _doc_text() -> str:
    return "\n".join(p.read_text() for p in DOCS)


def printed_commands() -> set[str]:
    """Names after `.venv/bin/` and modules after `python -m` in the docs."""
    text = _doc_text()
    out = {f"bin:{m}" for m in re.findall(r"\.venv/bin/([A-Za-z0-9_.-]+)", text) if m != "python"}
    out |= {f"module:{m}" for m in re.findall(r"python -m ([A-Za-z0-9_.]+)", text)}
    return out


def test_the_docs_print_the_training_commands():
    cmds = printed_commands()
    assert {"bin:bitmar-train", "bin:bitmar-eval"} <= cmds, cmds


@pytest.mark.parametrize("cmd", sorted(printed_commands()))
def test_each_printed_command_answers_help(cmd):
    kind, name = cmd.split(":", 1)
    if kind == "bin":
        exe = VENV_BIN / name
        assert exe.is_file() and os.access(exe, os.X_OK), f"{exe} missing: the set-up must install it"
        argv = [str(exe), "--help"]
    else:
        argv = [sys.executable, "-m", name, "--help"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower(), proc.stdout[:500]


def smoke_block() -> list[str]:
    text = (REPO / "docs" / "TRAINING.md").read_text()
    m = re.search(r"<!-- smoke-run[^>]*-->\s*```bash\n(.*?)```", text, re.S)
    assert m, "docs/TRAINING.md lost its smoke-run block"
    return [c for c in m.group(1).replace("\\\n", " ").splitlines() if c.strip()]


@pytest.mark.slow
def test_smoke_run_as_printed():
    commands = smoke_block()
    assert len(commands) == 2
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for line in commands:
        argv = shlex.split(line)
        assert argv[0].startswith(".venv/bin/")
        argv[0] = str(VENV_BIN / Path(argv[0]).name)
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
        assert proc.returncode == 0, (line, proc.stderr[-3000:])
    summary = json.loads((REPO / "runs" / "smoke" / "summary.json").read_text())
    with open(REPO / "runs" / "smoke" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert summary["steps"] == 20 and float(rows[-1]["lm"]) < float(rows[0]["lm"])
    assert "attrF1" in proc.stdout  # bitmar-eval printed its table
