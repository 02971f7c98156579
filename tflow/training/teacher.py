"""The distillation teacher (`train.objective: distill | ce+distill`): the receiver reading what a
control channel gives it (`train.teacher`: every sender's document in its own prompt, or the
senders' text messages), with that control's trained LoRA when `train.teacher_checkpoint` names
one. Before training it scores every training and validation answer once, without gradient, on
the answer target the student learns; its top-k log-probs are cached on disk (`teacher_cache`) and
looked up by example in each step.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from tflow.agents.encoding import pad_batch
from tflow.backbones.families import ReceiverSpec
from tflow.channels import registry
from tflow.errors import CheckpointError, RecipeError, first_line
from tflow.io import read_safetensors, sha256_file
from tflow.lora.patching import patched
from tflow.lora.receiver_lora import ReceiverLoRA
from tflow.tasks import Example, Task
from tflow.training import teacher_cache as cache
from tflow.training.data import Splits, teacher_forced_ids

Say = Callable[[str], None]


@dataclass(frozen=True)
class TeacherTargets:
    """The teacher's top-k log-probs and token ids at every answer token of each example it scored."""

    rows: dict[str, tuple[Tensor, Tensor]]
    """example digest (`example_digest`) -> (log-probs [answer tokens, k] fp16, ids [answer tokens, k] int32)."""
    task: Task
    answer: str
    """The data column the answer target comes from (`data.fields.answer`)."""

    def lookup(self, examples: Sequence[Example], device) -> list[tuple[Tensor, Tensor]]:
        """Each example's (log-probs, ids) on `device`, in order.

        Raises:
            CheckpointError: an example the teacher did not score.
        """
        out = []
        for example in examples:
            found = self.rows.get(example_digest(self.task, example, self.answer))
            if found is None:
                raise CheckpointError(f"the teacher scored no answer for {example.question[:60]!r}; it scores the "
                                      "train and val splits the recipe gives, before training")
            out.append((found[0].to(device), found[1].to(device)))
        return out


def example_digest(task: Task, example: Example, answer: str) -> str:
    """SHA-256 (hex) of what an example puts before teacher and student: its query, contexts and target."""
    return cache.digest(task.prompt(example), sorted(example.contexts.items()), task.target(example, answer))


def check(recipe, splits: Splits) -> None:
    """The checks of a distillation run that need no weights: a teacher that reads something, and
    its checkpoint.

    Raises:
        RecipeError: a context teacher where no sender holds any private context.
        CheckpointError: a `train.teacher_checkpoint` that does not exist or lacks the teacher's part.
    """
    train = recipe.train
    if train.objective == "ce":
        return
    if (train.teacher != "text" and not any(ex.contexts for ex in [*splits.train, *splits.val])
            and not any(s.context for s in recipe.senders)):
        raise RecipeError([f"train.objective: {train.objective} learns from a {train.teacher} teacher, which reads "
                           "the senders' private contexts, but no sender holds any in this data; set "
                           "train.teacher=text, give the senders contexts (data.fields.context), or use "
                           "train.objective=ce"])
    if train.teacher_checkpoint is not None:
        folder, part = Path(train.teacher_checkpoint), registry.get(train.teacher).part
        train_it = f"train it with `tflow train RECIPE train.channel={train.teacher} train.out_dir={folder}`"
        if not folder.is_dir():
            raise CheckpointError(f"train.teacher_checkpoint: {folder} does not exist; {train_it}")
        if not (folder / part.file).is_file():
            raise CheckpointError(f"train.teacher_checkpoint: {folder} holds no {train.teacher} control "
                                  f"({part.file}); {train_it}")


def prepare(team, splits: Splits, say: Say | None = None) -> Splits:
    """`splits` with the teacher of the team's recipe's targets for every train and val example:
    read from the cache where a file fits, else scored now and cached. A file that does not fit
    (another key, other examples, damaged) is reported in one line and rebuilt, never used.

    Raises:
        CheckpointError: the teacher checkpoint's part does not fit the receiver.
    """
    recipe = team.recipe
    train = recipe.train
    if train.objective == "ce":
        return splits
    say = say or _stderr
    lora, adapter = teacher_lora(team, train.teacher, train.teacher_checkpoint)
    folder = Path(train.teacher_cache)
    answer = recipe.data.fields.answer
    identity = _identity(recipe, team, adapter)
    rows: dict[str, tuple[Tensor, Tensor]] = {}
    for split, examples in (("train", splits.train), ("val", splits.val)):
        if not examples:
            continue
        digests = [example_digest(splits.task, ex, answer) for ex in examples]
        description = {**identity, "task": splits.task.name, "split": split, "examples": cache.digest(digests)}
        key = cache.digest(description)
        path = cache.path_for(folder, split, key)
        found = None
        if path.exists():
            try:
                found = cache.read(path, key, digests)
            except CheckpointError as err:
                say(f"teacher cache not used, rebuilding it: {first_line(err)}")
        if found is None:
            progress = partial(_progress, say, train.teacher, split, len(examples), path)
            found = score(team, registry.get(train.teacher).part.turns, lora, examples, splits.task, answer,
                          train.distill_top_k, train.batch_size, progress)
            cache.write(path, key, description, digests, found)
        rows.update(zip(digests, found, strict=True))
    return replace(splits, teacher=TeacherTargets(rows, splits.task, answer))


