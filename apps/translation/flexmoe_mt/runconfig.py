"""A training run's configuration: a TOML file with ``[data]``, ``[model]`` and ``[train]`` tables,
read into typed dataclasses. Unknown tables or keys are errors that name them."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomllib

from flexmoe_mt.config import ModelConfig, check_int, check_number, check_text

DataSource = Literal["cldr_demo", "tsv"]
DATA_SOURCES = ("cldr_demo", "tsv")
# ModelConfig fields that come from the data and tokenizer, not from the run file.
DERIVED_MODEL_FIELDS = ("vocab_size", "num_target_langs", "num_lang_pairs", "pad_id", "bos_id", "eos_id")


@dataclass(frozen=True)
class DataConfig:
    """source: ``"cldr_demo"`` (the embedded corpus, demo preset) or ``"tsv"`` (the user's files:
    ``train`` required, ``valid``/``test`` optional). vocab_size: sentencepiece pieces (upper bound).
    temperature: language sampling temperature. cache_dir: corpus and tokenizer cache.
    languages: with ``"cldr_demo"``, the target languages (CLDR codes, English is the other side;
    empty: the demo preset's 12), e.g. ``["de", "fr", "ru"]`` for a smaller corpus that trains
    to its plateau in fewer steps."""

    source: DataSource = "cldr_demo"
    train: str = ""
    valid: str = ""
    test: str = ""
    vocab_size: int = 1000
    temperature: float = 5.0
    cache_dir: str = "runs/cache"
    languages: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ValueError(f"data.source must be one of {DATA_SOURCES}, got {self.source!r}")
        for name in ("train", "valid", "test"):
            check_text(f"data.{name}", getattr(self, name))
        check_text("data.cache_dir", self.cache_dir, empty=False)
        if self.source == "tsv" and not self.train:
            raise ValueError("data.train (a TSV file) is required when data.source = 'tsv'")
        check_int("data.vocab_size", self.vocab_size, 8)
        check_number("data.temperature", self.temperature, strict=True)
        languages = self.languages
        if isinstance(languages, str) or not isinstance(languages, (list, tuple)):
            raise ValueError(f"data.languages must be a list of language codes such as ['de', 'fr'], got {languages!r}")
        if not all(isinstance(code, str) and code for code in languages) or len(set(languages)) != len(languages):
            raise ValueError(f"data.languages must be distinct non-empty language codes, got {list(languages)!r}")
        if languages and self.source != "cldr_demo":
            raise ValueError("data.languages picks languages of the embedded corpus (data.source = 'cldr_demo'); "
                             "for TSV files, put only the languages you want in them")  # fmt: skip
        object.__setattr__(self, "languages", tuple(languages))


BUDGET_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
"""The clocks ``TrainConfig.max_minutes`` can be counted on."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping. Training stops at ``max_steps`` or after ``max_minutes`` of
    time spent in training steps (validation excluded, counted across resumes), whichever
    comes first; 0 disables a limit (not both). ``budget_clock`` says which time: ``"wall"``
    (seconds on the clock) or ``"cpu"`` (CPU seconds of the process, all its threads: the same
    compute for every run however busy the machine is; the results table uses it).

    distill_from: a teacher's ``checkpoint.pt``: train this (dense) model on the teacher's soft
    targets (weight ``distill_weight``, rest on the references), initialised from the teacher's
    non-expert weights (Kudugunta et al.'s distillation baseline).
    device: where the model trains (``"cpu"``, ``"cuda"``, ``"cuda:N"``); checkpoints are device-free.
    collective_timeout_s: under torchrun, how long a rank waits in a collective for the others
    before the run stops with an error naming the likely cause (a rank that crashed, hung or
    skipped a step); raise it when one step (a validation included) legitimately takes longer."""

    run_dir: str = "runs/default"
    seed: int = 0
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    max_steps: int = 0
    max_minutes: float = 0.0
    budget_clock: Literal["wall", "cpu"] = "wall"
    log_every: int = 10
    eval_every: int = 200
    checkpoint_every: int = 200
    valid_sentences: int = 256
    max_new_tokens: int = 64
    threads: int = 0
    distill_from: str = ""
    distill_weight: float = 0.5
    device: str = "cpu"
    collective_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        check_text("train.run_dir", self.run_dir, empty=False)
        check_text("train.distill_from", self.distill_from)
        check_number("train.collective_timeout_s", self.collective_timeout_s, strict=True)
        for name in ("batch_size", "log_every", "eval_every", "checkpoint_every", "valid_sentences", "max_new_tokens"):
            check_int(f"train.{name}", getattr(self, name), 1)
        for name in ("max_steps", "warmup_steps", "threads", "seed"):
            check_int(f"train.{name}", getattr(self, name), 0)
        for name in ("lr", "max_minutes", "weight_decay", "label_smoothing", "clip_norm", "distill_weight"):
            check_number(f"train.{name}", getattr(self, name))
        if not isinstance(self.device, str) or self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"train.device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.budget_clock not in BUDGET_CLOCKS:
            raise ValueError(f"train.budget_clock must be one of {sorted(BUDGET_CLOCKS)}, got {self.budget_clock!r}")
        if self.max_steps == 0 and self.max_minutes == 0:
            raise ValueError("set train.max_steps or train.max_minutes (or both): training needs a limit")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)

    def model_config(self, **derived: Any) -> ModelConfig:
        """The ModelConfig: the ``[model]`` table plus the fields the data decides."""
        return ModelConfig(**self.model, **derived)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, table: str, values: object) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"[{table}] must be a table, got {values!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in [{table}]; accepted keys: {sorted(known)}")
    try:
        return cls(**values)
    except TypeError as error:
        raise ValueError(f"[{table}]: {error}") from error


def run_config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Validate a parsed run file (or the ``run_config`` of a checkpoint)."""
    unknown = sorted(set(values) - {"data", "model", "train"})
    if unknown:
        raise ValueError(f"unknown table(s) {unknown}; accepted tables: ['data', 'model', 'train']")
    model = dict(values.get("model", {}))
    accepted = sorted({f.name for f in dataclasses.fields(ModelConfig)} - set(DERIVED_MODEL_FIELDS))
    unknown = sorted(set(model) - set(accepted))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in [model]; accepted keys: {accepted}")
    # Check the model fields now, with a placeholder vocabulary, rather than after data preparation.
    ModelConfig(vocab_size=1000, **model)
    return RunConfig(
        _build(DataConfig, "data", values.get("data", {})), model, _build(TrainConfig, "train", values.get("train", {}))
    )


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate a run file; relative TSV paths are taken relative to the working directory."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        with path.open("rb") as handle:
            values = tomllib.load(handle)
        return run_config_from_dict(values)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
