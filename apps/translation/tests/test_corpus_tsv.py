import pytest

from flexmoe_mt.data import Pair, load_tsv


def test_load_tsv(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("source_lang\ttarget_lang\tsource\ttarget\nen\tfr\tthree\ttrois\n\nfr\ten\tdeux\ttwo\n")
    corpus = load_tsv({"train": path})
    assert corpus["train"] == [
        Pair("three", "trois", "en", "fr", "user", "train.tsv:2"),
        Pair("deux", "two", "fr", "en", "user", "train.tsv:4"),
    ]
    assert corpus.target_languages == ["en", "fr"]
    assert corpus.counts("train")[("en", "fr", "user")] == 1


def test_bad_tsv_names_file_and_line(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("en\tfr\tthree\ttrois\nen\tfr\tfour\n")
    with pytest.raises(ValueError, match=r"bad\.tsv:2"):
        load_tsv({"train": path})
    with pytest.raises(ValueError, match="train"):
        load_tsv({"test": path})
