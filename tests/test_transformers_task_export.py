"""Task routing on converted transformers models and the per-task dense export: task ids through
forward and generate, task embeddings from the mean router input, and exported dense models whose
logits (float64) and greedy tokens equal the task-routed model's, loadable without flexmoe."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flexmoe.integrations.export import export_task_model  # noqa: E402
from flexmoe.integrations.task_routing import (  # noqa: E402
    initial_task_embeddings,
    layer_granularities,
    route_tasks,
    set_task_embeddings,
    task_routed_layers,
)
from flexmoe.integrations.transformers import flexmoe_layers, from_flexmoe, to_flexmoe  # noqa: E402
from flexmoe.task.extract import task_gates  # noqa: E402

COMMON = dict(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1)
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(
        **COMMON, intermediate_size=12, num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5
    ),
    # Layer 0 is a dense MLP of width 2 x 8: it folds with the task blocks into one dense Qwen3.
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **COMMON,
        head_dim=8,
        intermediate_size=16,
        moe_intermediate_size=8,
        num_experts=6,
        num_experts_per_tok=2,
        mlp_only_layers=[0],
    ),
}
NUM_TASKS = 3


def build(family: str, config=None):
    """A tiny float64 model of the family with decisive routers (std 1 instead of 0.02)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config or CONFIGS[family]()).double().eval()
    model.set_experts_implementation("eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate.weight") and param.shape[0] > 1:
                param.normal_(std=1.0)
    return model


def task_model(family: str, granularity="task"):
    """The family's model converted to task routing, task embeddings random (distinct tasks)."""
    model = to_flexmoe(build(family), granularity=granularity, num_tasks=NUM_TASKS)
    with torch.no_grad():
        for layer in task_routed_layers(model):
            layer.task_embedding.weight.normal_(std=2.0)
    return model


def token_ids(rows: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (rows, seq), generator=torch.Generator().manual_seed(seed))


def logits_and_input_grad(model, ids: torch.Tensor):
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=embeds).logits
    upstream = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=logits.dtype)
    (logits * upstream).sum().backward()
    return logits.detach(), embeds.grad


def test_layer_granularities_per_block_and_bad_ones_named():
    assert layer_granularities("task", 2) == ["task", "task"]
    assert layer_granularities(lambda i: "task" if i >= 1 else "token", 3) == ["token", "task", "task"]
    assert layer_granularities(["token", "task"], 2) == ["token", "task"]
    with pytest.raises(ValueError, match="one entry per MoE block \\(3\\)"):
        layer_granularities(["task"], 3)
    with pytest.raises(ValueError, match="'tsk'"):
        layer_granularities("tsk", 1)
    model = to_flexmoe(build("mixtral"), granularity=lambda i: "task" if i >= 1 else "token", num_tasks=2)
    assert [layer.config.granularity for layer in flexmoe_layers(model)] == ["token", "task", "task"]
    with pytest.raises(ValueError, match="task_embedding_dim"):
        to_flexmoe(build("mixtral"), granularity="task", num_tasks=2, task_embedding_dim=4)


def test_route_tasks_gives_each_row_its_task_through_forward():
    model = task_model("mixtral")
    ids = token_ids(rows=3)
    with torch.no_grad():
        with route_tasks(model, [2, 0, 1]):
            mixed = model(ids).logits
        for row, task in enumerate([2, 0, 1]):
            with route_tasks(model, task):
                alone = model(ids[row : row + 1]).logits
            torch.testing.assert_close(mixed[row : row + 1], alone, rtol=0, atol=1e-12)
        with route_tasks(model, 0):
            other = model(ids).logits
    assert (mixed[0] - other[0]).abs().max() > 1e-3  # the tasks route differently: the test can fail
    assert all(not layer._forward_pre_hooks for layer in task_routed_layers(model))  # hooks removed
    with pytest.raises(ValueError, match="task_ids"):  # no hook: the layers ask for task ids
        model(ids)


