"""bench/retention.py: its quick run measures both stores in the same rounds and keeps the budgeted one
inside its budget (the figures themselves are the machine's)."""
import pytest


@pytest.mark.slow
def test_quick_run_keeps_the_budget_and_reports_both_columns():
    from bench import retention

    table = retention.run(quick=True)
    rows = {r[0]: r for r in table.rows}
    assert "(0 over)" in rows["store after the run"][1]
    commit = rows["commit of one episode (node path, one transaction)"]
    assert "with the budget" in commit[1] and "without a budget" in commit[2]
    # a thumbnail of a rendered scene alone is > 1 KB; an episode row holds it, its embedding and caption
    assert table.metrics["bytes_per_episode"] > 4 * retention.DIM + 1000
