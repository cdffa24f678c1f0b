"""Training: the algorithms (shaping and loss on top of ``reopold.core``), the trainer loop, building a run from a
config, sharded launches, checkpoints and metrics logging."""
