"""The translation model: shapes, masks, routing per stack, KV cache, extraction."""

import pytest
import torch
from translation_fixtures import one_thread

from flexmoe import MoELayer, expert_usage
from flexmoe.task import DenseFFN
from flexmoe_mt import ModelConfig, TranslationModel
from flexmoe_mt.batching import TaskTable
from flexmoe_mt.extraction import extract_direction

_one_thread = pytest.fixture(autouse=True)(one_thread)


def make_model(dtype=torch.float64, **options) -> TranslationModel:
    defaults = dict(
        vocab_size=40, model_dim=16, num_heads=2, ffn_dim=12, num_experts=4, num_target_langs=3,
        num_lang_pairs=5, dropout=0.0, max_len=24, encoder_layers=2, decoder_layers=2,
    )  # fmt: skip
    defaults.update(options)
    model = TranslationModel(ModelConfig(**defaults)).to(dtype).eval()
    with torch.no_grad():  # non-zero biases and distinct task embeddings: zeros would hide bugs
        for name, p in model.named_parameters():
            if name.endswith(("b1", "b2", "bias")):
                p.normal_(std=0.1)
    return model


def make_batch(batch=4, source_len=7, target_len=5, vocab=40):
    source = torch.randint(4, vocab, (batch, source_len))
    source[0, 4:] = 0  # padding
    source[1, 6:] = 0
    target_in = torch.randint(4, vocab, (batch, target_len))
    target_in[:, 0] = 2
    target_in[2, 3:] = 0
    return source, target_in, torch.tensor([0, 1, 2, 1])[:batch], torch.tensor([0, 3, 4, 1])[:batch]


def test_forward_backward_shapes_and_aux_loss():
    model = make_model(torch.float32).train()
    source, target_in, target_lang, lang_pair = make_batch()
    logits = model(source, target_in, target_lang, lang_pair)
    assert logits.shape == (4, 5, 40)
    aux = model.aux_loss()
    assert aux.item() > 0
    (logits.logsumexp(-1).mean() + aux).backward()
    for name, p in model.named_parameters():
        if "task_embedding" not in name:  # token/target default: only the decoder has tasks
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("encoder_routing", ["token", "sentence", "target", "langpair"])
def test_source_padding_does_not_leak(encoder_routing):
    model = make_model(encoder_routing=encoder_routing, decoder_routing="token")
    source, target_in, target_lang, lang_pair = make_batch()
    reference = model(source, target_in, target_lang, lang_pair)
    longer = torch.cat([source, torch.zeros(4, 3, dtype=torch.long)], dim=1)  # more padding
    torch.testing.assert_close(model(longer, target_in, target_lang, lang_pair), reference)
    changed = source.clone()
    changed[0, 5] = 9  # a different token at a padding position: ignored if marked padding...
    changed[0, 4:] = 0
    torch.testing.assert_close(model(changed, target_in, target_lang, lang_pair), reference)
    real_change = source.clone()
    real_change[0, 1] = (source[0, 1] + 1 - 4) % 36 + 4  # ...while a real token matters
    assert not torch.allclose(model(real_change, target_in, target_lang, lang_pair)[0], reference[0])


def test_decoder_is_causal():
    model = make_model()
    source, target_in, target_lang, lang_pair = make_batch()
    reference = model(source, target_in, target_lang, lang_pair)
    changed = target_in.clone()
    changed[:, -1] = 7
    out = model(source, changed, target_lang, lang_pair)
    torch.testing.assert_close(out[[0, 1, 3], :-1], reference[[0, 1, 3], :-1])


def test_dense_variant_has_no_moe():
    model = make_model(num_experts=0)
    assert not any(isinstance(m, MoELayer) for m in model.modules())
    source, target_in, target_lang, lang_pair = make_batch()
    assert model(source, target_in, target_lang, lang_pair).shape == (4, 5, 40)
    assert model.aux_loss().item() == 0
    moe = make_model()
    assert sum(isinstance(m, MoELayer) for m in moe.modules()) == 2  # every other FFN of 2 + 2 layers


@pytest.mark.parametrize("routing", ["target", "langpair"])
def test_task_routing_sends_a_task_to_the_same_experts(routing):
    model = make_model(encoder_routing=routing, decoder_routing=routing)
    source, target_in, target_lang, lang_pair = make_batch()
    task = target_lang if routing == "target" else lang_pair
    batch = dict(source=source, target_in=target_in, target_lang=target_lang, lang_pair=lang_pair)
    usage = expert_usage(model, [batch], by_task=True)
    assert len(usage.counts) == 2
    for counts in usage.counts.values():
        for t in task.unique().tolist():
            assert int((counts[t] > 0).sum()) == model.config.top_k  # every token of task t: same 2 experts
        assert counts.sum() > 0


@pytest.mark.parametrize("decoder_routing", ["token", "target", "sentence"])
def test_decoder_is_causal_for_every_routing(decoder_routing):
    """A position's logits never depend on later target tokens (sentence routing in the decoder
    goes by the source sentence, not by the mean of a target that decoding has not produced)."""
    model = make_model(decoder_routing=decoder_routing).eval()
    source, target_in, target_lang, lang_pair = make_batch()
    changed = target_in.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % model.config.vocab_size
    with torch.no_grad():
        memory = model.encode(source, target_lang, lang_pair)
        a = model.decode(target_in, memory, source, target_lang, lang_pair)
        b = model.decode(changed, memory, source, target_lang, lang_pair)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


