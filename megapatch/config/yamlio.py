"""Reading config YAML: files with `base:` inheritance, dotted overrides, and a writer that
round-trips. Records which file or override set each key, for error messages."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml

from megapatch.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats such as 2e6 and 1e-3 (PyYAML's YAML 1.1
    rules read them as strings)."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings _Loader would read as floats."""


_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
for _cls in (_Loader, _Dumper):
    _cls.yaml_implicit_resolvers = {k: list(v) for k, v in _cls.yaml_implicit_resolvers.items()}
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def dump_scalar(value: Any) -> str:
    text = yaml.dump(value, Dumper=_Dumper, default_flow_style=True, width=10**9, sort_keys=False)
    return text.replace("\n...\n", "").strip()


def read_yaml(path: Path, label: str) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{label}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read config file ({exc.strerror})") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{label}: invalid YAML{where}: {problem}") from None
    except Exception as exc:  # noqa: BLE001
        # PyYAML's constructors raise plain Python errors, not YAMLError, on some well-formed
        # but meaningless input ("2001-02-30" -> ValueError, "!!float " -> IndexError): what
        # parsing the user's text raises is about the text.
        problem = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"{label}: invalid YAML: {type(exc).__name__}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{label}: expected a mapping of sections at the top level, got {type(data).__name__}"
        )
    return data


def merge(dst: dict, src: dict, provenance: dict | None, label: str, prefix: str = "") -> None:
    """Deep-merge src into dst (mappings merge, anything else replaces) and record in
    `provenance` which file set each section and section.key."""
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if provenance is not None and dotted.count(".") <= 1:
            provenance[dotted] = label
        if isinstance(value, dict):
            if not isinstance(dst.get(key), dict):
                dst[key] = {}
            merge(dst[key], value, provenance, label, dotted + ".")
        else:
            dst[key] = copy.deepcopy(value)


def read_with_bases(path: Path, provenance: dict, chain: tuple[Path, ...] = ()) -> dict:
    label = str(path)
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise ConfigError(f"{label}: base: inheritance cycle ({cycle})")
    data = read_yaml(path, label)
    bases = data.pop("base", None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ConfigError(f"{label}: base={bases!r}: expected a file name or a list of file names")
    merged: dict = {}
    for base in bases:
        base_path = Path(os.path.normpath(path.parent / base))
        if not base_path.is_file():
            raise ConfigError(f"{label}: base={base!r}: file not found (looked for {base_path})")
        # The base's own keys are recorded under its name while it is read.
        merge(merged, read_with_bases(base_path, provenance, (*chain, resolved)), None, "")
    merge(merged, data, provenance, label)
    return merged


def parse_override(item: str) -> tuple[str, Any]:
    """'train.total_tokens=2e6' -> ('train.total_tokens', 2000000.0); the value is a YAML scalar."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: expected section.key=value, e.g. patch.size=4")
    try:
        value = yaml.load(text, Loader=_Loader) if text.strip() else None
    except Exception:  # noqa: BLE001 - a YAMLError, or a plain error from PyYAML (read_yaml)
        raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
    return key, value


def apply_override(raw: dict, provenance: dict, item: str) -> None:
    key, value = parse_override(item)
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    provenance[".".join(parts[:2])] = f"override {item!r}"
    provenance.setdefault(parts[0], f"override {item!r}")  # a section only an override names