def teacher_lora(team, channel: str, checkpoint: str | None) -> tuple[ReceiverLoRA | None, str | None]:
    """The teacher's receiver LoRA from `checkpoint` (sized by the file's own metadata) and its file's
    digest; (None, None) without a checkpoint.

    Raises:
        CheckpointError: the part is unreadable or made for another receiver.
    """
    if checkpoint is None:
        return None, None
    part = registry.get(channel).part
    path = Path(checkpoint) / part.file
    saved = json.loads(read_safetensors(path)[1].get("config") or "{}")
    receiver, kv = team.receiver, team.recipe.kv
    spec = ReceiverSpec.from_model(receiver.model, saved.get("targets", kv.targets), saved.get("layers", kv.layers))
    lora = ReceiverLoRA(spec, saved.get("rank", kv.rank), saved.get("alpha", kv.alpha))
    lora = lora.to(next(receiver.model.parameters()).device)
    part.load(lora, path, team)
    return lora, sha256_file(path)


def score(team, turns: Callable, lora: ReceiverLoRA | None, examples: Sequence[Example], task: Task, answer: str,
          top_k: int, batch_size: int, progress: Callable[[int, float], None] | None = None) -> cache.Rows:
    """The teacher's top-k log-probs and ids at each example's answer tokens (target + EOS), no gradient.

    The teacher reads the user turns `turns` gives (a control channel's `TrainedPart.turns`), with
    `lora` patched in, never cut to train.max_length: a student whose row is cut reads the first
    of them.
    """
    receiver, tok = team.receiver, team.receiver.tokenizer
    names = [s.name for s in team.senders]
    device = next(receiver.model.parameters()).device
    rows: cache.Rows = []
    start, every = time.perf_counter(), max(1, len(examples) // 10)
    for b in range(0, len(examples), batch_size):
        batch = examples[b:b + batch_size]
        queries = [task.prompt(ex) for ex in batch]
        documents = [{n: ex.contexts[n] for n in names if ex.contexts.get(n) is not None} for ex in batch]
        prompts = [receiver.prompt(turn) for turn in turns(team, queries, documents)]
        seqs, labels = teacher_forced_ids(tok, prompts, [task.target(ex, answer) for ex in batch], sys.maxsize)
        ids, mask = pad_batch(seqs, tok.pad_token_id, "right", device)
        with torch.no_grad(), (patched(receiver.model, lora.delta()) if lora is not None else nullcontext()):
            logits = receiver.model(input_ids=ids, attention_mask=mask.long()).logits
        for i, row in enumerate(labels):
            at = torch.tensor([j - 1 for j, label in enumerate(row) if label != -100], device=device)
            logprobs = logits[i, at].float().log_softmax(-1)
            values, top = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
            rows.append((values.to(device="cpu", dtype=torch.float16), top.to(device="cpu", dtype=torch.int32)))
        done = min(b + batch_size, len(examples))
        if progress is not None and (done // every > b // every or done == len(examples)):
            progress(done, time.perf_counter() - start)
    return rows


def _identity(recipe, team, adapter: str | None) -> dict:
    """What determines the teacher's values beyond the split and its examples."""
    seen: dict[int, dict] = {}

    def backbone(agent) -> dict:  # agents on one backbone share a fingerprint, computed once
        if id(agent.model) not in seen:
            seen[id(agent.model)] = {"weights": cache.model_fingerprint(agent.model),
                                     "tokenizer": cache.tokenizer_fingerprint(agent.tokenizer)}
        return seen[id(agent.model)]

    receiver, train = team.receiver, recipe.train
    return {"format": cache.FORMAT, "teacher": train.teacher, "adapter": adapter, "top_k": train.distill_top_k,
            "receiver": {**backbone(receiver), "system_prompt": receiver.system_prompt},
            "senders": [{"name": s.name, "role": s.role, "context": s.context, "position": s.context_position,
                         **backbone(s)} for s in team.senders],
            "message_tokens": recipe.generate.message_tokens, "data": recipe.data.model_dump(mode="json")}


def _progress(say: Say, teacher: str, split: str, n: int, path: Path, done: int, seconds: float) -> None:
    say(f"teacher ({teacher}): {done}/{n} {split} answers scored in {seconds:.0f} s -> {path}")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
