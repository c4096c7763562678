"""The word-cached encoder of Hugging Face tokenizers: the same ids as the library's own
`encode_batch` on varied text, for each supported layout; and the library's path wherever
the cache could be inexact (a pattern outside the proven subset, a character the two regex
engines or the two NFC implementations disagree on, a case-folding match)."""

import unicodedata

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from megapatch.data import HFTokenizer
from megapatch.data.hf_tokenizer import GPT2_PATTERN, WordSplitter, _PatternAtoms, train_bpe
from tests.data.helpers import synthetic_text

tokenizers = pytest.importorskip("tokenizers")
pre = tokenizers.pre_tokenizers

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GPT-4o's (o200k): letter case classes, (?i) contractions made optional by a quantifier.
O200K_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}", r" ?[^\s\p{L}\p{N}]+[\r\n/]*", r"\s*[\r\n]+", r"\s+(?!\S)", r"\s+",
])  # fmt: skip


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    """GPT-2's layout: the ByteLevel pre-tokenizer with its built-in regex."""
    return train_bpe([synthetic_text(seed, 4000) for seed in range(5)], vocab_size=400)


@pytest.fixture(scope="module")
def nfc_bpe(bpe) -> HFTokenizer:
    """GPT-NeoX's layout: an NFC normalizer before GPT-2's byte-level pre-tokenizer."""
    tok = tokenizers.Tokenizer.from_str(bpe.backend.to_str())
    tok.normalizer = tokenizers.normalizers.NFC()
    return HFTokenizer({"tokenizer.json": tok.to_str().encode()})


def _split_bpe(pattern: str, added=()) -> HFTokenizer:
    """A byte-level BPE with Llama 3's layout: a Split regex, then ByteLevel without one."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre.Sequence([
        pre.Split(tokenizers.Regex(pattern), behavior="isolated"),
        pre.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|end_of_text|>"], show_progress=False,
        initial_alphabet=pre.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator([synthetic_text(s, 3000) for s in range(4)], trainer)
    tok.add_tokens(list(added))
    return HFTokenizer({"tokenizer.json": tok.to_str().encode()})


@pytest.fixture(scope="module")
def split_bpe() -> HFTokenizer:
    return _split_bpe(LLAMA3_PATTERN, added=["NOT SPECIAL"])  # an added token of plain text


@pytest.fixture(scope="module")
def o200k_bpe() -> HFTokenizer:
    return _split_bpe(O200K_PATTERN)


def _library_splits(tok: HFTokenizer, text: str) -> list[str]:
    return [text[a:b] for _, (a, b) in tok.backend.pre_tokenizer.pre_tokenize_str(text)]


def _same_ids(tok: HFTokenizer, text: str) -> bool:
    ours = tok.encode_batch([text, text])  # the second one from a warm cache
    theirs = tok.encode_plain_batch([text])[0].tolist()
    return ours[0].tolist() == ours[1].tolist() == theirs


UNICODE = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=120)
SPACEY = st.text(alphabet=" \n\r\t\x0b\x1c\x85\u00a0\u2028\u3000ab1.'sé東🙂", max_size=60)
WORDY = st.lists(
    st.sampled_from(["the", " cat", "'s", "'LL", "'ſ", "'ß", "ß", "ﬆ", "12345", "  ", "\n\n",
                     "\r\n", "<|endoftext|>", "e\u0301", "\u212b", "\u212a", "\u1100\u1161",
                     "\ufb01", "\u0958", "<|end_of_text|>", "NOT SPECIAL", "\U0002ebf0", "Ꟑ",
                     "ǅ", "𝟘", "⅔", "٣", "a\u07fd\u0301", "\u0378", "\U000f0000", "\ue000",
                     "Ab", "aB", "ÀÉ", "/\n"]),
    max_size=30,
).map("".join)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(UNICODE, SPACEY, WORDY))
def test_the_word_cache_gives_the_librarys_ids(bpe, split_bpe, o200k_bpe, nfc_bpe, text):
    for tok in (bpe, split_bpe, o200k_bpe, nfc_bpe):
        assert tok._splitter is not None  # the fast path is on for each layout
        assert tok._splitter._ascii_safe  # and plain ASCII text needs no check per character
        assert _same_ids(tok, text)


def test_the_atoms_of_known_patterns():
    assert _PatternAtoms.of(GPT2_PATTERN) == (("\\p{L}", "\\p{N}", "\\s"), ())
    llama3 = _PatternAtoms.of(LLAMA3_PATTERN)
    assert set(llama3.predicates) == {"\\p{L}", "\\p{N}", "\\s"} | {
        f"(?i:{c})" for c in "'strevmld"
    }
    assert llama3.folded == ("'d", "'ll", "'m", "'re", "'s", "'t", "'ve")
    o200k = _PatternAtoms.of(O200K_PATTERN)
    assert {"\\p{Lu}", "\\p{Ll}", "\\p{M}", "(?i:s)"} <= set(o200k.predicates)
    assert _PatternAtoms.of(r"[a-z-]+|.|\p{Han}") == ((".", "\\p{Han}"), ())


@pytest.mark.parametrize(
    "pattern",
    [
        r"(\p{L}+)|\s+|.",  # a capture: findall would return the group
        r"\s+$|\s+|\S+",  # $: before any line break in Oniguruma, only the last in regex
        r"^\S+|\s+|\S+",
        r"(?<=a)b|\s+|.",  # lookbehind
        r"\b\w+|\W",  # word boundary
        r"(.)\1|.",  # backreference
        r"\p{L}*|\s+|.",  # can match the empty string
        r"\p{L}++|.",  # possessive
        r"\p{N}{1,3}?|.",  # lazy in regex, an optional repeat in Oniguruma
        r"[[a]b]|.",  # a nested class in Oniguruma, a literal [ in regex
        r"[\p{L}&&[^a]]|.",  # an intersection
        r"[a-b-c]|.",
        r"(?i)abc|.",  # a flag for the rest of the pattern
        r"(?i:[a-z]+)|.",  # (?i) around anything but literals
        r"(?i:ß)|.",  # a literal folding to two characters
        r"(?i:s)+|.",  # (?i) literals repeated, or next to others: one longer string there
        r"(?:x(?i:s)){2}|.",
        r"(?i:a)(?i:b)|.",
        r"(?x) a |.",
        r"\x41|.",
        r"\h|.",
        r"a{,3}|.",
        r"a)|.",
    ],
)
def test_patterns_outside_the_proven_subset_are_refused(pattern):
    assert _PatternAtoms.of(pattern) is None


def test_a_refused_pattern_takes_the_librarys_path(split_bpe):
    # With `$` the engines split "a  \nb" apart: the cache would be inexact, so it is off.
    pattern = r"\s+$|\s+|\S+"
    text = "a  \nb  \n"
    tok = _split_bpe(pattern)
    assert regex.findall(pattern, text) != _library_splits(tok, text)
    assert tok._splitter is None
    assert tok.encode(text).tolist() == tok.backend.encode(text, add_special_tokens=False).ids


def test_other_layouts_take_the_librarys_path(bpe):
    tok = tokenizers.Tokenizer.from_str(bpe.backend.to_str())
    tok.normalizer = tokenizers.normalizers.Lowercase()
    lower = HFTokenizer({"tokenizer.json": tok.to_str().encode()})
    assert lower._splitter is None
    text = "Cafe\u0301 " + synthetic_text(3, 100)
    assert lower.encode(text).tolist() == lower.backend.encode(text, add_special_tokens=False).ids


def _onig_letters(chars: str) -> set[str]:
    """The characters of `chars` that the library's engine takes for letters."""
    split = pre.Split(tokenizers.Regex(r"\p{L}+"), behavior="removed")
    return set(chars) - set("".join(piece for piece, _ in split.pre_tokenize_str(chars)))


