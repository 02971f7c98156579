"""How the `latent` channel (RecursiveMAS) runs a call: latent thoughts through trained links, spliced into a prompt.

Each sender reads its chat turn and rolls out `latent_steps` thoughts: its last-layer state
through its InnerLink, fed back as the next input embedding. Its OuterLink maps them into the
receiver's embedding space, where they are spliced into the receiver's user turn at a slot (the
text around the slot tokenized piece by piece). With `rounds` > 1, the receiver rolls out its own
thoughts on that prompt, and the feedback OuterLink splices them into the first sender's turn for
the next round; the other senders' thoughts do not change and are kept. The last round's receiver
generates. Rows are left-padded embedding sequences with explicit positions (tflow.agents.trace), so a
query's answer does not depend on its batch-mates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from tflow.agents.encoding import token_ids
from tflow.agents.generation import generate_ids
from tflow.agents.prefix import prefix_text
from tflow.agents.trace import Trace, last_real
from tflow.channels.latent.links import accepts_embeddings, embed
from tflow.channels.ledger import Stages, agent_usage
from tflow.channels.registry import Call, check_replay
from tflow.channels.text import text_turn
from tflow.errors import ChannelError
from tflow.reply import Reply, Usage

SLOT = "<|latent thoughts|>"


def check(call: Call) -> None:
    """Raises ChannelError: no links on the receiver, links made for other widths, or an agent
    whose backbone gives no input embeddings; QueryError: beam search, or a replayed message
    without thoughts for every query."""
    check_replay(call, "latent")
    links = call.receiver.links
    if links is None:
        raise ChannelError("the latent channel needs trained links on the receiver: train them with "
                           "`tflow train RECIPE train.channel=latent` and load that folder as the checkpoint")
    agents = [*zip(call.names, call.senders, strict=True), (call.receiver.name, call.receiver)]
    for name, agent in agents:
        if not accepts_embeddings(agent.model):
            raise ChannelError(f"the latent channel feeds thoughts as input embeddings, and {name}'s backbone "
                               f"({type(agent.model).__name__}) gives none; use the text or weights channel")
    dims = [s.model.config.hidden_size for s in call.senders]
    if dims != links.sender_dims or call.receiver.model.config.hidden_size != links.receiver_dim:
        raise ChannelError(f"the links were made for senders of width {links.sender_dims} and a receiver of "
                           f"{links.receiver_dim}, this team has {dims} and {call.receiver.model.config.hidden_size}")


def run(call: Call) -> list[Reply]:
    senders, receiver = call.senders, call.receiver
    q_count = len(call.queries)
    stages = Stages(senders, receiver)
    seen = tallies([*call.names, receiver.name], q_count)
    with torch.no_grad():
        if call.message is None:
            message, sent = converse(call, stages, seen)
        else:  # thoughts made earlier (ablations): the senders do not run
            message = call.message.to(next(receiver.model.parameters()).device)
            sent = [message.shape[1] * message.shape[-1]] * q_count
        texts = [receiver_turn(receiver, q, call.names) for q in call.queries]
        with stages("receiver"):
            embeds, mask, counts = spliced(receiver.model, receiver.tokenizer, texts, message, keep_last=False,
                                           slots=len(call.names))
            trace = Trace(receiver.model, q_count)
            trace.append_embeds(embeds, mask)
            last = [[ids[-1]] for ids in token_ids(receiver.tokenizer, [t.rsplit(SLOT, 1)[1] for t in texts])]
            out = generate_ids(receiver.model, receiver.tokenizer, last, call.settings, past=trace, **call.decode)
        _count(seen[receiver.name], counts, 0)
    itemsize = next(receiver.model.parameters()).dtype.itemsize
    agents = [(receiver.name, receiver)] if call.message is not None else \
        [*zip(call.names, senders, strict=True), (receiver.name, receiver)]
    replies = []
    for q, text in enumerate(out.texts):
        ledger = {}
        for name, agent in agents:
            prompt, latent, cached = seen[name][q]
            generated = out.generated_tokens[q] if agent is receiver else 0
            ledger[name] = agent_usage(agent, prompt, generated, latent, cached)
        replies.append(Reply(text, "latent", Usage(ledger), message_bytes=sent[q] * itemsize, **stages.measured,
                             finish_reason=out.finish_reasons[q]))
    return replies


def converse(call: Call, stages: Stages, seen: dict[str, list[list[int]]]) -> tuple[Tensor, list[int]]:
    """The senders' thoughts over the call's `rounds` rounds, as the receiver splices them: message
    [queries, senders x latent_steps, receiver hidden] (sender s's block at s x latent_steps), and
    the vector elements that crossed between agents per query. Counts each pass into `seen`."""
    senders, receiver, links, steps = call.senders, call.receiver, call.receiver.links, call.options["latent_steps"]
    sent = [0] * len(call.queries)
    thoughts: list[Tensor | None] = [None] * len(senders)
    feedback = message = None
    for r in range(call.options["rounds"]):
        if r:  # the receiver's own thoughts on the last message go back to the first sender
            with stages("receiver"):
                texts = [receiver_turn(receiver, q, call.names) for q in call.queries]
                own = rollout(receiver.model, receiver.tokenizer, texts, links.receiver_inner, steps, message,
                              slots=len(call.names))
                _count(seen[receiver.name], own.counts, steps - 1 if steps else 0)
            feedback = links.feedback(own.thoughts)
            sent = [n + feedback.shape[1] * feedback.shape[-1] for n in sent]
        with stages("senders"):
            for s, sender in enumerate(senders):
                if thoughts[s] is not None and not (s == 0 and feedback is not None):
                    continue  # unchanged since the last round
                texts = [sender_turn(sender, q, call.context(s, i), feedback is not None and s == 0,
                                     receiver.name) for i, q in enumerate(call.queries)]
                role = tuple(token_ids(sender.tokenizer, [prefix_text(sender)])[0])
                done = rollout(sender.model, sender.tokenizer, texts, links.inner[s], steps,
                               feedback if s == 0 else None, prefix=role)
                thoughts[s] = done.thoughts
                _count(seen[call.names[s]], done.counts, steps - 1 if steps else 0, done.cached)
        message = torch.cat([links.outer[s](t) for s, t in enumerate(thoughts)], dim=1)
        changed = message.shape[1] if r == 0 else thoughts[0].shape[1]
        sent = [n + changed * message.shape[-1] for n in sent]
    return message, sent


def tallies(names: Sequence[str], queries: int) -> dict[str, list[list[int]]]:
    """Per agent, per query, the [prompt tokens, latent positions, cached tokens] `converse` adds up."""
    return {name: [[0, 0, 0] for _ in range(queries)] for name in names}


def _count(ledger: list[list[int]], counts: list[tuple[int, int]], steps_fed: int,
           cached: Sequence[int] | None = None) -> None:
    """Add one pass's (text tokens, spliced vectors) per query, the latent steps it fed and the
    text tokens it read from a kept prefix."""
    for q, (row, (tokens, vectors)) in enumerate(zip(ledger, counts, strict=True)):
        row[0] += tokens
        row[1] += vectors + steps_fed
        row[2] += cached[q] if cached is not None else 0


def sender_turn(sender, query: str, context: str | None, with_feedback: bool, receiver: str) -> str:
    """A sender's chat text; with feedback, the receiver's thoughts go at a slot after the query."""
    if not with_feedback:
        return sender.prompt(query, context)
    return sender.prompt(f"{query}\n\nLatent thoughts from {receiver}: {SLOT}", context)


def receiver_turn(receiver, query: str, names: Sequence[str]) -> str:
    """The receiver's chat text: the text channel's turn (`text_turn`) with each sender's thoughts at
    a slot where that sender's message would be, so the receiver reads them where it reads notes."""
    return receiver.prompt(text_turn(query, dict.fromkeys(names, SLOT)))


def spliced(model: nn.Module, tokenizer, texts: Sequence[str], vectors: Tensor | None, *, keep_last: bool = True,
            tails: Sequence[Sequence[int]] | None = None, slots: int = 1,
            skip: Sequence[int] | None = None) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
    """Left-padded input embeddings of `texts`, `vectors` [N, k, H] in place of each text's slots.

    Each text's last `slots` slots get the equal blocks of its row of `vectors`, in order, one per
    slot (a slot marker typed into a query, earlier in the text, stays text); a text without a slot
    (vectors None) is embedded whole. Without `keep_last`, each row's last
    token is left out (generation reads it). `tails[i]`, when given, are token ids appended to
    row i (teacher forcing). `skip[i]` leading tokens of row i are left out (a kept prefix supplies
    them; they are still counted). Returns embeds [N, W, H], mask [N, W] long and per row (text
    tokens, spliced vectors); the tails are not counted.

    Raises:
        ChannelError: a text with fewer than `slots` slots.
    """
    rows, counts = [], []
    for i, text in enumerate(texts):
        pieces = text.rsplit(SLOT, slots) if vectors is not None else [text]
        if vectors is not None and len(pieces) - 1 != slots:
            raise ChannelError(f"latent: text {i} has {len(pieces) - 1} thought slot(s) {SLOT!r} where {slots} "
                               "are needed; each sender's message needs its own slot")
        ids = token_ids(tokenizer, pieces)
        counts.append((sum(map(len, ids)), vectors.shape[1] if vectors is not None else 0))
        if skip is not None:
            ids[0] = ids[0][skip[i]:]
        if not keep_last:
            ids[-1] = ids[-1][:-1]
        parts = [embed(model, ids[0])]
        if vectors is not None:
            size = vectors.shape[1] // (len(pieces) - 1)
            for j, piece in enumerate(ids[1:]):
                parts += [vectors[i, j * size:(j + 1) * size].to(parts[0].dtype), embed(model, piece)]
        if tails is not None:
            parts.append(embed(model, tails[i]))
        rows.append(torch.cat(parts))
    width = max(r.shape[0] for r in rows)
    embeds = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=embeds.device)
    for i, r in enumerate(rows):
        embeds[i, width - r.shape[0]:] = r
        mask[i, width - r.shape[0]:] = 1
    return embeds, mask, counts


