"""Converted transformers models save with save_pretrained and safetensors and load back to the
same logits; output_router_logits gives the family's aux loss on converted blocks."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from flexmoe.integrations.transformers import to_flexmoe  # noqa: E402

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    output_router_logits=True,
)


def _tiny(family: str, seed: int):
    torch.manual_seed(seed)
    if family == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=48, num_local_experts=4, **COMMON)
        return transformers.MixtralForCausalLM(config).eval()
    config = transformers.Qwen3MoeConfig(moe_intermediate_size=48, intermediate_size=64, num_experts=4, **COMMON)
    return transformers.Qwen3MoeForCausalLM(config).eval()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("share_storage", [False, True])
def test_save_pretrained_and_safetensors_round_trip(family, share_storage, tmp_path):
    model = to_flexmoe(_tiny(family, 0), share_storage=share_storage)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "pretrained")
    save_file(model.state_dict(), tmp_path / "plain.safetensors")
    for path in (tmp_path / "pretrained" / "model.safetensors", tmp_path / "plain.safetensors"):
        # save_pretrained writes Mixtral's MoE blocks under their original checkpoint name.
        state = {key.replace(".block_sparse_moe.", ".mlp."): value for key, value in load_file(path).items()}
        other = to_flexmoe(_tiny(family, 1))  # different weights until loaded
        missing, unexpected = other.load_state_dict(state, strict=False)
        assert not unexpected and all("lm_head" in key for key in missing)  # lm_head may be tied
        with torch.no_grad():
            torch.testing.assert_close(other(ids).logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_output_router_logits_aux_loss_matches_original(family):
    original = _tiny(family, 0).train()
    ids = torch.randint(0, 64, (2, 9))
    expected = original(ids, labels=ids)
    expected.loss.backward()
    gate = original.model.layers[0].mlp.gate
    expected_grad = gate.weight.grad.clone()
    converted = to_flexmoe(original)
    got = converted(ids, labels=ids)
    assert len(got.router_logits) == 2
    torch.testing.assert_close(got.aux_loss, expected.aux_loss)
    torch.testing.assert_close(got.loss, expected.loss)
    converted.zero_grad()
    got.loss.backward()
    torch.testing.assert_close(converted.model.layers[0].mlp.moe.router.weight.grad, expected_grad)
