"""How BitMar is trained: the loop and its command line (`train`, `bitmar-train`), the recipe, the
data a run reads, its resumable state, the adaptive controller, the learning-rate schedule,
torchrun and figures."""
