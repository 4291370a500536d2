"""Single-process checkpoints through DCP: round trip with Adam state, atomic replacement,
export to one safetensors file, and the errors (multi-rank resharding: tests/distributed)."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import flexmoe.checkpoint
from flexmoe import MoELayer, export_safetensors, load_checkpoint, save_checkpoint
from flexmoe.cli import main as cli_main

LR = 1e-2


class Net(nn.Module):
    """Two MoE layers (4 experts; 2 gated experts) around a Linear."""

    def __init__(self, hidden_dim: int = 8):
        super().__init__()
        self.moe1 = MoELayer(model_dim=8, num_experts=4, hidden_dim=hidden_dim)
        self.proj = nn.Linear(8, 8)
        self.moe2 = MoELayer(model_dim=8, num_experts=2, hidden_dim=hidden_dim, gated=True)

    def forward(self, x):
        x = x + self.moe1(x)
        return x + self.moe2(self.proj(x))


def trained(seed: int = 0):
    """The model after two Adam steps (so exp_avg, exp_avg_sq and step are real)."""
    torch.manual_seed(seed)
    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(4, 6, 8)).pow(2).mean().backward()
        optimizer.step()
    return model, optimizer


def fresh(seed: int = 99):
    torch.manual_seed(seed)
    model = Net()
    return model, torch.optim.Adam(model.parameters(), lr=0.5)


def assert_same(model, optimizer, other_model, other_optimizer):
    for (name, param), other in zip(model.named_parameters(), other_model.parameters()):
        torch.testing.assert_close(other, param, rtol=0, atol=0, msg=name)
    for param, other in zip(model.parameters(), other_model.parameters()):
        state, other_state = optimizer.state[param], other_optimizer.state[other]
        assert state.keys() == other_state.keys()
        for key in state:
            torch.testing.assert_close(other_state[key], state[key], rtol=0, atol=0)
    assert other_optimizer.param_groups[0]["lr"] == LR


def test_round_trip_with_adam_state_and_extra(tmp_path):
    model, optimizer = trained()
    save_checkpoint(tmp_path / "ckpt", model, optimizer, extra={"step": 2})
    loaded, loaded_optimizer = fresh()
    assert load_checkpoint(tmp_path / "ckpt", loaded, loaded_optimizer) == {"step": 2}
    assert_same(model, optimizer, loaded, loaded_optimizer)
    # Training goes on identically.
    x = torch.randn(2, 3, 8)
    for net, opt in ((model, optimizer), (loaded, loaded_optimizer)):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
    assert_same(model, optimizer, loaded, loaded_optimizer)


def test_save_replaces_a_checkpoint_and_refuses_other_directories(tmp_path):
    first, first_optimizer = trained(0)
    second, second_optimizer = trained(1)
    save_checkpoint(tmp_path / "ckpt", first, first_optimizer)
    save_checkpoint(tmp_path / "ckpt", second, second_optimizer, extra={"n": 2})
    loaded, loaded_optimizer = fresh()
    assert load_checkpoint(tmp_path / "ckpt", loaded, loaded_optimizer) == {"n": 2}
    assert_same(second, second_optimizer, loaded, loaded_optimizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging or previous copy left
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a checkpoint"):
        save_checkpoint(tmp_path / "other", first)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer = trained(0)
    save_checkpoint(tmp_path / "ckpt", model, optimizer, extra={"n": 1})
    other, other_optimizer = trained(1)

    def interrupted(state, checkpoint_id, **kwargs):
        checkpoint_id.mkdir()
        (checkpoint_id / "__0_0.distcp").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(flexmoe.checkpoint.dcp, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "ckpt", other, other_optimizer)
    monkeypatch.undo()
    loaded, loaded_optimizer = fresh()
    assert load_checkpoint(tmp_path / "ckpt", loaded, loaded_optimizer) == {"n": 1}
    assert_same(model, optimizer, loaded, loaded_optimizer)
    save_checkpoint(tmp_path / "ckpt", other, other_optimizer)  # the leftover staging is cleared
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_export_safetensors_and_cli(tmp_path, capsys):
    model, optimizer = trained()
    save_checkpoint(tmp_path / "ckpt", model, optimizer)
    export_safetensors(tmp_path / "ckpt", tmp_path / "model.safetensors")
    exported = load_file(tmp_path / "model.safetensors")
    state = model.state_dict()
    assert exported.keys() == state.keys()
    for key in state:
        torch.testing.assert_close(exported[key], state[key], rtol=0, atol=0)
    assert cli_main(["checkpoint", "export", str(tmp_path / "ckpt"), str(tmp_path / "cli.safetensors")]) == 0
    assert "cli.safetensors" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="2"):
        cli_main(["checkpoint", "export", str(tmp_path / "missing"), str(tmp_path / "x.safetensors")])
    assert "holds no checkpoint" in capsys.readouterr().err


def test_load_errors(tmp_path):
    model, _ = trained()
    save_checkpoint(tmp_path / "ckpt", model)
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        load_checkpoint(tmp_path / "missing", model)
    with pytest.raises(ValueError, match="holds no optimizer state"):
        load_checkpoint(tmp_path / "ckpt", *fresh())
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="missing keys"):
        load_checkpoint(tmp_path / "ckpt", nn.Sequential(Net(), nn.Linear(8, 8)))
    with pytest.raises(ValueError, match="does not fit"):
        load_checkpoint(tmp_path / "ckpt", Net(hidden_dim=16))
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path / "other", model, extra={"bad": object()})
