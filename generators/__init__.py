"""Pluggable parameter generators (hypernetworks): each kind in its own module with its settings
beside it (`Generator.Settings`), registered by `kind` in `generators.registry`.

`param_tokens` (the paper's transformer over parameter tokens), `mlp` (a compact shared MLP),
`basis` (the param-token trunk emitting K x K cores on a shared learned basis) and `perceiver`
(Doc-to-LoRA's: a shared Perceiver over each layer's sender states, one latent per rank).
"""

from generators.base import Generator, masked_mean
from generators.registry import available, build, get, register

# isort: off
# Imported in this order so their @register calls fill the registry; the order is `available()`.
from generators import param_tokens, mlp, basis, perceiver  # noqa: E402, F401
# isort: on

__all__ = ["Generator", "available", "build", "get", "masked_mean", "register"]