def test_a_character_the_engines_disagree_on_takes_the_librarys_path(bpe, split_bpe):
    candidates = "".join(regex.findall(r"\p{L}", "".join(map(chr, range(0x20000)))))
    disputed = sorted(set(candidates) - _onig_letters(candidates))
    if not disputed:
        pytest.skip("the installed regex engines agree on every letter of the BMP and SMP")
    for tok in (bpe, split_bpe):
        for char in disputed[:3]:
            text = f"ab{char}cd and more"
            assert tok._splitter.pattern.findall(text) != _library_splits(tok, text)
            assert char not in tok._splitter._safe and tok._splitter.words(text) is None
            assert _same_ids(tok, text)


def test_characters_outside_the_checked_set_take_the_librarys_path(bpe, nfc_bpe):
    for tok in (bpe, nfc_bpe):
        for char in ("\u0378", "\U000f0000", "\U0010fffd", "\ufffe"):  # unassigned, private use
            text = f"a{char}b"
            assert tok._splitter.words(text) is None and _same_ids(tok, text)


def test_a_case_folding_match_takes_the_librarys_path():
    # The library's engine matches (?i:'ss) against "'ß" (full case folding), the regex
    # package does not: "ß" and its kin are ruled out, not the pattern.
    pattern = r"(?i:'ss)|\p{L}+|\s+|[^\s\p{L}]"
    tok = _split_bpe(pattern)
    assert tok._splitter is not None
    text = "x'ßa x'SSa"
    assert regex.findall(pattern, text) != _library_splits(tok, text)
    assert {"ß", "ẞ", "ﬆ"} - tok._splitter._safe == {"ß", "ẞ"}  # ﬆ folds to "st"
    assert tok._splitter.words(text) is None and _same_ids(tok, text)
    assert tok._splitter.words("x'SSa x'ſſa") is not None and _same_ids(tok, "x'SSa x'ſſa")


def test_a_combining_mark_the_normalizers_disagree_on_takes_the_librarys_path(nfc_bpe):
    # A mark the library's NFC tables may not know: Python composes a + U+0301 around it.
    normalizer = nfc_bpe.backend.normalizer
    for text in ("ca\u07fd\u0301fe", "a\u0898\u0316", "e\u0301\u0316"):
        differs = unicodedata.normalize("NFC", text) != normalizer.normalize_str(text)
        if differs:
            assert nfc_bpe._splitter.words(text) is None
        assert _same_ids(nfc_bpe, text)


def test_the_check_is_built_once_per_pattern(bpe):
    again = HFTokenizer(bpe.files())
    assert again._splitter._safe is bpe._splitter._safe
    assert WordSplitter.of(again.backend, again._spec)._safe is bpe._splitter._safe


def test_a_full_word_cache_starts_again_and_stays_exact(monkeypatch, bpe):
    import megapatch.data.tokenizer as base

    monkeypatch.setattr(base, "_CACHE_WORDS", 64)
    tok = HFTokenizer(bpe.files())  # a cache of its own
    texts = [synthetic_text(900 + seed, 300) for seed in range(6)]
    seen = set()
    for text in texts:
        assert _same_ids(tok, text)
        seen.update(tok._splitter.words(text))
        assert len(tok._cache) <= max(64, len(set(tok._splitter.words(text))))
    assert len(tok._cache) < len(seen)  # it was cleared on the way
