"""BitMar as the robot runs it: checkpoints and tokenizers, vision backbones, the one decoding
loop (`DecoderSession`) with its bit-identical fast step, and `BitMarRuntime`, which turns a frame,
a caption or a query into model calls."""
