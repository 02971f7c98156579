"""Does the delta carry the query? Ablations and delta diagnostics for the weights channel.

An accuracy above the none channel does not show that each query's delta carries that query's
information: a generator can learn one static delta that helps every query. Two kinds of check:

- Ablations answer every query with an edited delta (`ablate`): `shuffled` (another query's,
  a fixed derangement of the evaluated set), `static` (the exact mean over the evaluated set),
  `drop-sender` (one row per sender, that sender's share removed), `scale` (x0.5 and x2), and,
  with a copy head, `copy-head` (its part alone) and `trunk` (everything but it).
- Diagnostics describe the deltas themselves (`summarize`): the mean norm per layer and module
  kind, every query's norm beside the guard's `max_delta_norm`, and the cosine similarity
  between different queries' deltas (near 1: the generator ignores the query).

`tflow eval --ablations` and `tflow.evaluation.evaluate.evaluate(..., ablations=...)` run both,
through the channel's record (`tflow.channels.weights`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tflow.agents.agent import Receiver, Sender
from tflow.agents.encoding import encode
from tflow.backbones.families import ReceiverSpec
from tflow.channels.dispatch import sender_names
from tflow.channels.weights.fusion import Delta, fuse
from tflow.channels.weights.run import guard_delta
from tflow.errors import AblationError, ChannelError
from tflow.evaluation.ablations import check_ablations, derangement
from tflow.lora.basis import BasisDelta
from tflow.lora.delta import LoRADelta
from tflow.lora.onehot import flat_columns_gram

SCALES = (0.5, 2.0)
COSINE_QUERIES = 256  # the cosine matrix is over the first this many applied deltas
HISTOGRAM_BINS = 40
GRAM_BLOCK_ELEMENTS = 2 ** 24  # the most entries of one module's column-Gram block `_gram` holds at once
NO_COPY_HEAD = ("copy-head and trunk split a delta into its copy head and the rest; this generator has no copy "
                "head (generator.copy_head: false)")


@dataclass(frozen=True)
class SenderDeltas:
    """Every query's generated delta, one share per sender (its gate folded in).

    shares[s]: sender s's delta, a row per query, as generated; refused: [queries] bool, the rows
    the weights channel's guard answers without a delta (not finite, or above max_delta_norm).
    """

    senders: tuple[str, ...]
    shares: tuple[Delta, ...]
    refused: Tensor
    copy_module: str | None = None
    """The module the generator's copy head writes (the receiver's LM head), or None without one."""

    @property
    def num_queries(self) -> int:
        return self.shares[0].batch_size

    def applied(self) -> tuple[Delta, ...]:
        """The shares as the receiver gets them: refused rows zeroed."""
        return tuple(share.zero_rows(self.refused) for share in self.shares)

    def fused(self) -> Delta:
        """The delta the weights channel patches in: all applied shares, rank-concatenated."""
        return fuse(self.applied())

    def generated(self) -> Delta:
        """The fused delta before the guard (for its norms)."""
        return fuse(self.shares)


def sender_deltas(senders: Sequence[Sender], receiver: Receiver, queries: Sequence[str],
                  contexts: Sequence[Mapping[str, str]] | None = None, batch_size: int = 8) -> SenderDeltas:
    """Run the senders and the generator (not the receiver) over `queries`, in batches.

    `contexts` is as for `tflow.communicate`: one mapping per query, sender name -> document.
    The deltas are detached and kept on the CPU: message bytes x queries of memory.

    Raises:
        ChannelError: the receiver has no generator.
    """
    generator = receiver.generator
    if generator is None:
        raise ChannelError("delta diagnostics need a generator on the receiver: "
                           "use tflow.load(recipe, checkpoint=DIR) or Receiver(..., generator=...)")
    names = sender_names(senders, receiver)
    parts: list[list[Delta]] = [[] for _ in senders]
    refused = []
    for start in range(0, len(queries), batch_size):
        batch = list(queries[start : start + batch_size])
        per_sender = None
        if contexts is not None:
            per_sender = [[(c or {}).get(name) for c in contexts[start : start + batch_size]] for name in names]
        with torch.no_grad():
            shares = generator.shares(encode(senders, batch, per_sender))
        _, reasons = guard_delta(fuse(shares), generator.max_delta_norm)
        refused += [reason is not None for reason in reasons]
        for kept, share in zip(parts, shares, strict=True):
            kept.append(share.detach().to("cpu"))
    shares = tuple(type(kept[0]).stack_rows(kept) for kept in parts)
    copy = generator.copy.module if generator.copy is not None else None
    refused = torch.tensor(refused, dtype=torch.bool, device="cpu")  # cpu: beside the shares, kept on the host
    return SenderDeltas(tuple(names), shares, refused, copy)


@dataclass(frozen=True)
class Reordered:
    """`delta` with its rows in `order`, selected a batch at a time (`delta_rows`) instead of copied whole."""

    delta: Delta
    order: Tensor

    @property
    def batch_size(self) -> int:
        return len(self.order)

    def select(self, rows) -> Delta:
        return self.delta.select(self.order[rows])


def ablate(deltas: SenderDeltas, names: Sequence[str], *, seed: int = 0) -> dict[str, Delta | Reordered]:
    """The delta each ablation row answers with: {row: a row per query, or one row for all}.

    Rows: `shuffled` (query i gets query order[i]'s delta, `derangement(n, seed)`, as a
    `Reordered` view that `delta_rows` selects a batch at a time), `static`
    (one row: the exact mean, `LoRADelta.mean`), `drop-sender:NAME` per sender (the other
    senders' shares only), `scale:0.5` and `scale:2`. They start from the applied deltas.

    Raises:
        AblationError: an unknown name, drop-sender with one sender, shuffled with one query.
    """
    check_ablations(names, deltas.senders)
    fused, rows = deltas.fused(), {}
    for name in names:
        if name == "shuffled":
            rows[name] = Reordered(fused, torch.tensor(derangement(deltas.num_queries, seed), device="cpu"))  # cpu: as the shares
        elif name == "static":
            rows[name] = fused.mean()
        elif name == "drop-sender":
            applied = deltas.applied()
            for s, sender in enumerate(deltas.senders):
                rows[f"drop-sender:{sender}"] = fuse(applied[:s] + applied[s + 1:])
        elif name == "scale":
            rows.update({f"scale:{k:g}": fused.scaled(k) for k in SCALES})
        elif name in ("copy-head", "trunk"):
            rows[name] = _modules(fused, deltas.copy_module, keep=name == "copy-head")
    return rows


def _modules(delta: Delta, module: str | None, keep: bool) -> Delta:
    """`delta` with only `module`'s part (`keep`), or with every part but it.

    Raises:
        AblationError: no copy head, so there is no such part to keep or remove.
    """
    if module is None:
        raise AblationError(NO_COPY_HEAD)
    return LoRADelta({name: ab for name, ab in delta.factors.items() if (name == module) == keep}, delta.scale)


def check(team, names) -> None:
    """Raises AblationError before anything runs: copy-head or trunk without a copy head."""
    if {"copy-head", "trunk"} & set(names) and getattr(team.receiver.generator, "copy", None) is None:
        raise AblationError(NO_COPY_HEAD)


def norms_by_layer_and_kind(delta: Delta, spec: ReceiverSpec) -> dict:
    """The mean over rows of each module's norm ||scale * B A||_F, as a layer x kind grid.

    Returns {"layers": [...], "kinds": [...], "mean_norm": [[per kind] per layer]}; None where a
    layer has no module of that kind in the delta.
    """
    norms = {name: n.mean().item() for name, n in delta.module_row_norms().items()}
    layers = sorted({m.layer for m in spec.modules})
    kinds = [k for k in spec.targets if any(m.kind == k for m in spec.modules)]
    grid = [[None] * len(kinds) for _ in layers]
    for m in spec.modules:
        if m.name in norms:
            grid[layers.index(m.layer)][kinds.index(m.kind)] = norms[m.name]
    return {"layers": layers, "kinds": kinds, "mean_norm": grid}


def cosine_similarities(delta: Delta) -> Tensor:
    """[batch, batch] cosine similarity of the rows' whole updates over every module.

    cos(i, j) = <dW_i, dW_j>_F / (||dW_i|| ||dW_j||) with dW_b = B_b A_b; NaN where a row is zero.
    """
    return _cosines(_gram(delta))


def query_specific_shares(delta: Delta) -> Tensor:
    """[batch] the share of each row's squared norm that is not the rows' mean update:
    ||dW_i - mean_j dW_j||^2 / ||dW_i||^2 (0: every row is the mean; NaN where a row is zero)."""
    return _specific(_gram(delta))


def _gram(delta: Delta) -> Tensor:
    """[batch, batch] <dW_i, dW_j>_F summed over modules (the scale left out), on the CPU.

    From <B_i A_i, B_j A_j>_F = sum((A_i A_jᵀ) * (B_iᵀ B_j)): r x r blocks, B A is never formed.
    On a shared basis, <V M_i U, V M_j U>_F = sum(M_i * (Vᵀ V) M_j (U Uᵀ)): K x K blocks.
    """
    n = delta.batch_size
    gram = torch.zeros(n, n, device="cpu")  # cpu: the analysis reads every factor back to the host
    if isinstance(delta, BasisDelta):
        for name, core in delta.cores.items():
            u, v = (t.detach().float().cpu() for t in delta.basis[name])
            m = core.detach().float().cpu()
            gram += torch.einsum("iab,jab->ij", m, (v.T @ v) @ m @ (u @ u.T))
        return gram
    for a, b in delta.factors.values():
        a, b = a.detach().float().cpu(), b.detach().float().cpu()
        r = a.shape[1]
        rows_a = a.reshape(n * r, -1)
        # [c * r, n * r] blocks of c rows at a time: a copy head's rank is its sender's length, and
        # the whole (n r)^2 matrix of 200 queries would take gigabytes
        c = max(1, GRAM_BLOCK_ELEMENTS // (r * n * r))
        for i in range(0, n, c):
            rows = slice(i, min(i + c, n))
            block = rows_a[rows.start * r:rows.stop * r] @ rows_a.T
            gram[rows] += (block * flat_columns_gram(b, rows)).reshape(-1, r, n, r).sum((1, 3))
    return gram


def _cosines(gram: Tensor) -> Tensor:
    norms = gram.diagonal().clamp_min(0).sqrt()
    return gram / (norms[:, None] * norms[None, :])


def _specific(gram: Tensor) -> Tensor:
    apart = gram.diagonal() - 2 * gram.mean(1) + gram.mean()
    return apart.clamp_min(0) / gram.diagonal()


def summarize(deltas: SenderDeltas, receiver: Receiver) -> dict:
    """The diagnostics of a report (plain data): norms, per-query norms and cross-query cosines.

    Layers and module kinds are those of `receiver.generator.spec`. Norms by layer and kind and
    the cosines are over the applied deltas; the per-query norms are the generated ones, refused
    rows included (NaN and inf written as None), so they can be read against `max_delta_norm`. The cosines compare the first `COSINE_QUERIES` applied non-zero
    deltas with each other (each pair once), and `query_specific_share` is the mean over them of
    `query_specific_shares`: cosines near 1 say the deltas share one direction, this says how much
    of each delta is left for its own query.
    """
    spec, max_delta_norm = receiver.generator.spec, receiver.generator.max_delta_norm
    fused = deltas.fused()
    keep = ~deltas.refused
    applied = fused.select(keep) if deltas.refused.any() else fused
    nonzero = torch.nonzero(applied.row_norms() > 0).flatten()[:COSINE_QUERIES]
    cosine = None
    if len(nonzero) >= 2:
        gram = _gram(applied.select(nonzero))
        matrix = _cosines(gram)
        off = matrix[torch.ones_like(matrix, dtype=torch.bool).triu(1)]  # each pair once, never i with i
        counts = torch.histc(off.clamp(-1, 1), bins=HISTOGRAM_BINS, min=-1, max=1)
        cosine = {"queries": len(nonzero), "mean": off.mean().item(), "min": off.min().item(),
                  "max": off.max().item(), "quantiles": _quantiles(off),
                  "query_specific_share": _specific(gram).mean().item(),
                  "histogram": {"edges": torch.linspace(-1, 1, HISTOGRAM_BINS + 1, device="cpu").tolist(),
                                "counts": [int(c) for c in counts.tolist()]}}
    row_norms = deltas.generated().row_norms().tolist()
    return {
        "queries": deltas.num_queries,
        "refused": int(deltas.refused.sum()),
        "norms": norms_by_layer_and_kind(applied, spec) if keep.any() else None,
        "row_norms": [norm if math.isfinite(norm) else None for norm in row_norms],
        "max_delta_norm": max_delta_norm,
        "sender_norms": {name: share.select(keep).row_norms().mean().item() if keep.any() else None
                         for name, share in zip(deltas.senders, deltas.shares, strict=True)},
        "cosine": cosine,
    }


def _quantiles(values: Tensor) -> dict[str, float]:
    qs = torch.quantile(values, torch.tensor([0.05, 0.5, 0.95], dtype=values.dtype, device=values.device))
    return {"p5": qs[0].item(), "p50": qs[1].item(), "p95": qs[2].item()}




def delta_rows(delta: Delta | Reordered, rows: slice) -> Delta:
    """The delta rows of the queries in `rows` (a one-row delta serves them all)."""
    return delta if delta.batch_size == 1 else delta.select(rows)


def collect(senders, receiver, queries, contexts, batch_size, ablations=(), **options) -> SenderDeltas:
    """Every query's delta, as `tflow.evaluation.evaluate` collects a channel's messages."""
    return sender_deltas(senders, receiver, queries, contexts, batch_size)
