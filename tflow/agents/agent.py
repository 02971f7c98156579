"""Agents: role-prompted senders and the receiver that answers, on frozen HF causal LMs."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from tflow.errors import ModelLoadError, QueryError

CONTEXT_POSITIONS = ("before_query", "after_query")


def chat_prompt(tokenizer, system: str | None, user: str) -> str:
    """The chat-template text of a system + user turn, ending with the assistant header.

    Raises:
        ModelLoadError: the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} has no chat "
            "template; use an instruct/chat model's tokenizer or set tokenizer.chat_template"
        )
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass(eq=False)
class Sender:
    """A frozen agent that reads the query under its role prompt (and an optional private document).

    The role is the system message; `context`, when given, comes before the query in the user
    turn, or after it with `context_position="after_query"` (then every document token's state
    has seen the question). Senders may run different backbones, each with its own tokenizer.

    Raises:
        ModelLoadError: the tokenizer has no chat template.
        QueryError: an unknown context_position.
    """

    model: nn.Module
    tokenizer: object
    role: str
    name: str | None = None
    context: str | None = None
    context_position: str = "before_query"

    def __post_init__(self):
        if not getattr(self.tokenizer, "chat_template", None):
            who = f"sender {self.name!r}" if self.name else f"the sender with role {self.role!r}"
            raise ModelLoadError(f"{who}: its tokenizer has no chat template; give it an instruct/chat model's "
                                 "tokenizer or set tokenizer.chat_template")
        if self.context_position not in CONTEXT_POSITIONS:
            raise QueryError(f"context_position must be one of {', '.join(CONTEXT_POSITIONS)}, "
                             f"got {self.context_position!r}")

    def prompt(self, query: str, context: str | None = None) -> str:
        """The chat text this sender reads; `context` replaces the sender's own for this query."""
        context = context if context is not None else self.context
        if not context:
            return chat_prompt(self.tokenizer, self.role, query)
        parts = (query, context) if self.context_position == "after_query" else (context, query)
        return chat_prompt(self.tokenizer, self.role, "\n\n".join(parts))


@dataclass(eq=False)
class Receiver:
    """The agent that answers, with each channel's trained part: `generator` (a tflow Hypernetwork,
    weights) turns sender states into its delta, `kv_lora` (tflow.lora.receiver_lora.ReceiverLoRA, kv) is
    the LoRA it decodes a KV trace with (None: LatentMAS), `links` (tflow.channels.latent.links.Links,
    latent) map the senders' latent thoughts into its embedding space."""

    model: nn.Module
    tokenizer: object
    system_prompt: str | None = None
    generator: nn.Module | None = None
    name: str = "receiver"
    kv_lora: nn.Module | None = None
    links: nn.Module | None = None
    parts: dict[str, nn.Module] = field(default_factory=dict)
    """The trained parts of channels registered beyond the built-in ones, by channel name."""

    def prompt(self, query: str) -> str:
        return chat_prompt(self.tokenizer, self.system_prompt, query)