def test_route_tasks_bad_input_is_named():
    model = task_model("mixtral")
    with pytest.raises(ValueError, match=r"0\.\.num_tasks-1 = 0\.\.2"):
        with route_tasks(model, [0, 3]):
            pass
    with pytest.raises(ValueError, match="2 task ids for a batch of 3 rows"):
        with route_tasks(model, [0, 1]), torch.no_grad():
            model(token_ids(rows=3))
    with pytest.raises(TypeError, match="integer"):
        with route_tasks(model, torch.tensor([0.5])):
            pass
    with pytest.raises(ValueError, match="no task-routed MoELayer"):
        with route_tasks(to_flexmoe(build("mixtral")), 0):
            pass


@pytest.mark.parametrize("family", list(CONFIGS))
def test_exported_dense_model_equals_the_task_routed_model(family):
    model = task_model(family)
    ids = token_ids()
    for task in range(NUM_TASKS):
        dense = export_task_model(model, task)
        assert type(dense).__name__ == {"mixtral": "MistralForCausalLM", "qwen3_moe": "Qwen3ForCausalLM"}[family]
        top_k = model.config.num_experts_per_tok
        expert_width = getattr(model.config, "moe_intermediate_size", model.config.intermediate_size)
        assert dense.config.intermediate_size == top_k * expert_width
        assert not any(hasattr(dense.config, name) for name in ("num_local_experts", "num_experts"))
        with route_tasks(model, task):
            expected_logits, expected_grad = logits_and_input_grad(model, ids)
        logits, grad = logits_and_input_grad(dense, ids)
        torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)
        model.zero_grad()
    with route_tasks(model, 0), torch.no_grad():
        other_task = model(ids).logits
    assert (other_task - logits).abs().max() > 1e-3  # last export was task 2: tasks differ


@pytest.mark.parametrize("family", list(CONFIGS))
def test_greedy_generate_gives_the_same_tokens(family):
    model = task_model(family)
    prompts = token_ids(rows=2, seq=5, seed=3)
    tasks = [1, 2]
    options = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad(), route_tasks(model, tasks):
        routed = model.generate(prompts, **options)
    with torch.no_grad(), route_tasks(model, tasks):  # generate repeats rows: each keeps its task
        repeated = model.generate(prompts, num_return_sequences=2, num_beams=2, **options)
    for row, task in enumerate(tasks):
        dense = export_task_model(model, task)
        with torch.no_grad():
            exported = dense.generate(prompts[row : row + 1], **options)
            beams = dense.generate(prompts[row : row + 1], num_return_sequences=2, num_beams=2, **options)
        assert torch.equal(exported, routed[row : row + 1])
        assert torch.equal(beams, repeated[2 * row : 2 * row + 2])


