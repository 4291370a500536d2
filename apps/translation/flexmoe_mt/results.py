"""The results page from the runs of apps/translation/scripts/run_table.py (run from the
repository root): python -m flexmoe_mt.results > docs/results.md.

Reads <runs>/<row>/seed<N>.json and prints Markdown: per row the mean chrF and BLEU over
directions as mean ± standard deviation over seeds, parameters (total and active per token),
peak decoding throughput and its batch, the extracted sub-networks; then each of Kudugunta et
al.'s claims with the difference, its 95% interval, the p-value and a verdict
(flexmoe_mt.stats); the distillation measure; the routing mass pruning keeps; equal-FLOPs
comparisons from the validation curves; chrF per direction. ``--figure PATH`` also draws the
learning curves of every row (needs runs that recorded curves).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import itertools
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flexmoe_mt.stats import Comparison, gain_ratio, paired, welch

ROW_NAMES = {
    "dense": "dense",
    "token_token": "token / token",
    "sentence_sentence": "sentence / sentence",
    "target_target": "target / target",
    "token_target": "token / target",
    "token_langpair": "token / langpair",
    "distilled_dense": "dense, distilled from token / token",
    "pruned_token": "token / token, pruned per language to 2 experts",
    "pruned_token_keep4": "token / token, pruned per language to 4 experts",
    "token_token_half": "token / token, half budget",
    "distilled_dense_shared": "dense, distilled from token / token, half budget each",
}
# The committed run data and the learning-curve figure, relative to the repository root.
RESULTS = Path("apps/translation/results")
FIGURE = Path("docs/images/results_curves.png")
TABLE_COMMAND = "python apps/translation/scripts/run_table.py"
# Packages whose versions decide the corpus (babel, num2words), the tokenizer or the scores;
# recorded beside every result.
PACKAGES = ("babel", "num2words", "sentencepiece", "sacrebleu", "torch")


def package_versions() -> dict[str, str]:
    """Installed versions of :data:`PACKAGES`."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def corpus_digest(corpus) -> str:
    """SHA-256 of every split's pairs, in order: equal digests mean the runs saw the same corpus."""
    digest = hashlib.sha256()
    for split in ("train", "valid", "test"):
        for pair in corpus.splits.get(split, []):
            line = f"{split}\t{pair.source_lang}\t{pair.target_lang}\t{pair.source}\t{pair.target}\n"
            digest.update(line.encode())
    return digest.hexdigest()


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


def time_budgeted(result: dict) -> bool:
    """A run trained to a time budget (``minutes``), before the table trained by steps."""
    return "step_budget" not in result


def pruning_valid(result: dict) -> bool:
    """A pruned run whose usage was counted on every direction (``usage_sample`` recorded)."""
    return "usage_sample" in result


def chrf(results: list[dict]) -> list[float]:
    return [r["scores"]["mean_chrf"] for r in results]


def extracted_chrf(results: list[dict]) -> list[float]:
    return [r["extracted"]["scores"]["mean_chrf"] for r in results if r.get("extracted")]


def peak_cell(results: list[dict]) -> str:
    """Peak tokens/s (mean ± std) and the batch each seed peaked at (older runs: a fixed sweep)."""
    speeds = [r["peak_tokens_per_s"] for r in results if "peak_tokens_per_s" in r]
    return f"{spread(speeds, digits=0)}{peak_batches([r.get('throughput') for r in results])}"


def peak_batches(sweeps: list[dict | None]) -> str:
    """`` at batch 64/128`` (each seed's peak batch), flagged when a sweep hit its batch limit
    still rising (the peak lies beyond it); nothing for runs without a sweep."""
    sweeps = [s for s in sweeps if s]
    if not sweeps:
        return ""
    batches = "/".join(str(b) for b in sorted({s["peak_batch"] for s in sweeps}))
    rising = any(s.get("stopped") == "limit" for s in sweeps)
    return f" at batch {batches}{' (still rising at the batch limit)' if rising else ''}"


def versus(speeds: list[float], baseline: float | None, name: str) -> str:
    """``, xR vs name``: the mean of ``speeds`` over ``baseline`` (nothing without a baseline)."""
    return f", x{statistics.mean(speeds) / baseline:.2f} vs {name}" if baseline and speeds else ""


