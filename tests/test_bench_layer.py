"""benchmarks/layer.py: the HF-style loop computes MoELayer's function, and both modes print the table
(a smoke test: no timing is asserted)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexmoe import MoELayer

ROOT = Path(__file__).resolve().parent.parent


def load_benchmark():
    spec = importlib.util.spec_from_file_location("layer_benchmark", ROOT / "benchmarks" / "layer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("top_k", [1, 2])
def test_hf_style_loop_matches_the_dropless_layer_forward_and_backward(top_k):
    torch.manual_seed(0)
    # No balance loss: it rides on the layer's output (the loop has none), as in the benchmark.
    options = dict(capacity_factor=0.0, normalize_gate=top_k > 1, aux_loss=None)
    layer = MoELayer(model_dim=8, num_experts=4, hidden_dim=16, top_k=top_k, **options).double()
    with torch.no_grad():
        for bias in (layer.experts.b1, layer.experts.b2):
            bias.normal_()
    loop = load_benchmark().HFStyleMoE(layer).double()
    x = torch.randn(32, 8, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(32, 8, dtype=torch.float64)
    expected = layer(x)
    got = loop(x)  # its softmax runs in float32, as transformers writes it: float32 tolerances
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    grad_expected = torch.autograd.grad(expected, [x, layer.router.weight], upstream)
    grad_got = torch.autograd.grad(got, [x, loop.gate.weight], upstream)
    for a, b in zip(grad_got, grad_expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", [[], ["--fresh", "--warmup", "1"]])
def test_layer_benchmark_prints_the_table_in_both_modes(mode):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, str(ROOT / "benchmarks" / "layer.py"), "--quick", "--repeats", "1"]
    command += ["--only", "T512 M64 H128 E8 k2 f1", "--rows", "floor:addmm", "MoELayer", "loop", "of which", *mode]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True)
    for row in ("floor:addmm-per-expert", "MoELayer", "loop (HF-style)", "bound: floor", "MoELayer / loop"):
        assert f"| {row}" in done.stdout
    assert ("fresh process per row" in done.stdout) == bool(mode)
