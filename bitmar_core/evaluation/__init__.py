"""How BitMar is measured (paper §4): held-out captioning, memory recall, long streams and probes
(`evaluate`, the `bitmar-eval` command), their metrics, and the zero-shot multiple-choice tasks."""