def extracted_cells(results: list[dict], dense_speed: float | None = None) -> str:
    """chrF of the extracted sub-networks (over all directions, each sentence translated by its
    target language's sub-network), identical translations, and throughput at its own peak vs
    the parent's peak (each run's pair timed in turn) and vs the dense row's mean peak."""
    extracted = [r["extracted"] for r in results if r.get("extracted")]
    if not extracted:
        return "|  |  |"
    identical = sum(e["identical"] for e in extracted)
    sentences = sum(e["sentences"] for e in extracted)
    speeds = [e["peak_tokens_per_s"] for e in extracted]
    ratio = spread([e["peak_tokens_per_s"] / e["parent_peak_tokens_per_s"] for e in extracted], digits=2)
    at = peak_batches([e.get("throughput") for e in extracted])
    return (
        f"| {spread(extracted_chrf(results))} ({identical}/{sentences} identical) | {spread(speeds, digits=0)}{at} "
        f"(x{ratio} vs parent{versus(speeds, dense_speed, 'dense')}), {extracted[0]['parameters']:,} parameters |"
    )


def row_label(row: str, results: list[dict]) -> str:
    marks = ""
    if any(time_budgeted(r) for r in results):
        marks += " †"
    if row.startswith("pruned") and not all(pruning_valid(r) for r in results):
        marks += " ‡"
    return ROW_NAMES[row] + marks


