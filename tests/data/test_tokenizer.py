import io
import pickle

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megapatch.data.tokenizer import SentencePieceTokenizer, Tokenizer
from megapatch.errors import DataError
from tests.data.helpers import synthetic_text

# U+2581 is sentencepiece's own space symbol: it decodes to " " (a known sentencepiece
# limitation); surrogates cannot be encoded as UTF-8 at all.
TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"),
    max_size=200,
)
SPACEY = st.text(alphabet=" \n\t\rab.é東🙂", max_size=60)

CASES = [
    "",
    "plain ASCII words",
    "  two leading spaces, trailing  ",
    "\n\nleading newlines and\r\nCRLF\n\n\n",
    "tabs\tand\x00nul and \x7f DEL",
    "café naïve Zürich — “quotes” … ½",
    "東京 Ελλάδα москва עברית العربية",
    "emoji 🙂👍🏽 and ZWJ 👩‍👩‍👧 and combining e\u0301",
    "ｆｕｌｌｗｉｄｔｈ ligature ﬁ and NBSP\u00a0here",
]


@pytest.mark.parametrize("text", CASES)
def test_round_trip(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    assert ids.dtype == np.uint16
    assert tiny_tokenizer.decode(ids) == text


def test_trained_tokenizer_has_the_fast_exact_path(tiny_tokenizer):
    assert tiny_tokenizer.words_are_independent
    assert (tiny_tokenizer.bos_id, tiny_tokenizer.eos_id, tiny_tokenizer.pad_id) == (1, 2, 3)
    assert tiny_tokenizer.unk_id == 0 and tiny_tokenizer.vocab_size == 400


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.one_of(TEXT, SPACEY))
def test_round_trip_and_fast_path_match_sentencepiece(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    assert ids.tolist() == tiny_tokenizer.encode_plain(text).tolist()
    assert tiny_tokenizer.decode(ids) == text


def test_fast_path_matches_on_prose_and_with_a_warm_cache(tiny_tokenizer):
    for seed in (11, 12):
        text = synthetic_text(seed, 3000)
        assert tiny_tokenizer.encode(text).tolist() == tiny_tokenizer.encode_plain(text).tolist()


def test_invalid_utf8_bytes_decode_to_replacement_chars(tiny_tokenizer):
    sp = tiny_tokenizer.processor
    lone_lead = sp.piece_to_id("<0xC3>")  # first byte of "é" without its second byte
    stray = sp.piece_to_id("<0xFF>")  # never valid in UTF-8
    hello = tiny_tokenizer.encode("hi").tolist()
    text = tiny_tokenizer.decode([*hello, lone_lead, stray, *hello])
    assert text.startswith("hi") and text.endswith("hi")
    assert set(text[2:-2]) == {"\ufffd"}


def test_other_tokenizers_take_the_plain_path():
    # sentencepiece's defaults: NFKC normalisation and a dummy prefix space.
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(synthetic_text(3, 3000).splitlines()),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )
    tok = SentencePieceTokenizer(model.getvalue())
    assert not tok.words_are_independent
    text = "ﬁne  words\n and more"
    assert tok.encode(text).tolist() == tok.processor.encode(text)


def test_pickles_by_model_bytes(tiny_tokenizer):
    clone = pickle.loads(pickle.dumps(tiny_tokenizer))
    assert clone.sha256 == tiny_tokenizer.sha256
    assert clone.encode("some text").tolist() == tiny_tokenizer.encode("some text").tolist()


def test_not_a_model(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match="bad.model: not a sentencepiece model"):
        Tokenizer.from_file(bad)
    with pytest.raises(DataError, match="tokenizer not found"):
        Tokenizer.from_file(tmp_path / "missing.model")
