"""A run directory under faults and mistakes: nothing the run did not write is deleted, a killed
run resumes to the same result, damaged files and bad run files are named in one line (exit 2)."""

import json

import pytest
from translation_fixtures import one_thread, write_run_file

from flexmoe_mt.cli import main as flexmoe_mt
from flexmoe_mt.runconfig import load_run_config
from flexmoe_mt.train import train

_one_thread = pytest.fixture(autouse=True)(one_thread)


def records(run_dir, split="train"):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["split"] == split]


def error_line(command: list[str], capsys) -> str:
    """The one stderr line of a command that must stop with status 2 (no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        flexmoe_mt(command)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# --- --fresh deletes only what the run wrote -------------------------------------------------


def test_fresh_keeps_files_the_run_did_not_write(tmp_path, capsys):
    config = write_run_file(tmp_path, "run", train={"max_steps": 2, "eval_every": 1})
    assert flexmoe_mt(["train", "--config", str(config), "--quiet"]) == 0
    run_dir = tmp_path / "run"
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "data").mkdir()
    (run_dir / "data" / "corpus.tsv").write_text("mine too")
    assert flexmoe_mt(["train", "--config", str(config), "--quiet", "--fresh"]) == 0
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert (run_dir / "data" / "corpus.tsv").read_text() == "mine too"
    assert "checkpoint at step" not in capsys.readouterr().out  # started over
    assert [step for step, _ in records(run_dir)] == [1, 2]


@pytest.mark.parametrize("run_dir", ["", "."])
def test_fresh_refuses_a_directory_that_is_not_a_run(tmp_path, monkeypatch, capsys, run_dir):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "thesis.tex").write_text("years of work")
    config = write_run_file(tmp_path, "run", train={"run_dir": run_dir, "max_steps": 1})
    line = error_line(["train", "--config", str(config), "--quiet", "--fresh"], capsys)
    assert "train.run_dir" in line
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


def test_fresh_names_a_directory_that_holds_no_run(tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text("someone else's\n")
    (other / "checkpoint.pt").write_text("a model of someone else's")
    config = write_run_file(tmp_path, "run", train={"run_dir": str(other), "max_steps": 1})
    line = error_line(["train", "--config", str(config), "--quiet", "--fresh"], capsys)
    assert str(other) in line and "not a training run" in line
    assert (other / "metrics.jsonl").read_text() == "someone else's\n"
    line = error_line(["train", "--config", str(config), "--quiet"], capsys)  # nor trains into it
    assert str(other) in line and "choose a new or empty directory" in line


def test_a_run_without_manifest_is_still_a_run(tmp_path, capsys):
    """A run directory written before manifests (checkpoint, tokenizer and metrics together)
    resumes, and --fresh clears it."""
    config = write_run_file(tmp_path, "run", train={"max_steps": 1})
    assert flexmoe_mt(["train", "--config", str(config), "--quiet"]) == 0
    run_dir = tmp_path / "run"
    (run_dir / "flexmoe_run.json").unlink()
    (run_dir / "finished.json").unlink()
    (run_dir / "notes.txt").write_text("mine")
    assert flexmoe_mt(["train", "--config", str(config), "--quiet", "--fresh"]) == 0
    assert (run_dir / "notes.txt").read_text() == "mine" and (run_dir / "flexmoe_run.json").is_file()


# --- a killed run finishes on resume ---------------------------------------------------------


def test_run_killed_before_its_plots_finishes_them_on_resume(tmp_path, monkeypatch, capsys):
    config = write_run_file(tmp_path, "run", train={"max_steps": 2, "eval_every": 1})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the kill after the final checkpoint, before the plots

    monkeypatch.setattr("flexmoe_mt.plots.plot_run", killed)
    with pytest.raises(KeyboardInterrupt):
        flexmoe_mt(["train", "--config", str(config), "--quiet"])
    monkeypatch.undo()
    run_dir = tmp_path / "run"
    assert not (run_dir / "loss.png").exists()
    assert flexmoe_mt(["train", "--config", str(config), "--quiet"]) == 0
    assert "already trained" not in capsys.readouterr().out
    assert (run_dir / "loss.png").is_file() and (run_dir / "chrf.png").is_file()
    assert [step for step, _ in records(run_dir, "valid")] == [1, 2]  # step 2 once, not twice
    assert flexmoe_mt(["train", "--config", str(config), "--quiet"]) == 0  # now finished: reused
    assert "already trained to its budget" in capsys.readouterr().out


def test_run_killed_during_its_final_checkpoint_write_is_not_finished(tmp_path, monkeypatch, capsys):
    import torch

    config = write_run_file(tmp_path, "run", train={"max_steps": 3, "checkpoint_every": 3})
    run_dir, save = tmp_path / "run", torch.save

    def killed_mid_write(state, path, *args, **kwargs):
        validated = (run_dir / "metrics.jsonl").is_file() and 3 in [s for s, _ in records(run_dir, "valid")]
        if str(path).endswith(".partial") and validated:  # the checkpoint after the final validation
            path.write_bytes(b"PK\x03\x04 half a checkpoint")
            raise KeyboardInterrupt  # the kill during the final checkpoint's write
        return save(state, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        flexmoe_mt(["train", "--config", str(config), "--quiet"])
    monkeypatch.undo()
    assert not (run_dir / "loss.png").exists()
    assert flexmoe_mt(["train", "--config", str(config), "--quiet"]) == 0
    assert "already trained" not in capsys.readouterr().out
    assert (run_dir / "loss.png").is_file() and (run_dir / "finished.json").is_file()
    assert [step for step, _ in records(run_dir, "valid")] == [3]


# --- the resumed loss curve is the uninterrupted one -----------------------------------------


def test_resumed_curve_averages_the_steps_before_the_checkpoint_too(tmp_path):
    steps = {"log_every": 2, "checkpoint_every": 3, "eval_every": 10}
    train(load_run_config(write_run_file(tmp_path, "straight", train=steps)), progress=False)
    expected = records(tmp_path / "straight")
    assert [step for step, _ in expected] == [2, 4, 6]
    train(load_run_config(write_run_file(tmp_path, "resumed", train={**steps, "max_steps": 3})), progress=False)
    train(load_run_config(write_run_file(tmp_path, "resumed", train=steps)), progress=False)
    assert records(tmp_path / "resumed") == expected  # step 4 averages steps 3 and 4


def test_torn_last_metrics_line_does_not_block_the_resume(tmp_path):
    train(load_run_config(write_run_file(tmp_path, "straight")), progress=False)
    expected = records(tmp_path / "straight")
    train(load_run_config(write_run_file(tmp_path, "resumed", train={"max_steps": 3})), progress=False)
    with (tmp_path / "resumed" / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 4, "split": "tr')  # the kill mid-write
    train(load_run_config(write_run_file(tmp_path, "resumed")), progress=False)
    assert records(tmp_path / "resumed") == expected


def test_corrupt_metrics_line_before_the_last_names_file_and_line(tmp_path, capsys):
    config = write_run_file(tmp_path, "run", train={"max_steps": 3})
    assert flexmoe_mt(["train", "--config", str(config), "--quiet"]) == 0
    metrics = tmp_path / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[1] = lines[1][:10]
    metrics.write_text("\n".join(lines) + "\n")
    config = write_run_file(tmp_path, "run", train={"max_steps": 4})
    line = error_line(["train", "--config", str(config), "--quiet"], capsys)
    assert f"{metrics}:2" in line


# --- damaged files and bad run files: one line naming the file or option ---------------------


def test_truncated_checkpoint_is_named(tmp_path, capsys):
    config = write_run_file(tmp_path, "run", train={"max_steps": 1})
    assert flexmoe_mt(["train", "--config", str(config), "--quiet"]) == 0
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    capsys.readouterr()
    for command in (["eval", "--model", str(tmp_path / "run")], ["train", "--config", str(config), "--quiet"]):
        line = error_line(command, capsys)
        assert str(checkpoint) in line and "truncated or corrupted" in line


def test_truncated_extracted_weights_are_named(tmp_path, capsys):
    config = write_run_file(tmp_path, "run", train={"max_steps": 1})
    assert flexmoe_mt(["train", "--config", str(config), "--quiet"]) == 0
    assert flexmoe_mt(["extract", "--model", str(tmp_path / "run"), "--task", "fr", "--limit", "2"]) == 0
    weights = tmp_path / "run" / "extract-fr" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    line = error_line(["eval", "--model", str(weights.parent)], capsys)
    assert "model.safetensors" in line


@pytest.mark.parametrize("split", ["train", "valid"])
def test_empty_tsv_is_named(tmp_path, capsys, split):
    config = write_run_file(tmp_path, "run", train={"max_steps": 1})
    (tmp_path / f"{split}.tsv").write_text("")
    line = error_line(["train", "--config", str(config), "--quiet"], capsys)
    assert f"{split}.tsv" in line and "no pairs" in line


@pytest.mark.parametrize(
    ("table", "options", "message"),
    [
        ("train", {"run_dir": 5}, "train.run_dir must be"),
        ("train", {"run_dir": ""}, "train.run_dir must be"),
        ("train", {"distill_from": 3}, "train.distill_from must be"),
        ("data", {"temperature": "hot"}, "data.temperature must be"),
        ("data", {"vocab_size": "big"}, "data.vocab_size must be"),
        ("data", {"cache_dir": 1}, "data.cache_dir must be"),
        ("model", {"capacity_factor": "high"}, "capacity_factor"),
    ],
)
def test_run_file_values_of_the_wrong_type_are_named(tmp_path, monkeypatch, capsys, table, options, message):
    monkeypatch.chdir(tmp_path)  # where run_dir = "" would write if it were accepted
    config = write_run_file(tmp_path, "run", **({"train": options} if table == "train" else {}))
    if table != "train":
        text = config.read_text()
        key, value = next(iter(options.items()))
        assert f"[{table}]" in text
        config.write_text(text.replace(f"[{table}]\n", f"[{table}]\n{key} = {json.dumps(value)}\n", 1))
        if table == "data":  # drop the default written by the fixture, if any
            lines = config.read_text().splitlines()
            first = [i for i, x in enumerate(lines) if x.startswith(f"{key} =")]
            config.write_text("\n".join(x for i, x in enumerate(lines) if i not in first[1:]) + "\n")
    line = error_line(["train", "--config", str(config), "--quiet"], capsys)
    assert message in line


def test_run_config_api_names_the_option():
    from flexmoe_mt.runconfig import DataConfig, TrainConfig

    with pytest.raises(ValueError, match=r"train\.run_dir must be a non-empty path, got 5"):
        TrainConfig(run_dir=5, max_steps=1)
    with pytest.raises(ValueError, match=r"data\.temperature must be a finite number > 0.0, got 'hot'"):
        DataConfig(temperature="hot")
    with pytest.raises(ValueError, match=r"train\.collective_timeout_s must be a finite number > 0.0"):
        TrainConfig(max_steps=1, collective_timeout_s=0)


def test_resume_refuses_another_corpus(tmp_path, capsys):
    config = write_run_file(tmp_path, "run", train={"max_steps": 1})
    assert flexmoe_mt(["train", "--config", str(config), "--quiet"]) == 0
    longer = write_run_file(tmp_path, "run", train={"max_steps": 2})
    text = longer.read_text()
    longer.write_text(text.replace("[data]\n", "[data]\ntemperature = 1.0\n", 1))
    capsys.readouterr()
    line = error_line(["train", "--config", str(longer), "--quiet"], capsys)
    assert "data.temperature" in line and "--fresh" in line
    longer.write_text(text)
    train_tsv = tmp_path / "train.tsv"
    train_tsv.write_text(train_tsv.read_text().replace("trois", "drei"))  # the same file, edited
    line = error_line(["train", "--config", str(longer), "--quiet"], capsys)
    assert str(train_tsv) in line and "changed" in line


def test_command_options_out_of_range_are_refused_before_loading(tmp_path, capsys):
    """A negative --limit would drop the last sentences (a slice), a zero --beam translate to
    nothing: both silently wrong scores; a missing input file was found after the model loaded."""
    run_dir = str(tmp_path / "none")  # never loaded: the options are checked first
    for command, option in (
        (["eval", "--model", run_dir, "--limit", "-1"], "--limit"),
        (["eval", "--model", run_dir, "--batch-size", "0"], "--batch-size"),
        (["eval", "--model", run_dir, "--beam", "0"], "--beam"),
        (["extract", "--model", run_dir, "--task", "fr", "--limit", "-2"], "--limit"),
        (["translate", "--model", run_dir, "--to", "fr", "--beam", "0"], "--beam"),
    ):
        line = error_line(command, capsys)
        assert option in line and "expected an integer >=" in line
    line = error_line(["translate", "--model", run_dir, "--to", "fr", str(tmp_path / "missing.txt")], capsys)
    assert "missing.txt" in line and "does not exist" in line
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nmax_steps = 1\n")
    line = error_line(["train", "--config", str(bad)], capsys)
    assert str(bad) in line and "line 1" in line


def test_damaged_tokenizer_missing_device_and_teacher_path(tmp_path, capsys):
    from flexmoe_mt.train import load_trained

    config = write_run_file(tmp_path, "run", train={"max_steps": 1})
    assert flexmoe_mt(["train", "--config", str(config), "--quiet"]) == 0
    run_dir = tmp_path / "run"
    # distill_from documents "a teacher's checkpoint.pt": the file's path loads its run.
    assert load_trained(run_dir / "checkpoint.pt").tasks == load_trained(run_dir).tasks
    tokenizer = run_dir / "tokenizer.model"
    tokenizer.write_bytes(tokenizer.read_bytes()[:500])
    capsys.readouterr()
    line = error_line(["eval", "--model", str(run_dir)], capsys)
    assert str(tokenizer) in line and "truncated or corrupted" in line
    gpu = write_run_file(tmp_path, "gpu", train={"max_steps": 1, "device": "cuda:99"})
    line = error_line(["train", "--config", str(gpu), "--quiet"], capsys)
    assert "train.device 'cuda:99'" in line


def test_resume_refuses_a_checkpoint_that_cannot_tell_its_corpus(tmp_path, capsys):
    """A checkpoint written before checkpoints recorded their corpus (no fingerprint, no logging
    window) resumed on whatever corpus the code builds today: a rebuilt corpus silently changed
    a learning curve mid-run. It is refused, naming --fresh."""
    import torch

    config = write_run_file(tmp_path, "run", train={"max_steps": 1})
    assert flexmoe_mt(["train", "--config", str(config), "--quiet"]) == 0
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=False)
    for key in ("data_fingerprint", "log_window"):
        state.pop(key)
    torch.save(state, checkpoint)
    (tmp_path / "run" / "finished.json").unlink(missing_ok=True)
    longer = write_run_file(tmp_path, "run", train={"max_steps": 2})
    capsys.readouterr()
    line = error_line(["train", "--config", str(longer), "--quiet"], capsys)
    assert "cannot tell" in line and "--fresh" in line
