"""Hugging Face tokenizers (`tokenizer.json`, e.g. GPT-2, GPT-NeoX, Llama 3, Qwen) behind
megapatch's tokenizer interface, and byte-level BPE training with the `tokenizers` library.

Special tokens come from the tokenizer's own files: `tokenizer_config.json` (or
`special_tokens_map.json`) beside the `tokenizer.json` names them; a bare `tokenizer.json`
is searched for a special token of a well-known end-of-text name. A tokenizer without one
is refused: megapatch ends every document with EOS.

Encoding runs in batches (`Tokenizer.encode_batch_fast`: no offsets are computed), one
thread per process (prep's workers are the parallelism), without the tokenizer's own
special tokens: prep adds EOS itself and no BOS, as for sentencepiece models.
"""

from __future__ import annotations

import hashlib
import json
import os
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

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # Set here, not at import: the tokenizers library reads it at each call.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        encodings = self._tok.encode_batch_fast(texts, add_special_tokens=False)
        ids = [e.ids for e in encodings]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum()))
        return np.split(flat, np.cumsum(lengths)[:-1]) if len(ids) else []

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

    def __getstate__(self):
        return {"files": self._files, "source": self.source}

    def __setstate__(self, state):
        self.__init__(state["files"], state["source"])

    def __repr__(self) -> str:
        return f"HFTokenizer({self.source!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


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
