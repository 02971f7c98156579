"""The FastAPI app of `tflow serve`: OpenAI's chat completions over a Team, one model id per channel.

Endpoints: POST /v1/chat/completions (plain, or server-sent events with `stream: true`),
GET /v1/models, GET /health, GET /metrics (Prometheus). With an API key, every endpoint but
/health needs `Authorization: Bearer KEY`. Every error is OpenAI-shaped JSON, never a traceback.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from tflow.errors import ServeError
from tflow.serving.batcher import Batcher, Job, QueueFull
from tflow.serving.metrics import CONTENT_TYPE, UNKNOWN, Metrics
from tflow.serving.protocol import (
    APIError,
    ChatRequest,
    chunk,
    completion,
    delta_choice,
    ledger,
    model_id,
    usage,
)

log = logging.getLogger("tflow.serve")


@dataclass(frozen=True)
class ServeSettings:
    """How `tflow serve` listens and batches.

    Raises:
        ServeError: a value out of range.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16
    """Most rows (choices) in one batch."""
    max_wait_ms: float = 10.0
    """How long the oldest waiting request waits for batch-mates."""
    max_queue: int = 256
    """Most requests waiting; one more is answered 503 with Retry-After."""
    api_key: str | None = None
    """When set, every endpoint but /health needs `Authorization: Bearer <api_key>`."""
    max_body_bytes: int = 1 << 20
    """Largest request body; a larger one is answered 413."""

    def __post_init__(self):
        problems = [f"{name} must be {rule}, got {getattr(self, name)}" for name, rule, ok in [
            ("port", "in 0..65535", 0 <= self.port <= 65535), ("max_batch", ">= 1", self.max_batch >= 1),
            ("max_wait_ms", ">= 0", self.max_wait_ms >= 0), ("max_queue", ">= 1", self.max_queue >= 1),
            ("max_body_bytes", ">= 1", self.max_body_bytes >= 1)] if not ok]
        if self.api_key is not None and not self.api_key.strip():
            problems.append("api_key must not be empty")
        if problems:
            raise ServeError("; ".join(problems))


def served_channels(team) -> list[str]:
    """The channels a team can be served on, in registry order: the rule `tflow ask`
    and `tflow eval` follow (a channel whose part is not optional needs it from the checkpoint; kv
    runs untrained as LatentMAS), and only where the channel's own check accepts the team (kv:
    every sender on the receiver's backbone)."""
    from tflow.agents.generation import GenerationSettings
    from tflow.channels import registry
    from tflow.channels.dispatch import sender_names
    from tflow.channels.registry import Call
    from tflow.errors import TflowError
    from tflow.team import channel_settings

    served = []
    for channel in registry.channels():
        part = channel.part
        if part is not None and not part.optional and channel.name not in team.trained:
            continue
        if channel.check is not None:
            probe = Call(team.senders, team.receiver, ["?"], GenerationSettings(),
                         sender_names(team.senders, team.receiver), None,
                         options=channel_settings(team.recipe, channel.name))
            try:
                channel.check(probe)
            except TflowError:
                continue
        served.append(channel.name)
    return served


