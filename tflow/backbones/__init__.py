"""Backbones: loading frozen causal LMs (hub, local, GGUF), receiver families and their targets, tiny models built locally."""
