"""Data for the end-to-end translation job: corpus records, the embedded corpus, sampling."""

from flexmoe.data.corpus import Corpus, Pair, load_tsv, read_tsv

__all__ = ["Corpus", "Pair", "load_tsv", "read_tsv"]
