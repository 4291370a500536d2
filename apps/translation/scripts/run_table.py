"""Run the results table (Kudugunta et al.'s Table 1 at our scale) and write one
<row>/seed<N>.json per run into --results (apps/translation/results, tracked by git, so finished
runs survive a fresh machine); python -m flexmoe_mt.results > docs/results.md turns them into the
table, the learning-curve figure and the claims with their significance. Run from the
repository root:

    python apps/translation/scripts/run_table.py [--steps N] [--seeds 0,1,2] [--rows dense,token_target]

Rows (ROWS): apps/translation/configs/table/<config>.toml, each trained for the same number of
optimizer steps (--steps, default the configs' max_steps: every table config carries the same
value); the configs' max_minutes is only a safety cap (CPU time) that a healthy run never
reaches. Every run records its validation curve (chrF every eval_every steps, from its
metrics.jsonl), the versions of the packages that build the corpus and a digest of the corpus.
pruned_token and pruned_token_keep4 train nothing (the token/token run of the same seed, pruned
per target language to its 2 or 4 most used experts, NLLB-MoE style; usage is counted on a
sample with the same number of training pairs from every direction). A distilled row needs its
teacher's run of the same seed first (the default order does that): distilled_dense learns from
the full-budget token/token run (so teacher and student had a budget each), distilled_dense_shared
from token_token_half, trained half the steps, and trains the other half itself (teacher and
student share one budget: the equal-total-compute comparison). Finished runs are skipped (a run
resumes from its checkpoint in --out), so the script can be killed and restarted;
--reevaluate scores and times finished runs whose checkpoints are still in --out again
without training, --reevaluate --timing-only only their throughput (wall clock: taken on a busy
machine, it is redone on a quiet one). Throughput: the batch doubles from 1 until each model's
tokens/s stops rising (or memory ends, or --max-batch); each model's peak and its batch are kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from pathlib import Path

import torch

APP = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(APP))

from flexmoe import ExpertUsage, MoELayer, expert_usage, prune_experts  # noqa: E402
from flexmoe.task.extract import count_parameters  # noqa: E402
from flexmoe_mt.batching import collate, encode_pairs, model_inputs  # noqa: E402
from flexmoe_mt.compare import peak_throughputs  # noqa: E402
from flexmoe_mt.data.corpus import Pair  # noqa: E402
from flexmoe_mt.demo import per_direction_sample  # noqa: E402
from flexmoe_mt.evaluate import score, translate_pairs  # noqa: E402
from flexmoe_mt.extraction import extract_direction  # noqa: E402
from flexmoe_mt.results import corpus_digest, package_versions  # noqa: E402
from flexmoe_mt.runconfig import RunConfig, load_run_config  # noqa: E402
from flexmoe_mt.train import METRICS, TrainedModel, load_corpus, load_trained, train  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the table: ``config`` names configs/table/<config>.toml; ``budget`` is its share
    of ``--steps``; ``teacher`` the row whose run of the same seed it distils from; ``source``
    the row whose trained run it reuses without training (pruning, to ``keep`` experts per layer)."""

    config: str
    budget: float = 1.0
    teacher: str | None = None
    source: str | None = None
    keep: int = 0


# In run order: a teacher or source row comes before the rows that need it.
ROWS = {
    "dense": Row("dense"),
    "token_token": Row("token_token"),
    "sentence_sentence": Row("sentence_sentence"),
    "target_target": Row("target_target"),
    "token_target": Row("token_target"),
    "token_langpair": Row("token_langpair"),
    "distilled_dense": Row("distilled_dense", teacher="token_token"),
    "pruned_token": Row("token_token", source="token_token", keep=2),
    "pruned_token_keep4": Row("token_token", source="token_token", keep=4),
    "token_token_half": Row("token_token", budget=0.5),
    "distilled_dense_shared": Row("distilled_dense", budget=0.5, teacher="token_token_half"),
}
# Training pairs per direction on which expert usage is counted (every direction equally).
USAGE_PER_DIRECTION = 200


def active_parameters(model: torch.nn.Module) -> int:
    """Parameters one token uses: all, minus the experts its MoE layers do not pick."""
    unused = 0
    for layer in model.modules():
        if isinstance(layer, MoELayer):
            per_expert = sum(p.numel() for p in layer.experts.parameters()) // layer.config.num_experts
            unused += (layer.config.num_experts - layer.config.top_k) * per_expert
    return count_parameters(model) - unused


