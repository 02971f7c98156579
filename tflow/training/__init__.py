"""Training on Lightning: the loop every channel's trained part runs in, its data, and checkpoints."""
