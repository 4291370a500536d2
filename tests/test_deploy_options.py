"""Task-level deployment (extract_task, prune_experts, TaskServer, from_flexmoe) under every
routing option of the layer: float64 outputs equal to the full model's, and a test per error."""

import pytest
import torch
from torch import nn

from flexmoe import MoELayer, expert_usage, extract_task, prune_experts
from flexmoe.parallel import ExpertLayout
from flexmoe.routing import group_limited_scores
from flexmoe.serving import TaskServer
from flexmoe.task import DenseFFN, load_subnetwork, save_subnetwork

EXACT = dict(rtol=1e-10, atol=1e-12)
NUM_TASKS = 4

OPTIONS = {
    "shared": dict(num_shared_experts=2, shared_hidden_dim=4),
    "shared_gate": dict(num_shared_experts=1, shared_expert_gate=True, gated=True, activation="silu"),
    "sigmoid": dict(score_function="sigmoid"),
    "sigmoid_unnormalized": dict(score_function="sigmoid", normalize_gate=False),
    "softmax_unnormalized": dict(normalize_gate=False),
    "route_scale": dict(route_scale=2.5),
    "groups": dict(num_groups=4, top_groups=1),
    "loss_free": dict(loss_free_balance=True),
    "cosine": dict(router="cosine", cosine_proj_dim=8),
    "fixed_capacity": dict(expert_capacity=64),  # not binding for these inputs
    "deepseek_v3": dict(
        score_function="sigmoid",
        route_scale=2.5,
        num_groups=4,
        top_groups=2,
        loss_free_balance=True,
        num_shared_experts=2,
        shared_hidden_dim=4,
        gated=True,
        bias=False,
        activation="silu",
        aux_loss=None,
    ),
    "qwen2_moe": dict(
        num_shared_experts=1, shared_expert_gate=True, normalize_gate=False, gated=True, bias=False, activation="silu"
    ),
}


class EncoderDecoder(nn.Module):
    """A token-routed layer (kept whole by extraction) then a task-routed one, residual."""

    def __init__(self, **options):
        super().__init__()
        common = dict(model_dim=16, num_experts=8, hidden_dim=8, top_k=2, **options)
        self.encoder = MoELayer(**common)
        self.decoder = MoELayer(**common, granularity="task", num_tasks=NUM_TASKS)

    def forward(self, x, task_ids, padding_mask=None):
        x = x + self.encoder(x, padding_mask=padding_mask)
        return x + self.decoder(x, task_ids=task_ids, padding_mask=padding_mask)


