"""The cost ledger and stage timer every channel shares."""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager

import torch

from tflow.agents.agent import Receiver, Sender
from tflow.agents.generation import Generated, kv_cache_bytes
from tflow.reply import AgentUsage


def agent_usage(agent: Sender | Receiver, prompt_tokens: int, generated_tokens: int,
                latent_positions: int = 0, cached_tokens: int = 0) -> AgentUsage:
    """One agent's ledger entry, its KV-cache bytes computed from its model's config."""
    cache = kv_cache_bytes(agent.model, prompt_tokens + generated_tokens + latent_positions)
    return AgentUsage(prompt_tokens, generated_tokens, cache, latent_positions, cached_tokens)


def generated_usage(agent: Sender | Receiver, out: Generated, row: int) -> AgentUsage:
    """The ledger entry of row `row` of a generate call."""
    return agent_usage(agent, out.prompt_tokens[row], out.generated_tokens[row],
                       cached_tokens=out.cached_tokens[row])


def token_id_bytes(tokenizer) -> int:
    """Bytes per token id on the wire: the smallest integer width that holds the vocabulary."""
    return 2 if len(tokenizer) <= 1 << 16 else 4


class Stages:
    """Per-stage wall seconds and peak CUDA memory of one call, as `with stages("receiver"): ...`.

    Waits for queued CUDA work at both ends, so a stage is charged its own kernels; memory is the
    peak allocated above the stage's start, summed over the agents' CUDA devices (None without any).
    Each stage resets those devices' peak statistics (torch.cuda.reset_peak_memory_stats). A stage
    entered twice (rounds of the latent channel) adds up.
    """

    def __init__(self, senders: Sequence[Sender], receiver: Receiver):
        devices = {next(agent.model.parameters()).device for agent in [*senders, receiver]}
        self._cuda = sorted((d for d in devices if d.type == "cuda"), key=str)
        self.seconds: dict[str, float] = {}
        self.peak_memory_bytes: dict[str, int | None] = {}

    @property
    def measured(self) -> dict:
        """The Reply fields this recorder fills."""
        return {"timings": self.seconds, "peak_memory_bytes": self.peak_memory_bytes}

    @contextmanager
    def __call__(self, stage: str):
        for device in self._cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = {device: torch.cuda.memory_allocated(device) for device in self._cuda}
        began = time.perf_counter()
        yield
        for device in self._cuda:
            torch.cuda.synchronize(device)
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - began
        peaks = [torch.cuda.max_memory_allocated(device) - start[device] for device in self._cuda]
        peak = sum(peaks) if peaks else None
        known = self.peak_memory_bytes.get(stage)
        self.peak_memory_bytes[stage] = peak if known is None or peak is None else max(known, peak)
