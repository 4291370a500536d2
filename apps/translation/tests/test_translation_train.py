"""Training runs: exact resume, run-file errors, the commands end to end on a tiny TSV corpus."""

import json

import pytest
from translation_fixtures import one_thread, write_run_file

from flexmoe_mt.cli import main as flexmoe_mt
from flexmoe_mt.runconfig import load_run_config
from flexmoe_mt.train import Trainer, train

_one_thread = pytest.fixture(autouse=True)(one_thread)


def train_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["split"] == "train"]


def test_resume_continues_the_same_loss_curve(tmp_path):
    straight = load_run_config(write_run_file(tmp_path, "straight"))
    train(straight, progress=False)
    expected = train_losses(tmp_path / "straight")
    assert [step for step, _ in expected] == [1, 2, 3, 4, 5, 6]

    half = load_run_config(write_run_file(tmp_path, "resumed", train={"max_steps": 3}))
    train(half, progress=False)  # stops at 3 and checkpoints, as a kill after the step-3 checkpoint would
    (tmp_path / "resumed" / "metrics.jsonl").open("a").write('{"step": 4, "split": "train", "loss": 99.0}\n')
    resumed = load_run_config(write_run_file(tmp_path, "resumed"))
    trainer = Trainer(resumed, progress=False)
    assert trainer.step == 3
    trainer.run()
    assert train_losses(tmp_path / "resumed") == expected  # bit-identical, stale record dropped


def test_resume_refuses_a_different_model(tmp_path):
    train(load_run_config(write_run_file(tmp_path, "run", train={"max_steps": 1})), progress=False)
    with pytest.raises(ValueError, match="different"):
        Trainer(load_run_config(write_run_file(tmp_path, "run", model={"num_experts": 2})), progress=False)


