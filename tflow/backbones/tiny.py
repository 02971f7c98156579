"""Tiny models of every supported receiver family and a locally trained tokenizer: no hub, no downloads.

Tests, the demo and the benchmarks build their agents here. `build(path)` saves both with
`save_pretrained`, so the folder loads through the same `from_pretrained` path real weights take,
and marks the config (`RANDOM_INIT`) so whoever loads it knows its weights are random.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
RANDOM_INIT = "tflow_random_init"
"""The config.json key `build` sets: the folder holds the random initialisation, untrained."""


def default_corpus() -> list[str]:
    """A small English-and-digits corpus covering chat roles and the words tflow prompts use."""
    words = (
        "system user assistant you are a helpful agent strategist knowledge extractor executor "
        "answer the question with one word number fact secret code city color animal of is what "
        "read this document and pass on to receiver how approach task not solve formulas "
        "constraints step think final result the a an in on at for to from by with"
    ).split()
    lines = [" ".join(words[i : i + 7]) for i in range(0, len(words), 3)]
    lines += [f"The answer is {n}. {n} plus {n % 7} is {n + n % 7}." for n in range(1000)]
    lines += ["<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"]
    return lines


def tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `corpus`, with ChatML specials and chat template.

    eos is `<|im_end|>` (ends every chat turn), pad is `<|endoftext|>`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus if corpus is not None else default_corpus()), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        chat_template=CHATML_TEMPLATE,
    )


# arch -> (transformers config class, causal LM class)
ARCHS = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
}


def config(vocab_size: int, *, arch: str = "qwen3", hidden_size: int = 64, num_layers: int = 2,
           num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int | None = None,
           head_dim: int | None = None, max_positions: int = 512, pad_token_id: int = 0,
           eos_token_id: int = 2):
    """A transformers config of the given size; `arch` is one of `ARCHS` (`gemma3`: text only).

    head_dim defaults to hidden_size // num_heads; Qwen3-4B sets it apart (32 heads of 128 on 2560).
    """
    import transformers

    config_class, lm_class = ARCHS[arch]
    return getattr(transformers, config_class)(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim or hidden_size // num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        architectures=[lm_class],
    )


def model(tok, *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A randomly initialised causal LM sized by `config_kwargs`, matched to tokenizer `tok`."""
    from transformers import AutoModelForCausalLM

    cfg = config(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **config_kwargs)
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    lm.generation_config.pad_token_id = tok.pad_token_id
    lm.generation_config.eos_token_id = tok.eos_token_id
    return lm.eval()


def build(path: str | Path, *, corpus: Iterable[str] | None = None, vocab_size: int = 512,
          seed: int = 0, **config_kwargs) -> Path:
    """Build a tiny model and tokenizer and `save_pretrained` both into `path`; returns `path`.

    The saved config carries `RANDOM_INIT` (`is_random` reads it back from the loaded model).
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(path)
    tok = tokenizer(corpus, vocab_size)
    lm = model(tok, seed=seed, **config_kwargs)
    setattr(lm.config, RANDOM_INIT, True)
    lm.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def is_random(lm) -> bool:
    """Whether the causal LM `lm` was loaded from a folder `build` wrote: random weights, so its answers are noise."""
    return bool(getattr(lm.config, RANDOM_INIT, False))
