"""What a call returns: the answer, the cost ledger of every agent, and per-stage seconds and memory."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AgentUsage:
    """What one agent processed: prompt tokens (no padding), generated tokens (through EOS),
    latent positions and the bytes their keys and values take in its KV cache.

    `latent_positions` are positions fed as vectors instead of tokens (kv and latent channels):
    the latent steps the agent ran, and the latent thoughts spliced into its prompt. Each costs a
    forward position like a token, so `total_tokens` counts them.

    `cached_tokens` of the prompt tokens were read from a role prefix kept per backbone
    (tflow.agents.prefix) instead of run for this query, so `processed_tokens` (what the agent ran for
    it) is total - cached. The prefix itself runs once per backbone; an evaluation charges it once
    (tflow.evaluation.evaluate).
    """

    prompt_tokens: int
    generated_tokens: int = 0
    kv_cache_bytes: int = 0
    latent_positions: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.generated_tokens + self.latent_positions

    @property
    def processed_tokens(self) -> int:
        return self.total_tokens - self.cached_tokens


@dataclass(frozen=True)
class Usage:
    """Cost ledger over all agents of one query, sender prefill included."""

    by_agent: dict[str, AgentUsage]

    @property
    def prompt_tokens(self) -> int:
        return sum(u.prompt_tokens for u in self.by_agent.values())

    @property
    def generated_tokens(self) -> int:
        return sum(u.generated_tokens for u in self.by_agent.values())

    @property
    def latent_positions(self) -> int:
        return sum(u.latent_positions for u in self.by_agent.values())

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.generated_tokens + self.latent_positions

    @property
    def cached_tokens(self) -> int:
        return sum(u.cached_tokens for u in self.by_agent.values())

    @property
    def processed_tokens(self) -> int:
        return sum(u.processed_tokens for u in self.by_agent.values())

    @property
    def kv_cache_bytes(self) -> int:
        return sum(u.kv_cache_bytes for u in self.by_agent.values())


@dataclass(frozen=True)
class Reply:
    """The receiver's answer to one query.

    `timings` holds wall seconds per stage (senders, generator, receiver) of the call that produced
    the reply and `peak_memory_bytes` the peak CUDA memory each stage allocated above what was
    allocated when it began (None per stage when no agent runs on CUDA); the queries of one batched
    call share both. `message_bytes` is what crossed from the senders to the receiver for this
    query: its delta's bytes (weights), its message tokens' bytes (text), the bytes of the KV trace
    the senders built (kv) or of the latent vectors spliced into the receiver's prompt (latent).

    `delta_applied` is True when the weights channel patched this query's delta in, False when
    it refused the delta (not finite, or above the generator's `max_delta_norm`) and answered
    without it, None on channels without a delta; `warnings` says what went wrong, if anything.
    `finish_reason` is "stop" when the answer ended on EOS, "length" when it used its budget.
    """

    text: str
    channel: str
    usage: Usage
    timings: dict[str, float] = field(default_factory=dict)
    message_bytes: int = 0
    messages: dict[str, str] = field(default_factory=dict)
    peak_memory_bytes: dict[str, int | None] = field(default_factory=dict)
    delta_applied: bool | None = None
    warnings: list[str] = field(default_factory=list)
    finish_reason: str | None = None