def randomise(model: nn.Module) -> nn.Module:
    """Non-zero biases and selection biases: zeros would hide one that is lost or misapplied."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".b" in name:
                p.normal_(std=0.1)
        for name, b in model.named_buffers():
            if name.endswith("load_balancer.bias"):
                b.normal_(std=0.5)
    return model


def build(name: str, seed: int = 0) -> EncoderDecoder:
    torch.manual_seed(seed)
    return randomise(EncoderDecoder(**OPTIONS[name]).double().eval())


def inputs(batch: int = 3, seq: int = 5):
    x = torch.randn(batch, seq, 16, dtype=torch.float64)
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    mask[-1, seq - 2 :] = True
    return x, mask


# --- extraction ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OPTIONS))
def test_extracted_model_equals_full_model_forward_and_backward(name):
    model = build(name)
    x, mask = inputs()
    for task in range(NUM_TASKS):
        sub = extract_task(model, task)
        assert isinstance(sub.decoder, DenseFFN) and isinstance(sub.encoder, MoELayer)
        ids = torch.full((x.shape[0],), task)
        x_full, x_sub = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_full, out_sub = model(x_full, ids, mask), sub(x_sub, ids, mask)
        torch.testing.assert_close(out_sub, out_full, **EXACT)
        upstream = torch.randn_like(out_full)
        (out_full * upstream).sum().backward()
        (out_sub * upstream).sum().backward()
        torch.testing.assert_close(x_sub.grad, x_full.grad, **EXACT)


def test_selection_bias_changes_the_choice_not_the_gates():
    model = build("loss_free")
    with torch.no_grad():
        model.decoder.load_balancer.bias.copy_(torch.tensor([0, 0, 0, 0, 0, 0, 10.0, 20.0]))
    x, _ = inputs()
    for task in range(NUM_TASKS):
        sub = extract_task(model, task)
        assert sub.decoder.experts == (7, 6)  # the bias decides the choice
        ids = torch.full((x.shape[0],), task)
        torch.testing.assert_close(sub(x, ids), model(x, ids), **EXACT)
    # Gates are the unbiased scores renormalised: not the 20:10 a biased gate would give.
    logits = model.decoder.router(model.decoder.task_embedding.weight[:1])
    gates = torch.softmax(logits, -1)[0, [7, 6]]
    expected_w2 = torch.cat([model.decoder.experts.w2[e] * g for e, g in zip((7, 6), gates / gates.sum())])
    torch.testing.assert_close(extract_task(model, 0).decoder.w2, expected_w2, **EXACT)


def test_group_limited_choice_stays_in_one_group():
    model = build("groups")
    plain_choices = torch.softmax(model.decoder.router(model.decoder.task_embedding.weight), -1).topk(2).indices
    differs = False
    for task in range(NUM_TASKS):
        chosen = extract_task(model, task).decoder.experts
        assert chosen[0] // 2 == chosen[1] // 2  # top_groups=1, groups of 2 experts
        differs |= set(chosen) != set(plain_choices[task].tolist())
    assert differs  # the group limit changed some task's choice: the test above can fail


def test_shared_experts_in_the_extracted_block_and_its_parameters():
    folded = extract_task(build("shared"), 1)
    report = folded.extraction_report
    assert folded.decoder.hidden_dim == 2 * 8 + 2 * 4 and folded.decoder.shared_experts is None
    assert "folded" in report.shared_experts["decoder"] and "shared" in str(report)
    gated = extract_task(build("shared_gate"), 1)
    assert gated.decoder.hidden_dim == 2 * 8 and gated.decoder.shared_experts.gate is not None
    assert "gated branch" in gated.extraction_report.shared_experts["decoder"]
    # 2 routed experts (w1, w3, b1, w2, b2) + the gated shared FFN (width 8) and its gate.
    ffn = 3 * 16 * 8 + 8 + 16
    assert sum(p.numel() for p in gated.decoder.parameters()) == 2 * ffn - 16 + ffn + 16


def test_report_names_capacity_limits():
    report = extract_task(build("fixed_capacity"), 0).extraction_report
    assert report.capacity_limited == {"decoder": "expert_capacity=64"} and "does not bind" in str(report)
    assert extract_task(build("shared"), 0).extraction_report.capacity_limited == {}


def test_gated_shared_subnetwork_saves_and_loads(tmp_path):
    model = build("qwen2_moe")
    sub = extract_task(model, 2)
    save_subnetwork(sub, tmp_path / "task2")
    loaded = load_subnetwork(tmp_path / "task2", lambda: EncoderDecoder(**OPTIONS["qwen2_moe"]).double())
    x, mask = inputs()
    ids = torch.full((x.shape[0],), 2)
    torch.testing.assert_close(loaded(x, ids, mask), model(x, ids, mask), **EXACT)


# --- pruning ---------------------------------------------------------------------------------


def token_layer(name: str, seed: int = 0, **overrides) -> MoELayer:
    torch.manual_seed(seed)
    options = {**OPTIONS[name], **overrides}
    return randomise(MoELayer(model_dim=16, num_experts=8, hidden_dim=8, top_k=2, **options).double().eval())


def tokens_whose_groups_are(layer: MoELayer, groups: set[int], count: int = 400) -> torch.Tensor:
    """Random tokens whose ``top_groups`` best groups (as the layer ranks them) are ``groups``."""
    x = torch.randn(count, 16, dtype=torch.float64)
    scores = torch.sigmoid(layer.router(x)) + layer.load_balancer.bias
    kept = group_limited_scores(scores, layer.config.num_groups, layer.config.top_groups).isfinite()
    in_groups = kept.view(count, layer.config.num_groups, -1).any(-1)
    wanted = torch.zeros(layer.config.num_groups, dtype=torch.bool)
    wanted[list(groups)] = True
    selected = x[(in_groups == wanted).all(-1)]
    assert len(selected) >= 5
    return selected


@pytest.mark.parametrize("group_routing", ["whole_groups", "disable"])
def test_pruning_a_deepseek_v3_layer_to_whole_groups(group_routing):
    layer = token_layer("deepseek_v3")
    keep = [1, 0, 4, 5]  # groups 0 and 2 (of 4 groups of 2)
    pruned = prune_experts(layer, keep, group_routing=group_routing)
    torch.testing.assert_close(pruned.load_balancer.bias, layer.load_balancer.bias[keep], **EXACT)
    torch.testing.assert_close(pruned.router.weight, layer.router.weight[keep], **EXACT)
    if group_routing == "whole_groups":
        assert (pruned.config.num_groups, pruned.config.top_groups) == (2, 2) and pruned.ungrouped_layers == []
    else:
        assert (pruned.config.num_groups, pruned.config.top_groups) == (1, None)
        assert pruned.ungrouped_layers == [""]  # the root module
    x = tokens_whose_groups_are(layer, {0, 2})
    torch.testing.assert_close(pruned(x), layer(x), **EXACT)


def test_pruning_keeps_group_limit_over_the_kept_groups():
    layer = token_layer("deepseek_v3", top_groups=1)
    with torch.no_grad():
        layer.load_balancer.bias.mul_(0.1)  # so that every group is some token's best
    pruned = prune_experts(layer, [2, 3, 6, 7, 4, 5])  # groups 1, 3, 2
    assert (pruned.config.num_groups, pruned.config.top_groups) == (3, 1)
    for group, kept_rows in ((1, [0, 1]), (3, [2, 3]), (2, [4, 5])):
        x = tokens_whose_groups_are(layer, {group})
        torch.testing.assert_close(pruned(x), layer(x), **EXACT)
        pruned.record_plan = True
        pruned(x)
        assert set(pruned.last_plan.expert_index.tolist()) == set(kept_rows)


def test_usage_chosen_whole_groups_prune_exactly():
    layer = token_layer("deepseek_v3")
    x = tokens_whose_groups_are(layer, {0, 2})
    usage = expert_usage(nn.Sequential(layer), [{"input": x}])
    keep = usage.top_groups(2, num_groups=4)["0"]
    assert sorted(keep) == [0, 1, 4, 5] and keep[0] // 2 == keep[1] // 2
    pruned = prune_experts(layer, keep)
    torch.testing.assert_close(pruned(x), layer(x), **EXACT)
    with pytest.raises(ValueError, match="must divide"):
        usage.top_groups(1, num_groups=3)


def test_pruning_errors_for_groups_and_shards():
    layer = token_layer("deepseek_v3")
    for keep in ([0, 2, 4, 6], [0, 4, 1, 5], [0, 1, 2]):
        with pytest.raises(ValueError, match="group_routing='disable'"):
            prune_experts(layer, keep)
    with pytest.raises(ValueError, match="group_routing must be one of"):
        prune_experts(layer, [0, 1], group_routing="drop")
    assert prune_experts(layer, [0, 2, 4, 6], group_routing="disable").config.num_groups == 1
    # Groups that limit nothing (top_groups = all groups) are dropped for any keep.
    assert prune_experts(token_layer("deepseek_v3", top_groups=4), [0, 2, 5]).config.num_groups == 1


def test_pruning_sigmoid_is_exact_and_softmax_renormalises():
    keep = [0, 1, 2, 3, 4]
    for name in ("sigmoid_unnormalized", "softmax_unnormalized"):
        layer = token_layer(name)
        x = torch.randn(300, 16, dtype=torch.float64)
        scores = torch.sigmoid(layer.router(x)) if name.startswith("sigmoid") else torch.softmax(layer.router(x), -1)
        x = x[(scores.topk(2).indices < len(keep)).all(-1)]  # tokens whose top-2 are kept
        assert len(x) >= 5
        pruned = prune_experts(layer, keep)
        if name.startswith("sigmoid"):  # independent scores: nothing changes
            torch.testing.assert_close(pruned(x), layer(x), **EXACT)
        else:  # the softmax over the kept experts divides every gate by the kept probability mass
            mass = torch.softmax(layer.router(x), -1)[:, keep].sum(-1, keepdim=True)
            torch.testing.assert_close(pruned(x) * mass, layer(x), **EXACT)
            assert not torch.allclose(pruned(x), layer(x))


# --- expert-parallel shards ------------------------------------------------------------------


def test_sharded_layers_are_refused_with_a_way_out():
    model = build("deepseek_v3")
    model.decoder.layout = ExpertLayout(num_experts=8, world_size=2, rank=1)  # as a rank of 2 holds it
    for action in (lambda: extract_task(model, 0), lambda: prune_experts(model, [0, 1]), lambda: TaskServer(model)):
        with pytest.raises(ValueError, match=r"'decoder' holds only rank 1's shard.*load_checkpoint"):
            action()


# --- serving ---------------------------------------------------------------------------------


def test_mixed_task_serving_with_shared_experts_and_sigmoid_routing():
    model = build("deepseek_v3")
    with torch.no_grad():
        model.decoder.shared_experts.gate = nn.Linear(16, 1, bias=False).double()  # gated as well
    x, mask = inputs(batch=7)
    task_ids = torch.tensor([3, 0, 3, 1, 2, 0, 3])
    server = TaskServer(model)
    torch.testing.assert_close(server(x, task_ids, padding_mask=mask), model(x, task_ids, mask), **EXACT)
    assert server.stats.misses == NUM_TASKS and server.reducible_layers == ["decoder"]


# --- transformers bridge ---------------------------------------------------------------------


def test_from_flexmoe_refuses_a_pruned_layer():
    pytest.importorskip("transformers")
    from flexmoe.integrations.transformers import flexmoe_layers, from_flexmoe, to_flexmoe
    from tests.test_transformers_integration import build as build_hf

    model = to_flexmoe(build_hf("deepseek_v3"))
    assert flexmoe_layers(model)[0].config.num_groups == 4
    with pytest.raises(ValueError, match="num_experts 8 -> 4"):
        from_flexmoe(prune_experts(model, [0, 1, 2, 3]))
    with pytest.raises(ValueError, match="num_groups 4 -> 1"):
        from_flexmoe(prune_experts(model, list(range(8)), group_routing="disable"))
    pruned = prune_experts(model, list(range(8)))  # everything kept: still the original structure
    from_flexmoe(pruned)
    from_flexmoe(model)  # the source of the pruned copies is untouched
