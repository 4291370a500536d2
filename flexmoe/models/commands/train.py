"""``flexmoe train --config configs/<name>.toml``: train, or resume the run in ``train.run_dir``."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from flexmoe.models.runconfig import load_run_config


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="flexmoe train", description=__doc__)
    parser.add_argument("--config", required=True, help="TOML run file ([data], [model], [train])")
    parser.add_argument("--fresh", action="store_true", help="delete train.run_dir's checkpoint and start over")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        run = load_run_config(args.config)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))  # a clear message and exit status 2, no traceback
    run_dir = Path(run.train.run_dir)
    if args.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    from flexmoe.models.train import train  # torch and the data stack load after argument errors

    print(f"run directory: {train(run, progress=not args.quiet)}")
