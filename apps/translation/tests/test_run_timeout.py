"""Under torchrun, a rank that stops taking part in the steps does not hang the others for the
default 30 minutes: they stop after train.collective_timeout_s with one line naming the cause."""

import os
import subprocess
import sys
import textwrap

from translation_fixtures import write_run_file

from tests.distributed.launcher import free_port

# Rank 1 stalls in its second step, past the timeout, before any collective of that step.
STALLING_RANK = textwrap.dedent(
    """
    import sys, time
    import torch.distributed as dist
    from flexmoe_mt.cli import main
    from flexmoe_mt.train import Trainer

    step = Trainer.train_step

    def stalled(self):
        if dist.get_rank() == 1 and self.step == 1:
            time.sleep(12)
        return step(self)

    Trainer.train_step = stalled
    sys.exit(main(["train", "--config", sys.argv[1], "--quiet"]))
    """
)


def test_a_stalled_rank_stops_the_others_after_the_configured_timeout(tmp_path):
    run_file = write_run_file(tmp_path, "run", {"num_experts": 4}, {"max_steps": 3, "collective_timeout_s": 4})
    script = tmp_path / "stalling_rank.py"
    script.write_text(STALLING_RANK)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*command, "--master_port", str(free_port()), str(script), str(run_file)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("flexmoe-mt train: error: rank 0")]
    assert len(lines) == 1, done.stderr[-3000:]
    assert "train.collective_timeout_s = 4 s" in lines[0] and "skipped a step" in lines[0]
