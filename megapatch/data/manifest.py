"""`manifest.json`: what a prep output directory holds, written last so its presence marks
a complete prep.

    {
      "format": "megapatch-prep", "version": 1,
      "vocab_size": 4096, "dtype": "uint16",
      "tokenizer": {"file": "tokenizer.model", "type": "sentencepiece",
                    "files": ["tokenizer.model"], "sha256": "...", "trained": true,
                    "bos_id": 1, "eos_id": 2, "pad_id": 3, "unk_id": 0},
      "splits": {"train": {"num_tokens": ..., "num_documents": ...,
                           "shards": [{"name": "train-00000", "num_tokens": ..., "num_documents": ...}]},
                 "valid": {...}},
      "sources": [{"path": "...", "bytes": ...}],
      "skipped": {"bad_json": 0, "missing_text": 0, "empty": 0},
      "prep_args": {...},
      "megapatch_version": "0.1.0"
    }
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from megapatch.data.tokenizer import TOKENIZER_FILES
from megapatch.errors import DataError

MANIFEST_NAME = "manifest.json"
FORMAT = "megapatch-prep"
FORMAT_VERSION = 1
SPLITS = ("train", "valid")

_REQUIRED = ("format", "version", "vocab_size", "dtype", "tokenizer", "splits")


def write_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    path = Path(directory) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a prep output directory, with its required keys checked."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise DataError(f"data directory not found: {directory}")
    if not path.is_file():
        raise DataError(f"{path}: missing; {directory} is not a complete `megapatch prep` output")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: expected a JSON object")
    for key in _REQUIRED:
        if key not in manifest:
            raise DataError(f"{path}: missing key {key!r}")
    if manifest["format"] != FORMAT or manifest["version"] != FORMAT_VERSION:
        raise DataError(
            f"{path}: format {manifest['format']!r} version {manifest['version']!r}, "
            f"expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    for split, info in manifest["splits"].items():
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            raise DataError(f"{path}: splits.{split} must hold a list of shards")
    return manifest


def prep_files(directory: str | os.PathLike) -> list[Path]:
    """Files in `directory` that belong to a prep (so a new prep must not mix with them)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    names = [MANIFEST_NAME, *TOKENIZER_FILES]
    found = [directory / n for n in names if (directory / n).exists()]
    for split in SPLITS:
        found += sorted(directory.glob(f"{split}-*.bin")) + sorted(directory.glob(f"{split}-*.idx"))
    return found
