"""Where a learning curve flattens, and what the results table costs at that step budget.

Train the curve runs first (the table's model, 10,000 steps, validation every 250), side by side:

    flexmoe-mt train --config apps/translation/configs/curves/dense.toml --quiet &
    flexmoe-mt train --config apps/translation/configs/curves/token_token.toml --quiet &

then, from the repository root:

    python apps/translation/scripts/plateau.py runs/curves/dense runs/curves/token_token

For each run it prints the validation chrF curve, the first step after which the smoothed curve
(mean of a point and its two neighbours, as validation chrF on a few hundred sentences is noisy)
rises by less than --min-gain over the next --window steps (the plateau), and the CPU seconds
per training step; then the step budget for the table (the latest plateau, rounded up to 500:
every full-budget row trains to the plateau; the half-budget rows of the equal-compute
distillation share one such budget) and the hours the table takes at that budget.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

# Training runs per seed in units of one full-budget run: 7 full rows (the distilled student
# also runs its teacher forward, ~+30%), the half-budget teacher and student, and evaluation
# (test translation, extraction, pruning, the throughput sweep) of 11 rows, ~1 run's worth.
RUNS_PER_SEED = 7 + 0.3 + 0.5 + 0.5 * 1.3 + 1.0


def read_curve(run_dir: Path) -> tuple[list[tuple[int, float]], float | None]:
    """(step, validation chrF) points and CPU seconds per training step of a run directory."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = sorted({r["step"]: r["chrf"] for r in records if r.get("split") == "valid"}.items())
    timed = [r for r in records if r.get("split") == "train" and "elapsed_s" in r and r["step"] > 0]
    seconds = timed[-1]["elapsed_s"] / timed[-1]["step"] if timed else None
    return curve, seconds


def smoothed(curve: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Each inner point's chrF averaged with its two neighbours' (the ends, with one neighbour,
    are left out: their mean would lag)."""
    return [(curve[i][0], sum(c for _, c in curve[i - 1 : i + 2]) / 3) for i in range(1, len(curve) - 1)]


def plateau_step(curve: list[tuple[int, float]], window: int, min_gain: float) -> int | None:
    """The first validated step after which the smoothed chrF gains less than ``min_gain``
    within the next ``window`` steps (over the points validated there); None when the curve is
    still rising or too short to tell."""
    smooth = smoothed(curve)
    for i, (step, chrf) in enumerate(smooth):
        ahead = [c for s, c in smooth[i + 1 :] if s <= step + window]
        if smooth[-1][0] < step + window or not ahead:
            return None
        if max(ahead) - chrf < min_gain:
            return step
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories with metrics.jsonl")
    parser.add_argument("--window", type=int, default=1000, help="steps to look ahead (default 1000)")
    parser.add_argument("--min-gain", type=float, default=1.0, help="chrF gain that still counts as rising")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--processes", type=int, default=2, help="runner processes side by side (one core each)")
    args = parser.parse_args(argv)
    plateaus, per_step = [], []
    for run_dir in args.runs:
        if not (run_dir / "metrics.jsonl").is_file():
            parser.error(f"{run_dir}/metrics.jsonl does not exist: train the curve run first")
        curve, seconds = read_curve(run_dir)
        step = plateau_step(curve, args.window, args.min_gain)
        points = ", ".join(f"{s}: {c:.1f}" for s, c in curve)
        print(f"{run_dir}: {points}")
        flat = f"flat from step {step}" if step is not None else "still rising (or too short to tell)"
        print(f"  {flat}; {seconds:.3f} CPU s per step" if seconds else f"  {flat}")
        plateaus.append(step)
        per_step += [seconds] if seconds else []
    if any(step is None for step in plateaus):
        print("no step budget: a curve has not flattened; train the curve runs longer (raise max_steps)")
        return
    steps = math.ceil(max(plateaus) / 500) * 500
    hours = args.seeds * RUNS_PER_SEED * steps * max(per_step) / args.processes / 3600 if per_step else math.nan
    print(
        f"table: --steps {steps} (set train.max_steps in every apps/translation/configs/table/*.toml); "
        f"about {hours:.1f} h for {args.seeds} seeds on {args.processes} cores (validation not included)"
    )


if __name__ == "__main__":
    main()
