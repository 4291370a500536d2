"""``flexmoe extract`` and ``flexmoe infer`` on the tiny model of tests/task_models.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flexmoe.cli import main as cli_main
from flexmoe.serving import Request, TaskServer
from flexmoe.task import load_subnetwork
from tests.task_models import MODEL_DIM, tiny_task_model

ROOT = Path(__file__).resolve().parent.parent
MODEL = ["--model", "tests.task_models:tiny_task_model", "--model-kwargs", '{"seed": 1}']
EXACT = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture
def trained(tmp_path):
    """A model with other weights than the factory's default, saved as .pt and .safetensors."""
    model = tiny_task_model(seed=5)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "w.pt")
    save_file(state, str(tmp_path / "w.safetensors"))
    return model


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_extract_writes_the_task_subnetwork(tmp_path, trained, suffix, capsys):
    cli_main(
        ["extract", *MODEL, "--checkpoint", str(tmp_path / f"w{suffix}"), "--task", "2", "--out", str(tmp_path / "t2")]
    )
    assert "reduced    decoder.0" in capsys.readouterr().out
    sub = load_subnetwork(tmp_path / "t2", tiny_task_model)
    x = torch.randn(3, 4, MODEL_DIM, dtype=torch.float64)
    ids = torch.full((3,), 2)
    torch.testing.assert_close(sub(x, ids), trained(x, ids), **EXACT)


def test_infer_pt_mixed_tasks_with_keyword_inputs(tmp_path, trained):
    x = torch.randn(7, 5, MODEL_DIM, dtype=torch.float64)
    task_ids = torch.tensor([1, 3, 1, 0, 4, 3, 1])
    mask = torch.zeros(7, 5, dtype=torch.bool)
    mask[::2, 3:] = True
    torch.save({"inputs": x, "task_ids": task_ids, "padding_mask": mask}, tmp_path / "in.pt")
    checkpoint = ["--checkpoint", str(tmp_path / "w.pt")]
    cli_main(["infer", *MODEL, *checkpoint, "--inputs", str(tmp_path / "in.pt"), "--out", str(tmp_path / "out.pt")])
    result = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(result["outputs"], trained(x, task_ids, padding_mask=mask), **EXACT)
    assert result["task_ids"].tolist() == task_ids.tolist()


def test_infer_pt_serves_the_batch_whole(tmp_path, trained, monkeypatch, capsys):
    """A .pt batch goes through TaskServer.__call__ (one model call per task, no per-row requests)
    and gives exactly what the per-row request path gave; .jsonl output of a .pt batch too."""
    x = torch.randn(6, 4, MODEL_DIM, dtype=torch.float64)
    task_ids = torch.tensor([2, 0, 2, 2, 1, 0])
    mask = torch.zeros(6, 4, dtype=torch.bool)
    mask[1::2, 2:] = True
    torch.save({"inputs": x, "task_ids": task_ids, "padding_mask": mask}, tmp_path / "in.pt")
    per_row = [Request(int(t), x[i : i + 1], {"padding_mask": mask[i : i + 1]}) for i, t in enumerate(task_ids)]
    expected = torch.cat(TaskServer(trained).serve(per_row))

    def no_per_row_requests(self, requests):
        raise AssertionError("a .pt batch must not be split into requests")

    monkeypatch.setattr(TaskServer, "serve", no_per_row_requests)
    checkpoint = ["--checkpoint", str(tmp_path / "w.pt")]
    for out in ("out.pt", "out.jsonl"):
        cli_main(["infer", *MODEL, *checkpoint, "--inputs", str(tmp_path / "in.pt"), "--out", str(tmp_path / out)])
        # One model call per distinct task, all six rows served.
        assert "'requests': 6" in (err := capsys.readouterr().err) and "'groups': 3" in err and "'rows': 6" in err
    assert torch.equal(torch.load(tmp_path / "out.pt")["outputs"], expected)
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in records] == task_ids.tolist()
    assert torch.equal(torch.tensor([r["outputs"] for r in records], dtype=torch.float64), expected)


