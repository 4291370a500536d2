"""Data for the end-to-end translation job: corpus records, the embedded corpus, sampling.

The embedded-corpus names (``cldr``, ``kinds``) load babel and num2words, so they are imported
on first use: a run on the user's TSV files never pays for them.
"""

from importlib import import_module
from typing import Any

from flexmoe.data.corpus import Corpus, Pair, load_tsv, read_tsv
from flexmoe.data.sampler import TemperatureSampler

_LAZY = {
    "DEFAULT_LANGUAGES": "flexmoe.data.cldr",
    "DEMO_LANGUAGES": "flexmoe.data.cldr",
    "CorpusBuild": "flexmoe.data.cldr",
    "CorpusConfig": "flexmoe.data.cldr",
    "KindSupport": "flexmoe.data.cldr",
    "build_corpus": "flexmoe.data.cldr",
    "build_corpus_with_support": "flexmoe.data.cldr",
    "default_cache_dir": "flexmoe.data.cldr",
    "KINDS": "flexmoe.data.kinds",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flexmoe.data' has no attribute {name!r}")


__all__ = [
    "DEFAULT_LANGUAGES",
    "DEMO_LANGUAGES",
    "KINDS",
    "Corpus",
    "CorpusBuild",
    "CorpusConfig",
    "KindSupport",
    "Pair",
    "TemperatureSampler",
    "build_corpus",
    "build_corpus_with_support",
    "default_cache_dir",
    "load_tsv",
    "read_tsv",
]
