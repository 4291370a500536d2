"""transformers' MoE models on flexmoe layers: same logits and input-embedding gradients in
float64, and a to_flexmoe -> from_flexmoe -> save_pretrained -> from_pretrained round trip."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flexmoe import MoELayer  # noqa: E402
from flexmoe.integrations.transformers import (  # noqa: E402
    SUPPORTED_BLOCKS,
    flexmoe_aux_loss,
    flexmoe_layers,
    from_flexmoe,
    to_flexmoe,
)
from flexmoe.parallel import SINGLE_PROCESS, ParallelConfig  # noqa: E402

COMMON = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(
        **COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.1
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **COMMON,
        intermediate_size=24,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=12,
        num_experts=6,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        decoder_sparse_step=2,  # layer 0 dense, layer 1 sparse
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **COMMON, head_dim=8, intermediate_size=24, moe_intermediate_size=8, num_experts=6, num_experts_per_tok=3
    ),
    "olmoe": lambda: transformers.OlmoeConfig(
        **COMMON, intermediate_size=8, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True
    ),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **{**COMMON, "num_key_value_heads": 2},  # MLA: one key/value head per query head
        intermediate_size=24,
        moe_intermediate_size=8,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        q_lora_rank=8,
        kv_lora_rank=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=4,
        routed_scaling_factor=2.5,
    ),
    "switch_transformers": lambda: transformers.SwitchTransformersConfig(
        vocab_size=64,
        d_model=16,
        d_kv=8,
        d_ff=24,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        num_experts=4,
        expert_capacity=3,  # < seq_len * top1 / experts for some experts: drops happen
        encoder_sparse_step=1,
        decoder_sparse_step=2,
        relative_attention_num_buckets=8,
        router_jitter_noise=0.0,
    ),
}


def build(family: str, config=None):
    """The family's tiny model in float64 (``config``: another config of that family)."""
    torch.manual_seed(0)
    config = config or CONFIGS[family]()
    if family == "switch_transformers":
        model = transformers.SwitchTransformersForConditionalGeneration(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    model = model.double().eval()
    model.set_experts_implementation("eager")  # grouped_mm refuses float64
    with torch.no_grad():  # decisive routing and non-zero selection biases, so the test can fail
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.classifier.weight")) and p.dim() == 2 and p.shape[0] > 1:
                p.normal_(std=1.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(std=0.3)
    return model


def logits_and_embedding_grads(model, family: str):
    """Logits and the gradients of the input embeddings (encoder and decoder for Switch)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 10), generator=generator)
    embed = model.get_input_embeddings()
    inputs = {"inputs_embeds": embed(ids).detach().requires_grad_()}
    if family == "switch_transformers":
        inputs["decoder_inputs_embeds"] = embed(ids.flip(1)).detach().requires_grad_()
    logits = model(**inputs).logits
    upstream = torch.randn(logits.shape, generator=generator, dtype=logits.dtype)
    (logits * upstream).sum().backward()
    return logits.detach(), [t.grad for t in inputs.values()]


def assert_same(a, b):
    # transformers rounds router scores to float32 even in float64 models, flexmoe keeps float64:
    # differences at float32 rounding level (a wrong expert or gate is off by ~0.1).
    (logits_a, grads_a), (logits_b, grads_b) = a, b
    torch.testing.assert_close(logits_a, logits_b, rtol=1e-5, atol=2e-6)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_converted_model_matches_and_round_trips(family, tmp_path):
    model = build(family)
    expected = logits_and_embedding_grads(model, family)
    to_flexmoe(model, share_storage=family in ("mixtral", "deepseek_v3"))
    layers = flexmoe_layers(model)
    assert layers and not any(type(m).__name__ in SUPPORTED_BLOCKS for m in model.modules())
    assert not any(p.is_meta for p in model.parameters())
    converted = logits_and_embedding_grads(model, family)
    assert_same(converted, expected)
    if family == "switch_transformers":
        assert any(int(layer.stats.dropped) > 0 for layer in layers)  # the capacity limit is exercised

    from_flexmoe(model)
    assert not flexmoe_layers(model)
    assert_same(logits_and_embedding_grads(model, family), expected)
    model.save_pretrained(tmp_path)
    loader = transformers.SwitchTransformersForConditionalGeneration
    if family != "switch_transformers":
        loader = transformers.AutoModelForCausalLM
    reloaded = loader.from_pretrained(tmp_path, dtype=torch.float64).eval()
    reloaded.set_experts_implementation("eager")
    assert_same(logits_and_embedding_grads(reloaded, family), expected)


def test_fused_expert_weights_are_views_and_training_reaches_the_saved_model(tmp_path):
    model = build("mixtral")
    gate_up = model.model.layers[0].mlp.experts.gate_up_proj
    to_flexmoe(model, share_storage=True)
    layer = flexmoe_layers(model)[0]
    assert layer.experts.w1.untyped_storage().data_ptr() == gate_up.untyped_storage().data_ptr()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 64, (2, 8))
    out = model(input_ids=ids, labels=ids)
    (out.loss + flexmoe_aux_loss(model)).backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    from_flexmoe(model)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    reloaded.set_experts_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, rtol=1e-6, atol=1e-7)


def test_unsupported_blocks_are_named():
    class ToyMoE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match="ToyMoE"):
        to_flexmoe(torch.nn.Sequential(ToyMoE()))
    with pytest.raises(ValueError, match="no MoE block"):
        to_flexmoe(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="FlexMoEBlock"):
        from_flexmoe(torch.nn.Sequential(MoELayer(model_dim=4, num_experts=2, hidden_dim=4)))


def test_options_reach_the_layers_and_unknown_options_are_named():
    model = to_flexmoe(build("olmoe"), aux_loss="gshard", capacity_factor=1.5)
    assert all(
        layer.config.aux_loss == "gshard" and layer.config.capacity_factor == 1.5 for layer in flexmoe_layers(model)
    )
    with pytest.raises(TypeError, match="top_kk"):
        to_flexmoe(build("olmoe"), top_kk=2)


def test_group_and_parallel_reach_the_layers_and_bad_ones_are_named():
    parallel = ParallelConfig(parallel_degree=0, overlap_degree=2)
    model = to_flexmoe(build("olmoe"), group=SINGLE_PROCESS, parallel=parallel)
    assert all(layer.groups is None and layer.parallel == parallel for layer in flexmoe_layers(model))
    with pytest.raises(TypeError, match="group must be"):
        to_flexmoe(build("olmoe"), group="world")
    with pytest.raises(TypeError, match="parallel must be"):
        to_flexmoe(build("olmoe"), parallel={"parallel_degree": 0})


def test_example_converts_trains_prunes_and_saves():
    from flexmoe.examples import transformers_moe

    losses = transformers_moe.main(["--steps", "3", "--keep", "2"])
    assert losses["trained"] < losses["first"] and losses["reload_difference"] == 0.0
