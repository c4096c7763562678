"""Building a RunConfig: YAML (or a mapping) -> typed sections -> derived defaults ->
validation. The only coercions are lossless: an integral float for an int (2e6), an int
for a float, and a fraction string such as "2/3" for a float."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
from dataclasses import MISSING, fields
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from megapatch.config.sections import FIELD_DOCS, SECTIONS, PatchSection, RunConfig
from megapatch.config.validation import Checker, validate
from megapatch.config.yamlio import apply_override, dump_scalar, merge, read_with_bases
from megapatch.errors import ConfigError


class _Mismatch(Exception):
    """A value does not fit a type; the message says what was expected."""


_TYPE_WORDS = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    dict: "a mapping",
    list: "a list",
    type(None): "null",
}


def _coerce(value: Any, tp: Any) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        expected = []
        for arg in get_args(tp):
            try:
                return _coerce(value, arg)
            except _Mismatch as exc:
                expected.append(str(exc))
        raise _Mismatch(" or ".join(expected))
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, str) and value in choices:
            return value
        hint = difflib.get_close_matches(str(value), choices, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise _Mismatch(f"one of {', '.join(repr(c) for c in choices)}{suggestion}")
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 2e6 -> 2000000: lossless
        if isinstance(value, float):
            raise _Mismatch("an integer (this number has a fractional part)")
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*/\s*\d+\s*", value):
            num, den = (int(x) for x in value.split("/"))
            if den:
                return float(Fraction(num, den))
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp in (dict, list) or origin in (dict, list):
        if isinstance(value, origin or tp):
            return copy.deepcopy(value)
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported config type {tp!r}")
    raise _Mismatch(_TYPE_WORDS.get(tp, str(tp)))


def _all_keys() -> list[str]:
    return [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in fields(cls)]


def _build_section(name: str, cls: type, given: Any, check: Checker) -> Any:
    if given is None:
        given = {}
    if not isinstance(given, dict):
        check.fail(name, given, f"a mapping of {name} settings")
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key in given:
        if key not in known:
            check.unknown(f"{name}.{key}", _all_keys())
    values = {}
    for fname, f in known.items():
        dotted = f"{name}.{fname}"
        if fname not in given:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ConfigError(
                    f"{check.where(name)}: {dotted} is required ({FIELD_DOCS.get(dotted, '').rstrip('.')})"
                )
            continue
        try:
            values[fname] = _coerce(given[fname], hints[fname])
        except _Mismatch as exc:
            check.fail(dotted, given[fname], str(exc))
    return cls(**values)


def build(raw: dict, provenance: dict, source: str, run_name_default: str | None) -> RunConfig:
    check = Checker(provenance, source)
    for key in raw:
        if key not in SECTIONS:
            check.unknown(key, list(SECTIONS) + _all_keys())
    sections = {
        name: _build_section(name, cls, raw.get(name), check) for name, cls in SECTIONS.items()
    }
    cfg = RunConfig(**sections, source=source, provenance=provenance)
    cfg = _resolve_defaults(cfg, run_name_default)
    validate(cfg, check)
    if cfg.patch.stages is not None:  # stages replace the shorthand: its keys show the defaults
        defaults = PatchSection()
        patch = dataclasses.replace(cfg.patch, size=defaults.size, fraction=defaults.fraction)
        cfg = dataclasses.replace(cfg, patch=patch)
    return cfg


def _resolve_defaults(cfg: RunConfig, run_name_default: str | None) -> RunConfig:
    """Fill the null defaults that derive from other values, so the saved config shows them."""
    replace = dataclasses.replace
    run = cfg.run
    if run.name is None:
        run = replace(run, name=run_name_default or "run")
    if run.dir is None:
        run = replace(run, dir=os.path.join("runs", run.name))
    checkpoint = cfg.checkpoint
    if checkpoint.dir is None:
        checkpoint = replace(checkpoint, dir=os.path.join(run.dir, "checkpoints"))
    data = cfg.data
    if data.seed is None:
        data = replace(data, seed=run.seed)
    if data.valid_path is None and data.path is not None:
        data = replace(data, valid_path=data.path)
    model = cfg.model
    if model.n_kv_heads is None:
        model = replace(model, n_kv_heads=model.n_heads)
    return replace(cfg, run=run, checkpoint=checkpoint, data=data, model=model)


def unresolve(raw: dict) -> dict:
    """Turn derived defaults back into null so that overrides re-derive them (a new
    run.dir moves the default checkpoint.dir with it)."""
    run, checkpoint, data, model = raw["run"], raw["checkpoint"], raw["data"], raw["model"]
    if checkpoint["dir"] == os.path.join(run["dir"], "checkpoints"):
        checkpoint["dir"] = None
    if run["dir"] == os.path.join("runs", run["name"]):
        run["dir"] = None
    if data["seed"] == run["seed"]:
        data["seed"] = None
    if data["valid_path"] == data["path"]:
        data["valid_path"] = None
    if model["n_kv_heads"] == model["n_heads"]:
        model["n_kv_heads"] = None
    return raw


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config (following `base:`), apply dotted overrides, validate.

    Raises ConfigError with one line naming the file or override, the key and the value.
    """
    path = Path(path)
    provenance: dict[str, str] = {}
    raw = read_with_bases(path, provenance)
    for item in overrides:
        apply_override(raw, provenance, item)
    return build(
        raw,
        provenance,
        str(path),
        run_name_default=path.name.removesuffix(".yaml").removesuffix(".yml"),
    )


def config_from_dict(
    data: dict, overrides: list[str] | tuple[str, ...] = (), source: str = "<dict>"
) -> RunConfig:
    """Like load_config for an in-memory mapping (tests, programmatic use)."""
    provenance: dict[str, str] = {}
    raw: dict = {}
    merge(raw, data, provenance, source)
    for item in overrides:
        apply_override(raw, provenance, item)
    return build(raw, provenance, source, run_name_default=None)


def with_overrides(cfg: RunConfig, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """A new, fully validated config: `cfg` with dotted overrides applied."""
    raw = unresolve(cfg.to_dict())
    provenance = dict(cfg.provenance)
    for item in overrides:
        apply_override(raw, provenance, item)
    return build(raw, provenance, cfg.source, run_name_default=cfg.run.name)


def config_reference() -> str:
    """Every section and key with its type, default and documentation (Markdown)."""
    lines = ["# megapatch config reference", ""]
    for name, cls in SECTIONS.items():
        lines += [
            f"## {name}",
            "",
            "| key | type | default | meaning |",
            "| --- | --- | --- | --- |",
        ]
        hints = get_type_hints(cls)
        for f in fields(cls):
            if f.default is not MISSING:
                default = dump_scalar(f.default)
            elif f.default_factory is not MISSING:
                default = dump_scalar(f.default_factory())
            else:
                default = "required"
            type_name = str(hints[f.name]).replace("typing.", "")
            lines.append(
                f"| `{name}.{f.name}` | {type_name} | `{default}` | {FIELD_DOCS.get(f'{name}.{f.name}', '')} |"
            )
        lines.append("")
    return "\n".join(lines)
