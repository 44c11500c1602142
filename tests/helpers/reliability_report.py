"""Render the figures of a reliability run (the JSON that tests/test_reliability.py writes when
BITMAR_RELIABILITY_JSON is set) into the block between the markers of tests/RELIABILITY.md.

Usage: reliability_report.py FIGURES.json RELIABILITY.md PYTEST_EXIT_CODE
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

BEGIN, END = "<!-- long-run:begin -->", "<!-- long-run:end -->"

ROWS = (  # key, label
    ("load_minutes", "minutes of load held (30 Hz 640×480 rgb8 + 5 Hz captions + ~4 Hz queries)"),
    ("load_frames_sent", "frames published"),
    ("load_frames_received", "frames received by the node"),
    ("load_captions_sent", "captions published"),
    ("load_episodes_stored", "episodes stored (each caption exactly once)"),
    ("load_episodes_lost", "captions lost"),
    ("load_max_text_queue", "largest caption queue seen (bound 64)"),
    ("load_caption_to_commit_p95_ms", "caption received → episode committed, p95 over the last 512 (ms)"),
    ("load_descriptions", "descriptions generated under load (1 Hz asked)"),
    ("load_description_final_p95_ms", "frame received → final description token, p95 (ms)"),
    ("load_queries", "queries answered under load"),
    ("load_query_p50_ms", "query latency p50 (ms)"),
    ("load_query_p99_ms", "query latency p99 (ms)"),
    ("load_rss_after_warmup_mb", "node RSS after warm-up (MB)"),
    ("load_rss_end_mb", "node RSS at the end (MB)"),
    ("load_rss_max_mb", "node RSS max (MB)"),
    ("load_rss_growth_pct", "RSS growth after warm-up (%)"),
    ("kills_survived", "SIGKILLs survived in a row"),
    ("kills_during_startup", "of which at a random moment of the first 8 s (start-up)"),
    ("kill_episodes_acknowledged", "episodes acknowledged (all runs)"),
    ("kill_episodes_in_store", "episodes in the store at the end (≥ acknowledged)"),
    ("kill_episodes_lost", "acknowledged episodes lost"),
    ("kill_seed", "kill-moment seed (BITMAR_KILL_SEED replays it)"),
    ("fuzz_image_cases", "fuzz cases, sensor_msgs/Image node (images, texts, requests)"),
    ("fuzz_image_examples", "hypothesis examples, Image node"),
    ("fuzz_image_distinct_rejections", "distinct rejection reasons, Image node"),
    ("fuzz_image_rss_after_warmup_mb", "RSS after warm-up, Image node (MB)"),
    ("fuzz_image_rss_max_mb", "RSS max, Image node (MB)"),
    ("fuzz_image_rss_end_mb", "RSS at the end, Image node (MB)"),
    ("fuzz_compressed_cases", "fuzz cases, CompressedImage node"),
    ("fuzz_compressed_examples", "hypothesis examples, CompressedImage node"),
    ("fuzz_compressed_distinct_rejections", "distinct rejection reasons, CompressedImage node"),
    ("fuzz_compressed_rss_after_warmup_mb", "RSS after warm-up, CompressedImage node (MB)"),
    ("fuzz_compressed_rss_max_mb", "RSS max, CompressedImage node (MB)"),
    ("fuzz_compressed_rss_end_mb", "RSS at the end, CompressedImage node (MB)"),
)


def render(figures: dict, exit_code: int, root: Path) -> str:
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip() or "?"
    except OSError:
        rev = "?"
    load = os.getloadavg()
    lines = [BEGIN,
             f"Run of {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} on commit {rev} "
             f"(plus the working tree), {os.cpu_count()} CPUs, load average {load[0]:.1f} at the end, "
             f"Python {platform.python_version()}: pytest exit code {exit_code} "
             f"({'all passed' if exit_code == 0 else 'FAILURES, see the log'}).",
             "", "| figure | value |", "| --- | --- |"]
    for key, label in ROWS:
        if key in figures:
            lines.append(f"| {label} | {figures[key]} |")
    extra = sorted(set(figures) - {k for k, _ in ROWS})
    lines += [f"| {k} | {figures[k]} |" for k in extra]
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    figures_path, doc_path, exit_code = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    data = json.loads(figures_path.read_text()) if figures_path.exists() and figures_path.stat().st_size else {}
    block = render(data.get("long", {}), exit_code, doc_path.resolve().parents[1])
    doc = doc_path.read_text()
    if BEGIN in doc and END in doc:
        doc = doc[: doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    doc_path.write_text(doc)
    print(block)


if __name__ == "__main__":
    main()
