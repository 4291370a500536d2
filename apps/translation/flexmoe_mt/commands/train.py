"""flexmoe-mt train --config apps/translation/configs/<name>.toml: train, or resume the run in train.run_dir.

Under torchrun --nproc_per_node N -m flexmoe_mt train --config ... every rank joins the world
group (gloo on CPU, NCCL when train.device is CUDA) and the MoE layers shard their experts
over it (flexmoe_mt.distributed)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from flexmoe.cli import CommandParser
from flexmoe_mt.runconfig import load_run_config


def main(argv: list[str]) -> None:
    parser = CommandParser("flexmoe-mt train", description=__doc__)
    parser.add_argument("--config", required=True, help="TOML run file ([data], [model], [train])")
    parser.add_argument("--fresh", action="store_true", help="delete train.run_dir's checkpoint and start over")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        run = load_run_config(args.config)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))  # a clear message and exit status 2, no traceback
    run_dir = Path(run.train.run_dir)
    joined = join_torchrun_world(run.train.device)
    try:
        if args.fresh and run_dir.exists() and int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(run_dir)
        from flexmoe_mt.train import train  # torch and the data stack load after argument errors

        if joined:
            import torch.distributed as dist

            dist.barrier()  # no rank looks for a checkpoint that --fresh is deleting

        path = train(run, progress=not args.quiet)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"run directory: {path}")
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()


def join_torchrun_world(device: str) -> bool:
    """Initialise torch.distributed when torchrun launched more than one rank (and nothing did
    yet); returns whether this call did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True
