"""Sub-network extraction: outputs equal the full model's for the task, parameters shrink."""

import pytest
import torch
from torch import nn

from flexmoe import MoELayer
from flexmoe.task import DenseFFN, extract_task


class TinyTranslator(nn.Module):
    """Token-routed 'encoder' layer then two task-routed 'decoder' layers, residual."""

    def __init__(self, gated=False, dtype=torch.float64):
        super().__init__()
        common = dict(model_dim=16, num_experts=8, hidden_dim=8, top_k=2, capacity_factor=0.0, gated=gated)
        self.encoder = MoELayer(**common)
        self.decoder = nn.ModuleList(
            [MoELayer(**common, granularity="task", num_tasks=4, activation="silu") for _ in range(2)]
        )
        self.to(dtype).eval()
        with torch.no_grad():
            for name, p in self.named_parameters():
                if ".b" in name:
                    p.normal_(std=0.1)

    def forward(self, x, task_ids, padding_mask=None):
        x = x + self.encoder(x, padding_mask=padding_mask)
        for layer in self.decoder:
            x = x + layer(x, task_ids=task_ids, padding_mask=padding_mask)
        return x


@pytest.mark.parametrize("gated", [False, True])
def test_extracted_model_equals_full_model_on_its_task(gated):
    model = TinyTranslator(gated)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    for task in range(4):
        sub = extract_task(model, task)
        ids = torch.full((3,), task)
        torch.testing.assert_close(sub(x, ids), model(x, ids), rtol=1e-10, atol=1e-12)
        report = sub.extraction_report
        assert set(report.reduced) == {"decoder.0", "decoder.1"} and set(report.kept_whole) == {"encoder"}
        assert isinstance(sub.decoder[0], DenseFFN) and isinstance(sub.encoder, MoELayer)
        # Each decoder layer keeps 2 of 8 experts and drops its router and task embedding.
        dense_params = sum(p.numel() for p in sub.decoder.parameters())
        assert dense_params == 2 * (16 * 16 + 16 + 16 * 16 + 16 + (16 * 16 if gated else 0))
        assert report.parameters_after == sum(p.numel() for p in sub.parameters()) < report.parameters_before


def test_extraction_leaves_the_model_untouched_and_shares_nothing():
    model = TinyTranslator()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    sub = extract_task(model, 1)
    with torch.no_grad():
        for p in sub.parameters():
            p.add_(1.0)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name])


def test_padding_and_wrong_task_in_extracted_model():
    model = TinyTranslator()
    sub = extract_task(model, 2)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 3:] = True
    ids = torch.tensor([2, 2])
    out, ref = sub(x, ids, mask), model(x, ids, mask)
    torch.testing.assert_close(out[~mask], ref[~mask], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="serves task 2"):
        sub(x, torch.tensor([2, 3]))
    with pytest.raises(ValueError, match="task_id"):
        extract_task(model, 4)


def test_save_and_load_subnetwork_without_the_full_model(tmp_path):
    from flexmoe.task import load_subnetwork, save_subnetwork

    model = TinyTranslator(gated=True)
    sub = extract_task(model, 3)
    save_subnetwork(sub, tmp_path / "fr")
    loaded = load_subnetwork(tmp_path / "fr", lambda: TinyTranslator(gated=True))
    x = torch.randn(2, 4, 16, dtype=torch.float64)
    ids = torch.full((2,), 3)
    torch.testing.assert_close(loaded(x, ids), model(x, ids), rtol=1e-10, atol=1e-12)
    assert sum(p.numel() for p in loaded.parameters()) == sub.extraction_report.parameters_after
    with pytest.raises(FileNotFoundError, match="save_subnetwork"):
        load_subnetwork(tmp_path, lambda: TinyTranslator())
