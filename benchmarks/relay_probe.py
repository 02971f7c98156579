"""What the relay's senders know, and what a trained generator passes on (measurements, not tests).

    python benchmarks/relay_probe.py states [RECIPE]             # is the asked value readable?
    python benchmarks/relay_probe.py loss RECIPE CHECKPOINT      # value vs other answer tokens
    python benchmarks/relay_probe.py read [RECIPE]               # the backbone reading documents
    python benchmarks/relay_probe.py write [RECIPE]              # can a sender's state make it say the value?
    python benchmarks/relay_probe.py article CHECKPOINT [N]      # category task: why never "an animal"?

`states`: for the documents-format relay, takes every sender's hidden state at the last token of
every fact's value (8 candidates per query: 4 facts in each of 2 documents) and fits a logistic
probe "is this the asked fact?" on 180 training queries; then, on 60 other queries, counts how
often the probe's top candidate is the asked fact (chance: 1 in 8). Once per sender layer, and
for the mixtures the conditioning can form: the uniform mean of all RMS-normalised layers, the
same through a random 576 -> 128 projection (the generator's width), and layers 12-24 only.

`loss`: the teacher-forced loss of the checkpoint's team on 32 held-out queries, split into the
answer value's tokens and the sentence's other tokens, and how many queries get every value token
right under teacher forcing.

`read`: the recipe's backbone as a single agent given the documents in its own prompt, greedy, on
40 held-out queries: how often its reply contains the asked value, for the holder's document
before or after the question, and for both documents.

`write`: no training. What `generator.state_values` can do at best: the holder's own state
entering layer L + 1 (at the token before the asked value, or at the value's last token) is
added, times c, to the output of the receiver's layer-L `down_proj`, at every position or only
where the receiver says the value. On 40 held-out queries, teacher-forced: how often every value
token is then the receiver's top-1, and a value token's mean log-prob, against no write.

`article`: for a checkpoint trained on the category task, on the first N (200) validation
queries, with the generated delta and with none: per gold category, how often the four full
answer sentences ("... is an animal.", "... is a fruit.", ...), scored by summed log-prob, pick
the right one, and the mean probability of " an" and of " a" at the article.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext

import torch

import tflow
from tflow.agents.encoding import encode
from tflow.lora.patching import patched
from tflow.training.data import load_splits, teacher_forced


def answer_logprobs(team, prompts, targets, delta=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The receiver teacher-forced on prompt + target, with `delta` patched in (None: plain): the
    log-probs of each next token [N, T - 1, V] and the labels they predict [N, T - 1] (-100 off the target)."""
    model = team.receiver.model
    ids, mask, labels = teacher_forced(team.receiver.tokenizer, prompts, targets, team.recipe.train.max_length)
    with torch.no_grad(), patched(model, delta, validate=False) if delta is not None else nullcontext():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return torch.log_softmax(logits[:, :-1].float(), -1), labels[:, 1:]


def value_states(team, task, examples) -> list[list[tuple[torch.Tensor, bool]]]:
    """Per query: (hidden [layers + 1, H] at the value's last token, is-the-asked-fact) per fact."""
    tok = team.receiver.tokenizer
    out = []
    for b in range(0, len(examples), 16):
        chunk = examples[b:b + 16]
        queries = [task.prompt(ex) for ex in chunk]
        contexts = [[ex.contexts.get(s.name) for ex in chunk] for s in team.senders]
        states = encode(team.senders, queries, contexts)
        for qi, ex in enumerate(chunk):
            facts = []
            for si, sender in enumerate(team.senders):
                doc = contexts[si][qi]
                text = sender.prompt(queries[qi], doc)
                offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
                start = text.rindex(doc)
                for sentence in doc.rstrip(".").split(". "):
                    city, _ = sentence.split(" of ", 1)[1].split(" is ")
                    kind = "code" if "secret code" in sentence else "password"
                    end = start + doc.index(sentence) + len(sentence)
                    pos = max(i for i, (a, z) in enumerate(offsets) if a < z <= end)
                    asked = sender.name == ex.meta["holder"] and (city, kind) == (ex.meta["entity"], ex.meta["kind"])
                    facts.append((states.hidden[:, si * len(chunk) + qi, pos], asked))
            out.append(facts)
    return out


