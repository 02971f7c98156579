"""Tiny models built locally: a folder from_pretrained loads, the same seed gives the same weights."""

import torch

from tflow.backbones import tiny


def test_build_saves_a_folder_that_from_pretrained_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny.build(tmp_path / "m", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    text = tok.apply_chat_template(
        [{"role": "system", "content": "You are a strategist."}, {"role": "user", "content": "What is 2+2?"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert text == "<|im_start|>system\nYou are a strategist.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == text  # byte-level BPE round-trips any text
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3) or tok.eos_token_id in out[0]


def test_same_seed_same_weights(tok):
    a, b = tiny.model(tok, seed=7), tiny.model(tok, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_a_built_folder_is_marked_random_and_a_saved_model_is_not(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    built = tiny.build(tmp_path / "built", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    assert tiny.is_random(AutoModelForCausalLM.from_pretrained(built))
    model = tiny.model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    assert not tiny.is_random(model)  # the demo pretrains such a model before saving it
    model.save_pretrained(tmp_path / "saved")
    assert not tiny.is_random(AutoModelForCausalLM.from_pretrained(tmp_path / "saved"))