def test_saved_dense_checkpoint_loads_without_flexmoe(tmp_path):
    model = task_model("mixtral")
    dense = export_task_model(model, 1)
    dense.save_pretrained(tmp_path / "task1")
    config = json.loads((tmp_path / "task1" / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"] and config["model_type"] == "mistral"
    ids = token_ids()
    torch.save(ids, tmp_path / "ids.pt")
    script = f"""
import sys
from pathlib import Path
sys.modules["flexmoe"] = None  # import flexmoe raises ImportError
import torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / "task1")!r}, dtype=torch.float64).eval()
assert type(model).__name__ == "MistralForCausalLM"
with torch.no_grad():
    torch.save(model(torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(tmp_path / "logits.pt")!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    with route_tasks(model, 1), torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=1e-12)


def test_what_does_not_fold_is_named():
    mixed = task_model("mixtral", granularity=["token", "task", "task"])
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp is token-routed"):
        export_task_model(mixed, 0)
    qwen2 = transformers.Qwen2MoeConfig(
        **COMMON, intermediate_size=16, moe_intermediate_size=8, shared_expert_intermediate_size=8, num_experts=4
    )
    with pytest.raises(ValueError, match="shared_expert_gate"):
        export_task_model(to_flexmoe(build("qwen2_moe", qwen2), granularity="task", num_tasks=2), 0)
    olmoe = transformers.OlmoeConfig(**COMMON, intermediate_size=8, num_experts=4, num_experts_per_tok=2)
    with pytest.raises(ValueError, match="post-norm"):
        export_task_model(to_flexmoe(build("olmoe", olmoe), granularity="task", num_tasks=2), 0)
    wider_dense_layer = CONFIGS["qwen3_moe"]()
    wider_dense_layer.intermediate_size = 24  # layer 0's MLP: 24 wide, the folded blocks 2 x 8
    qwen3 = to_flexmoe(build("qwen3_moe", wider_dense_layer), granularity="task", num_tasks=2)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp: 24"):
        export_task_model(qwen3, 0)
    with pytest.raises(ValueError, match="no FlexMoEBlock"):
        export_task_model(build("mixtral"), 0)
    with pytest.raises(ValueError, match="task-routed, the original MixtralSparseMoeBlock routes by token"):
        from_flexmoe(mixed)


def test_task_embeddings_from_the_token_router():
    model = build("mixtral")
    ids, mask = token_ids(rows=4, seq=6), torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:] = 0  # padding: left out of the means
    tasks = torch.tensor([0, 1, 0, 1])
    batches = [dict(input_ids=ids, attention_mask=mask, task_ids=tasks)]
    block = model.model.layers[2].mlp
    seen = []
    handle = block.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    means = initial_task_embeddings(model, batches, num_tasks=2, method="mean_input")
    by_scores = initial_task_embeddings(model, batches, num_tasks=2)
    handle.remove()
    hidden = seen[0]
    expected_means, expected_scores = [], []
    for task in range(2):
        tokens = hidden[tasks == task][mask[tasks == task].bool()]  # [task tokens, hidden]
        expected_means.append(tokens.mean(0))
        expected_scores.append(torch.softmax(tokens @ block.gate.weight.T, dim=-1).mean(0))
    torch.testing.assert_close(means[2], torch.stack(expected_means), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"no token of task\(s\) \[2\]"):
        initial_task_embeddings(model, [dict(input_ids=ids, task_ids=tasks)], num_tasks=3)
    with pytest.raises(ValueError, match="mean_scores"):
        initial_task_embeddings(model, batches, num_tasks=2, method="mean")

    with torch.no_grad():
        mean_logits = means[2] @ block.gate.weight.T  # the pretrained router on the mean input
    for embeddings, check in ((means, "mean_input"), (by_scores, "mean_scores")):
        converted = to_flexmoe(build("mixtral"), granularity="task", num_tasks=2)
        set_task_embeddings(converted, embeddings)
        layer = flexmoe_layers(converted)[2]
        for task in range(2):
            gates, experts = task_gates(layer, task)
            if check == "mean_input":
                assert set(experts.tolist()) == set(mean_logits[task].topk(2).indices.tolist())
            else:  # the experts the task's tokens use most, gates in proportion to their mean scores
                usage = expected_scores[task]
                assert experts.tolist() == usage.topk(2).indices.tolist()
                torch.testing.assert_close(gates, usage[experts] / usage[experts].sum(), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match=r"one per MoE block \(3\)"):
        set_task_embeddings(converted, means[:2])


def test_task_embeddings_learn_under_route_tasks():
    model = task_model("mixtral")
    model.train()
    ids = token_ids()
    with route_tasks(model, [0, 1]):
        model(input_ids=ids, labels=ids).loss.backward()
    grads = [layer.task_embedding.weight.grad for layer in task_routed_layers(model)]
    assert all(g is not None and g[:2].abs().sum() > 0 and g[2].abs().sum() == 0 for g in grads)


def test_benchmark_quick_runs():
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    command = [sys.executable, str(root / "benchmarks" / "task_transformers.py"), "--quick"]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=120, check=True)
    for row in (
        "token-routed (trained)",
        "task-routed, converted (mean_scores)",
        "exported dense (MistralForCausalLM)",
    ):
        assert row in done.stdout
    # The exported models (saved and reloaded) compute the fine-tuned task-routed model's losses.
    difference = float(done.stdout.split("largest relative loss difference ")[1].split()[0])
    assert difference < 1e-5
    assert sum(" peak " in line and " at batch " in line for line in done.stdout.splitlines()) == 4
