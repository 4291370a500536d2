"""flexmoe-mt train --config apps/translation/configs/<name>.toml: train, or resume the run in train.run_dir.

Under torchrun --nproc_per_node N -m flexmoe_mt train --config ... every rank joins the world
group (gloo on CPU, NCCL when train.device is CUDA) and the MoE layers shard their experts
over it (flexmoe_mt.distributed). A rank that waits in a collective longer than
train.collective_timeout_s (default 300) stops the run with an error naming the likely cause."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from flexmoe.cli import CommandParser
from flexmoe_mt.runconfig import load_run_config
from flexmoe_mt.runfiles import clear_run, files_to_clear


def main(argv: list[str]) -> None:
    parser = CommandParser("flexmoe-mt train", description=__doc__)
    parser.add_argument("--config", required=True, help="TOML run file ([data], [model], [train])")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="delete the run's own files in train.run_dir (checkpoint, metrics, plots, scores; nothing else) "
        "and start over",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        run = load_run_config(args.config)
        # Every rank checks (reading only) before any joins: a refusal stops them all alike.
        stale = files_to_clear(Path(run.train.run_dir)) if args.fresh else []
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))  # a clear message and exit status 2, no traceback
    joined = join_torchrun_world(run.train.device, run.train.collective_timeout_s)
    rank = int(os.environ.get("RANK", "0"))
    try:
        if rank == 0:
            clear_run(Path(run.train.run_dir), stale)
        from flexmoe_mt.train import Trainer  # torch and the data stack load after argument errors

        if joined:
            import torch.distributed as dist

            dist.barrier()  # no rank looks for a checkpoint that --fresh is deleting
        try:
            trainer = Trainer(run, progress=not args.quiet)
        except (ValueError, FileNotFoundError) as error:  # the data, the run directory, a damaged checkpoint
            parser.error(str(error))
        try:
            path = trainer.run()
        except RuntimeError as error:
            if not joined:
                raise
            parser.error(collective_failure(error, rank, run.train.collective_timeout_s))
        if rank == 0:
            print(f"run directory: {path}")
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()


def collective_failure(error: RuntimeError, rank: int, timeout_s: float) -> str:
    """One line for a collective that failed under torchrun: what happened and the likely cause."""
    text = " ".join(str(error).split())
    cause = "another rank crashed, hung or skipped a step (see its output above)"
    if "timed out" in text.lower() or "timeout" in text.lower():
        what = f"a collective waited longer than train.collective_timeout_s = {timeout_s:g} s"
        fix = "; if steps legitimately take longer, raise train.collective_timeout_s"
    else:
        what, fix = "a collective failed", ""
    return f"rank {rank}: {what}: {cause}{fix} (backend: {text[:300]})"


def join_torchrun_world(device: str, timeout_s: float) -> bool:
    """Initialise torch.distributed when torchrun launched more than one rank (and nothing did
    yet), with collectives timing out after ``timeout_s``; returns whether this call did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return True
