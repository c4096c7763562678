"""Hugging Face tokenizers (`tokenizer.json`, e.g. GPT-2, GPT-NeoX, Llama 3, Qwen) behind
megapatch's tokenizer interface, and byte-level BPE training with the `tokenizers` library.

Special tokens come from the tokenizer's own files: `tokenizer_config.json` (or
`special_tokens_map.json`) beside the `tokenizer.json` names them; a bare `tokenizer.json`
is searched for a special token of a well-known end-of-text name. A tokenizer without one
is refused: megapatch ends every document with EOS.

Encoding runs in batches (`Tokenizer.encode_batch_fast`: no offsets are computed), one
thread per process (prep's workers are the parallelism), without the tokenizer's own
special tokens: prep adds EOS itself and no BOS, as for sentencepiece models.

The word cache, where it is exact: the library's own pre-tokenizer (a regex over the text)
costs most of the time, about 1-2 MB/s on one core. For the common byte-level BPE layout
(no normalizer or NFC, as GPT-NeoX and Qwen have; GPT-2's ByteLevel regex, or a Split
regex before a regex-free ByteLevel, as in Llama 3) the `regex` package splits the text with the tokenizer's own pattern, each
distinct word goes through the tokenizer's BPE model once (`model.tokenize` of its
byte-level form) and is cached: the same ids, several times faster. Exactness rests on the
two regex engines classifying characters alike: at load every letter, digit and space of
the Unicode tables is pre-tokenized by both in a few contexts, and a text holding a
character they disagree on (one newer than the library's Unicode tables), or the text of
an added token, takes the library's path; with NFC, so does a character Python's own
Unicode tables do not know.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from itertools import chain
from pathlib import Path

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
        # Set here, not at import: the tokenizers library reads it at each call.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
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
        key = backend.pre_tokenizer.__getstate__()  # its JSON
        if key not in _DISAGREEMENTS:  # once per process and pre-tokenizer
            _DISAGREEMENTS[key] = self._disagreements(backend)
        self._unsafe = _DISAGREEMENTS[key]
        if nfc:
            self._unsafe = self._unsafe | _nfc_disagreements(backend)

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
        except Exception:  # a pattern the `regex` package reads otherwise: no fast path
            return None

    def words(self, text: str) -> list[str] | None:
        """The pre-tokenized words of `text`, or None where only the library is exact."""
        if self._has_added(text) or not self._unsafe.isdisjoint(text):
            return None
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
            if self._has_added(text):
                return None
        words = self.pattern.findall(text)
        if sum(map(len, words)) != len(text):  # text the pattern leaves out: not supported
            return None
        return words

    def _has_added(self, text: str) -> bool:
        return any(p in text for p in self._added_starts) and any(t in text for t in self._added)

    def byte_level(self, word: str) -> str:
        return word.encode("utf-8").decode("latin-1").translate(self._byte_table)

    def _disagreements(self, backend) -> frozenset[str]:
        """The characters the two engines split differently. Letters,
        digits and spaces are probed in runs of one class, after a letter, a digit, a
        space, a period and a line break; the chars of a run that splits differently are
        then probed one by one."""
        import regex

        everything = "".join(map(chr, chain(range(0xD800), range(0xE000, 0x110000))))
        runs = regex.findall(r"\p{L}+|\p{N}+|\s+", everything)
        bad = set()
        for run in self._differing(runs, backend):
            bad.update(self._differing(list(run), backend))
        return frozenset(bad)

    def _differing(self, items: list[str], backend) -> list[str]:
        """The items whose probes the two engines split differently."""
        probes, owner = [], []
        for i, item in enumerate(items):
            for context in ("a", "1", " ", ".", "\n"):
                probes.append(context + item)
                owner += [i] * (len(item) + 1)
        text = "".join(probes)
        ours = {m.end() for m in self.pattern.finditer(text)}
        theirs = {end for _, (_, end) in backend.pre_tokenizer.pre_tokenize_str(text)}
        # a boundary belongs to the probe it ends (the text's end to the last)
        return [items[i] for i in sorted({owner[pos - 1] for pos in ours ^ theirs})]


def _nfc_disagreements(backend) -> frozenset[str]:
    """Characters Python's NFC may treat otherwise than the tokenizer's: those Python's
    Unicode tables do not know (assigned in the `regex` package's), and those with a
    canonical decomposition that the two normalize differently, alone or decomposed."""
    if "nfc" not in _DISAGREEMENTS:  # once per process
        import regex

        everything = "".join(map(chr, chain(range(0xD800), range(0xE000, 0x110000))))
        assigned = regex.findall(r"\p{Assigned}", everything)
        bad = {c for c in assigned if unicodedata.category(c) == "Cn"}
        decomposable = [c for c in assigned if c not in bad and unicodedata.decomposition(c)]
        forms = [f for c in decomposable for f in (c, unicodedata.normalize("NFD", c))]
        theirs = backend.normalizer.normalize_str("\n".join(forms)).split("\n")
        ours = [unicodedata.normalize("NFC", f) for f in forms]
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            if a != b:
                bad.update(c for c in forms[i] if unicodedata.combining(c) or c == forms[i])
        _DISAGREEMENTS["nfc"] = frozenset(bad)
    return _DISAGREEMENTS["nfc"]


def _encode_batch(backend, texts: list[str]):
    # encode_batch_fast (tokenizers >= 0.20) skips the offsets; the ids are the same
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return encode(texts, add_special_tokens=False)


def _is_byte_level(step: dict, use_regex: bool) -> bool:
    return (
        step.get("type") == "ByteLevel"
        and not step.get("add_prefix_space")
        and step.get("use_regex", True) == use_regex
    )


_DISAGREEMENTS: dict = {}
# The pattern of the tokenizers library's ByteLevel pre-tokenizer (GPT-2's).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


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
