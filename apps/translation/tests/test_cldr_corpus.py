"""The embedded CLDR/num2words corpus: determinism, split hygiene, well-formed pairs, cache, config errors."""

import dataclasses
import math
import unicodedata
from collections import Counter

import pytest
import torch
from babel import Locale

from flexmoe_mt.data import (
    KINDS,
    CorpusConfig,
    Pair,
    TemperatureSampler,
    build_corpus,
    build_corpus_with_support,
    card,
    cldr,
)
from flexmoe_mt.data.cldr import DEFAULT_LANGUAGES, corpus_to_tsv, render_corpus
from flexmoe_mt.data.kinds import combination_of, parts_of

TINY = CorpusConfig(languages=("ru", "ja", "fr", "ar"), items_per_kind=40, seed=3)


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    return build_corpus_with_support(TINY, cache_dir=tmp_path_factory.mktemp("corpus"), progress=False)


def test_deterministic_byte_identical(tiny_build):
    Locale("ja").months["stand-alone"]["wide"][3]  # leaves Japanese names in babel's shared data
    again = render_corpus(TINY)
    assert corpus_to_tsv(again.corpus).encode() == corpus_to_tsv(tiny_build.corpus).encode()
    other_seed = render_corpus(CorpusConfig(languages=TINY.languages, items_per_kind=40, seed=4))
    assert corpus_to_tsv(other_seed.corpus) != corpus_to_tsv(tiny_build.corpus)


def test_cache_hit_returns_same_corpus(tiny_build, tmp_path, monkeypatch):
    first = build_corpus(TINY, cache_dir=tmp_path, progress=False)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(TINY.cache_key() in name for name in files)

    def no_rendering(*args, **kwargs):
        raise AssertionError("a cache hit must not render")

    monkeypatch.setattr(cldr, "render_corpus", no_rendering)
    second = build_corpus_with_support(TINY, cache_dir=tmp_path, progress=False)
    assert first == second.corpus == tiny_build.corpus
    assert second.support == tiny_build.support and list(second.support) == list(TINY.languages)
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    with pytest.raises(AssertionError, match="cache hit"):  # another config is another entry
        build_corpus(dataclasses.replace(TINY, seed=5), cache_dir=tmp_path, progress=False)


def test_data_card_tables(tiny_build):
    tables = card.preset_section("tiny", "", tiny_build) + card.examples(tiny_build, ("ru", "ja"))
    text = "\n".join(tables + card.sampling_table(tiny_build))
    assert "| ru | " in text and "| date_full | " in text and "| test_compositional | " in text


def test_split_hygiene_no_item_shared(tiny_build):
    items = {name: {p.item for p in pairs} for name, pairs in tiny_build.corpus.splits.items()}
    assert all(items[name] for name in ("train", "valid", "test", "test_compositional"))
    for held_out in ("valid", "test", "test_compositional"):
        assert not items["train"] & items[held_out], held_out
    assert not items["valid"] & items["test"]
    # a held-out item is held out in every kind and language: no other pair carries it
    train_combinations = {combination_of(p.item) for p in tiny_build.corpus["train"]}
    assert not {combination_of(p.item) for p in tiny_build.corpus["test_compositional"]} & train_combinations


def test_compositional_parts_seen_in_training_per_direction(tiny_build):
    seen = {}
    for pair in tiny_build.corpus["train"]:
        seen.setdefault((pair.source_lang, pair.target_lang), set()).update(parts_of(pair.item))
    compositional = tiny_build.corpus["test_compositional"]
    assert {p.kind for p in compositional} >= {"date_full", "unit", "currency_amount", "relative_time"}
    assert parts_of("train.tsv:3") == () and combination_of("train.tsv:3") == ""  # user TSV items: atomic
    assert parts_of("unit:length-meter:21") == ("unit.0:length-meter", "unit.1:21")
    for pair in compositional:
        assert parts_of(pair.item)
        assert set(parts_of(pair.item)) <= seen[pair.source_lang, pair.target_lang], pair


def test_both_directions_every_language_and_kind(tiny_build):
    counts = Counter((p.source_lang, p.target_lang) for p in tiny_build.corpus["train"])
    for language in TINY.languages:
        assert counts["en", language] > 0 and counts[language, "en"] == counts["en", language]
    assert {p.kind for p in tiny_build.corpus["train"]} == set(KINDS)
    assert tiny_build.corpus.target_languages == sorted(["en", *TINY.languages])


def test_pairs_well_formed(tiny_build):
    for pairs in tiny_build.corpus.splits.values():
        for pair in pairs:
            assert isinstance(pair, Pair) and pair.kind in KINDS and pair.item
            for text in (pair.source, pair.target):
                assert text and text == text.strip() and "  " not in text
                assert not any(unicodedata.category(c) in ("Cc", "Cf") for c in text), pair


