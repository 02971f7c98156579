"""LoRA primitives: per-row deltas (low-rank, basis, one-hot), the hooks that patch them in, and PEFT export."""