def probe_hits(train, test, feature) -> int:
    """Fit a logistic probe on `train` queries' features; count `test` queries whose top fact is the asked one."""
    x = torch.stack([feature(h) for facts in train for h, _ in facts])
    y = torch.tensor([float(a) for facts in train for _, a in facts])
    mean, std = x.mean(0), x.std(0) + 1e-4
    w = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([w, bias], lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        logits = ((x - mean) / std) @ w + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + 1e-3 * w.pow(2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return sum(facts[int((((torch.stack([feature(h) for h, _ in facts]) - mean) / std) @ w).argmax())][1]
                   for facts in test)


def states(recipe: str) -> None:
    team = tflow.load(recipe)
    splits = load_splits(team.recipe)
    data = value_states(team, splits.task, splits.train[:240])
    train, test = data[:180], data[180:]
    layers, width = data[0][0][0].shape

    def normed_mean(h: torch.Tensor) -> torch.Tensor:
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).mean(0)

    projection = torch.randn(width, 128, generator=torch.Generator().manual_seed(0)) / width ** 0.5
    features = {f"layer {layer}": (lambda h, layer=layer: h[layer]) for layer in range(0, layers, 3)}
    features |= {"mean of all layers": normed_mean,
                 "mean of all layers, random projection to 128": lambda h: normed_mean(h) @ projection,
                 "mean of layers 12-24": lambda h: normed_mean(h[12:25])}
    print(f"asked fact ranked first among 8, on {len(test)} held-out queries (chance {len(test) / 8:.1f}):")
    for name, feature in features.items():
        print(f"  {name}: {probe_hits(train, test, feature)}", flush=True)


def value_tokens(tok, prompts, targets, examples, shape) -> torch.Tensor:
    """[rows, T] bool: the positions of each teacher-forced row (prompt + target) that hold its value's tokens."""
    value = torch.zeros(shape, dtype=torch.bool)
    for i, (prompt, target, ex) in enumerate(zip(prompts, targets, examples, strict=True)):
        at = len(tok(prompt, add_special_tokens=False)["input_ids"])
        cut = target.index(ex.answer)
        first = at + len(tok(target[:cut].rstrip(), add_special_tokens=False)["input_ids"])
        last = at + len(tok(target[:cut + len(ex.answer)], add_special_tokens=False)["input_ids"])
        value[i, first:last] = True
    return value


def loss(recipe: str, checkpoint: str) -> None:
    team = tflow.load(recipe, checkpoint)
    splits = load_splits(team.recipe)
    examples = splits.val[-32:]
    tok = team.receiver.tokenizer
    queries = [splits.task.prompt(ex) for ex in examples]
    contexts = [[ex.contexts.get(s.name) for ex in examples] for s in team.senders]
    prompts = [team.receiver.prompt(q) for q in queries]
    targets = [splits.task.target(ex, team.recipe.data.fields.answer) for ex in examples]
    with torch.no_grad():
        delta = team.receiver.generator(encode(team.senders, queries, contexts))
    logp, labels = answer_logprobs(team, prompts, targets, delta)
    value = value_tokens(tok, prompts, targets, examples, (len(examples), labels.shape[1] + 1))[:, 1:]
    nll = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    right = logp.argmax(-1) == labels
    other = (labels != -100) & ~value
    exact = sum(bool(right[i][value[i]].all()) for i in range(len(examples)))
    print(f"value tokens {nll[value].mean():.3f} nats/token (top-1 {right[value].float().mean():.1%}), "
          f"other tokens {nll[other].mean():.3f}; every value token right in {exact} of {len(examples)} queries")


def read(recipe: str) -> None:
    team = tflow.load(recipe)
    examples = load_splits(team.recipe).val[:40]
    model, tok = team.receiver.model, team.receiver.tokenizer
    only = "Answer with only the word or number from the document."
    layouts = {
        "holder's document, then the question": lambda ex: [
            {"role": "system", "content": only}, {"role": "user", "content": f"{ex.contexts[ex.meta['holder']]}\n\n{ex.question}"}],
        "the question, then the holder's document": lambda ex: [
            {"role": "user", "content": f"{ex.question}\n\n{ex.contexts[ex.meta['holder']]}"}],
        "both documents, then the question": lambda ex: [
            {"role": "user", "content": "Document: " + " ".join(ex.contexts[s.name] for s in team.senders)
             + f"\n\nQuestion: {ex.question} Answer with only the word or number."}],
    }
    tok.padding_side = "left"
    for name, chat in layouts.items():
        texts = [tok.apply_chat_template(chat(ex), tokenize=False, add_generation_prompt=True) for ex in examples]
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=12, do_sample=False)
        replies = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        hits = sum(ex.answer in reply for ex, reply in zip(examples, replies, strict=True))
        print(f"{name}: {hits} of {len(examples)}", flush=True)


def value_positions(tok, text: str, doc: str, answer: str) -> tuple[int, int]:
    """Token positions in `text` of the token before `answer` (in `doc`) and of its last token."""
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    start = text.rindex(doc) + doc.index(f" {answer}.") + 1
    first = min(i for i, (a, z) in enumerate(offsets) if z > start and a < z)
    last = max(i for i, (a, z) in enumerate(offsets) if a < z <= start + len(answer))
    return first - 1, last


