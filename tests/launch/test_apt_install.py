"""The SLURM fixture's apt-get install, against a fake apt-get on PATH (nothing installed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.launch.slurm_cluster import APT_LOCK_TIMEOUT_S, apt_install

# Answers each call with the next [exit code, stderr] scripted for its verb (default: 0)
# and logs its argv and DEBIAN_FRONTEND.
FAKE_APT = """\
import json, os, sys
state = os.environ["FAKE_APT_STATE"]
with open(state) as f:
    scripted = json.load(f)
verb = next(a for a in sys.argv[1:] if a in ("update", "install"))
code, stderr = (scripted.get(verb) or [[0, ""]]).pop(0)
with open(state, "w") as f:
    json.dump(scripted, f)
with open(os.environ["FAKE_APT_LOG"], "a") as f:
    f.write(json.dumps([os.environ.get("DEBIAN_FRONTEND"), *sys.argv[1:]]) + "\\n")
sys.stderr.write(stderr)
sys.exit(code)
"""
NOT_FOUND = [100, "Reading package lists...\nE: Unable to locate package slurm-wlm\n"]
LOCKED = [100, "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 7\n"]


@pytest.fixture
def fake_apt(tmp_path, monkeypatch):
    """`fake_apt(update=[...], install=[...], lists=True)` → the calls apt_install made."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    apt = bin_dir / "apt-get"
    apt.write_text(f"#!{sys.executable}\n{FAKE_APT}")
    apt.chmod(0o755)
    log, state = tmp_path / "apt.log", tmp_path / "apt.json"
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_APT_LOG", str(log))
    monkeypatch.setenv("FAKE_APT_STATE", str(state))
    monkeypatch.delenv("DEBIAN_FRONTEND", raising=False)

    def install(update=(), install=(), lists=True):
        state.write_text(json.dumps({"update": list(update), "install": list(install)}))
        lists_dir = tmp_path / "lists"
        lists_dir.mkdir(exist_ok=True)
        if lists:
            (lists_dir / "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages").touch()
        try:
            apt_install(["slurm-wlm", "munge"], lists=lists_dir)
        finally:
            calls = [json.loads(line) for line in log.read_text().splitlines()]
        return calls

    return install


def _verbs(calls):
    return [next(a for a in call if a in ("update", "install")) for call in calls]


def test_install_command_waits_for_the_lock_noninteractively(fake_apt):
    (call,) = fake_apt()
    assert call == [
        "noninteractive",
        "-q",
        "-o",
        f"DPkg::Lock::Timeout={APT_LOCK_TIMEOUT_S}",
        "install",
        "-y",
        "--no-install-recommends",
        "slurm-wlm",
        "munge",
    ]
    assert APT_LOCK_TIMEOUT_S == 300


def test_missing_package_lists_are_fetched_first(fake_apt):
    calls = fake_apt(lists=False)
    assert _verbs(calls) == ["update", "install"]
    assert calls[0][:4] == [
        "noninteractive",
        "-q",
        "-o",
        f"DPkg::Lock::Timeout={APT_LOCK_TIMEOUT_S}",
    ]


def test_unknown_package_updates_the_lists_and_retries(fake_apt):
    assert _verbs(fake_apt(install=[NOT_FOUND])) == ["install", "update", "install"]


def test_other_failure_retries_without_update(fake_apt):
    assert _verbs(fake_apt(install=[LOCKED])) == ["install", "install"]


def test_failed_update_is_retried(fake_apt):
    calls = fake_apt(update=[[100, "E: network down\n"]], lists=False)
    assert _verbs(calls) == ["update", "update", "install"]


def test_second_failure_raises_with_apts_last_stderr_lines(fake_apt):
    stderr = "".join(f"line {i}\n" for i in range(20)) + "E: Unable to locate package munge\n"
    with pytest.raises(RuntimeError) as raised:
        fake_apt(install=[NOT_FOUND, [100, stderr]])
    message = str(raised.value)
    assert message.startswith("`apt-get -q -o DPkg::Lock::Timeout=300 install -y ")
    assert "failed with exit 100 (tried twice)" in message
    assert message.endswith("line 19\nE: Unable to locate package munge")
    assert "line 10" not in message  # only the last lines
