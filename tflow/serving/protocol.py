"""OpenAI's chat-completions schema as tflow reads and writes it: requests, replies, chunks, errors.

A request's query is its system message(s), if any, then its last user message. Private sender
documents come in the extension field `tflow.contexts` (clients send it with `extra_body`), and
every choice carries the full tflow ledger of its row in an extension field `tflow`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tflow.reply import Reply

MODEL_PREFIX = "tflow-"
# Parameters that would change the answer and that tflow cannot honour: refused, never ignored.
UNSUPPORTED = ("stop", "tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs",
               "response_format", "logit_bias", "prediction", "audio", "modalities")


class ContentPart(BaseModel):
    """One part of a message's content; only text parts carry a query."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """The message's text; content parts other than text are refused.

        Raises:
            ValueError: a non-text content part.
        """
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        kinds = sorted({part.type for part in self.content if part.type != "text"})
        if kinds:
            raise ValueError(f"only text content is supported, got {', '.join(kinds)}")
        return "".join(part.text or "" for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class Extension(BaseModel):
    """tflow's own request fields, sent as `extra_body={"tflow": {...}}`."""

    model_config = ConfigDict(extra="forbid")
    contexts: dict[str, str] = Field(default_factory=dict)
    """A private document for a sender of this query, by sender name."""


class ChatRequest(BaseModel):
    """POST /v1/chat/completions; fields OpenAI defines that tflow does not use are accepted and unused."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    tflow: Extension = Field(default_factory=Extension)

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> ChatRequest:
        given = [name for name in UNSUPPORTED if (self.model_extra or {}).get(name) not in (None, False, [])]
        if given:
            raise ValueError(f"{', '.join(given)} not supported by tflow serve")
        return self

    def query(self) -> str:
        """The system message(s), if any, then a blank line and the last user message.

        Raises:
            ValueError: no user message, or an empty last one.
        """
        users = [m for m in self.messages if m.role == "user"]
        if not users or not users[-1].text().strip():
            raise ValueError("the last user message must have non-empty text content")
        system = "\n\n".join(t for m in self.messages if m.role in ("system", "developer") if (t := m.text().strip()))
        user = users[-1].text()
        return f"{system}\n\n{user}" if system else user

    def budget(self, default: int) -> int:
        """Most new tokens per choice: max_completion_tokens, else max_tokens, else the recipe's."""
        return self.max_completion_tokens or self.max_tokens or default

    def sampling(self, defaults) -> dict:
        """do_sample, temperature and top_p: temperature 0 is greedy; unset fields take `defaults`
        (the recipe's `generate` section)."""
        if self.temperature is None:
            do_sample, temperature = defaults.do_sample, defaults.temperature
        else:
            do_sample, temperature = self.temperature > 0, self.temperature
        if not do_sample:
            return {"do_sample": False, "temperature": 1.0, "top_p": 1.0}
        return {"do_sample": True, "temperature": temperature, "top_p": self.top_p or defaults.top_p}


@dataclass(eq=False)
class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: dict | None = None

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def model_id(channel: str) -> str:
    return MODEL_PREFIX + channel


def ledger(reply: Reply) -> dict:
    """The full tflow ledger of one row: every agent's tokens (sender prefill included), totals,
    message bytes, whether the delta was applied and why not, stage seconds."""
    out = asdict(reply)
    del out["text"]
    usage = reply.usage
    out["usage"].update(prompt_tokens=usage.prompt_tokens, generated_tokens=usage.generated_tokens,
                        total_tokens=usage.total_tokens, cached_tokens=usage.cached_tokens,
                        processed_tokens=usage.processed_tokens, kv_cache_bytes=usage.kv_cache_bytes)
    return out


def usage(replies: list[Reply], receiver: str) -> dict:
    """OpenAI's usage: the receiver's prompt once, its generated tokens over all choices."""
    prompt = replies[0].usage.by_agent[receiver].prompt_tokens
    completion = sum(r.usage.by_agent[receiver].generated_tokens for r in replies)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(request_id: str, model: str, replies: list[Reply], receiver: str) -> dict:
    """A chat.completion object, one choice per reply."""
    choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason,
                "logprobs": None, "tflow": ledger(r)} for i, r in enumerate(replies)]
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(replies, receiver)}


def chunk(request_id: str, model: str, choices: list[dict], usage: dict | None = None) -> dict:
    """A chat.completion.chunk object; `choices` already shaped ({"index", "delta", "finish_reason"})."""
    out = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


def delta_choice(index: int, delta: dict, finish_reason: str | None = None, **extra) -> dict:
    return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None, **extra}
