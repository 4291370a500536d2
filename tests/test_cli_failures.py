"""``flexmoe infer`` and ``flexmoe extract`` on damaged or mistaken input: one line, exit 2, found
before any computing, and nothing of the user's overwritten."""

import json

import pytest
import torch
from safetensors.torch import save_file

from flexmoe.cli import main as cli_main
from tests.task_models import MODEL_DIM, tiny_task_model

MODEL = ["--model", "tests.task_models:tiny_task_model"]


def error_line(arguments: list[str], capsys) -> str:
    """The one stderr line of a command that must stop with status 2 (no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(arguments)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def never_served(monkeypatch):
    """Fails the test if the server computes anything: errors must come before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the inputs were computed before the error was found")

    monkeypatch.setattr("flexmoe.serving.TaskServer.serve", refuse)
    monkeypatch.setattr("flexmoe.serving.TaskServer.__call__", refuse)


def test_infer_missing_out_directory_is_found_before_serving(tmp_path, capsys, never_served):
    write_jsonl(tmp_path / "in.jsonl", [{"task_id": 1, "inputs": [[0.5] * MODEL_DIM] * 2}])
    out = tmp_path / "missing" / "out.jsonl"
    line = error_line(["infer", *MODEL, "--inputs", str(tmp_path / "in.jsonl"), "--out", str(out)], capsys)
    assert "--out" in line and "missing" in line and "does not exist" in line


def test_infer_refuses_to_overwrite_its_inputs(tmp_path, capsys, never_served):
    inputs = tmp_path / "in.jsonl"
    write_jsonl(inputs, [{"task_id": 1, "inputs": [[0.5] * MODEL_DIM] * 2}])
    before = inputs.read_text()
    line = error_line(["infer", *MODEL, "--inputs", str(inputs), "--out", str(inputs)], capsys)
    assert "--out" in line and "--inputs" in line
    assert inputs.read_text() == before


def test_infer_wrong_width_row_names_its_line_before_serving(tmp_path, capsys, never_served):
    rows = [{"task_id": t, "inputs": [[0.5] * MODEL_DIM] * 3} for t in (0, 1, 2)]
    rows.append({"task_id": 1, "inputs": [[0.5] * (MODEL_DIM - 1)] * 3})  # one narrower row, last
    write_jsonl(tmp_path / "in.jsonl", rows)
    line = error_line(
        ["infer", *MODEL, "--inputs", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o.jsonl")], capsys
    )
    assert "line 4" in line and "(3, 15)" in line and "(3, 16)" in line


def test_infer_inputs_of_the_wrong_width_for_the_model_name_the_file(tmp_path, capsys):
    inputs = tmp_path / "in.pt"
    torch.save(
        {"inputs": torch.randn(2, 3, MODEL_DIM + 1, dtype=torch.float64), "task_ids": torch.tensor([0, 1])}, inputs
    )
    line = error_line(["infer", *MODEL, "--inputs", str(inputs), "--out", str(tmp_path / "o.pt")], capsys)
    assert str(inputs) in line and "model_dim=16" in line
    assert not (tmp_path / "o.pt").exists()


def test_infer_malformed_json_line_names_the_line(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"task_id": 1, "inputs": [[0.5]]}\n{"task_id": 1, "inp\n')
    line = error_line(
        ["infer", *MODEL, "--inputs", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o.jsonl")], capsys
    )
    assert "line 2" in line and "JSON" in line


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_checkpoint_names_the_file(tmp_path, capsys, suffix):
    state = {k: v.contiguous() for k, v in tiny_task_model().state_dict().items()}
    whole = tmp_path / f"whole{suffix}"
    torch.save(state, whole) if suffix == ".pt" else save_file(state, str(whole))
    truncated = tmp_path / f"w{suffix}"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    line = error_line(
        ["extract", *MODEL, "--checkpoint", str(truncated), "--task", "1", "--out", str(tmp_path / "x")], capsys
    )
    assert str(truncated) in line and "truncated or corrupted" in line
    assert not (tmp_path / "x").exists()


def test_extract_refuses_a_directory_holding_other_files(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    line = error_line(["extract", *MODEL, "--task", "1", "--out", str(out)], capsys)
    assert "--out" in line and "notes.txt" in line
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # A previous extraction's directory is replaced (a rerun), and an out path that is a file is refused.
    assert cli_main(["extract", *MODEL, "--task", "1", "--out", str(tmp_path / "sub")]) == 0
    assert cli_main(["extract", *MODEL, "--task", "2", "--out", str(tmp_path / "sub")]) == 0
    capsys.readouterr()
    line = error_line(["extract", *MODEL, "--task", "1", "--out", str(out / "notes.txt")], capsys)
    assert "--out" in line and "not a directory" in line


@pytest.mark.parametrize(("device", "message"), [("gpu", "--device must be a torch device"), ("cuda:99", "--device")])
def test_unknown_device_is_named_before_the_model_is_built(tmp_path, capsys, device, message):
    line = error_line(["extract", *MODEL, "--task", "1", "--out", str(tmp_path / "x"), "--device", device], capsys)
    assert message in line and device in line


def test_truncated_pt_inputs_are_named(tmp_path, capsys, never_served):
    whole = tmp_path / "whole.pt"
    torch.save({"inputs": torch.randn(2, 3, MODEL_DIM, dtype=torch.float64), "task_ids": torch.tensor([0, 1])}, whole)
    inputs = tmp_path / "in.pt"
    inputs.write_bytes(whole.read_bytes()[:200])
    line = error_line(["infer", *MODEL, "--inputs", str(inputs), "--out", str(tmp_path / "o.pt")], capsys)
    assert str(inputs) in line and "truncated or corrupted" in line