def scores_of(trained: TrainedModel, model: torch.nn.Module, pairs: list[Pair]) -> tuple[list[str], dict]:
    hypotheses = translate_pairs(model, trained.tokenizer, trained.tasks, pairs)
    return hypotheses, score(pairs, hypotheses).to_dict()


def has_extraction(trained: TrainedModel) -> bool:
    """Whether the run's model is task-routed by target language (one sub-network per language)."""
    config = trained.model.config
    routings = (config.encoder_routing, config.decoder_routing)
    return not config.is_dense and "target" in routings and "langpair" not in routings


def extraction_results(trained: TrainedModel, test: list[Pair], hypotheses: list[str], language: str) -> dict:
    """Every target language's sub-network translates its sentences; scored over all directions
    like the parent (so equal outputs give the parent's score), with the number of identical
    translations and the size of ``language``'s sub-network (timed by :func:`timings`)."""
    combined = list(hypotheses)
    result = {"identical": 0, "sentences": len(test)}
    for target in trained.tasks.target_languages:
        indices = [i for i, p in enumerate(test) if p.target_lang == target]
        if not indices:
            continue
        extracted = extract_direction(trained.model, trained.tasks, target)
        sub_hypotheses, _ = scores_of(trained, extracted, [test[i] for i in indices])
        for i, hypothesis in zip(indices, sub_hypotheses):
            result["identical"] += hypothesis == hypotheses[i]
            combined[i] = hypothesis
        if target == language:
            result["parameters"] = count_parameters(extracted)
    result["scores"] = score(test, combined).to_dict()
    return result


def language_usage(
    trained: TrainedModel, train_pairs: list[Pair], per_direction: int = USAGE_PER_DIRECTION
) -> ExpertUsage:
    """Expert usage per target language, counted on ``per_direction`` training pairs of every
    direction (the corpus lists pairs direction by direction and kind by kind, so its first
    pairs would leave most languages uncounted)."""
    sample = per_direction_sample(train_pairs, per_direction)
    train_data = encode_pairs(sample, trained.tokenizer, trained.tasks, trained.model.config.max_len)
    batches = [
        model_inputs(collate(train_data, range(i, min(i + 64, len(train_data.sources)))))
        for i in range(0, len(train_data.sources), 64)
    ]
    return expert_usage(trained.model, batches, by_task=True)


def kept_routing_mass(trained: TrainedModel, usage: ExpertUsage, keep: int) -> dict[str, dict[str, float]]:
    """Per target language: the share of its routing mass (its (token, choice) pairs) that its
    ``keep`` most used experts carry, as the mean and the minimum over MoE layers."""
    shares = {}
    for language in trained.tasks.target_languages:
        task = trained.tasks.target_id(language)
        kept = usage.top_experts(keep, task=task)
        per_layer = []
        for name, experts in kept.items():
            row = usage.counts[name][task].double() if task < len(usage.counts[name]) else None
            if row is not None and row.sum() > 0:
                per_layer.append(float(row[experts].sum() / row.sum()))
        if per_layer:
            shares[language] = {"mean": sum(per_layer) / len(per_layer), "min": min(per_layer)}
    return shares


def pruned_model(trained: TrainedModel, usage: ExpertUsage, keep: int, target: str) -> torch.nn.Module:
    """The model with every MoE layer pruned to ``target``'s ``keep`` most used experts."""
    return prune_experts(trained.model, usage.top_experts(keep, task=trained.tasks.target_id(target))).eval()


def pruned_results(trained: TrainedModel, usage: ExpertUsage, test: list[Pair], keep: int, language: str) -> dict:
    """Per target language: prune every MoE layer to the language's ``keep`` most used experts
    and score sentences into it; sizes of ``language``'s pruned model; the routing mass the
    kept experts carry per language."""
    hypotheses, pairs_all, result = [], [], {"keep": keep}
    for target in trained.tasks.target_languages:
        pairs = [p for p in test if p.target_lang == target]
        if not pairs:
            continue
        pruned = pruned_model(trained, usage, keep, target)
        out, _ = scores_of(trained, pruned, pairs)
        hypotheses += out
        pairs_all += pairs
        if target == language:
            result["parameters"] = count_parameters(pruned)
            result["active_parameters"] = active_parameters(pruned)
    result["scores"] = score(pairs_all, hypotheses).to_dict()
    result["kept_routing_mass"] = kept_routing_mass(trained, usage, keep)
    result["usage_sample"] = f"{USAGE_PER_DIRECTION} training pairs per direction"
    return result