def table(by_row: dict[str, list[dict]]) -> str:
    rows = [row for row in ROW_NAMES if row in by_row]
    language = by_row[rows[0]][0].get("language", "fr")
    lines = [
        "| encoder / decoder routing | seeds | steps | mean chrF | mean BLEU | parameters (active) "
        f"| peak tokens/s into {language} | extracted chrF | extracted tokens/s into {language} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    dense = [r["peak_tokens_per_s"] for r in by_row.get("dense", []) if "peak_tokens_per_s" in r]
    dense_speed = statistics.mean(dense) if dense else None
    for row in rows:
        results = by_row[row]
        speed = [r["peak_tokens_per_s"] for r in results if "peak_tokens_per_s" in r]
        parameters = f"{results[0].get('parameters', 0):,} ({results[0].get('active_parameters', 0):,})"
        steps = spread([r.get("steps", 0) for r in results], digits=0)
        bleu = [r["scores"]["mean_bleu"] for r in results]
        lines.append(
            f"| {row_label(row, results)} | {len(results)} | {steps} | {spread(chrf(results))} | {spread(bleu)} "
            f"| {parameters} | {peak_cell(results)}{'' if row == 'dense' else versus(speed, dense_speed, 'dense')} "
            f"{extracted_cells(results, dense_speed)}"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Test:
    """One comparison behind a claim: ``measure(results of a row)`` -> values per seed; ``a``
    minus ``b``; ``paired`` when both come from the same runs (matched by seed); ``sign``: the
    direction the claim expects (+1: a above b, 0: no difference)."""

    label: str
    a: str
    b: str
    sign: int
    paired: bool = False
    measure_a: Callable[[list[dict]], list[float]] = chrf
    measure_b: Callable[[list[dict]], list[float]] = chrf


CLAIMS: dict[str, list[Test]] = {
    "Task routing beats token routing (chrF)": [
        Test("token / target - token / token", "token_target", "token_token", +1),
        Test("target / target - token / token", "target_target", "token_token", +1),
    ],
    "MoE beats dense at the same steps (chrF)": [
        Test("token / token - dense", "token_token", "dense", +1),
        Test("token / target - dense", "token_target", "dense", +1),
        Test("target / target - dense", "target_target", "dense", +1),
    ],
    "Extraction keeps the gain at dense cost (chrF; tokens/s at each model's own peak)": [
        Test("extracted token / target - dense", "token_target", "dense", +1, measure_a=extracted_chrf),
        Test(
            "extracted token / target - its parent",
            "token_target",
            "token_target",
            0,
            paired=True,
            measure_a=extracted_chrf,
        ),
        Test(
            "extracted token / target - dense, peak tokens/s (the same cost claimed)",
            "token_target",
            "dense",
            0,
            measure_a=lambda rs: [r["extracted"]["peak_tokens_per_s"] for r in rs if r.get("extracted")],
            measure_b=lambda rs: [r["peak_tokens_per_s"] for r in rs],
        ),
    ],
    "Pruning a token-MoE per language loses the gain (chrF)": [
        Test("pruned to 2 - token / token", "pruned_token", "token_token", -1, paired=True),
        Test("pruned to 4 - token / token", "pruned_token_keep4", "token_token", -1, paired=True),
        Test("pruned to 2 - dense", "pruned_token", "dense", -1),
    ],
}


def by_seed(results: list[dict], measure: Callable[[list[dict]], list[float]]) -> dict[int, float]:
    return {r["seed"]: value for r in results for value in measure([r])}


def compare(test: Test, by_row: dict[str, list[dict]]) -> Comparison | None:
    if test.a not in by_row or test.b not in by_row:
        return None
    a, b = by_seed(by_row[test.a], test.measure_a), by_seed(by_row[test.b], test.measure_b)
    if not a or not b:
        return None
    if test.paired:
        seeds = sorted(set(a) & set(b))
        return paired([a[s] for s in seeds], [b[s] for s in seeds]) if seeds else None
    return welch(list(a.values()), list(b.values()))


def equality_verdict(result: Comparison) -> str:
    """For a claim of no difference: identical values, no significant difference, or a loss."""
    if result.difference == 0 and (math.isnan(result.p) or result.low == result.high):
        return "holds (identical)"
    if math.isnan(result.p):
        return "not testable (one seed)"
    return "does not hold" if result.p < 0.05 else "holds (no significant difference)"


def usable(row: str, by_row: dict[str, list[dict]]) -> bool:
    """Whether a row's runs may back a claim: pruned rows only with usage counted on every direction."""
    return row in by_row and (not row.startswith("pruned") or all(pruning_valid(r) for r in by_row[row]))


def claims(by_row: dict[str, list[dict]]) -> str:
    """The claims table, then one sentence per claim with its comparisons' verdicts."""
    summary: dict[str, list[str]] = {}
    lines = [
        "| claim | comparison | difference [95% interval], p | verdict |",
        "|---|---|---|---|",
    ]
    for claim, tests in CLAIMS.items():
        for test in tests:
            if not (usable(test.a, by_row) and usable(test.b, by_row)):
                why = "usage counted on one direction pair: invalid, rerun" if test.a in by_row else "no runs"
                lines.append(f"| {claim} | {test.label} | n/a | not measured ({why}) |")
                summary.setdefault(claim, []).append(f"{test.label}: not measured")
                continue
            result = compare(test, by_row)
            if result is None:
                continue
            verdict = result.verdict(test.sign) if test.sign else equality_verdict(result)
            summary.setdefault(claim, []).append(f"{test.label}: {verdict}")
            lines.append(f"| {claim} | {test.label} | {result.describe()} | {verdict} |")
    sentences = [f"{claim}: {'; '.join(verdicts)}." for claim, verdicts in summary.items()]
    return "\n".join(lines) + "\n\nIn words: " + " ".join(sentences)


def distillation(by_row: dict[str, list[dict]]) -> str:
    """(student - dense) / (teacher - dense) for both distilled rows."""
    pairs = [
        ("distilled_dense_shared", "token_token_half", "equal total compute (teacher and student half the steps each)"),
        ("distilled_dense", "token_token", "teacher and student the full steps each (twice the compute)"),
    ]
    lines = []
    for student, teacher, budget in pairs:
        if not all(r in by_row for r in (student, teacher, "dense")):
            continue
        ratio = gain_ratio(chrf(by_row[student]), chrf(by_row[teacher]), chrf(by_row["dense"]))
        if ratio.ratio is None:
            verdict = "undefined at this budget"
        elif ratio.low <= 1 / 3 <= ratio.high:
            verdict = "holds" if not (ratio.low <= 0 or ratio.high >= 1) else "not significant at this size"
        else:
            verdict = "does not hold"
        lines.append(f"- {ROW_NAMES[student]}, {budget}: {ratio.describe()}; about a third: {verdict}.")
    return "\n".join(lines)


def routing_mass(by_row: dict[str, list[dict]]) -> str:
    """Per pruned row and target language: the share of the language's routing mass its kept experts carry."""
    rows = [row for row in ("pruned_token", "pruned_token_keep4") if row in by_row and usable(row, by_row)]
    if not rows:
        return (
            "Not measured in these runs: the committed pruned runs counted expert usage on the "
            "first 4,000 training pairs, which are one direction pair, so most languages kept "
            "arbitrary experts (their rows are marked ‡ and kept out of the claims). "
            f"`{TABLE_COMMAND}` counts it on the same number of pairs from every direction and "
            "records this share."
        )
    languages = sorted({lang for row in rows for r in by_row[row] for lang in r["kept_routing_mass"]})
    lines = ["| target language | " + " | ".join(f"{ROW_NAMES[row]}: mean (min over layers)" for row in rows) + " |"]
    lines.append("|---" * (len(rows) + 1) + "|")
    for language in languages:
        cells = []
        for row in rows:
            shares = [r["kept_routing_mass"][language] for r in by_row[row] if language in r["kept_routing_mass"]]
            cells.append(f"{spread([100 * s['mean'] for s in shares])}% ({min(100 * s['min'] for s in shares):.0f}%)")
        lines.append(f"| {language} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def interpolate(curve: list[dict], step: float) -> float | None:
    """Validation chrF at ``step`` (linear between validations; None outside the curve)."""
    points = [(r["step"], r["chrf"]) for r in curve]
    for (s0, c0), (s1, c1) in itertools.pairwise(points):
        if s0 <= step <= s1:
            return c0 + (c1 - c0) * (step - s0) / (s1 - s0)
    return points[-1][1] if points and points[-1][0] == step else None


def flops_per_step(row: str, by_row: dict[str, list[dict]]) -> float:
    """Training FLOPs per token, ~6 x active parameters (forward 2, backward 4; attention scores
    and the router left out); a distilled student adds its teacher's forward, 2 x its active
    parameters. Every row sees the same tokens per step (same batches), so this ranks steps."""
    flops = 6 * by_row[row][0]["active_parameters"]
    teacher = {"distilled_dense": "token_token", "distilled_dense_shared": "token_token_half"}.get(row)
    if teacher and teacher in by_row:
        flops += 2 * by_row[teacher][0]["active_parameters"]
    return flops


def equal_flops(by_row: dict[str, list[dict]]) -> str:
    """Validation chrF of each row at the step where it has spent dense's training FLOPs."""
    if "dense" not in by_row or not all(r.get("curve") for r in by_row["dense"]):
        return "Not available: these runs recorded no validation curves."
    dense_flops = flops_per_step("dense", by_row)
    dense_steps = statistics.mean(r["max_steps"] for r in by_row["dense"])
    lines = [
        "| row | training FLOPs per step vs dense | valid chrF at its last step | valid chrF at dense's total FLOPs |",
        "|---|---|---|---|",
    ]
    for row in ROW_NAMES:
        results = [r for r in by_row.get(row, []) if r.get("curve")]
        if not results or row.startswith("pruned"):
            continue
        ratio = flops_per_step(row, by_row) / dense_flops
        at = [interpolate(r["curve"], dense_steps / ratio) for r in results]
        last = [r["curve"][-1]["chrf"] for r in results]
        cell = spread([v for v in at if v is not None]) if all(v is not None for v in at) else "outside its curve"
        lines.append(f"| {ROW_NAMES[row]} | x{ratio:.2f} | {spread(last)} | {cell} |")
    return "\n".join(lines)


def curves(by_row: dict[str, list[dict]]) -> dict[str, list[list[dict]]]:
    return {
        ROW_NAMES[row]: [r["curve"] for r in by_row[row] if r.get("curve")]
        for row in ROW_NAMES
        if row in by_row and not row.startswith("pruned") and any(r.get("curve") for r in by_row[row])
    }


def direction_table(by_row: dict[str, list[dict]]) -> str:
    rows = [row for row in ROW_NAMES if row in by_row]
    directions = sorted({d for row in rows for r in by_row[row] for d in r["scores"]["chrf"]})
    lines = ["| direction | BLEU tokenizer | " + " | ".join(row_label(r, by_row[r]) for r in rows) + " |"]
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


def provenance(by_row: dict[str, list[dict]], runs: Path) -> str:
    every = [r for results in by_row.values() for r in results]
    old = [r for r in every if time_budgeted(r)]
    machines = sorted({r["machine"] for r in every})
    packages = sorted(
        {", ".join(f"{name} {version}" for name, version in r["packages"].items()) for r in every if "packages" in r}
    )
    text = (
        f"Generated by `python -m flexmoe_mt.results {runs}` from the runs of `{TABLE_COMMAND}`. "
        f"Machine: {'; '.join(machines)}, {every[0]['threads']} thread(s) per run. "
    )
    if old:
        minutes = sorted({r["minutes"] for r in old})
        text += (
            f"**Rows marked † come from an earlier time budget** ({'/'.join(f'{m:g}' for m in minutes)} CPU minutes "
            "per run, half for the half-budget rows; a 128-wide model with 4 encoder and 4 decoder layers): "
            "the runs stopped after the steps shown, while validation chrF was still rising steeply, so they "
            "rank early-training speed, not trained models; they recorded no learning curves and no "
            "versions of the corpus's data packages. **This table is to be retrained** with "
            f"`{TABLE_COMMAND}`, which trains every row the same number of steps (the table configs' "
            "`max_steps`; the time limit is only a safety cap) and records curves and versions. "
        )
    if packages:
        text += f"Package versions of the step-budget runs: {'; '.join(packages)}. "
    text += (
        "chrF: sacrebleu chrF2, mean over directions; BLEU: sacrebleu with the `char` tokenizer for "
        "CJK/Thai targets and `13a` otherwise. Spread: mean ± standard deviation over seeds. "
        "Throughput: peak greedy decoding tokens/s, the batch doubled until tokens/s stopped rising "
        "(each run records why its sweep ended; `run_table.py --reevaluate --timing-only` retimes)"
        + (" († rows: the best of batch sizes 1, 16, 64, 128, which is not each model's peak)." if old else ".")
    )
    return text


def render(runs: Path) -> str:
    by_row = load_results(runs)
    if not by_row:
        raise SystemExit(f"no {runs}/<row>/seed<N>.json: run {TABLE_COMMAND} first")
    has_curves = bool(curves(by_row))
    sections = [
        "# Results: routing strategies for multilingual translation at our scale",
        provenance(by_row, runs),
        table(by_row),
        "## The paper's claims, as measured",
        "Each comparison: difference of the means over seeds (a - b), its 95% interval and the two-sided "
        "p-value of Welch's t-test (independent runs) or of the paired t-test over seeds (a model and "
        "what is derived from the same run). Verdict: *holds* when p < 0.05 in the claimed direction, "
        "*does not hold* when p < 0.05 the other way, else *not significant at this size* (more seeds "
        "or a larger test set would decide it).",
        claims(by_row)
        + (
            "\n\nOn rows marked † these verdicts compare models early in training (see above), not trained ones."
            if any(time_budgeted(r) for results in by_row.values() for r in results)
            else ""
        ),
        "Distillation, as the paper measures it: the share of the teacher's chrF gain over dense that the "
        "student keeps, (student - dense) / (teacher - dense), with a 95% delta-method interval; "
        "undefined when the teacher does not beat dense (p < 0.05). The paper reports about a third.",
        distillation(by_row) or "Not measured: no distilled rows.",
        "## Routing mass the kept experts carry (pruning)",
        routing_mass(by_row),
        "## Equal training compute",
        "Training FLOPs per token counted as 6 x the parameters a token uses (forward 2, backward 4; "
        "attention scores and the router left out), plus 2 x the teacher's for a distilled student; "
        "every row sees the same tokens per step. Each row's validation chrF is read off its curve "
        "(linear between validations) at the step where it has spent what dense spends in its budget.",
        equal_flops(by_row),
        "## Learning curves",
        f"![validation chrF vs step, all rows]({FIGURE.relative_to('docs')})"
        if has_curves
        else "None: the committed runs predate curve recording (rows †).",
        "## chrF per direction",
        direction_table(by_row),
    ]
    return "\n\n".join(sections)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="?", default=str(RESULTS), help=f"<row>/seed<N>.json files (default {RESULTS})")
    parser.add_argument("--figure", help=f"also draw the learning curves here (the page links {FIGURE})")
    args = parser.parse_args(argv)
    runs = Path(args.runs)
    print(render(runs))
    if args.figure:
        from flexmoe_mt.plots import plot_learning_curves

        drawn = curves(load_results(runs))
        if drawn:
            plot_learning_curves(drawn, Path(args.figure))


if __name__ == "__main__":
    main()
