"""How the `kv` channel (DiffMAS; LatentMAS while its LoRA is untrained): a shared KV trace.

The senders, in turn, append to one KV cache: each prefills its own chat turn (role, query, its
private document), then runs `latent_steps` latent steps, where its last-layer state, rescaled to
the mean input-embedding norm (and first realigned by LatentMAS's ridge matrix W_a with
`realign`), is the next input embedding. The receiver reads its own prompt on the trace and
generates, with its kv LoRA patched in (the trace is built without it).
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from tflow.agents.encoding import token_ids
from tflow.agents.generation import generate, kv_cache_bytes
from tflow.agents.prefix import prefix_text, stamp
from tflow.agents.trace import Trace, last_real
from tflow.channels.ledger import Stages, agent_usage
from tflow.channels.registry import Call, check_replay
from tflow.errors import ChannelError
from tflow.lora.patching import patched
from tflow.reply import Reply, Usage

RIDGE = 1e-5  # LatentMAS's regulariser of W_a
_ALIGNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check(call: Call) -> None:
    """Raises ChannelError: a sender on another backbone than the receiver's (no shared cache);
    QueryError: beam search, or a replayed message without one trace per query."""
    check_replay(call, "kv")
    for s, sender in enumerate(call.senders):
        if sender.model is not call.receiver.model:
            raise ChannelError(
                f"the kv channel shares one KV cache, so every sender must run on the receiver's backbone; "
                f"sender {call.names[s]!r} has its own: drop senders.{s}.model (and receiver.model) from the recipe "
                "so all agents share `model`, or use the latent channel, whose links map between backbones")


def run(call: Call) -> list[Reply]:
    receiver, queries = call.receiver, call.queries
    model, tokenizer = receiver.model, receiver.tokenizer
    stages = Stages(call.senders, receiver)
    if call.message is None:
        with stages("senders"), torch.no_grad():
            trace, prompt_tokens, cached = build_trace(call)
    else:  # a trace made earlier (ablations): the senders do not run
        trace, prompt_tokens, cached = Trace.from_rows(model, call.message), None, None
    trace_bytes = [kv_cache_bytes(model, n) for n in trace.lengths()]
    lora = receiver.kv_lora
    with stages("receiver"), (patched(model, lora.delta()) if lora is not None else nullcontext()):
        out = generate(model, tokenizer, [receiver.prompt(q) for q in queries], call.settings, past=trace,
                       **call.decode)
    replies = []
    for q, text in enumerate(out.texts):
        ledger = {} if prompt_tokens is None else {
            call.names[s]: agent_usage(sender, prompt_tokens[s][q], 0, call.options["latent_steps"],
                                       cached[q] if s == 0 else 0)
            for s, sender in enumerate(call.senders)}
        ledger[receiver.name] = agent_usage(receiver, out.prompt_tokens[q], out.generated_tokens[q])
        replies.append(Reply(text, "kv", Usage(ledger), message_bytes=trace_bytes[q], **stages.measured,
                             finish_reason=out.finish_reasons[q]))
    return replies


def build_trace(call: Call) -> tuple[Trace, list[list[int]], list[int]]:
    """The senders' shared trace over every query, each sender's prompt tokens per query, and the
    first sender's tokens per query read from its kept role prefix (tflow.agents.prefix) instead of run.

    Only the first sender's turn starts the trace, so only its role prefix is the same states for
    every query; the later senders' turns come after the earlier ones' and run whole.
    """
    model, tokenizer = call.receiver.model, call.receiver.tokenizer
    align = aligner(model, call.options["realign"])
    counts = []
    for s, sender in enumerate(call.senders):
        seqs = token_ids(tokenizer, [sender.prompt(q, call.context(s, i)) for i, q in enumerate(call.queries)])
        counts.append([len(ids) for ids in seqs])
        if s == 0:
            role = tuple(token_ids(tokenizer, [prefix_text(sender)])[0])
            trace, cached = Trace.after_prefixes(model, seqs, [role] * len(seqs))
            seqs = [ids[k:] for ids, k in zip(seqs, cached, strict=True)]
        h = last_real(trace.append_ids(seqs, tokenizer.pad_token_id).last_hidden_state)
        for _ in range(call.options["latent_steps"]):
            h = last_real(trace.append_embeds(align(h)[:, None]).last_hidden_state)
    return trace, counts, cached


def aligner(model: nn.Module, realign: bool):
    """h [N, H] -> the next input embedding [N, H]: `(h W_a) * target / ||h W_a||`, with
    W_a = (W_out^T W_out + 1e-5 I)^-1 W_out^T W_in when `realign`, else the identity, and target
    the mean norm of the input embeddings. Kept per model until its weights change."""
    key = (stamp(model), realign)
    found = _ALIGNERS.get(model)
    if found is None or found[0] != key:
        w_in = model.get_input_embeddings().weight.detach()
        target = w_in.norm(dim=-1).mean()
        w_a = None
        if realign:
            w_out = model.get_output_embeddings().weight.detach().double()
            gram = w_out.T @ w_out + RIDGE * torch.eye(w_out.shape[1], dtype=w_out.dtype, device=w_out.device)
            w_a = torch.linalg.solve(gram, w_out.T @ w_in.double()).to(w_in.dtype)
        found = _ALIGNERS[model] = (key, w_a, target)
    _, w_a, target = found

    def align(h: Tensor) -> Tensor:
        h = h if w_a is None else h @ w_a
        return h * (target / h.norm(dim=-1, keepdim=True).clamp(min=1e-12))

    return align
