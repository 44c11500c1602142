"""How BitMar is trained: the recipe, the data a run reads, its resumable state, torchrun, figures.
The loop and the command line are `bitmar_core.train` (`bitmar-train`)."""
