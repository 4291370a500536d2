"""Data for the end-to-end translation job: corpus records, the embedded corpus, sampling.

The embedded-corpus names (``cldr``, ``kinds``) load babel and num2words, so they are imported
on first use: a run on the user's TSV files never pays for them.
"""

from importlib import import_module
from typing import Any

from flexmoe_mt.data.corpus import Corpus, Pair, load_tsv, read_tsv
from flexmoe_mt.data.sampler import TemperatureSampler

_LAZY = {
    "DEFAULT_LANGUAGES": "flexmoe_mt.data.cldr",
    "DEMO_LANGUAGES": "flexmoe_mt.data.cldr",
    "CorpusBuild": "flexmoe_mt.data.cldr",
    "CorpusConfig": "flexmoe_mt.data.cldr",
    "KindSupport": "flexmoe_mt.data.cldr",
    "build_corpus": "flexmoe_mt.data.cldr",
    "build_corpus_with_support": "flexmoe_mt.data.cldr",
    "default_cache_dir": "flexmoe_mt.data.cldr",
    "KINDS": "flexmoe_mt.data.kinds",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flexmoe_mt.data' has no attribute {name!r}")


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
