"""ReceiverSpec: the targeted linear modules of every supported layout, subsets, fingerprints, bad targets."""

import pytest

from tflow import ReceiverSpec
from tflow.backbones import tiny
from tflow.errors import TargetError


@pytest.mark.parametrize("fixture", ["qwen", "llama"])
def test_spec_finds_all_seven_linear_types_per_layer(request, fixture):
    model = request.getfixturevalue(fixture)
    spec = ReceiverSpec.from_model(model)
    assert spec.num_layers == 2 and spec.hidden_size == 64
    assert len(spec.modules) == 14
    kinds = [m.kind for m in spec.modules if m.layer == 1]
    assert kinds == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    named = dict(model.named_modules())
    for m in spec.modules:
        assert named[m.name].in_features == m.in_features and named[m.name].out_features == m.out_features
    k = next(m for m in spec.modules if m.kind == "k_proj")
    assert (k.in_features, k.out_features) == (64, 32)  # 2 kv heads of 16


@pytest.mark.parametrize("arch", list(tiny.ARCHS))
def test_spec_covers_every_supported_layout(tok, arch):
    model = tiny.model(tok, arch=arch, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1)
    spec = ReceiverSpec.from_model(model)
    assert spec.architecture.lower().startswith(arch)
    kinds = len(spec.targets)
    assert kinds == (4 if arch == "phi3" else 7)  # Phi-3 fuses q/k/v and gate/up
    assert [m.kind for m in spec.modules[:kinds]] == list(spec.targets)
    assert len(spec.modules) == 2 * kinds and {m.layer for m in spec.modules} == {0, 1}


def test_spec_subset_and_fingerprint(qwen, llama):
    spec = ReceiverSpec.from_model(qwen, ["q_proj", "v_proj"], layers=[1])
    assert spec.module_names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    fp = spec.fingerprint()
    assert fp["architecture"] == "Qwen3ForCausalLM" and fp["num_layers"] == 2
    assert ReceiverSpec.from_model(llama, ["q_proj", "v_proj"], layers=[1]).fingerprint()["architecture"] == "LlamaForCausalLM"
    assert spec.fingerprint_digest() != ReceiverSpec.from_model(qwen, ["q_proj"], layers=[1]).fingerprint_digest()


def test_unknown_target_lists_existing_linears(qwen):
    with pytest.raises(TargetError) as err:
        ReceiverSpec.from_model(qwen, ["q_proj", "query"])
    msg = str(err.value)
    assert "['query'] do not exist" in msg
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in msg


def test_bad_layer_index(qwen):
    with pytest.raises(TargetError, match=r"layers \[5\] not in the model's 0..1"):
        ReceiverSpec.from_model(qwen, layers=[0, 5])
