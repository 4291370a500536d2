"""Helpers (no tests) for the translation tests: a tiny parallel corpus and run files."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = {
    "en": "zero one two three four five six seven eight nine ten eleven".split(),
    "fr": "zéro un deux trois quatre cinq six sept huit neuf dix onze".split(),
    "de": "null eins zwei drei vier fünf sechs sieben acht neun zehn elf".split(),
}


def write_corpus(directory: Path) -> dict[str, Path]:
    """train/valid/test TSV files: 'a b' number pairs, en<->fr and en<->de."""
    rows = {"train": [], "valid": [], "test": []}
    for a in range(12):
        for b in range(12):
            split = "test" if (a + b) % 7 == 0 else "valid" if (a + b) % 7 == 1 else "train"
            for lang in ("fr", "de"):
                en, other = f"{WORDS['en'][a]} {WORDS['en'][b]}", f"{WORDS[lang][a]} {WORDS[lang][b]}"
                rows[split].append(f"en\t{lang}\t{en}\t{other}" if (a * b) % 2 else f"{lang}\ten\t{other}\t{en}")
    paths = {}
    for split, lines in rows.items():
        paths[split] = directory / f"{split}.tsv"
        paths[split].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def write_run_file(directory: Path, name: str = "run", model: dict | None = None, train: dict | None = None) -> Path:
    """A TOML run file training a very small model on the tiny corpus in ``directory``;
    ``model``/``train`` entries override or add keys of those tables."""
    paths = write_corpus(directory)
    tables = {
        "data": {
            "source": "tsv",
            "train": str(paths["train"]),
            "valid": str(paths["valid"]),
            "test": str(paths["test"]),
            "vocab_size": 64,
            "cache_dir": str(directory / "cache"),
        },
        "model": {"model_dim": 16, "num_heads": 2, "ffn_dim": 16, "num_experts": 4, "max_len": 32, **(model or {})},
        "train": {
            "run_dir": str(directory / name),
            "batch_size": 8,
            "max_steps": 6,
            "warmup_steps": 2,
            "log_every": 1,
            "eval_every": 4,
            "checkpoint_every": 3,
            "valid_sentences": 8,
            "max_new_tokens": 6,
            **(train or {}),
        },
    }
    lines = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path = directory / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def one_thread():
    """Generator fixture body: tiny models run faster (and steadier) on one thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
