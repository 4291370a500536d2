"""benchmarks/task_inference.py --quick runs end to end (a smoke test: no timing is asserted)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_task_inference_benchmark_quick_runs():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, str(ROOT / "benchmarks" / "task_inference.py"), "--quick"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True)
    for row in ("(a) token-MoE", "(b) task-MoE whole", "(c) task subnet", "(d) dense same size", "peak ratio"):
        assert row in done.stdout
    # The extracted sub-network decodes what the task-routed model decodes.
    difference = float(done.stdout.split("max |logit difference| on task 3: ")[1].split()[0])
    assert difference < 1e-4
