"""The results table from the runs of apps/translation/scripts/run_table.py (run from the
repository root): python -m flexmoe_mt.results > docs/results.md.

Reads <runs>/<row>/seed<N>.json and prints Markdown: per row the mean chrF and BLEU
over directions as mean ± standard deviation over seeds, parameters (total and active per
token), peak decoding throughput, the extracted sub-networks' chrF and whether they equal their
parent; then chrF per direction.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROW_NAMES = {
    "dense": "dense",
    "token_token": "token / token",
    "sentence_sentence": "sentence / sentence",
    "target_target": "target / target",
    "token_target": "token / target",
    "token_langpair": "token / langpair",
    "distilled_dense": "dense, distilled from token / token",
    "pruned_token": "token / token, pruned per language",
    "token_token_half": "token / token, half budget",
    "distilled_dense_shared": "dense, distilled from token / token, half budget each",
}
# The committed run data, relative to the repository root.
RESULTS = Path("apps/translation/results")


def spread(values: list[float], digits: int = 1) -> str:
    """``mean ± std`` over seeds (``mean`` alone for one seed)."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def load_results(runs: Path) -> dict[str, list[dict]]:
    by_row: dict[str, list[dict]] = {}
    for path in sorted(runs.glob("*/seed*.json")):
        result = json.loads(path.read_text())
        by_row.setdefault(result["row"], []).append(result)
    return by_row


def versus(speeds: list[float], baseline: float | None, name: str) -> str:
    """``, xR vs name``: the mean of ``speeds`` over ``baseline`` (nothing without a baseline)."""
    return f", x{statistics.mean(speeds) / baseline:.2f} vs {name}" if baseline and speeds else ""


def extracted_cells(results: list[dict], dense_speed: float | None = None) -> str:
    """chrF of the extracted sub-networks (over all directions, each sentence translated by its
    target language's sub-network), identical translations, and throughput vs the parent (each
    run's pair timed in turn) and vs the dense row's mean."""
    extracted = [r["extracted"] for r in results if r.get("extracted")]
    if not extracted:
        return "|  |  |"
    chrf = spread([e["scores"]["mean_chrf"] for e in extracted])
    identical = sum(e["identical"] for e in extracted)
    sentences = sum(e["sentences"] for e in extracted)
    speeds = [e["peak_tokens_per_s"] for e in extracted]
    ratio = spread([e["peak_tokens_per_s"] / e["parent_peak_tokens_per_s"] for e in extracted], digits=2)
    parameters = f"{extracted[0]['parameters']:,}"
    return (
        f"| {chrf} ({identical}/{sentences} identical) | {spread(speeds, digits=0)} "
        f"(x{ratio} vs parent{versus(speeds, dense_speed, 'dense')}), {parameters} parameters |"
    )


def table(by_row: dict[str, list[dict]]) -> str:
    rows = [row for row in ROW_NAMES if row in by_row]
    first = by_row[rows[0]][0]
    lines = [
        "| encoder / decoder routing | seeds | steps | mean chrF | mean BLEU | parameters (active) "
        f"| peak tokens/s into {first.get('language', 'fr')} | extracted chrF | extracted tokens/s into "
        f"{first.get('language', 'fr')} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    dense = [r["peak_tokens_per_s"] for r in by_row.get("dense", []) if "peak_tokens_per_s" in r]
    dense_speed = statistics.mean(dense) if dense else None
    for row in rows:
        results = by_row[row]
        chrf = [r["scores"]["mean_chrf"] for r in results]
        bleu = [r["scores"]["mean_bleu"] for r in results]
        speed = [r["peak_tokens_per_s"] for r in results if "peak_tokens_per_s" in r]  # tokens/s
        parameters = f"{results[0].get('parameters', 0):,} ({results[0].get('active_parameters', 0):,})"
        steps = spread([r.get("steps", 0) for r in results], digits=0)
        lines.append(
            f"| {ROW_NAMES[row]} | {len(results)} | {steps} | {spread(chrf)} | {spread(bleu)} | {parameters} "
            f"| {spread(speed, digits=0)}{'' if row == 'dense' else versus(speed, dense_speed, 'dense')} "
            f"{extracted_cells(results, dense_speed)}"
        )
    return "\n".join(lines)


def direction_table(by_row: dict[str, list[dict]]) -> str:
    rows = [row for row in ROW_NAMES if row in by_row]
    directions = sorted({d for row in rows for r in by_row[row] for d in r["scores"]["chrf"]})
    lines = ["| direction | BLEU tokenizer | " + " | ".join(ROW_NAMES[r] for r in rows) + " |"]
    lines.append("|---" * (len(rows) + 2) + "|")
    for direction in directions:
        tokenizer = next(
            r["scores"]["bleu_tokenizer"][direction]
            for row in rows
            for r in by_row[row]
            if direction in r["scores"]["chrf"]
        )
        cells = [
            spread([r["scores"]["chrf"][direction] for r in by_row[row] if direction in r["scores"]["chrf"]])
            for row in rows
        ]
        lines.append(f"| {direction} | {tokenizer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(runs: Path) -> str:
    by_row = load_results(runs)
    if not by_row:
        raise SystemExit(f"no {runs}/<row>/seed<N>.json: run apps/translation/scripts/run_table.py first")
    some = next(iter(by_row.values()))[0]
    return "\n\n".join(
        [
            "# Results: routing strategies for multilingual translation at our scale",
            f"Generated by `python -m flexmoe_mt.results {runs}` from runs of "
            f"`python apps/translation/scripts/run_table.py "
            f"--minutes {some['minutes']:g}`. Machine: {some['machine']}, {some['threads']} threads. Every trained row "
            f"had the same training budget ({some['minutes']:g} minutes of {some.get('budget_clock', 'wall')} time, "
            "validation excluded), except the two half-budget rows: a token / token teacher trained half of "
            "it and a dense student distilled from it trained the other half (teacher and student share one "
            "budget). A distilled student's budget includes its teacher's forward passes. "
            "chrF: sacrebleu chrF2, mean over directions; BLEU: sacrebleu with "
            "the `char` tokenizer for CJK/Thai targets and `13a` otherwise (see the per-direction table). "
            "Spread: mean ± standard deviation over seeds. Throughput: peak greedy decoding tokens/s over batch "
            "sizes 1, 16, 64, 128.",
            table(by_row),
            "## chrF per direction",
            direction_table(by_row),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    print(render(Path(argv[0]) if argv else RESULTS))


if __name__ == "__main__":
    main()
