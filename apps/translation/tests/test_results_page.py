"""flexmoe_mt.results on synthetic step-budget runs: claims with verdicts, the distillation
measure, the kept routing mass, equal-FLOPs cells and the learning-curve figure."""

import json

from flexmoe_mt.plots import plot_learning_curves
from flexmoe_mt.results import curves, load_results, render

CHRF = {  # per seed: a clear ordering with small spread
    "dense": [60.0, 60.5, 59.5],
    "token_token": [66.0, 66.4, 65.6],
    "token_target": [70.0, 70.3, 69.7],
    "pruned_token": [40.0, 41.0, 39.0],
    "pruned_token_keep4": [55.0, 56.0, 54.5],
    "distilled_dense": [62.0, 62.2, 61.9],
    "token_token_half": [64.0, 64.4, 63.7],
    "distilled_dense_shared": [61.3, 61.5, 61.0],
}
ACTIVE = {"dense": 1000, "pruned_token": 1100, "pruned_token_keep4": 1100, "distilled_dense": 1000,
          "distilled_dense_shared": 1000}  # fmt: skip


def write_runs(root):
    for row, values in CHRF.items():
        for seed, value in enumerate(values):
            budget = 0.5 if "half" in row or "shared" in row else 1.0
            result = {
                "row": row, "seed": seed, "step_budget": 400, "budget": budget,
                "machine": "test", "threads": 1, "steps": 400, "max_steps": 400, "language": "fr",
                "packages": {"babel": "2.18.0", "num2words": "0.5.14"},
                "scores": {"mean_chrf": value, "mean_bleu": value - 5, "chrf": {"en-fr": value},
                           "bleu_tokenizer": {"en-fr": "13a"}},
                "parameters": 2000, "active_parameters": ACTIVE.get(row, 1200),
                "peak_tokens_per_s": 1000.0 + seed, "throughput": {"peak_batch": 64, "peak_tokens_per_s": 1000.0},
                "curve": [{"step": s, "chrf": value * s / 400, "loss": 1.0} for s in (100, 200, 300, 400)],
            }  # fmt: skip
            if row == "token_target":
                result["extracted"] = {"identical": 10, "sentences": 10, "peak_tokens_per_s": 1500.0 + seed,
                                       "parent_peak_tokens_per_s": 1000.0, "parameters": 1500,
                                       "throughput": {"peak_batch": 128}, "scores": dict(result["scores"])}  # fmt: skip
            if row.startswith("pruned"):
                result["usage_sample"] = "200 training pairs per direction"
                result["kept_routing_mass"] = {"fr": {"mean": 0.5, "min": 0.4}, "en": {"mean": 0.7, "min": 0.6}}
            path = root / row / f"seed{seed}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result))


def test_page_states_each_claim_with_its_verdict(tmp_path):
    write_runs(tmp_path)
    page = render(tmp_path)
    assert "†" not in page and "‡" not in page and "to be retrained" not in page
    assert "| token / target - token / token | +4.0 [" in page
    assert "token / target - token / token: holds" in page
    assert "pruned to 2 - token / token: holds" in page  # the paired loss is significant
    assert "extracted token / target - its parent: holds (identical)" in page
    # distillation: (61.27 - 60) / (64.03 - 60) ~ 0.31 at equal total compute
    assert "half budget each, equal total compute (teacher and student half the steps each): 0.31 [" in page
    assert "| fr | 50.0 ± 0.0% (40%) | 50.0 ± 0.0% (40%) |" in page
    assert "| token / token | x1.20 | 66.0 ± 0.4 |" in page  # 6 x 1200 vs 6 x 1000 active parameters
    assert "images/results_curves.png" in page
    assert "at batch 64" in page


def test_learning_curve_figure_is_drawn(tmp_path):
    write_runs(tmp_path / "runs")
    drawn = curves(load_results(tmp_path / "runs"))
    assert "dense" in drawn and not any("pruned" in label for label in drawn)
    plot_learning_curves(drawn, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_provenance_names_the_corpus_packages_and_tells_corpora_apart():
    from types import SimpleNamespace

    from flexmoe_mt.data.corpus import Pair
    from flexmoe_mt.results import corpus_digest, package_versions

    versions = package_versions()
    assert {"babel", "num2words"} <= set(versions)
    one = SimpleNamespace(splits={"train": [Pair("one", "un", "en", "fr")], "test": []})
    other = SimpleNamespace(splits={"train": [Pair("one", "une", "en", "fr")], "test": []})
    assert corpus_digest(one) == corpus_digest(one) != corpus_digest(other)
