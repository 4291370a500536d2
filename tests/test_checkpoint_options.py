"""A checkpoint remembers the MoE layers' options and the optimizer's class: loading it into a
model that computes differently, or an optimizer of another kind, is refused (or warned about)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from flexmoe import MoELayer, export_safetensors, load_checkpoint, save_checkpoint

BASE = dict(model_dim=8, hidden_dim=8, num_experts=4)


def _model(**options) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), MoELayer(**{**BASE, **options}))


@pytest.fixture
def saved(tmp_path):
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    save_checkpoint(tmp_path / "ckpt", model, optimizer)
    SAVED_ROUTER[:] = [model[1].router.weight.detach().clone()]
    return tmp_path / "ckpt"


SAVED_ROUTER: list[torch.Tensor] = []


@pytest.mark.parametrize(
    "options,named",
    [
        (dict(top_k=1), r"1.top_k: 2 \(saved\) vs 1 \(model\)"),
        (dict(activation="relu"), r"1.activation: 'gelu' \(saved\) vs 'relu' \(model\)"),
        (dict(granularity="sentence"), r"1.granularity: 'token' \(saved\) vs 'sentence'"),
        (dict(capacity_factor=1.0), r"1.capacity_factor: 0.0 \(saved\) vs 1.0"),
        (dict(score_function="sigmoid"), r"1.score_function"),
        (dict(normalize_gate=False), r"1.normalize_gate: True \(saved\) vs False"),
    ],
)
def test_other_routing_options_are_refused_or_warned(saved, options, named):
    model = _model(**options)
    with pytest.raises(ValueError, match=rf"saved with other MoE layer options: {named}.*options_mismatch='warn'"):
        load_checkpoint(saved, model)
    with pytest.warns(UserWarning, match=named):
        load_checkpoint(saved, model, options_mismatch="warn")
    torch.testing.assert_close(model[1].router.weight, SAVED_ROUTER[0], rtol=0, atol=0)


def test_other_expert_count_names_the_option(saved):
    with pytest.raises(ValueError, match=r"1.num_experts: 4 \(saved\) vs 8 \(model\)"):
        load_checkpoint(saved, _model(num_experts=8))


def test_options_that_do_not_change_the_computation_load_silently(saved, recwarn):
    model = _model(check_finite=True, aux_loss_weight=0.5, expert_kernel="per_expert")
    load_checkpoint(saved, model, torch.optim.Adam(model.parameters()))
    assert not [str(w.message) for w in recwarn if "options" in str(w.message)]


def test_adam_state_into_sgd_is_refused(saved):
    model = _model()
    with pytest.raises(ValueError, match=r"optimizer state of Adam.*the optimizer is a SGD.*optimizer=None"):
        load_checkpoint(saved, model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    # One optimizer's state cannot fill another's: refused also when option changes are allowed.
    with pytest.raises(ValueError, match="optimizer state of Adam"):
        load_checkpoint(saved, model, torch.optim.SGD(model.parameters(), lr=0.1), options_mismatch="warn")
    load_checkpoint(saved, model)  # the model alone


def test_a_checkpoint_without_a_description_loads(saved):
    (saved / "flexmoe.json").unlink()
    load_checkpoint(saved, _model(top_k=1))


def test_bad_options_mismatch_value(saved):
    with pytest.raises(ValueError, match="options_mismatch must be one of"):
        load_checkpoint(saved, _model(), options_mismatch="ignore")


def test_the_description_is_json(saved):
    description = json.loads((saved / "flexmoe.json").read_text())
    assert description["layers"]["1"]["top_k"] == 2
    assert description["optimizer"] == "Adam"


# --- every file of the checkpoint is checked against the description -----------------------


def _rank_file(directory):
    return next(directory.glob("*.distcp"))


def _flip_byte(path, position):
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_rank_file_are_refused(saved):
    rank_file = _rank_file(saved)
    _flip_byte(rank_file, rank_file.stat().st_size // 2)
    with pytest.raises(ValueError, match=rf"{rank_file.name} .*corrupted \(its SHA-256 differs"):
        load_checkpoint(saved, _model())


def test_truncated_or_missing_files_are_refused(saved):
    rank_file = _rank_file(saved)
    rank_file.write_bytes(rank_file.read_bytes()[:-10])
    with pytest.raises(ValueError, match=rf"{rank_file.name} is truncated or corrupted \(\d+ bytes, \d+ saved\)"):
        load_checkpoint(saved, _model())
    rank_file.unlink()
    with pytest.raises(ValueError, match=rf"{rank_file.name} is missing"):
        load_checkpoint(saved, _model())


def test_a_rank_file_from_another_save_is_refused(saved, tmp_path):
    model = _model()
    other = save_checkpoint(tmp_path / "other", model, torch.optim.Adam(model.parameters()))
    _rank_file(saved).write_bytes(_rank_file(other).read_bytes())
    with pytest.raises(ValueError, match="corrupted"):
        load_checkpoint(saved, _model())


def test_a_damaged_description_is_named(saved):
    (saved / "flexmoe.json").write_text('{"layers": ')
    with pytest.raises(ValueError, match=r"flexmoe.json is damaged"):
        load_checkpoint(saved, _model())


# --- export and argument mistakes -------------------------------------------------------------


def test_export_refuses_to_write_into_the_checkpoint_or_a_directory(saved, tmp_path):
    metadata = (saved / ".metadata").read_bytes()
    with pytest.raises(ValueError, match=r"file .*inside the checkpoint .*would damage it"):
        export_safetensors(saved, saved / ".metadata")
    assert (saved / ".metadata").read_bytes() == metadata
    load_checkpoint(saved, _model())  # still whole
    (tmp_path / "adir").mkdir()
    with pytest.raises(ValueError, match=r"file .*is a directory"):
        export_safetensors(saved, tmp_path / "adir")


def test_export_is_atomic(saved, tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"previous")

    def interrupted(tensors, path):
        Path(path).write_bytes(b"part")
        raise KeyboardInterrupt

    monkeypatch.setattr("flexmoe.checkpoint.save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_safetensors(saved, target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model")] == []


def test_arguments_of_the_wrong_type_are_named(saved, tmp_path):
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got NoneType"):
        load_checkpoint(saved, None)
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer or None, got str"):
        save_checkpoint(tmp_path / "x", _model(), "adam")
    assert not (tmp_path / "x").exists()
