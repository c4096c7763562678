"""Fuzzing the two readers of user files: the shard reader on arbitrary bytes, the config
loader on arbitrary YAML and overrides. Either they work, or they raise the project's own
error (one clear line); never anything else."""

from __future__ import annotations

import math
import re
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from megapatch.config import RunConfig, load_config
from megapatch.data import IndexedDataset
from megapatch.data.indexed import MAGIC, VERSION
from megapatch.errors import ConfigError, DataError, MegapatchError
from tests.training.conftest import REPO


def fuzz(examples: int):
    """Enough examples to find the crashes fixed so far within a few seconds each."""
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        database=None,
    )


# -- shards -----------------------------------------------------------------------------

_U64 = st.one_of(st.integers(0, 64), st.integers(0, 2**64 - 1))


@st.composite
def _index_files(draw) -> tuple[bytes, bytes]:
    """A .idx that is often nearly right (so the reader gets past the magic) and a .bin."""
    magic = draw(st.sampled_from([MAGIC, MAGIC, b"MPTOKIDY", b"\0" * 8]))
    version = draw(st.sampled_from([VERSION, VERSION, 0, 2**32 - 1]))
    code = draw(st.sampled_from([1, 2, 1, 0, 3, 2**32 - 1]))
    num_tokens, num_docs = draw(_U64), draw(_U64)
    header = struct.pack("<8sIIQQ", magic, version, code, num_tokens, num_docs)
    if draw(st.booleans()):  # consistent-looking offsets: ascending from 0 to num_tokens
        inner = sorted(draw(st.lists(st.integers(0, max(0, min(num_tokens, 64))), max_size=8)))
        offsets = [0, *inner, num_tokens]
    else:
        offsets = draw(st.lists(_U64, max_size=10))
    idx = header + b"".join(struct.pack("<Q", o) for o in offsets) + draw(st.binary(max_size=9))
    itemsize = 2 if code == 1 else 4
    if draw(st.booleans()) and num_tokens <= 256:
        bin_ = draw(st.binary(min_size=num_tokens * itemsize, max_size=num_tokens * itemsize))
    else:
        bin_ = draw(st.binary(max_size=64))
    return idx, bin_


def _read_all(ds: IndexedDataset) -> None:
    """Touch everything an opened shard promises: every document, every token."""
    assert len(ds.tokens) == ds.num_tokens
    docs = [np.asarray(ds.document(i)) for i in range(ds.num_documents)]
    joined = np.concatenate(docs) if docs else np.empty(0, dtype=ds.dtype)
    assert np.array_equal(joined, np.asarray(ds.tokens))


def _open(idx: bytes | None, bin_: bytes | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "shard"
        if idx is not None:
            prefix.with_suffix(".idx").write_bytes(idx)
        if bin_ is not None:
            prefix.with_suffix(".bin").write_bytes(bin_)
        try:
            ds = IndexedDataset(prefix)
        except DataError as exc:
            assert "\n" not in str(exc) and str(prefix) in str(exc)
            return
        _read_all(ds)


@fuzz(300)
@given(
    idx=st.one_of(st.none(), st.binary(max_size=128)),
    bin_=st.one_of(st.none(), st.binary(max_size=64)),
)
def test_shard_reader_on_arbitrary_bytes(idx, bin_):
    _open(idx, bin_)


@fuzz(200)
@given(files=_index_files())
@example(files=(struct.pack("<8sIIQQ", MAGIC, VERSION, 1, 0, 2**64 - 1), b""))
@example(files=(struct.pack("<8sIIQQQ", MAGIC, VERSION, 1, 0, 0, 0), b""))  # an empty shard
def test_shard_reader_on_nearly_valid_indexes(files):
    _open(*files)


# -- config -----------------------------------------------------------------------------

BASE = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["auto", "2/3", "1/0", "0/0", "2e6", "1e400", "-0", "cosine", "bf16", ""]),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
_KEYS = st.sampled_from(
    [f"{section}.{key}" for section, keys in BASE.items() for key in keys]
    + ["train.resume", "train.max_steps", "checkpoint.keep_last", "data.blend", "data.seed",
       "model.n_kv_heads", "parallel.deepspeed", "init.from_hf", "base", "run", "nonsense.key"]
)  # fmt: skip


