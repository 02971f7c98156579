"""What the relay's senders know, and what a trained generator passes on (measurements, not tests).

    python benchmarks/relay_probe.py states [RECIPE]             # is the asked value readable?
    python benchmarks/relay_probe.py loss RECIPE CHECKPOINT      # value vs other answer tokens
    python benchmarks/relay_probe.py read [RECIPE]               # the backbone reading documents

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
"""

from __future__ import annotations

import sys

import torch

import tflow
from tflow.agents.encoding import encode
from tflow.lora.patching import patched
from tflow.training.data import load_splits, teacher_forced


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


def loss(recipe: str, checkpoint: str) -> None:
    team = tflow.load(recipe, checkpoint)
    splits = load_splits(team.recipe)
    examples = splits.val[-32:]
    tok = team.receiver.tokenizer
    queries = [splits.task.prompt(ex) for ex in examples]
    contexts = [[ex.contexts.get(s.name) for ex in examples] for s in team.senders]
    prompts = [team.receiver.prompt(q) for q in queries]
    targets = [splits.task.target(ex, team.recipe.data.fields.answer) for ex in examples]
    ids, mask, labels = teacher_forced(tok, prompts, targets, 512)
    value = torch.zeros_like(labels, dtype=torch.bool)
    for i, (prompt, target, ex) in enumerate(zip(prompts, targets, examples, strict=True)):
        at = len(tok(prompt, add_special_tokens=False)["input_ids"])
        cut = target.index(ex.answer)
        first = at + len(tok(target[:cut].rstrip(), add_special_tokens=False)["input_ids"])
        last = at + len(tok(target[:cut + len(ex.answer)], add_special_tokens=False)["input_ids"])
        value[i, first:last] = True
    with torch.no_grad():
        delta = team.receiver.generator(encode(team.senders, queries, contexts))
        with patched(team.receiver.model, delta, validate=False):
            logits = team.receiver.model(input_ids=ids, attention_mask=mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    labels, value = labels[:, 1:], value[:, 1:]
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


if __name__ == "__main__":
    torch.set_num_threads(1)
    command, *args = sys.argv[1:] or ["states"]
    if command == "states":
        states(*(args or ["recipes/smollm2-relay.yaml"]))
    elif command == "loss" and len(args) == 2:
        loss(*args)
    elif command == "read":
        read(*(args or ["recipes/smollm2-relay.yaml"]))
    else:
        sys.exit(__doc__.split("\n\n")[1])
