"""Train a sentencepiece BPE tokenizer on a bounded sample of the corpus."""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Iterator

import sentencepiece as spm

from megapatch.errors import ConfigError

SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}

# Settings that make decode(encode(text)) == text and keep every piece inside a word
# (so megapatch's Tokenizer can encode word by word, exactly and fast):
_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,  # characters outside the vocabulary become byte pieces, never <unk>
    character_coverage=0.9995,
    normalization_rule_name="identity",  # no NFKC: text comes back byte for byte
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    split_digits=True,
    allow_whitespace_only_pieces=True,  # runs of spaces (indentation) get their own pieces
    max_sentence_length=1 << 16,
    num_threads=1,  # recorded in the model: a fixed value keeps it byte-identical
    minloglevel=2,
    **SPECIAL_IDS,
)
# Training "sentences" are lines with their trailing newlines, so no piece joins a line
# break to the text after it.
_LINE = re.compile(r"[^\n]*+\n*+")


def training_sentences(documents: Iterable[str]) -> Iterator[str]:
    for doc in documents:
        for line in _LINE.findall(doc):
            if line:
                yield line


def train_tokenizer(documents: Iterable[str], vocab_size: int) -> bytes:
    """The serialized model of a BPE tokenizer with `vocab_size` pieces trained on `documents`."""
    model = io.BytesIO()
    spm.set_random_generator_seed(0)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=training_sentences(documents),
            model_writer=model,
            vocab_size=vocab_size,
            **_OPTIONS,
        )
    except RuntimeError as exc:
        # "INTERNAL: src/trainer.cc(744) [check] Vocabulary size too high ..." → the sentence
        reason = re.sub(r"^.*\] ", "", " ".join(str(exc).split()))
        raise ConfigError(
            f"--vocab-size {vocab_size}: sentencepiece cannot train it: {reason}"
        ) from None
    return model.getvalue()