@pytest.mark.parametrize(("decoder_routing", "use_cache"), [("token", True), ("target", True), ("sentence", True)])
def test_kv_cache_decoding_equals_recomputation(decoder_routing, use_cache):
    model = make_model(decoder_routing=decoder_routing)
    source, _, target_lang, lang_pair = make_batch()
    cached = model.generate(source, target_lang, lang_pair, max_new_tokens=10, use_cache=True)
    plain = model.generate(source, target_lang, lang_pair, max_new_tokens=10, use_cache=False)
    assert cached.shape[1] == 10 and torch.equal(cached, plain)
    # and the cached logits themselves match the full-prefix forward
    memory = model.encode(source, target_lang, lang_pair)
    prefix = torch.cat([torch.full((4, 1), 2), plain[:, :4]], dim=1)
    full = model.decode(prefix, memory, source, target_lang, lang_pair)
    if use_cache:
        cache = [{} for _ in model.decoder]
        steps = [
            model.decode(prefix[:, i : i + 1], memory, source, target_lang, lang_pair, cache, offset=i)
            for i in range(prefix.shape[1])
        ]
        torch.testing.assert_close(torch.cat(steps, dim=1), full)


TASKS = TaskTable(("de", "en", "fr"), (("de", "en"), ("en", "de"), ("en", "en"), ("en", "fr"), ("fr", "en")))


@pytest.mark.parametrize(("encoder_routing", "decoder_routing"), [("token", "target"), ("langpair", "langpair")])
def test_extracted_subnetwork_matches_the_full_model(encoder_routing, decoder_routing):
    model = make_model(encoder_routing=encoder_routing, decoder_routing=decoder_routing)
    extracted = extract_direction(model, TASKS, "fr", "en")
    assert any(isinstance(m, DenseFFN) for m in extracted.decoder.modules())
    reduced = sum(p.numel() for p in extracted.parameters())
    assert reduced < sum(p.numel() for p in model.parameters())
    source, target_in, _, _ = make_batch()
    target_lang, lang_pair = torch.full((4,), 2), torch.full((4,), 3)  # fr, en-fr
    torch.testing.assert_close(
        extracted(source, target_in, target_lang, lang_pair), model(source, target_in, target_lang, lang_pair)
    )
    assert torch.equal(
        extracted.generate(source, target_lang, lang_pair, 8), model.generate(source, target_lang, lang_pair, 8)
    )
    with pytest.raises(ValueError, match="serves task"):
        extracted(source, target_in, torch.full((4,), 1), torch.full((4,), 1))


def test_extraction_needs_task_routing():
    with pytest.raises(ValueError, match="no task-routed"):
        extract_direction(make_model(decoder_routing="token"), TASKS, "fr")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(encoder_routing="task"), "encoder_routing must be one of"),
        (dict(num_experts=1), "num_experts"),
        (dict(top_k=9), "top_k"),
        (dict(model_dim=15), "divisible"),
        (dict(dropout=1.5), "dropout"),
    ],
)
def test_model_config_errors(options, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(vocab_size=40, **options)


@pytest.mark.parametrize("decoder_routing", ["target", "sentence"])
def test_beam_search(decoder_routing):
    model = make_model(decoder_routing=decoder_routing)
    with torch.no_grad():  # larger weights: peaked, prefix-dependent predictions, so beams reorder
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(std=0.5)
    source, _, target_lang, lang_pair = make_batch()
    greedy = model.generate(source, target_lang, lang_pair, max_new_tokens=6)
    assert torch.equal(model.beam_search(source, target_lang, lang_pair, beam_size=1, max_new_tokens=6), greedy)
    beams = model.beam_search(source, target_lang, lang_pair, beam_size=4, max_new_tokens=12)
    assert beams.shape[0] == 4 and beams.shape[1] <= 12

    uncached = model.beam_search(source, target_lang, lang_pair, beam_size=4, max_new_tokens=12, use_cache=False)
    assert torch.equal(beams, uncached)  # the cache follows each step's reordering of the beams
    with pytest.raises(ValueError, match="beam_size"):
        model.beam_search(source, target_lang, lang_pair, beam_size=0)


def test_clip_grad_norm_single_process_is_torchs():
    from flexmoe import MoELayer
    from flexmoe.parallel import clip_grad_norm_

    torch.manual_seed(0)
    models = [
        torch.nn.Sequential(torch.nn.Linear(8, 8), MoELayer(model_dim=8, num_experts=4, hidden_dim=16))
        for _ in range(2)
    ]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(10, 8)
    for model in models:
        (model(x).square().sum() * 100).backward()
    norm = clip_grad_norm_(models[0], 0.5)
    expected = torch.nn.utils.clip_grad_norm_(models[1].parameters(), 0.5)
    torch.testing.assert_close(norm, expected, rtol=1e-5, atol=0)
    assert norm > 0.5  # it clipped
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
