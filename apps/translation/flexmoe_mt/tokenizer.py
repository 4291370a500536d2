"""Sentencepiece tokenizer trained on a corpus's training split, cached on disk.

Ids: ``pad`` 0, ``unk`` 1, ``bos`` 2, ``eos`` 3, then one ``<2xx>`` tag per target language
(user-defined symbols, never split), then the learned pieces. A source sentence is encoded as
``<2xx> pieces... eos``, a target as ``pieces... eos`` (the model prepends ``bos``).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from flexmoe_mt.data.corpus import Corpus, Pair

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def language_tag(lang: str) -> str:
    """The target-language tag put first on the source: ``<2fr>``."""
    return f"<2{lang}>"


def corpus_hash(pairs: Sequence[Pair]) -> str:
    """A short stable digest of the training text (keys the tokenizer cache)."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update("\t".join((pair.source_lang, pair.target_lang, pair.source, pair.target)).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


class Tokenizer:
    """Wraps a trained sentencepiece model. ``tags`` are the ``<2xx>`` target languages it knows."""

    def __init__(self, model_file: str | Path, target_languages: Sequence[str]) -> None:
        self.model_file = Path(model_file)
        self.processor = spm.SentencePieceProcessor(model_file=str(self.model_file))
        self.target_languages = list(target_languages)
        self.tag_ids = {lang: self.processor.piece_to_id(language_tag(lang)) for lang in self.target_languages}

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def encode_source(self, text: str, target_lang: str) -> list[int]:
        if target_lang not in self.tag_ids:
            raise ValueError(f"target_lang must be one of {self.target_languages}, got {target_lang!r}")
        return [self.tag_ids[target_lang], *self.processor.encode(text), EOS_ID]

    def encode_target(self, text: str) -> list[int]:
        return [*self.processor.encode(text), EOS_ID]

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text, stopping at the first ``eos``; pad/bos are skipped."""
        kept = []
        for token in ids:
            if token == EOS_ID:
                break
            if token not in (PAD_ID, BOS_ID):
                kept.append(int(token))
        return self.processor.decode(kept)


def train_tokenizer(corpus: Corpus, vocab_size: int, cache_dir: str | Path) -> Tokenizer:
    """Train (or load from ``cache_dir``) a unigram sentencepiece model on ``corpus["train"]``.

    The cache key is the training text's digest and ``vocab_size``. ``vocab_size`` is an upper
    bound: on a corpus too small for it, sentencepiece stops at what the text supports.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 16:
        raise ValueError(f"vocab_size must be an int >= 16, got {vocab_size!r}")
    train = corpus["train"]
    languages = corpus.target_languages
    prefix = Path(cache_dir) / f"spm-{corpus_hash(train)}-{vocab_size}"
    if not prefix.with_suffix(".model").is_file():
        prefix.parent.mkdir(parents=True, exist_ok=True)
        text = sorted({pair.source for pair in train} | {pair.target for pair in train})
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(text),
            model_writer=model,
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            character_coverage=1.0,
            model_type="unigram",
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            user_defined_symbols=[language_tag(lang) for lang in languages],
            input_sentence_size=300_000,  # a bounded, seeded sample keeps training time flat on big corpora
            shuffle_input_sentence=True,
            seed_sentencepiece_size=1_000_000,
            num_threads=1,
            minloglevel=2,
        )
        # Write via a temporary name so an interrupted run never leaves a half-written model.
        partial = prefix.with_suffix(".partial")
        partial.write_bytes(model.getvalue())
        partial.replace(prefix.with_suffix(".model"))
    return Tokenizer(prefix.with_suffix(".model"), languages)
