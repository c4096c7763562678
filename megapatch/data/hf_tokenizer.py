r"""Hugging Face tokenizers (`tokenizer.json`, e.g. GPT-2, GPT-NeoX, Llama 3, Qwen) behind
megapatch's tokenizer interface, and byte-level BPE training with the `tokenizers` library.

Special tokens come from the tokenizer's own files: `tokenizer_config.json` (or
`special_tokens_map.json`) beside the `tokenizer.json` names them; a bare `tokenizer.json`
is searched for a special token of a well-known end-of-text name. A tokenizer without one
is refused: megapatch ends every document with EOS.

Encoding runs in batches (`Tokenizer.encode_batch_fast`: no offsets are computed), one
thread per process (prep's workers are the parallelism), without the tokenizer's own
special tokens: prep adds EOS itself and no BOS, as for sentencepiece models.

The word cache, where it is exact: the library's own pre-tokenizer (a regex over the text)
costs most of the time, about 1 MB/s on one core. For the common byte-level BPE layout (no
normalizer or NFC, as GPT-NeoX and Qwen have; GPT-2's ByteLevel regex, or a Split regex
before a regex-free ByteLevel, as in Llama 3) the `regex` package splits the text with the
tokenizer's own pattern, each distinct word goes through the tokenizer's BPE model once
(the bare model on its byte-level form) and is cached: the same ids, several times faster.

Why that is exact. The pattern is read by `_PatternParser`, which accepts only constructs
that mean the same in both engines (Oniguruma in the library, the `regex` package here)
and refuses a pattern that can match the empty string. Over such a pattern, where the
matches fall depends on the text's code points and, for each character, on a few
one-character predicates: `\s`, `\p{L}`, `\p{N}`, ..., a literal under `(?i)`. So if the
two engines agree on every predicate for every character of a text, they split it alike.
At first use (`_engine_disagreements`, about 0.2 s) every character the `regex` package's
tables assign (less surrogates and the private-use planes 15-16) is checked once in each
engine for all predicates; a text holding a character they disagree on (one newer than
the library's tables), one outside that set, or the text of an added token takes the
library's path. Under `(?i)` the library's engine also matches "ss" against "ß" (full
case folding): characters that fold to two or more characters of such a literal are
ruled out as well. With NFC, characters Python's Unicode tables do not know are ruled
out, and `_nfc_disagreements` probes each decomposable or combining character in both
normalizers. The hypothesis tests compare the ids with the library's on varied text.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from functools import cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from megapatch.data.tokenizer import HF_FILE, Tokenizer
from megapatch.errors import ConfigError, DataError

CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"
# Names an end-of-text / start-of-text special token goes by, most specific first.
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
BOS_NAMES = ("<|begin_of_text|>", "<|startoftext|>", "<s>", "<bos>", "<|bos|>")
TRAINED_EOS = "<|endoftext|>"


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ConfigError(
            "Hugging Face tokenizers need the `tokenizers` package: pip install tokenizers"
        ) from None
    return tokenizers


class HFTokenizer(Tokenizer):
    """A `tokenizer.json` and, when it came with one, its `tokenizer_config.json` (and
    `special_tokens_map.json`); without one, prep writes a config naming the special tokens
    so `AutoTokenizer.from_pretrained` reads the same ones."""

    kind = "huggingface"
    file_name = HF_FILE
    reads_json = True

    def __init__(self, files: dict[str, bytes], source: str = "<memory>"):
        self.source = source
        self._files = dict(files)
        try:
            self._tok = _tokenizers().Tokenizer.from_str(files[HF_FILE].decode("utf-8"))
        except Exception as exc:  # the Rust side raises a plain Exception
            reason = " ".join(str(exc).split())
            raise DataError(f"{source}: not a Hugging Face tokenizer.json ({reason})") from None
        self.sha256 = hashlib.sha256(files[HF_FILE]).hexdigest()
        vocab = self._tok.get_vocab(with_added_tokens=True)
        special = self._special_tokens()
        ids = {}
        for role, names in (("eos", EOS_NAMES), ("bos", BOS_NAMES), ("pad", ()), ("unk", ())):
            token = special.get(role)
            if token is None:  # not named by a config: a well-known name among special tokens
                token = next((n for n in names if n in self._special_contents()), None)
            if token is not None and token not in vocab:
                raise DataError(f"{source}: {role}_token {token!r} is not in its vocabulary")
            ids[role] = vocab[token] if token is not None else -1
        if ids["eos"] < 0:
            raise DataError(
                f"{source}: no end-of-text token: no eos_token in {CONFIG_FILE} or "
                f"{SPECIAL_MAP_FILE}, and no special token named {' or '.join(EOS_NAMES)}; "
                f"add one to {CONFIG_FILE} (megapatch ends each document with it)"
            )
        self.special_tokens = {r: self._tok.id_to_token(i) for r, i in ids.items() if i >= 0}
        self._set_ids(max(vocab.values()) + 1, ids["bos"], ids["eos"], ids["pad"], ids["unk"])
        if CONFIG_FILE not in self._files:
            self._files[CONFIG_FILE] = _config_json(self.special_tokens)
        self._spec = json.loads(files[HF_FILE])
        self._splitter_built, self._word_splitter = False, None

    @classmethod
    def from_json_file(cls, path: Path, data: bytes | None = None) -> HFTokenizer:
        """A `tokenizer.json` and the config files beside it (an HF model directory's)."""
        files = {HF_FILE: path.read_bytes() if data is None else data}
        for name in (CONFIG_FILE, SPECIAL_MAP_FILE):
            if (path.parent / name).is_file():
                files[name] = (path.parent / name).read_bytes()
        return cls(files, source=str(path))

    @property
    def backend(self):
        """The `tokenizers.Tokenizer`."""
        return self._tok

    def files(self) -> dict[str, bytes]:
        return dict(self._files)

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    @property
    def _splitter(self) -> WordSplitter | None:
        if not self._splitter_built:  # built on first use: loading stays fast
            self._word_splitter = WordSplitter.of(self._tok, self._spec)
            self._splitter_built = True
        return self._word_splitter

    def prepare(self) -> None:
        self._splitter  # noqa: B018 (built once here, before workers fork, not in each)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(texts)
        rest = []  # (index, text) of texts the word cache cannot encode exactly
        splitter = self._splitter
        for i, text in enumerate(texts):
            words = splitter.words(text) if splitter else None
            if words is None:
                rest.append((i, text))
            else:
                out[i] = self._encode_cached(words)
        if rest:
            for (i, _), ids in zip(rest, self.encode_plain_batch([t for _, t in rest])):
                out[i] = ids
        return out

    def encode_plain_batch(self, texts: list[str]) -> list[np.ndarray]:
        """The library's own encoding (the reference for `encode_batch`)."""
        encodings = _encode_batch(self._tok, texts)
        return [np.array(e.ids, dtype=self.dtype) for e in encodings]

    def _encode_words(self, words: list[str]) -> list[bytes]:
        # The byte-level forms of new words through the BPE model alone, in one batch.
        mapped = list(map(self._splitter.byte_level, words))
        encodings = _encode_batch(self._splitter.model_only, mapped)
        return [np.array(e.ids, dtype=self.dtype).tobytes() for e in encodings]

    def decode(self, ids) -> str:
        return self._tok.decode(
            [int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False
        )

    def _special_tokens(self) -> dict[str, str]:
        """role → token content named by the config files (tokenizer_config first)."""
        found: dict[str, str] = {}
        for name in (SPECIAL_MAP_FILE, CONFIG_FILE):  # the later file wins
            if name not in self._files:
                continue
            try:
                config = json.loads(self._files[name].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DataError(
                    f"{self.source}: {name} beside it is not valid JSON ({exc})"
                ) from None
            for role in ("eos", "bos", "pad", "unk"):
                value = config.get(f"{role}_token") if isinstance(config, dict) else None
                if isinstance(value, dict):  # a serialized AddedToken
                    value = value.get("content")
                if isinstance(value, str) and value:
                    found[role] = value
        return found

    def _special_contents(self) -> set[str]:
        return {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}

    def _pickled(self) -> dict[str, bytes]:
        return self._files


class WordSplitter:
    """The tokenizer's pre-tokenization redone with the `regex` package (module docstring)."""

    def __init__(self, pattern: str, backend, added: list[str], model_only, nfc: bool):
        import regex

        self.model_only = model_only
        self.nfc = nfc  # the tokenizer's normalizer is NFC: applied here with unicodedata
        self.pattern = regex.compile(pattern)
        # Added tokens are matched in the raw text: a text holding one goes to the library.
        # Checked with plain substring search (a regex alternation of hundreds of them, or a
        # class of thousands of characters, is slower than the encoding).
        self._added = sorted(set(added))
        self._added_starts = {t[:2] for t in self._added}
        # GPT-2's bytes_to_unicode: printable bytes stand for themselves, the others for
        # code points from 256 up; a word's UTF-8 bytes read as Latin-1 map through it.
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        others = [b for b in range(256) if b not in printable]
        table = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
        self._byte_table = str.maketrans({chr(b): c for b, c in table.items()})
        atoms = _PatternAtoms.of(pattern)
        if atoms is None or not self._splits_like(backend):
            raise ValueError("the word cache cannot be shown exact for this pattern")
        key = (atoms, nfc)
        if key not in _SAFE:  # once per process, pattern and normalizer
            _SAFE[key] = _safe_characters(atoms, backend.normalizer if nfc else None)
        self._safe = _SAFE[key]
        self._ascii_safe = self._safe.issuperset(map(chr, range(128)))

    @classmethod
    def of(cls, backend, spec: dict) -> WordSplitter | None:
        """A splitter for a tokenizer of the supported layout, else None."""
        try:
            import regex  # noqa: F401
        except ImportError:
            return None
        model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
        normalizer = spec.get("normalizer")
        if normalizer not in (None, {"type": "NFC"}):
            return None
        if model.get("type") != "BPE" or model.get("dropout"):
            return None
        steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
        pattern = None
        if len(steps) == 1 and _is_byte_level(steps[0], use_regex=True):
            pattern = GPT2_PATTERN
        elif (
            len(steps) == 2
            and steps[0].get("type") == "Split"
            and "Regex" in (steps[0].get("pattern") or {})
            and steps[0].get("behavior") == "Isolated"
            and not steps[0].get("invert")
            and _is_byte_level(steps[1], use_regex=False)
        ):
            pattern = steps[0]["pattern"]["Regex"]
        if pattern is None:
            return None
        added = [t["content"] for t in spec.get("added_tokens") or [] if t.get("content")]
        # The same BPE model with nothing around it: a whole string is one word to it.
        bare = {"normalizer": None, "pre_tokenizer": None, "post_processor": None}
        bare |= {"added_tokens": [], "truncation": None, "padding": None}
        model_only = _tokenizers().Tokenizer.from_str(json.dumps(spec | bare))
        try:
            return cls(pattern, backend, added, model_only, nfc=normalizer is not None)
        except Exception:  # a pattern outside the proven subset, or one an engine rejects
            return None

    def words(self, text: str) -> list[str] | None:
        """The pre-tokenized words of `text`, or None where only the library is exact."""
        if not (self._ascii_safe and text.isascii()) and not self._safe.issuperset(text):
            return None
        if self._has_added(text):
            return None
        if self.nfc:
            normal = unicodedata.normalize("NFC", text)
            if normal is not text:  # the same object when already NFC
                if not self._safe.issuperset(normal) or self._has_added(normal):
                    return None
                text = normal
        words = self.pattern.findall(text)
        if sum(map(len, words)) != len(text):  # text the pattern leaves out: not supported
            return None
        return words

    def _has_added(self, text: str) -> bool:
        return any(p in text for p in self._added_starts) and any(t in text for t in self._added)

    def byte_level(self, word: str) -> str:
        return word.encode("utf-8").decode("latin-1").translate(self._byte_table)

    def _splits_like(self, backend) -> bool:
        """Whether this pattern cuts a sample where the tokenizer's own pre-tokenizer does:
        it guards the assumption that ByteLevel's built-in regex is GPT-2's pattern."""
        ours = {0, len(_SAMPLE)}.union(*(m.span() for m in self.pattern.finditer(_SAMPLE)))
        pieces = backend.pre_tokenizer.pre_tokenize_str(_SAMPLE)
        return ours == {0, len(_SAMPLE)}.union(*(span for _, span in pieces))


class _PatternAtoms(NamedTuple):
    """What a pre-tokenizer regex's matches depend on besides the code points themselves.

    `predicates`: one-character regexes whose truth per character both engines must agree
    on (`\\s`, `\\p{L}`, `.`, a literal under `(?i)`, ...); `folded`: the case-folded
    literal runs under `(?i)` (a character whose full case folding is a substring of one
    may match several of their characters at once in the library's engine)."""

    predicates: tuple[str, ...]
    folded: tuple[str, ...]

    @classmethod
    def of(cls, pattern: str) -> _PatternAtoms | None:
        """The atoms of `pattern`, or None when it uses a construct outside the subset
        whose meaning is the same in both engines, or can match the empty string."""
        parser = _PatternParser(pattern)
        try:
            nullable = parser.alternation()
        except _Unsupported:
            return None
        if parser.pos != len(pattern) or nullable or len(parser.predicates) > 62:
            return None
        return cls(tuple(sorted(parser.predicates)), tuple(sorted(parser.folded)))


class _Unsupported(Exception):
    pass


class _PatternParser:
    """A recursive-descent reader of the regex subset that GPT-2's, Llama 3's, Qwen 2's and
    GPT-4o's pre-tokenizer patterns use: alternation, `(?:...)`, `(?=...)`, `(?!...)`,
    `(?i:...)` around literal alternatives, greedy and lazy `? * +`, `{m}`, `{m,}`,
    `{m,n}`, classes with ranges, `\\s \\S \\d \\D \\w \\W \\p{..} \\P{..}`, `.`, and escaped
    literals. Everything else (anchors, captures, lookbehind, backreferences, possessive
    quantifiers, nested classes, other flags) is refused: those read differently in
    Oniguruma (the library's engine) and the `regex` package, or depend on more than one
    character at a time."""

    METACHARS = set("\\^$.|?*+()[]{}")
    CLASS_ESCAPES = {"s": r"\s", "S": r"\s", "d": r"\d", "D": r"\d", "w": r"\w", "W": r"\w"}
    LITERAL_ESCAPES = {"r": "\r", "n": "\n", "t": "\t"} | {c: c for c in "\\^$.|?*+()[]{}-/"}

    def __init__(self, pattern: str):
        self.pattern, self.pos = pattern, 0
        self.predicates: set[str] = set()
        self.folded: set[str] = set()
        self.folded_groups = 0  # (?i:...) groups read so far

    def peek(self, ahead: int = 0) -> str:
        i = self.pos + ahead
        return self.pattern[i] if i < len(self.pattern) else ""

    def take(self, expected: str | None = None) -> str:
        char = self.peek()
        if not char or (expected is not None and char != expected):
            raise _Unsupported
        self.pos += 1
        return char

    def alternation(self) -> bool:
        """Parse alternatives; whether one of them can match the empty string."""
        nullable = self.sequence()
        while self.peek() == "|":
            self.take()
            nullable = self.sequence() or nullable
        return nullable

    def sequence(self) -> bool:
        nullable, folded_before = True, False
        while self.peek() not in ("", "|", ")"):
            groups = self.folded_groups
            atom_nullable = self.atom()
            minimum, repeats = self.quantifier()
            folded = self.folded_groups > groups
            # (?i) literals next to others, or repeated, could make one string in Oniguruma,
            # longer than the runs `folded` records
            if folded and (repeats or folded_before):
                raise _Unsupported
            folded_before = folded
            nullable = nullable and (atom_nullable or minimum == 0)
        return nullable

    def quantifier(self) -> tuple[int, bool]:
        """The minimum count of a quantifier here (1 without one), and whether it repeats."""
        char = self.peek()
        if char in ("?", "*", "+"):
            self.take()
            if self.peek() == "?":  # lazy: the same in both engines
                self.take()
            minimum, repeats = (1 if char == "+" else 0), char != "?"
        elif char == "{":
            self.take()
            minimum = maximum = self.number()
            if self.peek() == ",":
                self.take()
                maximum = self.number() if self.peek() != "}" else None
                if maximum is not None and maximum < minimum:
                    raise _Unsupported
            self.take("}")
            if self.peek() == "?":  # lazy in the regex package, an optional in Oniguruma's
                raise _Unsupported
            repeats = maximum is None or maximum > 1
        else:
            return 1, False
        if self.peek() in ("?", "*", "+", "{"):  # possessive or stacked
            raise _Unsupported
        return minimum, repeats

    def number(self) -> int:
        start = self.pos
        while self.peek().isdigit() and self.peek().isascii():
            self.take()
        if self.pos == start:
            raise _Unsupported
        return int(self.pattern[start : self.pos])

    def atom(self) -> bool:
        """Parse one atom; whether it can match the empty string."""
        char = self.take()
        if char == "(":
            if self.peek() != "?":  # a capture: findall would return the group
                raise _Unsupported
            self.take()
            kind = self.take()
            if kind == "i":
                self.take(":")
                nullable = self.folded_literals()
                self.folded_groups += 1
            elif kind in (":", "=", "!"):
                nullable = self.alternation() or kind != ":"
            else:
                raise _Unsupported
            self.take(")")
            if kind in ("=", "!") and self.peek() in ("?", "*", "+", "{"):
                raise _Unsupported  # a repeated lookahead
            return nullable
        if char == "[":
            self.char_class()
            return False
        if char == "\\":
            self.escape()  # a literal, or a predicate it records
            return False
        if char == ".":  # which line breaks it skips may depend on how the engine was built
            self.predicates.add(".")
            return False
        if char in self.METACHARS:
            raise _Unsupported
        return False  # a literal character: the same code point in both engines

    def escape(self) -> str | None:
        """An escape after the backslash: its literal character, or None for a class
        escape (recorded as a predicate)."""
        char = self.take()
        if char in self.CLASS_ESCAPES:
            self.predicates.add(self.CLASS_ESCAPES[char])
            return None
        if char in ("p", "P"):
            self.take("{")
            start = self.pos
            while self.peek() and (self.peek().isalnum() or self.peek() in "_="):
                self.take()
            name = self.pattern[start : self.pos]
            self.take("}")
            if not name or not name.isascii():
                raise _Unsupported
            self.predicates.add(f"\\p{{{name}}}")
            return None
        if char in self.LITERAL_ESCAPES:
            return self.LITERAL_ESCAPES[char]
        raise _Unsupported

    def char_class(self) -> None:
        if self.peek() == "^":
            self.take()
        start = self.pos
        while self.pos == start or self.peek() != "]":
            char = self.take()
            if char == "]" or char == "[" or (char == "&" and self.peek() == "&"):
                raise _Unsupported  # empty, nested, an intersection: read otherwise
            if char == "-" and self.pos - 1 != start and self.peek() != "]":
                raise _Unsupported  # a dash that starts no range, but first or last
            low = self.escape() if char == "\\" else char
            if self.peek() == "-" and self.peek(1) != "]":
                self.take()
                high = self.take()
                if high == "\\":
                    high = self.escape()
                if low is None or high is None or high in "[]" or ord(high) < ord(low):
                    raise _Unsupported
        self.take("]")

    def folded_literals(self) -> bool:
        """The body of `(?i:...)`: alternatives of literal characters only. Each character
        becomes a predicate; a character whose full case folding has several characters
        is refused (Oniguruma matches it against as many)."""
        nullable = False
        while True:
            run = []
            while self.peek() not in ("", "|", ")"):
                char = self.take()
                if char == "\\":
                    char = self.escape()
                    if char is None:
                        raise _Unsupported
                elif char in self.METACHARS:
                    raise _Unsupported
                if not char.isprintable() or len(char.casefold()) != 1:
                    raise _Unsupported  # Python's tables do not know it, or it folds to more
                self.predicates.add(f"(?i:{_escape(char)})")
                run.append(char)
            nullable = nullable or not run
            self.folded.add("".join(run).casefold())
            if self.peek() != "|":
                return nullable
            self.take()


def _escape(char: str) -> str:
    """A literal character as both engines read it."""
    if char in _PatternParser.METACHARS or char == "-":
        return "\\" + char
    return {"\r": r"\r", "\n": r"\n", "\t": r"\t"}.get(char, char)


@cache
def _universe() -> str:
    """The characters the word cache may see: every code point the `regex` package's
    Unicode tables assign, without surrogates and the private-use planes 15-16 (a text
    holding any other character takes the library's path)."""
    import regex

    points = np.concatenate([np.arange(0xD800), np.arange(0xE000, 0xF0000)])
    everything = points.astype(np.uint32).tobytes().decode("utf-32-le")
    return "".join(regex.findall(r"\p{Assigned}+", everything))


def _safe_characters(atoms: _PatternAtoms, normalizer) -> frozenset[str]:
    """The characters on which the word cache is exact for a pattern of these atoms (and,
    with `normalizer`, an NFC normalizer): those of `_universe` on which both engines
    agree for every predicate, less what case folding or NFC rule out."""
    import regex

    universe = _universe()
    bad = _engine_disagreements(atoms.predicates, universe)
    # The library's engine matches "ss" of a pattern's (?i) literal against a text's "ß":
    # characters whose full case folding (the regex package's, its tables the newest) is
    # two or more characters of a literal are ruled out.
    pieces = {r[i:j] for r in atoms.folded for i in range(len(r)) for j in range(i + 2, len(r) + 1)}
    if pieces:
        longest_first = sorted(pieces, key=lambda p: (-len(p), p))
        folds = regex.compile("(?fi)(?:" + "|".join(map(regex.escape, longest_first)) + ")")
        bad.update(folds.findall("\0".join(universe)))  # NUL: in no literal, folds to none
    if normalizer is not None:
        bad.update(c for c in universe if unicodedata.category(c) == "Cn")  # Python's tables
        bad |= _nfc_disagreements(normalizer, universe)
    points = np.frombuffer(universe.encode("utf-32-le"), dtype=np.uint32)
    unsafe = np.frombuffer("".join(bad).encode("utf-32-le"), dtype=np.uint32)
    return frozenset(points[~np.isin(points, unsafe)].tobytes().decode("utf-32-le"))


def _engine_disagreements(predicates: tuple[str, ...], universe: str) -> set[str]:
    """The characters of `universe` on which the `regex` package and the tokenizers
    library's engine disagree about any predicate.

    The characters are grouped by their truth values under the `regex` package; each
    group is then matched in the library's engine (a `Split` pre-tokenizer) by a pattern
    that accepts exactly the characters with those truth values there, and whatever it
    leaves is a disagreement. Every character is read once by each engine."""
    import regex

    points = np.frombuffer(universe.encode("utf-32-le"), dtype=np.uint32)
    codes = np.zeros(len(points), dtype=np.int64)
    for bit, predicate in enumerate(predicates):
        hits = "".join(regex.findall(predicate, universe)).encode("utf-32-le")
        codes |= np.isin(points, np.frombuffer(hits, dtype=np.uint32)).astype(np.int64) << bit
    split, pattern = _tokenizers().pre_tokenizers.Split, _tokenizers().Regex
    bad: set[str] = set()
    for code in np.unique(codes).tolist():
        group = points[codes == code].tobytes().decode("utf-32-le")
        tests = "".join(
            f"(?={p})" if code >> bit & 1 else f"(?!{p})" for bit, p in enumerate(predicates)
        )
        accept = split(pattern(f"(?:{tests}[\\s\\S])+"), behavior="removed")
        bad.update("".join(piece for piece, _ in accept.pre_tokenize_str(group)))
    return bad


def _nfc_disagreements(normalizer, universe: str) -> set[str]:
    """Characters whose NFC the tokenizers library may compute otherwise than Python.

    Unicode's normalization stability policy makes NFC the same in every version for
    characters assigned in both, so what is probed is whether the library knows each
    character Python's tables decompose or give a combining class: decomposable ones
    alone and decomposed, combining ones after a letter and before a mark of class 230
    (a starter would block the composition) and of class 220 (a mark of a higher class
    is moved behind it)."""
    known = [c for c in universe if unicodedata.category(c) != "Cn"]
    forms, owners = [], []
    for char in known:
        if unicodedata.decomposition(char):
            decomposed = unicodedata.normalize("NFD", char)
            forms += [char, decomposed]
            marks = [c for c in decomposed if unicodedata.combining(c)]
            owners += [[char], marks or list(decomposed)]
        if unicodedata.combining(char):
            forms += [f"a{char}\u0301", f"a{char}\u0316"]
            owners += [[char], [char]]
    theirs = normalizer.normalize_str("\n".join(forms)).split("\n")
    bad: set[str] = set()
    for form, their, owner in zip(forms, theirs, owners, strict=True):
        if unicodedata.normalize("NFC", form) != their:
            bad.update(owner)
    return bad


def _encode_batch(backend, texts: list[str]):
    # One thread: prep's workers are the parallelism. Set here, not at import: the library
    # reads it at each call (the word cache's batches of new words come through here too).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # encode_batch_fast (tokenizers >= 0.20) skips the offsets; the ids are the same
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return encode(texts, add_special_tokens=False)


def _is_byte_level(step: dict, use_regex: bool) -> bool:
    return (
        step.get("type") == "ByteLevel"
        and not step.get("add_prefix_space")
        and step.get("use_regex", True) == use_regex
    )


# The safe characters, per (pattern atoms, NFC or not), once per process.
_SAFE: dict = {}
# The pattern of the tokenizers library's ByteLevel pre-tokenizer (GPT-2's).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Split by a pattern and by the tokenizer's pre-tokenizer, to see they are the same.
_SAMPLE = (
    "Hello world's 'S 'Re I'LL we've 'd 1234567 x1y2  \n\n\t tabs\r\n ...!? (a) -- "
    "caf\u00e9 e\u0301 \u6771\u4eac \U0001f642 \u0663\u0664 \u00bd \u00a0 end  "
)


def _config_json(special: dict[str, str]) -> bytes:
    """A tokenizer_config.json under which `AutoTokenizer` encodes as prep did."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{f"{role}_token": token for role, token in special.items()},
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    return (json.dumps(config, indent=2) + "\n").encode()


def train_bpe(documents, vocab_size: int) -> HFTokenizer:
    """A byte-level BPE (GPT-2's pre-tokenizer, no prefix space, `<|endoftext|>` as id 0)
    of `vocab_size` tokens trained on `documents` with the `tokenizers` library."""
    tk = _tokenizers()
    alphabet = tk.pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ConfigError(
            f"--vocab-size {vocab_size}: a byte-level BPE needs at least {len(alphabet) + 1} "
            "tokens (256 bytes and the end-of-text token)"
        )
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[TRAINED_EOS],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer)
    return HFTokenizer({HF_FILE: tok.to_str().encode()}, source=HF_FILE)