def _load(text: str, overrides: list[str] = ()) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(text)
        try:
            cfg = load_config(path, overrides)
        except ConfigError as exc:
            assert "\n" not in str(exc), str(exc)
            return
        except MegapatchError as exc:  # the project's family, but a config error is expected
            raise AssertionError(f"{type(exc).__name__} from the config loader: {exc}") from exc
        assert isinstance(cfg, RunConfig)
        cfg.config_hash()
        cfg.render_yaml()


@fuzz(200)
@given(text=st.text(max_size=300))
@example(text="a: 2001-02-30")  # a timestamp that is no date
@example(text="? [a, b]\n: c")  # a key that is a list
@example(text="1: x")  # a section name that is not a string
@example(text="model: {1: 2}")
@example(text="base: [1, 2]")
@example(text="&a [*a]")
@example(text="!!float ")
def test_config_loader_on_arbitrary_text(text):
    _load(text)


_YAML_PIECES = list(":-[]{}&*#|>'\"%@`,? \n\tabcxyz019.e+") + [
    "!!", "!!timestamp ", "!!binary ", "!!python/object ", "!!float ", "!!int ", "!!set ",
    "2001-02-30", "2001-12-14t21:59:43.10-05:00", "0x1F", "0o17", ".inf", ".nan", "~",
    "<<: ", "model:\n  ", "train:\n  ", "base: ", "--- ", "...",
]  # fmt: skip


@fuzz(200)
@given(text=st.lists(st.sampled_from(_YAML_PIECES), max_size=40).map("".join))
def test_config_loader_on_yaml_punctuation(text):
    _load(text)


@fuzz(100)
@given(changes=st.lists(st.tuples(_KEYS, _VALUES), max_size=4), drop=st.sets(_KEYS, max_size=2))
@example(changes=[("model.vocab_size", {"\n": None})], drop=set())  # YAML wrote it over lines
def test_config_loader_on_mutated_configs(changes, drop):
    raw = {section: dict(keys) for section, keys in BASE.items()}
    for key in drop:
        section, _, name = key.partition(".")
        if isinstance(raw.get(section), dict):
            raw[section].pop(name, None)
    for key, value in changes:
        section, _, name = key.partition(".")
        if name:
            raw.setdefault(section, {})
            if isinstance(raw[section], dict):
                raw[section][name] = value
        else:
            raw[section] = value
    _load(yaml.safe_dump(raw, allow_unicode=True))


@fuzz(100)
@given(
    overrides=st.lists(
        st.one_of(
            st.text(max_size=30),
            st.builds(
                lambda k, v: f"{k}={v}", _KEYS, st.one_of(st.text(max_size=10), _SCALARS.map(str))
            ),
        ),
        max_size=3,
    )
)
def test_config_overrides_on_arbitrary_text(overrides):
    _load((REPO / "configs" / "tiny.yaml").read_text(), overrides)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("run: {seed: 2001-02-30}", "invalid YAML: ValueError: day is out of range for month"),
        ("train: {lr: !!float }", "invalid YAML: IndexError"),
        ("1: x", "unknown key '1'"),
    ],
    ids=["no-such-date", "empty-float", "integer-section"],
)
def test_what_fuzzing_found_is_one_config_error(tmp_path, text, expected):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(path)


def test_fuzzing_reaches_a_valid_config():
    """The loader is exercised past validation, not only on errors."""
    _load((REPO / "configs" / "tiny.yaml").read_text())
    assert math.isfinite(load_config(REPO / "configs" / "tiny.yaml").train.lr)
