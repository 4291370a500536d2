"""PNG plots of a run (matplotlib, Agg backend): loss curves, chrF per direction, expert load per task."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt
import torch

from flexmoe.layer import MoELayer
from flexmoe.task import expert_usage
from flexmoe_mt import runfiles
from flexmoe_mt.batching import EncodedPairs, in_order_batches, model_inputs
from flexmoe_mt.translation import TranslationModel


def read_metrics(run_dir: str | Path) -> list[dict]:
    return runfiles.read_metrics(Path(run_dir) / runfiles.METRICS)


def plot_losses(records: list[dict], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(6, 4))
    for split in ("train", "valid"):
        points = [(r["step"], r["loss"]) for r in records if r["split"] == split]
        if points:
            axis.plot(*zip(*points), label=f"{split} loss", marker="." if split == "valid" else None)
    axis.set_xlabel("step")
    axis.set_ylabel("cross-entropy (train: label-smoothed)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_chrf(records: list[dict], path: Path) -> None:
    valid = [r for r in records if r["split"] == "valid"]
    if not valid:
        return
    by_direction = valid[-1]["chrf_by"]
    figure, axis = plt.subplots(figsize=(max(6, 0.35 * len(by_direction)), 4))
    axis.bar(list(by_direction), list(by_direction.values()))
    axis.set_ylabel(f"chrF (validation, step {valid[-1]['step']})")
    axis.set_ylim(0, 100)
    axis.tick_params(axis="x", rotation=90)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def expert_load(model: TranslationModel, data: EncodedPairs, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Per MoE layer, [tasks, experts] share of each task's routed tokens each expert took.
    Tasks are target languages (language pairs for langpair-routed layers)."""
    device = next(model.parameters()).device
    batches = [
        {key: value.to(device) for key, value in model_inputs(batch).items()}
        for batch in in_order_batches(data, batch_size)
    ]
    usage = expert_usage(model, batches, by_task=True)
    return {name: counts / counts.sum(1, keepdim=True).clamp_min(1) for name, counts in usage.counts.items()}


def plot_expert_load(load: dict[str, torch.Tensor], task_names: list[str], path: Path) -> None:
    figure, axes = plt.subplots(1, len(load), figsize=(3.2 * len(load), 0.3 * len(task_names) + 1.5), squeeze=False)
    for axis, (name, share) in zip(axes[0], load.items()):
        image = axis.imshow(share.numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis")
        axis.set_title(name.replace(".ffn", ""), fontsize=8)
        axis.set_xlabel("expert")
        rows = share.shape[0]
        axis.set_yticks(range(rows), task_names[:rows] if rows <= len(task_names) else range(rows), fontsize=6)
    figure.colorbar(image, ax=axes[0].tolist(), label="share of task's tokens")
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_run(
    run_dir: str | Path, model: TranslationModel, data: EncodedPairs, target_languages: list[str]
) -> list[Path]:
    """Write loss.png, chrf.png and (MoE models) expert_load.png (rows: ``target_languages``,
    the model's task table) into ``run_dir``."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    written = [run_dir / "loss.png", run_dir / "chrf.png"]
    plot_losses(records, written[0])
    plot_chrf(records, written[1])
    if any(isinstance(m, MoELayer) for m in model.modules()):
        load = expert_load(model, data)
        (run_dir / "expert_load.json").write_text(json.dumps({k: v.tolist() for k, v in load.items()}))
        plot_expert_load(load, target_languages, run_dir / "expert_load.png")
        written.append(run_dir / "expert_load.png")
    return written


def plot_learning_curves(curves: dict[str, list[list[dict]]], path: Path) -> None:
    """Validation chrF vs step, one line per row (mean over its seeds at the steps every seed
    validated) with the seeds' min-max range shaded. curves: row label -> one curve per seed,
    each a list of ``{"step", "chrf"}`` records."""
    figure, axis = plt.subplots(figsize=(8, 5))
    for label, seeds in curves.items():
        by_step = [{r["step"]: r["chrf"] for r in curve} for curve in seeds if curve]
        if not by_step:
            continue
        steps = sorted(set.intersection(*(set(s) for s in by_step)))
        values = [[s[step] for s in by_step] for step in steps]
        mean = [sum(v) / len(v) for v in values]
        line = axis.plot(steps, mean, label=f"{label} ({len(by_step)} seeds)")[0]
        axis.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.2,
                          color=line.get_color())  # fmt: skip
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("validation chrF (mean over directions)")
    axis.legend(fontsize="small")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