def test_translations_are_real(tiny_build):
    pairs = {(p.target_lang, p.kind, p.item): p for p in tiny_build.corpus.splits["train"]}
    english_cardinal = [p.source for (lang, kind, _), p in pairs.items() if lang == "ru" and kind == "cardinal"]
    assert all(text.isascii() for text in english_cardinal)
    russian = [p.target for (lang, kind, _), p in pairs.items() if lang == "ru" and kind in ("cardinal", "unit")]
    assert all(any("а" <= c <= "я" for c in text) for text in russian)
    japanese = [p.target for (lang, kind, _), p in pairs.items() if lang == "ja" and kind == "date_full"]
    assert japanese and all("年" in text for text in japanese)
    # stand-alone month names are each locale's own, whatever locale babel loaded before
    months = {(p.target_lang, p.item): p.target for pairs in tiny_build.corpus.splits.values() for p in pairs}
    assert (months["fr", "month:3"], months["ru", "month:3"], months["ja", "month:3"]) == ("mars", "март", "3月")


def test_support_records_fallbacks(tiny_build):
    # num2words spells Arabic ordinals as cardinals: the kind is left out and the reason recorded
    assert tiny_build.support["ar"]["ordinal"].reason == "renders as cardinal"
    assert "ordinal" not in {p.kind for p in tiny_build.corpus["train"] if "ar" in (p.source_lang, p.target_lang)}
    assert tiny_build.supported_kinds("ru") == list(KINDS)


def test_sampler_marginal_matches_temperature():
    pairs = [
        Pair("a", "b", "en", lang, "user", str(i)) for lang, n in [("x", 4000), ("y", 400), ("z", 40)] for i in range(n)
    ]
    sampler = TemperatureSampler(pairs, temperature=5.0, seed=0)
    weights = torch.tensor([4000.0, 400.0, 40.0]) ** 0.2
    expected = weights / weights.sum()
    draws = 200_000
    counts = Counter(pairs[i].target_lang for i in sampler.sample(draws).tolist())
    for language, p in zip(("x", "y", "z"), expected.tolist()):
        # 5 standard deviations of a binomial count: fixed seed, so this fails only on a real bias
        assert abs(counts[language] - draws * p) < 5 * math.sqrt(draws * p * (1 - p)), (language, counts)
    within_z = Counter(int(pairs[i].item) for i in sampler.sample(20_000).tolist() if pairs[i].target_lang == "z")
    assert len(within_z) == 40  # uniform within a language: every pair of the small language drawn


def test_sampler_deterministic_and_resumable():
    pairs = [Pair("a", "b", "en", lang, "user", str(i)) for i, lang in enumerate("xxyz" * 10)]
    first, second = TemperatureSampler(pairs, seed=7), TemperatureSampler(pairs, seed=7)
    assert torch.equal(first.sample(100), second.sample(100))
    state = first.state_dict()
    expected = list(zip(range(3), first.batches(8)))
    second.load_state_dict(state)
    assert list(zip(range(3), second.batches(8))) == expected
    assert all(0 <= i < len(pairs) for _, batch in expected for i in batch)
    assert isinstance(next(iter(first)), Pair)
    with pytest.raises(ValueError, match="temperature"):
        TemperatureSampler(pairs, temperature=0)


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"languages": ("ru", "xx_Nope")}, ValueError, "'xx_Nope'"),
        ({"languages": ("en",)}, ValueError, "source side"),
        ({"languages": ()}, ValueError, "languages"),
        ({"languages": "ru"}, TypeError, "languages"),
        ({"kinds": ("cardinal", "poems")}, ValueError, "poems.*accepted"),
        ({"directions": ("en->ru",)}, ValueError, "directions"),
        ({"items_per_kind": 0}, ValueError, "items_per_kind"),
        ({"test_fraction": 1.5}, ValueError, "test_fraction"),
        ({"valid_fraction": 0.5, "test_fraction": 0.5}, ValueError, "valid_fraction"),
        ({"seed": 1.5}, TypeError, "seed"),
    ],
)
def test_bad_config(options, error, match):
    with pytest.raises(error, match=match):
        CorpusConfig(**options)


def test_presets_and_type_errors():
    assert CorpusConfig().languages == DEFAULT_LANGUAGES and len(DEFAULT_LANGUAGES) >= 40
    demo = CorpusConfig.demo(items_per_kind=10)
    assert 10 <= len(demo.languages) <= 16 and demo.items_per_kind == 10
    assert CorpusConfig(languages=["ru"]).languages == ("ru",)  # lists become tuples (hashable config)
    with pytest.raises(TypeError, match="CorpusConfig"):
        build_corpus({"languages": ["ru"]})
