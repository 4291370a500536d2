"""scripts/run_table.py's row registry: budgets, teachers and run directories of the table's rows."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "run_table.py"


@pytest.fixture(scope="module")
def run_table():
    spec = importlib.util.spec_from_file_location("run_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_table"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_shared_budget_distillation_splits_one_budget(run_table, tmp_path):
    teacher = run_table.run_config("token_token_half", 2, 3000, tmp_path, None)
    student = run_table.run_config("distilled_dense_shared", 2, 3000, tmp_path, None)
    assert teacher.train.max_steps + student.train.max_steps == 3000
    assert student.train.distill_from == teacher.train.run_dir == str(tmp_path / "token_token_half" / "seed2")
    assert student.train.seed == teacher.train.seed == 2
    assert teacher.model == run_table.run_config("token_token", 2, 3000, tmp_path, None).model


def test_full_budget_rows_and_pruning_reuse(run_table, tmp_path):
    distilled = run_table.run_config("distilled_dense", 0, 3000, tmp_path, None)
    assert distilled.train.max_steps == 3000
    assert distilled.train.distill_from == str(tmp_path / "token_token" / "seed0")
    for row in ("pruned_token", "pruned_token_keep4"):
        pruned = run_table.run_config(row, 0, 3000, tmp_path, None)
        assert pruned.train.run_dir == str(tmp_path / "token_token" / "seed0")  # prunes the token/token run
    assert {run_table.ROWS[r].keep for r in ("pruned_token", "pruned_token_keep4")} == {2, 4}


def test_every_table_config_trains_the_same_steps_with_a_time_cap_only_as_a_safety_net(run_table):
    configs = {p.stem: run_table.table_config(p.stem) for p in (run_table.APP / "configs" / "table").glob("*.toml")}
    assert {c.train.max_steps for c in configs.values()} == {run_table.default_steps()}
    assert run_table.default_steps() > 0
    for name, config in configs.items():
        assert config.train.max_minutes > 0, name  # a cap against a stuck run
        assert config.train.eval_every <= run_table.default_steps() // 8, name  # enough points for a curve


def test_rows_come_after_their_teachers_and_sources(run_table):
    order = list(run_table.ROWS)
    for position, (row, spec) in enumerate(run_table.ROWS.items()):
        for needed in (spec.teacher, spec.source):
            assert needed is None or order.index(needed) < position, row
        assert (run_table.APP / "configs" / "table" / f"{spec.config}.toml").is_file(), row


def test_results_page_starts_with_the_generated_table():
    from flexmoe_mt.results import RESULTS, render

    repo = Path(__file__).resolve().parents[3]
    page = (repo / "docs" / "results.md").read_text()
    assert page.startswith(render(repo / RESULTS).replace(str(repo / RESULTS), str(RESULTS)) + "\n")


def test_usage_counts_every_target_language_when_the_corpus_starts_with_one_direction(run_table, tmp_path):
    """The first training pairs of a corpus are one direction pair; usage counted there leaves
    the other languages' rows empty and pruning would keep arbitrary experts for them."""
    from translation_fixtures import write_run_file

    from flexmoe_mt.data.corpus import Pair
    from flexmoe_mt.runconfig import load_run_config
    from flexmoe_mt.train import load_corpus, load_trained, train

    config = write_run_file(tmp_path, model={"encoder_routing": "token", "decoder_routing": "token"},
                            train={"max_steps": 1, "eval_every": 1})  # fmt: skip
    run = load_run_config(config)
    corpus = load_corpus(run.data)
    train(run, corpus, progress=False)
    trained = load_trained(run.train.run_dir)
    en_de = [p for p in corpus["train"] if (p.source_lang, p.target_lang) == ("en", "de")]
    others = [p for p in corpus["train"] if p.target_lang != "de"]
    first_4000_one_direction = [en_de[i % len(en_de)] for i in range(4000)] + others
    assert all(isinstance(p, Pair) for p in first_4000_one_direction)

    usage = run_table.language_usage(trained, first_4000_one_direction, per_direction=5)
    for language in trained.tasks.target_languages:
        task = trained.tasks.target_id(language)
        for layer, counts in usage.counts.items():
            assert task < len(counts) and counts[task].sum() > 0, (language, layer)
    mass = run_table.kept_routing_mass(trained, usage, keep=2)
    assert set(mass) == set(trained.tasks.target_languages)
    for share in mass.values():
        assert 0 < share["min"] <= share["mean"] <= 1


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plateau_is_the_first_step_the_curve_stops_rising_and_none_while_it_rises(tmp_path, capsys):
    plateau = load_script("plateau")
    rising = [(s, 80 * (1 - math.exp(-s / 1500))) for s in range(250, 3001, 250)]
    assert plateau.plateau_step(rising, window=1000, min_gain=1.0) is None
    flat = [(s, min(80.0, s / 25)) for s in range(250, 5001, 250)]  # 80 from step 2000
    assert plateau.plateau_step(flat, window=1000, min_gain=1.0) == 2250  # smoothed: 80 from 2250
    # Noise of +-1.5 chrF on a curve still rising 1.5 per 1000 steps is not a plateau.
    noisy = [(s, 60 + 1.5 * s / 1000 + (1.5 if (s // 250) % 2 else -1.5)) for s in range(250, 8001, 250)]
    assert plateau.plateau_step(noisy, window=1000, min_gain=1.0) is None
    for name, curve in (("dense", flat), ("token", flat)):
        (tmp_path / name).mkdir()
        lines = [{"step": s, "split": "valid", "loss": 1.0, "chrf": c} for s, c in curve]
        lines.append({"step": 5000, "split": "train", "loss": 1.0, "elapsed_s": 500.0})
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    plateau.main([str(tmp_path / "dense"), str(tmp_path / "token")])
    out = capsys.readouterr().out
    assert "flat from step 2250; 0.100 CPU s per step" in out and "--steps 2500" in out


def test_curve_runs_train_the_table_model(run_table):
    from flexmoe_mt.runconfig import load_run_config

    for row in ("dense", "token_token"):
        curve = load_run_config(run_table.APP / "configs" / "curves" / f"{row}.toml")
        table = run_table.table_config(row)
        assert curve.model == table.model and curve.data == table.data, row
        assert curve.train.max_steps >= table.train.max_steps and curve.train.eval_every == table.train.eval_every
