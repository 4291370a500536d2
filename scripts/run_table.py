"""Run the results table of issue 9 (Kudugunta et al.'s Table 1 at our scale) and write one
``<row>/seed<N>.json`` per run into ``--results`` (``docs/runs``, tracked by git, so finished runs
survive a fresh machine); ``python -m flexmoe.models.results docs/runs > docs/results.md`` turns
them into the table.

    python scripts/run_table.py [--minutes 7] [--seeds 0,1,2] [--rows dense,token_target] [--out runs/table]

Rows (:data:`ROWS`): configs/table/<config>.toml, each trained for its share of ``--minutes`` of
CPU time (the configs' ``budget_clock = "cpu"``, so a busy machine does not shorten a run);
``pruned_token`` trains nothing (the token/token run of the same seed, pruned per target language
to its ``--prune-keep`` most used experts, NLLB-MoE style). A distilled row needs its teacher's run
of the same seed first (the default order does that): ``distilled_dense`` learns from the
full-budget token/token run (so teacher and student had a budget each), ``distilled_dense_shared``
from ``token_token_half``, trained half the budget, and trains the other half itself (teacher and
student share one budget: the equal-total-compute comparison). Finished runs are skipped (a run
resumes from its checkpoint in ``--out``), so the script can be killed and restarted;
``--reevaluate`` scores and times finished runs whose checkpoints are still in ``--out`` again
without training (throughput taken on a busy machine is redone on a quiet one).
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flexmoe import MoELayer, expert_usage, prune_experts  # noqa: E402
from flexmoe.data.corpus import Pair  # noqa: E402
from flexmoe.models.batching import collate, encode_pairs, model_inputs  # noqa: E402
from flexmoe.models.compare import throughputs  # noqa: E402
from flexmoe.models.demo import per_direction_sample  # noqa: E402
from flexmoe.models.evaluate import score, translate_pairs  # noqa: E402
from flexmoe.models.extraction import extract_direction  # noqa: E402
from flexmoe.models.runconfig import RunConfig, load_run_config  # noqa: E402
from flexmoe.models.train import TrainedModel, load_corpus, load_trained, train  # noqa: E402
from flexmoe.task.extract import count_parameters  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the table: ``config`` names configs/table/<config>.toml; ``budget`` is its share
    of ``--minutes``; ``teacher`` the row whose run of the same seed it distils from; ``source``
    the row whose trained run it reuses without training (pruning)."""

    config: str
    budget: float = 1.0
    teacher: str | None = None
    source: str | None = None


# In run order: a teacher or source row comes before the rows that need it.
ROWS = {
    "dense": Row("dense"),
    "token_token": Row("token_token"),
    "sentence_sentence": Row("sentence_sentence"),
    "target_target": Row("target_target"),
    "token_target": Row("token_target"),
    "token_langpair": Row("token_langpair"),
    "distilled_dense": Row("distilled_dense", teacher="token_token"),
    "pruned_token": Row("token_token", source="token_token"),
    "token_token_half": Row("token_token", budget=0.5),
    "distilled_dense_shared": Row("distilled_dense", budget=0.5, teacher="token_token_half"),
}
BATCH_SIZES = [1, 16, 64, 128]


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


def extraction_results(trained: TrainedModel, test: list[Pair], hypotheses: list[str], language: str) -> dict:
    """Every target language's sub-network translates its sentences; scored over all directions
    like the parent (so equal outputs give the parent's score), with the number of identical
    translations, and ``language``'s sub-network timed in turn with its parent."""
    config = trained.model.config
    if "langpair" in (config.encoder_routing, config.decoder_routing):
        return {}  # one sub-network per direction; not part of the table
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
            sub = dataclasses.replace(trained, model=extracted, task=target)
            sweeps = throughputs({"extracted": sub, "parent": trained}, [test[i] for i in indices], BATCH_SIZES)
            result["peak_tokens_per_s"] = max(sweeps["extracted"].values())
            result["parent_peak_tokens_per_s"] = max(sweeps["parent"].values())
            result["parameters"] = count_parameters(extracted)
    result["scores"] = score(test, combined).to_dict()
    return result


def pruned_results(trained: TrainedModel, corpus, test: list[Pair], keep: int, language: str) -> dict:
    """Per target language: prune every MoE layer to the language's ``keep`` most used experts
    (usage counted on training sentences into it) and score sentences into it."""
    train_data = encode_pairs(corpus["train"][:4000], trained.tokenizer, trained.tasks, trained.model.config.max_len)
    batches = [
        model_inputs(collate(train_data, range(i, min(i + 64, len(train_data.sources)))))
        for i in range(0, len(train_data.sources), 64)
    ]
    usage = expert_usage(trained.model, batches, by_task=True)
    hypotheses, pairs_all, result = [], [], {"per_language": {}}
    for target in trained.tasks.target_languages:
        pairs = [p for p in test if p.target_lang == target]
        if not pairs:
            continue
        pruned = prune_experts(trained.model, usage.top_experts(keep, task=trained.tasks.target_id(target))).eval()
        out, _ = scores_of(trained, pruned, pairs)
        hypotheses += out
        pairs_all += pairs
        if target == language:
            sub = dataclasses.replace(trained, model=pruned, task=target)
            result["peak_tokens_per_s"] = max(throughputs({"pruned": sub}, pairs, BATCH_SIZES)["pruned"].values())
            result["parameters"] = count_parameters(pruned)
            result["active_parameters"] = active_parameters(pruned)
    result["scores"] = score(pairs_all, hypotheses).to_dict()
    return result


