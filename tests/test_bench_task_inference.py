"""benchmarks/task_inference.py --quick runs end to end for each shape (a smoke test: no timing is asserted)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("shape", "sparse_layers"), [("paper", "1 of 2"), ("moe-heavy", "2 of 2")])
def test_task_inference_benchmark_quick_runs(shape, sparse_layers):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, str(ROOT / "benchmarks" / "task_inference.py"), "--quick", "--shape", shape]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True)
    for row in ("(a) token-MoE", "(b) task-MoE whole", "(c) task subnet", "(d) dense same size"):
        assert done.stdout.count(row) == 3  # the two throughput tables and the memory/time table
    assert "whole generation (prefill included)" in done.stdout and "decoding only" in done.stdout
    assert done.stdout.count("peak ratio") == 2
    # The shape reached the decoder: the MoE layers sit where the shape puts them.
    assert f"shape {shape};" in done.stdout and f"the MoE layers ({sparse_layers};" in done.stdout
    # The extracted sub-network decodes what the task-routed model decodes.
    difference = float(done.stdout.split("max |logit difference| on task 3: ")[1].split()[0])
    assert difference < 1e-4