def timings(row: str, trained: TrainedModel, usage: ExpertUsage | None, test: list[Pair], args) -> dict:
    """Peak greedy decoding tokens/s into ``args.language`` and the batch it is reached at (the
    batch doubles until tokens/s stops rising; wall clock: take it on a quiet machine): the row's
    model (the pruned one for a pruned row) and, for a target-routed model, its extracted
    sub-network, timed in turn with it."""
    into = [p for p in test if p.target_lang == args.language]
    models = {"model": trained}
    if ROWS[row].source:
        pruned = pruned_model(trained, usage, ROWS[row].keep, args.language)
        models = {"model": dataclasses.replace(trained, model=pruned, task=args.language)}
    elif has_extraction(trained):
        extracted = extract_direction(trained.model, trained.tasks, args.language)
        models["extracted"] = dataclasses.replace(trained, model=extracted, task=args.language)
    peaks = {name: peak.to_dict() for name, peak in peak_throughputs(models, into, args.max_batch).items()}
    result = {"throughput": peaks["model"], "peak_tokens_per_s": peaks["model"]["peak_tokens_per_s"]}
    if "extracted" in peaks:
        result["extracted"] = {
            "throughput": peaks["extracted"],
            "peak_tokens_per_s": peaks["extracted"]["peak_tokens_per_s"],
            "parent_peak_tokens_per_s": peaks["model"]["peak_tokens_per_s"],
        }
    return result


def validation_curve(run_dir: str | Path) -> list[dict]:
    """The run's validation records (step, loss, mean chrF) from its metrics.jsonl, by step."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    curve = {r["step"]: {"step": r["step"], "loss": r["loss"], "chrf": r["chrf"]} for r in records
             if r.get("split") == "valid"}  # fmt: skip
    return [curve[step] for step in sorted(curve)]


def table_config(config: str) -> RunConfig:
    return load_run_config(APP / "configs" / "table" / f"{config}.toml")


def default_steps() -> int:
    """The step budget every table config carries (``train.max_steps``, the same in all)."""
    return table_config("dense").train.max_steps


def run_config(row: str, seed: int, steps: int, out: Path, tsv_dir: str | None) -> RunConfig:
    """The run of ``row`` for ``seed``: its config with the seed, step budget (its share of
    ``steps``; the config's time cap scaled alike) and run directory set (and its teacher's run
    directory, for a distilled row)."""
    spec = ROWS[row]
    run = table_config(spec.config)
    trained_row = spec.source or row
    train_config = dataclasses.replace(
        run.train,
        seed=seed,
        max_steps=round(steps * spec.budget),
        max_minutes=run.train.max_minutes * spec.budget,
        run_dir=str(out / trained_row / f"seed{seed}"),
    )
    if spec.teacher:
        train_config = dataclasses.replace(train_config, distill_from=str(out / spec.teacher / f"seed{seed}"))
    data = run.data
    if tsv_dir:
        files = {s: str(Path(tsv_dir) / f"{s}.tsv") for s in ("train", "valid", "test")}
        data = dataclasses.replace(data, source="tsv", **files)
    return dataclasses.replace(run, data=data, train=train_config)


def load_run(row: str, run: RunConfig, corpus) -> tuple[TrainedModel, ExpertUsage | None]:
    """A finished run's model (threads set as it trained) and, for a pruned row, its usage per language."""
    trained = load_trained(run.train.run_dir)
    torch.set_num_threads(run.train.threads or torch.get_num_threads())
    return trained, language_usage(trained, corpus["train"]) if ROWS[row].source else None


