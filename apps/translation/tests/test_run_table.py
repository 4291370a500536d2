"""scripts/run_table.py's row registry: budgets, teachers and run directories of the table's rows."""

import importlib.util
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
    teacher = run_table.run_config("token_token_half", 2, 7.0, tmp_path, None)
    student = run_table.run_config("distilled_dense_shared", 2, 7.0, tmp_path, None)
    assert teacher.train.max_minutes + student.train.max_minutes == pytest.approx(7.0)
    assert student.train.distill_from == teacher.train.run_dir == str(tmp_path / "token_token_half" / "seed2")
    assert student.train.seed == teacher.train.seed == 2
    assert teacher.model == run_table.run_config("token_token", 2, 7.0, tmp_path, None).model


def test_full_budget_rows_and_pruning_reuse(run_table, tmp_path):
    distilled = run_table.run_config("distilled_dense", 0, 7.0, tmp_path, None)
    assert distilled.train.max_minutes == 7.0
    assert distilled.train.distill_from == str(tmp_path / "token_token" / "seed0")
    pruned = run_table.run_config("pruned_token", 0, 7.0, tmp_path, None)
    assert pruned.train.run_dir == str(tmp_path / "token_token" / "seed0")  # prunes the token/token run


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