def create_app(team, channels: Sequence[str], settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The app serving `team` on `channels` (model ids `tflow-<channel>`)."""
    metrics = Metrics()
    batcher = Batcher(team, metrics, settings.max_batch, settings.max_wait_ms / 1000, settings.max_queue)
    models = {model_id(c): c for c in channels}
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.close()

    app = FastAPI(title="tflow", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics, app.state.batcher = metrics, batcher
    app.add_middleware(_BodyLimit, max_bytes=settings.max_body_bytes)
    _errors(app, metrics)
    router = APIRouter(dependencies=[Depends(_authorizer(settings.api_key))])

    def card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "tflow"}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "queue": batcher.depth}

    @router.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @router.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [card(name) for name in models]}

    @router.get("/v1/models/{name}")
    async def get_model(name: str) -> dict:
        _channel(models, name)
        return card(name)

    @router.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatRequest):
        channel = _channel(models, body.model)
        request.state.channel = channel
        job = _job(team, body, channel, settings.max_batch)
        try:
            batcher.submit(job)
        except QueueFull:
            raise APIError(503, f"the server is busy ({settings.max_queue} requests waiting); retry later",
                           "server_error", "queue_full", headers={"Retry-After": "1"}) from None
        event = await job.events.get()
        if event[0] == "error":
            raise event[1]
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            metrics.answered(channel, 200)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_events(job, request_id, body.model, include_usage, team.receiver.name, metrics),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        while (event := await job.events.get())[0] not in ("done", "error"):
            pass
        if event[0] == "error":
            raise event[1]
        metrics.answered(channel, 200)
        return completion(request_id, body.model, event[1], team.receiver.name)

    app.include_router(router)
    return app


def _channel(models: dict[str, str], name: str) -> str:
    if name not in models:
        raise APIError(404, f"the model {name!r} does not exist; this server has {', '.join(models)}",
                       code="model_not_found", param="model")
    return models[name]


def _job(team, body: ChatRequest, channel: str, max_batch: int) -> Job:
    """The batcher's job for a validated request.

    Raises:
        APIError: no usable user message, unknown sender in tflow.contexts, n above max_batch.
    """
    try:
        query = body.query()
    except ValueError as err:
        raise APIError(400, str(err), param="messages") from None
    names = [s.name for s in team.senders]
    unknown = sorted(set(body.tflow.contexts) - set(names))
    if unknown:
        raise APIError(400, f"tflow.contexts names unknown sender(s) {unknown}; senders: {names}",
                       param="tflow.contexts")
    if body.n > max_batch:
        raise APIError(400, f"n is {body.n} but this server batches at most {max_batch} rows", param="n")
    defaults = team.recipe.generate
    return Job(channel, query, dict(body.tflow.contexts), body.n, body.budget(defaults.max_new_tokens),
               body.sampling(defaults), body.stream)


async def _events(job: Job, request_id: str, model: str, include_usage: bool, receiver: str, metrics: Metrics):
    """The server-sent events of a streaming job; a client that goes away cancels its rows."""

    def event(data: dict) -> str:
        return f"data: {json.dumps(data)}\n\n"

    finished, sent = False, [""] * job.n
    try:
        yield event(chunk(request_id, model, [delta_choice(i, {"role": "assistant", "content": ""})
                                              for i in range(job.n)]))
        while True:
            kind, *rest = await job.events.get()
            if kind == "delta":
                choice, text = rest
                sent[choice] += text
                yield event(chunk(request_id, model, [delta_choice(choice, {"content": text})]))
            elif kind == "done":
                replies = rest[0]
                for i, reply in enumerate(replies):
                    tail = reply.text[len(sent[i]):] if reply.text.startswith(sent[i]) else ""
                    delta = {"content": tail} if tail else {}
                    yield event(chunk(request_id, model, [delta_choice(i, delta, reply.finish_reason,
                                                                       tflow=ledger(reply))]))
                if include_usage:
                    yield event(chunk(request_id, model, [], usage(replies, receiver)))
                finished = True
                yield "data: [DONE]\n\n"
                return
            else:
                err: APIError = rest[0]
                metrics.errors.labels(job.channel, err.code or str(err.status)).inc()
                finished = True
                yield event(err.body())
                return
    finally:
        if not finished:
            job.cancelled = True


def _authorizer(api_key: str | None):
    """A dependency that checks `Authorization: Bearer KEY` in constant time (no-op without a key)."""
    expected = api_key.encode() if api_key is not None else None

    async def authorize(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected)):
            raise APIError(401, "missing or incorrect API key: send Authorization: Bearer <key>",
                           code="invalid_api_key")

    return authorize


def _errors(app: FastAPI, metrics: Metrics) -> None:
    """Answer every failure in OpenAI's error shape, and count it."""

    def answer(request: Request, err: APIError) -> JSONResponse:
        metrics.answered(getattr(request.state, "channel", UNKNOWN), err.status, err.code or err.type)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return answer(request, err)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        first = err.errors()[0]
        if first.get("type") == "json_invalid":
            return answer(request, APIError(400, "the request body is not valid JSON", code="invalid_json"))
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        return answer(request, APIError(400, f"{where}: {message}" if where else message, param=where or None))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        kind = "not_found" if err.status_code == 404 else None
        return answer(request, APIError(err.status_code, str(err.detail), code=kind, headers=err.headers))

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=err)
        return answer(request, APIError(500, "internal error; see the server log", "server_error"))


class _BodyLimit:
    """ASGI middleware: a request body over `max_bytes` (declared or streamed) is answered 413."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            chunks.append(body)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        err = APIError(413, f"the request body exceeds {self.max_bytes} bytes", code="request_too_large")
        await JSONResponse(err.body(), status_code=413)(scope, receive, send)
