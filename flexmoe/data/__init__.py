"""Data for the end-to-end translation job: corpus records, the embedded corpus, sampling."""

from flexmoe.data.cldr import (
    DEFAULT_LANGUAGES,
    DEMO_LANGUAGES,
    CorpusBuild,
    CorpusConfig,
    KindSupport,
    build_corpus,
    build_corpus_with_support,
    default_cache_dir,
)
from flexmoe.data.corpus import Corpus, Pair, load_tsv, read_tsv
from flexmoe.data.kinds import KINDS
from flexmoe.data.sampler import TemperatureSampler

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
