"""Training the latent channel's part (RecursiveMAS); every LLM stays frozen.

The senders' thoughts are rolled out without gradient; the OuterLinks learn from the receiver's
answer objective (`train.objective`, cross-entropy by default) with the thoughts spliced into its
prompt, and each sender's InnerLink
learns to map its prompt's hidden state t to the input embedding of token t + 1 ((1 - cos) + 0.1
MSE). With rounds > 1, training runs every round as the channel does: the receiver's InnerLink
learns the same objective on its own prompts, and the feedback OuterLink learns from the
answer objective through the first sender's second rollout.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from tflow.agents.encoding import token_ids
from tflow.agents.trace import Trace
from tflow.channels.dispatch import sender_names
from tflow.channels.latent import part
from tflow.channels.latent.links import inner_loss
from tflow.channels.latent.run import receiver_turn, rollout, sender_turn, spliced
from tflow.training.modules import ExampleModule


class LatentModule(ExampleModule):
    """The latent channel: the links (`links`) are trained; with `rounds` > 1 the receiver's
    InnerLink and the feedback OuterLink too."""

    def __init__(self, team, splits):
        super().__init__(team, splits)
        self.links = team.receiver.links

    def save_part(self, out_dir: Path) -> Path:
        fingerprint = part.fingerprint(self.team.senders, self.team.receiver)
        return part.save(self.links, out_dir, fingerprint, self.team.recipe)

    def loss(self, examples) -> Tensor:
        team, latent = self.team, self.team.recipe.latent
        receiver, tok = team.receiver, team.receiver.tokenizer
        queries, contexts, targets = self.batch_parts(examples)
        thoughts, inner = [], []
        answers = [ids + [tok.eos_token_id] for ids in token_ids(tok, targets)]
        for s, sender in enumerate(team.senders):
            texts = [sender.prompt(q, contexts[s][i]) for i, q in enumerate(queries)]
            with torch.no_grad():
                done = rollout(sender.model, sender.tokenizer, texts, self.links.inner[s], latent.latent_steps)
            if latent.inner_text == "answer":
                inner.append(self._text_inner_loss(self.links.inner[s], sender, texts, targets))
            else:
                real = done.mask.bool()
                inner.append(inner_loss(self.links.inner[s], done.hidden[:, :-1], done.embeds[:, 1:],
                                        real[:, :-1] & real[:, 1:]))
            thoughts.append(self.links.outer[s](done.thoughts))
        names = sender_names(team.senders, receiver)
        turns = [receiver_turn(receiver, q, names) for q in queries]
        if latent.rounds > 1:
            inner.append(self._receiver_inner_loss(queries, targets))
        for _ in range(latent.rounds - 1):
            thoughts[0] = self._fed_back(queries, contexts[0], turns, torch.cat(thoughts, dim=1))
        embeds, mask, _ = spliced(receiver.model, tok, turns, torch.cat(thoughts, dim=1), tails=answers,
                                  slots=len(names))
        labels = torch.full(mask.shape, -100, dtype=torch.long, device=mask.device)
        for i, ids in enumerate(answers):
            labels[i, mask.shape[1] - len(ids):] = torch.tensor(ids, device=mask.device)
        logits = Trace(receiver.model, len(queries)).append_embeds(embeds, mask, full=True).logits
        return self.answer_loss(logits, labels, examples) + latent.inner_weight * torch.stack(inner).mean()

    def _fed_back(self, queries, contexts, turns, message: Tensor) -> Tensor:
        """One more round, as `tflow.channels.latent.run.converse` runs it: the receiver's own thoughts
        on `message` (without gradient) go through the feedback OuterLink into the first sender's
        turn, whose new thoughts, through its OuterLink, are returned. The gradient reaches the
        feedback link through the frozen first sender's rollout."""
        team, latent = self.team, self.team.recipe.latent
        receiver, first = team.receiver, team.senders[0]
        with torch.no_grad():
            own = rollout(receiver.model, receiver.tokenizer, turns, self.links.receiver_inner, latent.latent_steps,
                          message.detach(), slots=len(team.senders))
        feedback = self.links.feedback(own.thoughts)
        texts = [sender_turn(first, q, contexts[i], True, receiver.name) for i, q in enumerate(queries)]
        again = rollout(first.model, first.tokenizer, texts, self.links.inner[0], latent.latent_steps, feedback)
        return self.links.outer[0](again.thoughts)

    def _receiver_inner_loss(self, queries, targets) -> Tensor:
        """The receiver's InnerLink loss, on its own prompts (without thoughts) by `latent.inner_text`."""
        receiver = self.team.receiver
        answers = targets if self.team.recipe.latent.inner_text == "answer" else None
        return self._text_inner_loss(self.links.receiver_inner, receiver, [receiver.prompt(q) for q in queries], answers)

    def _text_inner_loss(self, link, agent, texts: list[str], targets: list[str] | None) -> Tensor:
        """`link`'s loss against the next token's embedding on `agent`'s prompts: at every position,
        or, given `targets`, on the prompts continued by them (and EOS), from the prompt's last position on."""
        tok = agent.tokenizer
        tails = None if targets is None else [ids + [tok.eos_token_id] for ids in token_ids(tok, targets)]
        with torch.no_grad():
            embeds, mask, _ = spliced(agent.model, tok, texts, None, tails=tails)
            hidden = Trace(agent.model, len(texts)).append_embeds(embeds, mask).last_hidden_state
        real = mask.bool()
        span = real[:, :-1] & real[:, 1:]
        if tails is not None:
            columns = torch.arange(mask.shape[1] - 1, device=mask.device)
            span &= torch.stack([columns >= mask.shape[1] - 1 - len(t) for t in tails])  # the last prompt token on
        return inner_loss(link, hidden[:, :-1], embeds[:, 1:], span)