def run_config(row: str, seed: int, minutes: float, out: Path, tsv_dir: str | None) -> RunConfig:
    """The run of ``row`` for ``seed``: its config with the seed, budget and run directory set
    (and its teacher's run directory, for a distilled row)."""
    spec = ROWS[row]
    run = load_run_config(REPO / "configs" / "table" / f"{spec.config}.toml")
    trained_row = spec.source or row
    train_config = dataclasses.replace(
        run.train, seed=seed, max_minutes=minutes * spec.budget, run_dir=str(out / trained_row / f"seed{seed}")
    )
    if spec.teacher:
        train_config = dataclasses.replace(train_config, distill_from=str(out / spec.teacher / f"seed{seed}"))
    data = run.data
    if tsv_dir:
        files = {s: str(Path(tsv_dir) / f"{s}.tsv") for s in ("train", "valid", "test")}
        data = dataclasses.replace(data, source="tsv", **files)
    return dataclasses.replace(run, data=data, train=train_config)


def evaluate_run(row: str, seed: int, run: RunConfig, corpus, args: argparse.Namespace) -> dict:
    """Scores, sizes and throughput of a finished run (the ``results.json`` of one table cell)."""
    trained = load_trained(run.train.run_dir)
    torch.set_num_threads(run.train.threads or torch.get_num_threads())
    test = corpus["test"]
    test = per_direction_sample(test, args.per_direction) if args.per_direction else test
    steps = torch.load(Path(run.train.run_dir) / "checkpoint.pt", weights_only=False)["step"]
    machine = f"{platform.machine()} ({os.cpu_count()} CPUs), torch {torch.__version__}"
    result = {"row": row, "seed": seed, "minutes": args.minutes, "budget": ROWS[row].budget, "machine": machine,
              "steps": steps, "language": args.language, "threads": torch.get_num_threads(),
              "budget_clock": run.train.budget_clock}  # fmt: skip
    if ROWS[row].source:
        result.update(pruned_results(trained, corpus, test, args.prune_keep, args.language))
        return result
    hypotheses, result["scores"] = scores_of(trained, trained.model, test)
    result["parameters"] = count_parameters(trained.model)
    result["active_parameters"] = active_parameters(trained.model)
    into = [p for p in test if p.target_lang == args.language]
    result["peak_tokens_per_s"] = max(throughputs({row: trained}, into, BATCH_SIZES)[row].values())
    config = trained.model.config
    if "target" in (config.encoder_routing, config.decoder_routing) and not config.is_dense:
        result["extracted"] = extraction_results(trained, test, hypotheses, args.language)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=7.0, help="training CPU minutes per run (default 7)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"subset of {list(ROWS)}")
    parser.add_argument("--out", default="runs/table", help="run directories (checkpoints; not tracked)")
    parser.add_argument("--results", default="docs/runs", help="<row>/seed<N>.json per finished run (tracked)")
    parser.add_argument("--language", default="fr", help="target language of the throughput figures")
    parser.add_argument("--per-direction", type=int, default=50, help="test sentences per direction (0: all)")
    parser.add_argument("--prune-keep", type=int, default=2, help="experts kept per layer by pruned_token")
    parser.add_argument(
        "--reevaluate",
        action="store_true",
        help="evaluate finished runs again (scores and throughput; no training): throughput figures "
        "taken while the machine was busy are redone on a quiet one",
    )
    parser.add_argument("--tsv-dir", help="DIR/{train,valid,test}.tsv instead of the embedded corpus")
    args = parser.parse_args()
    rows = args.rows.split(",")
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; rows are {list(ROWS)}")
    out, results = Path(args.out), Path(args.results)
    corpora: dict[str, object] = {}  # the rows share one corpus; loaded once per data config
    for seed in (int(s) for s in args.seeds.split(",")):
        for row in [r for r in ROWS if r in rows]:
            results_file = results / row / f"seed{seed}.json"
            run = run_config(row, seed, args.minutes, out, args.tsv_dir)
            if args.reevaluate:
                if not results_file.is_file() or not (Path(run.train.run_dir) / "checkpoint.pt").is_file():
                    continue  # not finished, or finished on another machine (its checkpoint is not here)
            elif results_file.is_file():
                continue  # finished
            if repr(run.data) not in corpora:
                corpora[repr(run.data)] = load_corpus(run.data)
            corpus = corpora[repr(run.data)]
            if not ROWS[row].source and not args.reevaluate:
                print(f"== {row} seed {seed}: training {args.minutes * ROWS[row].budget:g} minutes ==", flush=True)
                train(run, corpus)
            result = evaluate_run(row, seed, run, corpus, args)
            results_file.parent.mkdir(parents=True, exist_ok=True)
            results_file.write_text(json.dumps(result, indent=2) + "\n")
            print(f"{row} seed {seed}: mean chrF {result['scores']['mean_chrf']:.1f}", flush=True)


if __name__ == "__main__":
    main()
