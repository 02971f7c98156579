"""What a call returns: the answer, the token ledger of every agent, and per-stage seconds."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AgentUsage:
    """Tokens one agent processed: prompt tokens (no padding) and generated tokens (through EOS)."""

    prompt_tokens: int
    generated_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.generated_tokens


@dataclass(frozen=True)
class Usage:
    """Token ledger over all agents of one query, sender prefill included."""

    by_agent: dict[str, AgentUsage]

    @property
    def prompt_tokens(self) -> int:
        return sum(u.prompt_tokens for u in self.by_agent.values())

    @property
    def generated_tokens(self) -> int:
        return sum(u.generated_tokens for u in self.by_agent.values())

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.generated_tokens


@dataclass(frozen=True)
class Reply:
    """The receiver's answer to one query.

    `timings` holds wall seconds per stage (senders, generator, receiver) of the call that produced
    the reply; the queries of one batched call share them. `message_bytes` is what crossed from the
    senders to the receiver: the delta's bytes (weights) or the message tokens' bytes (text).
    """

    text: str
    channel: str
    usage: Usage
    timings: dict[str, float] = field(default_factory=dict)
    message_bytes: int = 0
    messages: dict[str, str] = field(default_factory=dict)