def write(recipe: str) -> None:
    team = tflow.load(recipe)
    splits = load_splits(team.recipe)
    examples = splits.val[-40:]
    tok, model = team.receiver.tokenizer, team.receiver.model
    queries = [splits.task.prompt(ex) for ex in examples]
    holders = [next(i for i, s in enumerate(team.senders) if s.name == ex.meta["holder"]) for ex in examples]
    contexts = [[ex.contexts.get(s.name) for ex in examples] for s in team.senders]
    with torch.no_grad():
        hidden = encode(team.senders, queries, contexts).hidden  # [layers + 1, S * Q, T, H]
    sources = {"before the value": [], "the value's last token": []}
    for q, (ex, h) in enumerate(zip(examples, holders, strict=True)):
        doc = ex.contexts[ex.meta["holder"]]
        before, last = value_positions(tok, team.senders[h].prompt(queries[q], doc), doc, ex.answer)
        sources["before the value"].append(hidden[:, h * len(examples) + q, before])
        sources["the value's last token"].append(hidden[:, h * len(examples) + q, last])
    prompts = [team.receiver.prompt(q) for q in queries]
    targets = [splits.task.target(ex, team.recipe.data.fields.answer) for ex in examples]
    ids, mask, _ = teacher_forced(tok, prompts, targets, 512)
    answer = value_tokens(tok, prompts, targets, examples, ids.shape).roll(-1, 1)  # positions that predict one
    labels = ids.roll(-1, 1)

    def score() -> tuple[float, float]:
        """(queries with every value token top-1, mean log-prob of a value token)."""
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        right = (logp.argmax(-1) == labels) | ~answer
        return right.all(1).float().mean().item(), logp.gather(-1, labels[..., None])[..., 0][answer].mean().item()

    top1, logp = score()
    print(f"no write: every value token top-1 in {top1:.1%} of queries, mean log-prob {logp:.2f} a value token",
          flush=True)
    layers = model.model.layers
    for name, states in sources.items():
        states = torch.stack(states, 1)  # [layers + 1, Q, H]
        for layer in range(3, len(layers), 5):
            for where in ("every position", "the answer position"):
                cells = []
                on = mask.bool() if where == "every position" else answer
                for c in (0.5, 1.0, 2.0, 4.0):
                    vector = states[layer + 1] * c

                    def hook(module, args, output, vector=vector, on=on):
                        return output + vector[:, None, :] * on[..., None]

                    handle = layers[layer].mlp.down_proj.register_forward_hook(hook)
                    try:
                        top1, logp = score()
                    finally:
                        handle.remove()
                    cells.append(f"c={c:g}: {top1:.0%} ({logp:.1f})")
                print(f"{name}, layer {layer}, {where}: " + ", ".join(cells), flush=True)


def article(checkpoint: str, n: str = "200") -> None:
    from tflow.tasks.relay import CATEGORIES, CATEGORY_ANSWER, _article

    team = tflow.load(f"{checkpoint}/recipe.yaml", checkpoint=checkpoint)
    splits = load_splits(team.recipe)
    task, receiver, tok = splits.task, team.receiver, team.receiver.tokenizer
    (an,), (a,) = tok.encode(" an"), tok.encode(" a")
    rows = {"weights": [], "none": []}  # (gold, forced choice, p(an), p(a)) per query
    examples = splits.val[: int(n)]
    for b in range(0, len(examples), 8):
        chunk = examples[b:b + 8]
        queries = [task.prompt(ex) for ex in chunk]
        prompts = [receiver.prompt(q) for q in queries]
        with torch.no_grad():
            delta = receiver.generator(encode(team.senders, queries, [[ex.contexts.get(s.name) for ex in chunk]
                                                                       for s in team.senders]))
        for mode, given in (("weights", delta), ("none", None)):
            scores = []
            for category in CATEGORIES:
                targets = [CATEGORY_ANSWER.format(entity=ex.meta["entity"], category=_article(category))
                           for ex in chunk]
                logp, labels = answer_logprobs(team, prompts, targets, given)
                scores.append((logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)).sum(1))
                if category == "animal":  # the position whose label is " an": the article
                    at = logp[torch.arange(len(chunk)), (labels == an).float().argmax(1)].exp()
            choice = torch.stack(scores, 1).argmax(1)
            rows[mode] += [(ex.answer, list(CATEGORIES)[int(c)], float(at[i, an]), float(at[i, a]))
                           for i, (ex, c) in enumerate(zip(chunk, choice, strict=True))]
    for mode, got in rows.items():
        print(f"{mode}: forced choice {sum(g == c for g, c, _, _ in got)} of {len(got)}")
        for category in CATEGORIES:
            some = [r for r in got if r[0] == category]
            print(f"  {category}: right {sum(g == c for g, c, _, _ in some)} of {len(some)}, "
                  f"p(' an') {sum(r[2] for r in some) / len(some):.3f}, p(' a') {sum(r[3] for r in some) / len(some):.3f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    command, *args = sys.argv[1:] or ["states"]
    if command == "states":
        states(*(args or ["recipes/smollm2-relay.yaml"]))
    elif command == "loss" and len(args) == 2:
        loss(*args)
    elif command == "write":
        write(*(args or ["recipes/smollm2-relay.yaml"]))
    elif command == "read":
        read(*(args or ["recipes/smollm2-relay.yaml"]))
    elif command == "article" and args:
        article(*args)
    else:
        sys.exit(__doc__.split("\n\n")[1])
