"""Sender prefix caching: a role prompt's keys, values and hidden states, computed once per backbone.

A sender reads its role (and its own context) before the query, and causal attention makes the
states of those positions independent of everything after them. So they are computed once, kept
per model, and every later encode (and every generate given `reuse`) prefills only the query
part on top of them. The prefix is always computed on its own, hit or miss, so a call gives the
same numbers whatever the cache holds. The cache is dropped when any parameter or buffer of the model changes: moved, replaced
or edited in place (optimizer steps, load_state_dict).
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tflow.agents.agent import Sender
from tflow.lora.patching import is_patched

MAX_PREFIXES = 32  # per model, least recently used dropped first


@dataclass(frozen=True)
class Prefix:
    """One prefix's states. keys, values: [layers, kv_heads, P, head_dim]; hidden: [layers + 1, P, H]."""

    ids: tuple[int, ...]
    keys: Tensor
    values: Tensor
    hidden: Tensor


def prefix_text(sender: Sender) -> str:
    """The chat text every prompt of `sender` starts with (with its own context): up to the query."""
    return os.path.commonprefix([sender.prompt("x"), sender.prompt("y")])


def common_length(seq, ids) -> int:
    """How many leading tokens two id sequences share."""
    n = 0
    for a, b in zip(seq, ids, strict=False):  # lengths differ by design
        if a != b:
            break
        n += 1
    return n


class _ModelCache:
    def __init__(self, stamp: tuple):
        self.stamp = stamp
        self.entries: OrderedDict[tuple[int, ...], Prefix] = OrderedDict()


_CACHES: weakref.WeakKeyDictionary[nn.Module, _ModelCache] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def reusable(model: nn.Module) -> bool:
    """Whether kept prefix states may be read on `model`: not while training (HF gradient
    checkpointing drops a past cache) and not while a delta is patched in (the states would carry it)."""
    return not model.training and not is_patched(model)


def prefixes(model: nn.Module, id_lists: list[tuple[int, ...]]) -> list[Prefix]:
    """The states of each token-id tuple on `model`'s decoder stack, from the cache or computed and kept."""
    now = stamp(model)
    with _LOCK:
        cache = _CACHES.get(model)
        if cache is None or cache.stamp != now:
            cache = _CACHES[model] = _ModelCache(now)
    found: dict[tuple[int, ...], Prefix] = {}  # rows sharing a prefix (the usual case) look it up once
    for ids in dict.fromkeys(id_lists):
        with _LOCK:
            hit = cache.entries.get(ids)
            if hit is not None:
                cache.entries.move_to_end(ids)
        if hit is None:
            hit = _compute(model, ids)
            with _LOCK:
                cache.entries[ids] = hit
                while len(cache.entries) > MAX_PREFIXES:
                    cache.entries.popitem(last=False)
        found[ids] = hit
    return [found[ids] for ids in id_lists]


def reused_lengths(seqs: Sequence[Sequence[int]], kept: Sequence[Prefix]) -> list[int]:
    """How many leading tokens of each row its prefix supplies: the shared ones, never the whole row
    (its last token must run, to give the states or logits that follow)."""
    return [min(common_length(seq, p.ids), len(seq) - 1) for seq, p in zip(seqs, kept, strict=True)]


def clear(model: nn.Module) -> None:
    """Forget every prefix kept for `model`."""
    with _LOCK:
        _CACHES.pop(model, None)


def _compute(model: nn.Module, ids: tuple[int, ...]) -> Prefix:
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.base_model(input_ids=torch.tensor([ids], device=device), use_cache=True,
                               output_hidden_states=True)
    layers = out.past_key_values.layers
    return Prefix(ids, torch.stack([layer.keys[0] for layer in layers]),
                  torch.stack([layer.values[0] for layer in layers]),
                  torch.stack(out.hidden_states)[:, 0])


def stamp(model: nn.Module) -> tuple:
    """Changes whenever any parameter or buffer of `model` is moved, replaced or edited in place."""
    # Tensor._version counts in-place writes; torch has no public equivalent, and a stale prefix
    # would silently change every answer, so this reads it.
    return tuple((t.data_ptr(), t._version, t.dtype) for t in itertools.chain(model.parameters(), model.buffers()))
