"""The paper's network (arXiv 2510.10560, Fig. 1): ternary layers, text encoder, vision
compressor, cross-modal fusion, episodic memory, sink-window decoder, and `BitMar` that joins them
with the training objective (eq. 4). Nothing here reads files, runs a loop or knows a robot."""