def evaluate_run(row: str, seed: int, run: RunConfig, corpus, args: argparse.Namespace) -> dict:
    """Scores, sizes and throughput of a finished run (the ``<row>/seed<N>.json`` of one table cell)."""
    trained, usage = load_run(row, run, corpus)
    test = test_pairs(corpus, args)
    steps = torch.load(Path(run.train.run_dir) / "checkpoint.pt", weights_only=False)["step"]
    machine = f"{platform.machine()} ({os.cpu_count()} CPUs), torch {torch.__version__}"
    result = {"row": row, "seed": seed, "step_budget": args.steps, "budget": ROWS[row].budget, "machine": machine,
              "steps": steps, "max_steps": run.train.max_steps, "language": args.language,
              "threads": torch.get_num_threads(), "packages": package_versions(),
              "corpus_sha256": corpus_digest(corpus), "curve": validation_curve(run.train.run_dir)}  # fmt: skip
    if usage is not None:
        result.update(pruned_results(trained, usage, test, ROWS[row].keep, args.language))
    else:
        hypotheses, result["scores"] = scores_of(trained, trained.model, test)
        result["parameters"] = count_parameters(trained.model)
        result["active_parameters"] = active_parameters(trained.model)
        if has_extraction(trained):
            result["extracted"] = extraction_results(trained, test, hypotheses, args.language)
    return merge_timings(result, timings(row, trained, usage, test, args))


def retime_run(row: str, run: RunConfig, corpus, results_file: Path, args: argparse.Namespace) -> dict:
    """A finished run's results with its throughput figures taken again (nothing else changes)."""
    trained, usage = load_run(row, run, corpus)
    result = json.loads(results_file.read_text())
    return merge_timings(result, timings(row, trained, usage, test_pairs(corpus, args), args))


def test_pairs(corpus, args: argparse.Namespace) -> list[Pair]:
    test = corpus["test"]
    return per_direction_sample(test, args.per_direction) if args.per_direction else test


def merge_timings(result: dict, timed: dict) -> dict:
    result["peak_tokens_per_s"] = timed["peak_tokens_per_s"]
    result["throughput"] = timed["throughput"]
    if "extracted" in timed:
        result["extracted"].update(timed["extracted"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--steps",
        type=int,
        default=default_steps(),
        help="optimizer steps per run (default: the table configs' max_steps)",
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"subset of {list(ROWS)}")
    parser.add_argument("--out", default="runs/table", help="run directories (checkpoints; not tracked)")
    parser.add_argument(
        "--results", default="apps/translation/results", help="<row>/seed<N>.json per finished run (tracked)"
    )
    parser.add_argument("--language", default="fr", help="target language of the throughput figures")
    parser.add_argument("--per-direction", type=int, default=50, help="test sentences per direction (0: all)")
    parser.add_argument("--max-batch", type=int, default=1024, help="largest batch of the throughput sweep")
    parser.add_argument(
        "--reevaluate",
        action="store_true",
        help="evaluate finished runs again (scores and throughput; no training): throughput figures "
        "taken while the machine was busy are redone on a quiet one",
    )
    parser.add_argument(
        "--timing-only",
        action="store_true",
        help="with --reevaluate: take the throughput figures again, keep the scores",
    )
    parser.add_argument("--tsv-dir", help="DIR/{train,valid,test}.tsv instead of the embedded corpus")
    args = parser.parse_args()
    rows = args.rows.split(",")
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; rows are {list(ROWS)}")
    if args.timing_only and not args.reevaluate:
        parser.error("--timing-only goes with --reevaluate")
    out, results = Path(args.out), Path(args.results)
    corpora: dict[str, object] = {}  # the rows share one corpus; loaded once per data config
    for seed in (int(s) for s in args.seeds.split(",")):
        for row in [r for r in ROWS if r in rows]:
            results_file = results / row / f"seed{seed}.json"
            run = run_config(row, seed, args.steps, out, args.tsv_dir)
            if args.reevaluate:
                if not results_file.is_file() or not (Path(run.train.run_dir) / "checkpoint.pt").is_file():
                    continue  # not finished, or finished on another machine (its checkpoint is not here)
            elif results_file.is_file():
                continue  # finished
            if repr(run.data) not in corpora:
                corpora[repr(run.data)] = load_corpus(run.data)
            corpus = corpora[repr(run.data)]
            if args.reevaluate and args.timing_only:
                results_file.write_text(json.dumps(retime_run(row, run, corpus, results_file, args), indent=2) + "\n")
                print(f"{row} seed {seed}: timed again", flush=True)
                continue
            if not ROWS[row].source and not args.reevaluate:
                print(f"== {row} seed {seed}: training {run.train.max_steps} steps ==", flush=True)
                train(run, corpus)
            result = evaluate_run(row, seed, run, corpus, args)
            results_file.parent.mkdir(parents=True, exist_ok=True)
            results_file.write_text(json.dumps(result, indent=2) + "\n")
            print(f"{row} seed {seed}: mean chrF {result['scores']['mean_chrf']:.1f}", flush=True)


if __name__ == "__main__":
    main()