class Rollout(NamedTuple):
    """thoughts [N, steps, H]; counts as `spliced`'s; the prompt's embeds [N, W, H], mask [N, W] and
    last-layer states [N, W, H] (what the InnerLinks are trained on), past the `cached` leading
    tokens of each row read from a kept prefix."""

    thoughts: Tensor
    counts: list[tuple[int, int]]
    embeds: Tensor
    mask: Tensor
    hidden: Tensor
    cached: list[int]


def rollout(model: nn.Module, tokenizer, texts: Sequence[str], inner: nn.Module, steps: int,
            vectors: Tensor | None = None, slots: int = 1, prefix: tuple[int, ...] | None = None) -> Rollout:
    """`steps` latent thoughts of `model` after reading `texts` (with `vectors` at their slot):
    thought t is inner(h_t), and is fed as the next input embedding, the last one excepted
    (nothing reads its output). With `prefix` (the ids every text starts with: a sender's role,
    `tflow.agents.prefix.prefix_text`), each row reads the leading tokens it shares with it from the
    states kept per model and runs only the rest, where the model allows it (`reusable`)."""
    trace, cached = Trace(model, len(texts)), [0] * len(texts)
    if prefix is not None:
        heads = [text.rsplit(SLOT, slots)[0] if vectors is not None else text for text in texts]
        trace, cached = Trace.after_prefixes(model, token_ids(tokenizer, heads), [prefix] * len(texts))
    embeds, mask, counts = spliced(model, tokenizer, texts, vectors, slots=slots, skip=cached)
    prompt = trace.append_embeds(embeds, mask).last_hidden_state
    h = last_real(prompt)
    thoughts = []
    for t in range(steps):
        thoughts.append(inner(h))
        if t < steps - 1:
            h = last_real(trace.append_embeds(thoughts[-1][:, None].to(embeds.dtype)).last_hidden_state)
    out = torch.stack(thoughts, dim=1) if thoughts else embeds.new_zeros(len(texts), 0, embeds.shape[-1])
    return Rollout(out, counts, embeds, mask, prompt, cached)