@pytest.mark.parametrize(
    ("model", "train_options", "message"),
    [
        ({}, {"learning_rate": 0.1}, r"unknown key\(s\) \['learning_rate'\] in \[train\]"),
        ({"experts": 4}, {}, r"unknown key\(s\) \['experts'\] in \[model\]"),
        ({"vocab_size": 100}, {}, r"unknown key\(s\) \['vocab_size'\] in \[model\]"),
        ({"decoder_routing": "language"}, {}, "decoder_routing must be one of"),
        ({}, {"max_steps": 0}, "max_steps or train.max_minutes"),
        ({}, {"batch_size": 0}, "batch_size"),
    ],
)
def test_run_file_errors_name_the_key(tmp_path, model, train_options, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(write_run_file(tmp_path, model=model, train=train_options))


def test_unknown_table(tmp_path):
    path = write_run_file(tmp_path)
    path.write_text(path.read_text() + "\n[optimizer]\nlr = 1\n")
    with pytest.raises(ValueError, match=r"unknown table\(s\) \['optimizer'\]"):
        load_run_config(path)


def test_commands_end_to_end(tmp_path, capsys):
    config = write_run_file(tmp_path, "cli", model={"encoder_routing": "token", "decoder_routing": "target"})
    assert flexmoe_mt(["train", "--config", str(config), "--quiet"]) == 0
    run_dir = tmp_path / "cli"
    for name in ("checkpoint.pt", "tokenizer.model", "metrics.jsonl", "loss.png", "chrf.png", "expert_load.png"):
        assert (run_dir / name).is_file(), name
    assert flexmoe_mt(["eval", "--model", str(run_dir)]) == 0
    scores = json.loads((run_dir / "eval-test.json").read_text())
    assert set(scores["chrf"]) == {"en-fr", "fr-en", "en-de", "de-en"}
    assert scores["bleu_tokenizer"]["en-fr"] == "13a"

    assert flexmoe_mt(["extract", "--model", str(run_dir), "--task", "fr"]) == 0
    out = capsys.readouterr().out
    assert "identical translations" in out
    same, total = out.split("identical translations: ")[1].split()[0].split("/")
    assert same == total and int(total) > 0
    extracted = run_dir / "extract-fr"
    assert flexmoe_mt(["eval", "--model", str(extracted)]) == 0
    assert set(json.loads((extracted / "eval-test.json").read_text())["chrf"]) == {"en-fr"}

    source = tmp_path / "in.txt"
    source.write_text("one two\nthree\n")
    capsys.readouterr()
    assert flexmoe_mt(["translate", "--model", str(extracted), "--to", "fr", "--beam", "2", str(source)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert flexmoe_mt(["throughput", "--model", str(run_dir), "--model", str(extracted), "--task", "fr",
                    "--batch-sizes", "1,4"]) == 0  # fmt: skip
    assert "peak" in capsys.readouterr().out


def run_error(command: list[str], capsys) -> str:
    """The one stderr line of a command that must stop with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        flexmoe_mt(command)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_commands_explain_user_mistakes_and_show_progress(tmp_path, capsys):
    config = write_run_file(tmp_path, "run", model={"decoder_routing": "target"}, train={"max_steps": 2})
    assert flexmoe_mt(["train", "--config", str(config), "--quiet"]) == 0
    run_dir = tmp_path / "run"
    capsys.readouterr()
    assert flexmoe_mt(["train", "--config", str(config), "--quiet"]) == 0  # a rerun says what it does
    assert "checkpoint at step 2, already trained to its budget: reusing it" in capsys.readouterr().out

    assert flexmoe_mt(["eval", "--model", str(run_dir), "--limit", "4"]) == 0
    assert "translating 4 sentences" in capsys.readouterr().err  # the progress bar

    source = tmp_path / "in.txt"
    source.write_text("one two\n")
    line = run_error(["translate", "--model", str(run_dir), "--to", "it", str(source)], capsys)
    assert "--to it" in line and "de, en, fr" in line
    line = run_error(["extract", "--model", str(run_dir), "--task", "it"], capsys)
    assert "--task it" in line and "de, en, fr" in line
    assert flexmoe_mt(["extract", "--model", str(run_dir), "--task", "fr", "--limit", "2"]) == 0
    line = run_error(["translate", "--model", str(run_dir / "extract-fr"), "--to", "de", str(source)], capsys)
    assert "--to de" in line and "serves only fr" in line and "--to fr" in line
    line = run_error(["eval", "--model", str(run_dir), "--split", "tests"], capsys)
    assert "--split" in line and "'test'" in line


def test_tokenizer_is_cached_and_tags_stay_whole(tmp_path):
    from translation_fixtures import write_corpus

    from flexmoe_mt.data import load_tsv
    from flexmoe_mt.tokenizer import EOS_ID, train_tokenizer

    corpus = load_tsv(write_corpus(tmp_path))
    first = train_tokenizer(corpus, 64, tmp_path / "cache")
    second = train_tokenizer(corpus, 64, tmp_path / "cache")
    assert first.model_file == second.model_file and len(list((tmp_path / "cache").iterdir())) == 1
    ids = first.encode_source("deux trois", "fr")
    assert ids[0] == first.tag_ids["fr"] and ids[-1] == EOS_ID
    assert first.decode(ids[1:]) == "deux trois"
    assert train_tokenizer(corpus, 80, tmp_path / "cache").model_file != first.model_file


def test_temperature_sampling_flattens_directions():
    from flexmoe_mt.data.corpus import Pair
    from flexmoe_mt.data.sampler import TemperatureSampler

    lang_pair = [0] * 900 + [1] * 100  # 9:1 data -> 9**(1/5):1 sampling at T = 5
    pairs = [Pair("a", "b", "en", "fr")] * len(lang_pair)
    sampler = TemperatureSampler(pairs, temperature=5.0, seed=0, groups=lang_pair)
    drawn = sampler.sample(20000).tolist()
    share = sum(lang_pair[i] == 1 for i in drawn) / len(drawn)
    assert abs(share - 1 / (1 + 9 ** (1 / 5))) < 0.02  # 0.391, vs 0.1 without temperature
    state = sampler.state_dict()
    again = sampler.sample(10).tolist()
    sampler.load_state_dict(state)
    assert sampler.sample(10).tolist() == again


def test_results_table_reports_spread_over_seeds(tmp_path):
    from flexmoe_mt.results import render

    for row, seed, chrf in (("dense", 0, 40.0), ("dense", 1, 44.0), ("token_target", 0, 50.0)):
        scores = {"chrf": {"en-fr": chrf}, "bleu": {"en-fr": 10.0}, "bleu_tokenizer": {"en-fr": "13a"},
                  "mean_chrf": chrf, "mean_bleu": 10.0}  # fmt: skip
        result = {"row": row, "seed": seed, "step_budget": 10, "machine": "test", "threads": 1, "scores": scores,
                  "parameters": 10, "active_parameters": 5, "peak_tokens_per_s": 100.0}  # fmt: skip
        result["steps"] = 10 + 2 * seed
        if row == "token_target":
            result["peak_tokens_per_s"] = 80.0
            result["extracted"] = {"scores": scores, "identical": 3, "sentences": 3, "parameters": 6,
                                   "peak_tokens_per_s": 150.0, "parent_peak_tokens_per_s": 80.0}  # fmt: skip
        (tmp_path / row).mkdir(exist_ok=True)
        (tmp_path / row / f"seed{seed}.json").write_text(json.dumps(result))
    text = render(tmp_path)
    assert "| dense | 2 | 11 ± 1 | 42.0 ± 2.8 |" in text
    assert "| token / target | 1 | 10 | 50.0 |" in text and "| 80, x0.80 vs dense |" in text
    assert "| 50.0 (3/3 identical) | 150 (x1.88 vs parent, x1.50 vs dense), 6 parameters |" in text


def test_distilled_student_starts_from_the_teachers_shared_weights(tmp_path):
    import torch

    train(load_run_config(write_run_file(tmp_path, "teacher", train={"max_steps": 2})), progress=False)
    student_file = write_run_file(
        tmp_path, "student", model={"num_experts": 0}, train={"distill_from": str(tmp_path / "teacher")}
    )
    student = Trainer(load_run_config(student_file), progress=False)
    teacher = student.teacher.state_dict()
    own = student.model.state_dict()
    assert torch.equal(own["embedding.weight"], teacher["embedding.weight"])
    assert torch.equal(own["decoder.0.ffn.fc1.weight"], teacher["decoder.0.ffn.fc1.weight"])  # dense in both
    assert "decoder.1.ffn.fc1.weight" in own and "decoder.1.ffn.experts.w1" in teacher  # MoE -> fresh dense FFN
    loss, _, _ = student.train_step()
    assert loss > 0
    teacher_tokenizer = (tmp_path / "teacher" / "tokenizer.model").read_bytes()
    assert (tmp_path / "student" / "tokenizer.model").read_bytes() == teacher_tokenizer


def test_train_command_reports_config_errors_without_traceback(tmp_path, capsys):
    path = write_run_file(tmp_path, train={"max_step": 3})
    with pytest.raises(SystemExit) as exit_info:
        flexmoe_mt(["train", "--config", str(path)])
    assert exit_info.value.code == 2
    assert "unknown key(s) ['max_step'] in [train]" in capsys.readouterr().err


def test_data_languages_pick_the_embedded_corpus_languages(monkeypatch):
    """``[data] languages`` builds the embedded corpus for those languages only (a smaller
    corpus for the results table); bad values name the option."""
    import flexmoe_mt.data.cldr as cldr
    from flexmoe_mt.runconfig import DataConfig
    from flexmoe_mt.train import load_corpus

    built = []
    monkeypatch.setattr(cldr, "build_corpus", lambda config, **kwargs: built.append(config) or "corpus")
    assert load_corpus(DataConfig(languages=["de", "ja"])) == "corpus"
    assert load_corpus(DataConfig()) == "corpus"
    assert built[0].languages == ("de", "ja") and built[1].languages == cldr.DEMO_LANGUAGES
    assert DataConfig(languages=["de", "ja"]) == DataConfig(languages=("de", "ja"))
    for bad, message in (
        ("de", "must be a list"),
        (["de", "de"], "must be distinct"),
        (["de", 5], "must be distinct"),
    ):
        with pytest.raises(ValueError, match=rf"data\.languages {message}"):
            DataConfig(languages=bad)
    with pytest.raises(ValueError, match=r"data\.languages picks languages of the embedded corpus"):
        DataConfig(source="tsv", train="train.tsv", languages=["de"])
