"""Dynamic batching: requests that arrive close together run as one batch, one batch at a time.

A collector task on the server's event loop holds the waiting jobs. As soon as the oldest has
waited `max_wait` seconds, or `max_batch` rows of its kind (channel and sampling settings) are
waiting, those jobs, oldest first, go to the single worker thread as one `tflow.communicate`
call: one sender forward, one generator call, one patched receiver generate with a delta per
row. The receiver's hooks are state on its modules, so exactly one batch runs at a time, and
jobs of another kind wait for a batch of their own. The worker talks back to each job through
its own asyncio queue (`loop.call_soon_threadsafe`); a streaming job gets its rows' text as it
grows, and stops its rows when its client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tflow.agents.generation import context_length
from tflow.channels import communicate, registry
from tflow.errors import TflowError
from tflow.serving.metrics import Metrics
from tflow.serving.protocol import APIError
from tflow.team import channel_settings

log = logging.getLogger("tflow.serve")


@dataclass(eq=False)
class Job:
    """One request: `n` rows of one query, and the queue of events the worker sends it.

    Events: ("started",) once its rows are admitted; ("delta", choice, text) while streaming;
    then ("done", replies) with one Reply per choice, or ("error", APIError). `cancelled` is set
    when a streaming client goes away: its rows stop at the next decoding step.
    """

    channel: str
    query: str
    contexts: dict[str, str]
    n: int
    max_tokens: int
    sampling: dict
    stream: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    @property
    def kind(self) -> tuple:
        """What jobs must share to run in one batch: channel and sampling settings."""
        return self.channel, tuple(sorted(self.sampling.items()))


class QueueFull(Exception):
    """The batcher already holds `max_queue` waiting jobs."""


class Batcher:
    """Collects jobs into batches on the event loop and runs them, one at a time, on one thread."""

    def __init__(self, team, metrics: Metrics, max_batch: int = 16, max_wait: float = 0.01, max_queue: int = 256):
        self.team, self.metrics = team, metrics
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait, max_queue
        self._waiting: deque[Job] = deque()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tflow-batch")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start collecting on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = self._loop.create_task(self._collect())

    async def close(self) -> None:
        """Stop collecting and wait for the batch in flight, if any."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    @property
    def depth(self) -> int:
        """Jobs waiting for a batch."""
        return len(self._waiting)

    def submit(self, job: Job) -> None:
        """Queue `job`; its events arrive on `job.events`.

        Raises:
            QueueFull: `max_queue` jobs are already waiting.
        """
        if len(self._waiting) >= self.max_queue:
            raise QueueFull
        self._waiting.append(job)
        self.metrics.queue_depth.set(len(self._waiting))
        self._wake.set()

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            first = self._waiting[0]
            deadline = first.arrived + self.max_wait
            while self._rows(first.kind) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), left)
            batch = self._take(first.kind)
            self.metrics.queue_depth.set(len(self._waiting))
            if not batch:
                continue
            try:
                await loop.run_in_executor(self._executor, self._run, batch)
            except Exception:  # a bug must not stop the collector: answer this batch 500 and go on
                log.exception("batch of %d jobs on %s failed", len(batch), batch[0].channel)
                for job in batch:
                    job.events.put_nowait(("error", APIError(500, "internal error; see the server log",
                                                             "server_error")))

    def _rows(self, kind: tuple) -> int:
        return sum(job.n for job in self._waiting if job.kind == kind)

    def _take(self, kind: tuple) -> list[Job]:
        """The oldest waiting jobs of `kind` that fit in `max_batch` rows, removed from the queue."""
        batch, rows, kept, full = [], 0, deque(), False
        for job in self._waiting:
            if not full and job.kind == kind:
                if rows + job.n <= self.max_batch:
                    batch.append(job)
                    rows += job.n
                    continue
                full = True  # later jobs of this kind keep their turn behind this one
            kept.append(job)
        self._waiting = kept
        return batch

    # The worker thread from here on.

    def _send(self, job: Job, event: tuple) -> None:
        self._loop.call_soon_threadsafe(job.events.put_nowait, event)

    def _run(self, batch: list[Job]) -> None:
        started = time.monotonic()
        for job in batch:
            self.metrics.queue_wait.labels(job.channel).observe(started - job.arrived)
        ready = []
        for job in batch:
            problem = self._too_long(job)
            if problem:
                self._send(job, ("error", APIError(400, problem, code="context_length_exceeded", param="messages")))
            else:
                self._send(job, ("started",))
                ready.append(job)
        if ready:
            self._answer(ready)

    def _too_long(self, job: Job) -> str | None:
        """Why the job's prompts do not fit their agents' contexts, or None when they do: each
        agent's prompt positions and new tokens as the channel counts them (`Channel.context_use`)."""
        team = self.team
        options = channel_settings(team.recipe, job.channel)
        uses = registry.get(job.channel).context_use(team, job.query, job.contexts, job.max_tokens, options)
        for agent, tokens, budget in uses:
            limit = context_length(agent.model)
            if limit is not None and tokens + budget > limit:
                return (f"the {agent.name} prompt of {tokens} tokens plus {budget} new tokens exceeds its context "
                        f"of {limit} tokens; shorten the messages or lower max_tokens")
        return None

    def _answer(self, jobs: list[Job]) -> None:
        """One communicate call for all rows of `jobs`; a failing batch is retried job by job."""
        rows = [(job, choice) for job in jobs for choice in range(job.n)]
        fanout = _Fanout(rows, self.team.receiver.tokenizer, self._send)
        channel, began = jobs[0].channel, time.perf_counter()
        try:
            replies = communicate(
                self.team.senders, self.team.receiver, [job.query for job, _ in rows], channel=channel,
                max_new_tokens=[job.max_tokens for job, _ in rows], contexts=[job.contexts for job, _ in rows],
                stream=fanout, **jobs[0].sampling, **channel_settings(self.team.recipe, channel))
        except TflowError as err:
            if len(jobs) == 1:
                self._send(jobs[0], ("error", APIError(400, str(err))))
                return
            for job in jobs:  # find the job at fault; rows already streamed cannot be taken back
                if fanout.streamed(job):
                    self._send(job, ("error", APIError(500, "the batch failed mid-answer; retry", "server_error")))
                else:
                    self._answer([job])
            return
        except Exception:
            log.exception("batch of %d rows on %s failed", len(rows), channel)
            for job in jobs:
                self._send(job, ("error", APIError(500, "internal error; see the server log", "server_error")))
            return
        receiver = self.team.receiver.name
        self.metrics.batch(channel, len(rows), sum(r.usage.by_agent[receiver].generated_tokens for r in replies),
                           time.perf_counter() - began, sum(r.finish_reason == "cancelled" for r in replies))
        at = 0
        for job in jobs:
            self._send(job, ("done", replies[at:at + job.n]))
            at += job.n



class _Fanout:
    """The RowStream of one batch: each streaming job's rows go to that job as their text grows.

    The text sent is always a prefix of the row's final reply text: it is decoded as the reply
    is (special tokens skipped, stripped), and a trailing incomplete character waits for the
    bytes that complete it.
    """

    def __init__(self, rows: list[tuple[Job, int]], tokenizer, send):
        self.rows, self.tokenizer, self.send = rows, tokenizer, send
        self.sent = [""] * len(rows)

    def update(self, row: int, tokens: list[int], finish_reason: str | None) -> None:
        job, choice = self.rows[row]
        if not job.stream:
            return
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        if finish_reason is None:
            text = text.rstrip("\ufffd")
        sent = self.sent[row]
        if len(text) > len(sent) and text.startswith(sent):
            self.send(job, ("delta", choice, text[len(sent):]))
            self.sent[row] = text

    def cancelled(self, row: int) -> bool:
        return self.rows[row][0].cancelled

    def streamed(self, job: Job) -> bool:
        return any(self.sent[r] for r, (j, _) in enumerate(self.rows) if j is job)