def test_infer_jsonl_in_a_subprocess(tmp_path, trained):
    lengths, tasks = [3, 5, 3, 2], [4, 0, 4, 1]
    xs = [torch.randn(n, MODEL_DIM, dtype=torch.float64) for n in lengths]
    lines = [json.dumps({"task_id": t, "inputs": x.tolist()}) for t, x in zip(tasks, xs)]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    command = [sys.executable, "-m", "flexmoe.cli", "infer", *MODEL, "--checkpoint", str(tmp_path / "w.safetensors")]
    command += ["--inputs", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl"), "--max-subnetworks", "1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True)
    assert "'misses': 3" in done.stderr and "'evictions': 2" in done.stderr
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in records] == tasks
    for record, x, task in zip(records, xs, tasks):
        expected = trained(x[None], torch.tensor([task]))[0]
        torch.testing.assert_close(torch.tensor(record["outputs"], dtype=torch.float64), expected, **EXACT)


def test_infer_model_without_task_layers_runs_whole(tmp_path, capsys):
    x = torch.randn(2, 3, MODEL_DIM, dtype=torch.float64)
    torch.save({"inputs": x, "task_ids": torch.tensor([0, 9])}, tmp_path / "in.pt")
    model = ["--model", "tests.task_models:tiny_task_model", "--model-kwargs", '{"task_routed": false}']
    cli_main(["infer", *model, "--inputs", str(tmp_path / "in.pt"), "--out", str(tmp_path / "out.pt")])
    assert "no task-routed MoELayer" in capsys.readouterr().err
    expected = tiny_task_model(task_routed=False)(x, torch.tensor([0, 9]))
    torch.testing.assert_close(torch.load(tmp_path / "out.pt")["outputs"], expected, **EXACT)


def test_cli_lists_the_commands(capsys):
    assert cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "extract" in out and "infer" in out


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["extract", "--model", "tests.task_models", "--task", "0", "--out", "x"], "package.module:function"),
        (["extract", "--model", "tests.nowhere:f", "--task", "0", "--out", "x"], "cannot import"),
        (["extract", "--model", "tests.task_models:nothing", "--task", "0", "--out", "x"], "no attribute"),
        (["extract", *MODEL[:2], "--model-kwargs", "[1]", "--task", "0", "--out", "x"], "JSON object"),
        (["extract", *MODEL, "--checkpoint", "w.bin", "--task", "0", "--out", "x"], "--checkpoint must end"),
        (["extract", *MODEL, "--checkpoint", "missing.pt", "--task", "0", "--out", "x"], "does not exist"),
        (["extract", *MODEL, "--task", "5", "--out", "x"], "0..4, got 5"),
        (["infer", *MODEL, "--inputs", "in.pt", "--out", "o.pt", "--max-subnetworks", "0"], "max_subnetworks"),
        (["infer", *MODEL, "--inputs", "in.pt", "--out", "o.csv"], "--out must end"),
        (
            ["infer", *MODEL, "--inputs", "in.pt", "--out", "o.pt"],
            "task_ids must be in 0..4",
        ),
        (["infer", *MODEL, "--inputs", "float_ids.pt", "--out", "o.pt"], "'task_ids' must be an integer tensor"),
        (["infer", *MODEL, "--inputs", "bad.pt", "--out", "o.pt"], "'inputs' and 'task_ids'"),
    ],
)
def test_bad_arguments_exit_with_a_message(tmp_path, monkeypatch, capsys, arguments, message):
    monkeypatch.chdir(tmp_path)
    torch.save({"inputs": torch.randn(2, 3, MODEL_DIM, dtype=torch.float64), "task_ids": torch.tensor([0, 7])}, "in.pt")
    torch.save({"x": torch.zeros(1)}, "bad.pt")
    torch.save({"inputs": torch.randn(2, 3, MODEL_DIM, dtype=torch.float64), "task_ids": torch.ones(2)}, "float_ids.pt")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(arguments)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_wrong_checkpoint_is_reported(tmp_path, capsys):
    torch.save({"w": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(SystemExit):
        cli_main(["extract", *MODEL, "--checkpoint", str(tmp_path / "other.pt"), "--task", "0", "--out", "x"])
    assert "does not fit --model" in capsys.readouterr().err
