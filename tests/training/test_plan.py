"""`megapatch plan`: the printed recipe, its options, and that it stays torch-free."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megapatch.cli import main
from megapatch.config import load_config

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


def plan(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def row(text: str, name: str) -> list[str]:
    """The cells of the table row of a phase ('patch', 'token' or 'total')."""
    line = next(ln for ln in text.splitlines() if ln.startswith(name + " "))
    return [cell.strip() for cell in line.split("  ") if cell.strip()]


def test_paper_370m_patch_prints_the_official_recipe(capsys):
    code, out, _ = plan(capsys, str(REPO / "configs" / "paper-370m-patch.yaml"))
    assert code == 0
    assert "135,000 steps x 2,097,152 tokens per step" in out
    assert "283,115,520,000 tokens (283.1B)" in out
    # phase, K, steps, global steps, positions, tokens/seq, window, seqs/step, shape, tokens/step, tokens
    assert row(out, "patch") == ["patch", "4", "90,000", "0 - 89,999", "2,048", "8,192", "8,196", "256",
                                 "4 x 8 x 8", "2,097,152", "188,743,680,000"]  # fmt: skip
    assert row(out, "token") == ["token", "1", "45,000", "90,000 - 134,999", "2,048", "2,048", "2,049",
                                 "1,024", "4 x 32 x 8", "2,097,152", "94,371,840,000"]  # fmt: skip
    assert row(out, "total") == ["total", "135,000", "2,097,152", "283,115,520,000"]
    assert "lr     patch: warmup 2,000 steps to 0.0003, cosine to 0 at step 89,999" in out
    assert "lr     token: re-warm 2,000 steps to 0.0003, cosine to 0 at step 134,999" in out
    assert "switch at step 90,000" in out and "optimizer state reset" in out
    assert "lambda/K + 1 - lambda = 0.5000x" in out
    assert "precise (attention, output layer, patch averaging, whole steps) = 0.500001x" in out
    assert "369.1M parameters" in out


def test_dp_and_world_size_options(capsys):
    config = str(REPO / "configs" / "paper-370m-patch.yaml")
    _, out, _ = plan(capsys, config, "--dp", "32")
    assert row(out, "patch")[8] == "4 x 2 x 32" and row(out, "token")[8] == "4 x 8 x 32"
    _, out, _ = plan(capsys, "--world-size", "16", config, "parallel.tensor_model_parallel_size=2")
    assert "TP 2 x DP 8 = 16 rank(s)" in out
    code, _, err = plan(
        capsys, config, "parallel.tensor_model_parallel_size=2", "--world-size", "15"
    )
    assert code == 2 and "--world-size 15: expected a multiple of" in err
    code, _, err = plan(capsys, config, "--dp", "0")
    assert code == 2 and "--dp 0: expected at least 1" in err


def test_vocab_auto_from_the_manifest_or_the_flag(capsys, tmp_path):
    tiny = str(REPO / "configs" / "tiny.yaml")
    _, out, _ = plan(capsys, tiny, f"data.path={tmp_path}")
    assert "auto: unresolved" in out and "FLOPs   unknown" in out
    assert "lambda/K + 1 - lambda = 0.5000x" in out
    (tmp_path / "manifest.json").write_text(json.dumps({"vocab_size": 4096}))
    _, out, _ = plan(capsys, tiny, f"data.path={tmp_path}")
    assert f"V 4,096 (auto, from {tmp_path / 'manifest.json'}) padded to 4,096" in out
    assert row(out, "patch")[2] == "64" and row(out, "token")[2] == "32"
    _, out, _ = plan(capsys, tiny, "--vocab-size", "1000")
    assert "V 1,000 (from --vocab-size) padded to 1,024" in out


def test_json_and_show_config(capsys, tmp_path):
    config = str(REPO / "configs" / "tiny.yaml")
    _, out, _ = plan(capsys, config, "--json", "--vocab-size", "4096", "--dp", "2")
    data = json.loads(out)
    assert [p["name"] for p in data["plan"]["phases"]] == ["patch", "token"]
    assert data["plan"]["inputs"]["dp_size"] == 2
    assert data["config_hash"] == load_config(config).config_hash()
    assert data["flops"]["simple_ratio"] == pytest.approx(0.5)

    _, out, _ = plan(capsys, "--show-config", config, "patch.size=2")
    resolved = out[out.index("# megapatch resolved config") :]
    saved = tmp_path / "resolved.yaml"
    saved.write_text(resolved)
    assert load_config(saved).patch.size == 2
    assert yaml.safe_load(resolved)["patch"]["size"] == 2


def test_bad_input_is_one_line_and_exit_2(capsys):
    code, out, err = plan(capsys, str(REPO / "configs" / "tiny.yaml"), "patch.sise=2")
    assert code == 2 and out == ""
    assert err.strip() == (
        "megapatch plan: error: override 'patch.sise=2': unknown key 'patch.sise'; did you mean 'patch.size'?"
    )


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_plans(capsys, name):
    code, out, _ = plan(capsys, str(REPO / "configs" / name), "--vocab-size", "4096")
    assert code == 0 and "tokens/step" in out


def test_plan_does_not_import_torch():
    code = (
        "import sys; from megapatch.cli import main; "
        "assert main(['plan', 'configs/paper-370m-patch.yaml']) == 0; "
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'plan must stay light'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True)


@pytest.mark.parametrize("command", ["plan", "train"])
def test_a_phase_no_longer_than_its_warmup_is_refused(capsys, command, tmp_path):
    # configs/tiny.yaml at 98,304 tokens: 8 patch steps, all of them warmup (8), 4 token steps
    code = main([command, str(REPO / "configs" / "tiny.yaml"), "train.total_tokens=98304",
                 f"run.dir={tmp_path / 'run'}"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].endswith(
        "train.warmup_steps=8: expected fewer than the 8 steps of the patch phase, which would "
        "never reach its peak LR or never decay: lower it, give it as a percentage of each phase "
        '("5%"), or raise train.total_tokens'
    )
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_warmup_as_a_percentage_of_each_phase(capsys):
    code, out, _ = plan(capsys, str(REPO / "configs" / "tiny.yaml"), "train.warmup_steps=12.5%")
    assert code == 0  # 64 patch steps -> 8, 32 token steps -> 4
    assert "patch: warmup 8 steps to 0.002" in out and "token: re-warm 4 steps to 0.002" in out


def memory_row(text: str, name: str) -> list[str]:
    """The cells of a phase's row in the memory table (after the 'memory per GPU' line)."""
    table = text[text.index("memory per GPU") :]
    return row(table, name)


def test_memory_plan_of_the_370m_recipe(capsys):
    config = str(REPO / "configs" / "paper-370m-patch.yaml")
    code, out, _ = plan(capsys, config, "--dp", "8", "--gpu-memory", "80GiB")
    assert code == 0
    assert "memory per GPU, GiB (estimate; ZeRO-2, bf16, TP 1, PP 1" in out
    # phase, micro, params, grads, optimizer, activations, logits, buffers, total
    patch, token = memory_row(out, "patch"), memory_row(out, "token")
    assert patch[:6] == ["patch", "4", "0.69", "0.09", "0.52", patch[5]]  # 369M x 2 bytes
    assert 4 < float(patch[5]) < 16 and patch[6] == "0.00"  # Triton: no [N, V] logits
    assert token[2:5] == patch[2:5]
    assert "fits    in 80.00 GiB (--gpu-memory 80GiB): yes, the patch phase peaks at" in out

    _, out, _ = plan(capsys, config, "--gpu-memory", "8GB", "train.ops_backend=reference")
    assert float(memory_row(out, "patch")[6]) > 2  # 3 fp32 [8192, 32000] buffers: 2.9 GiB
    assert "fits    in 7.45 GiB (--gpu-memory 8GB): NO" in out
    _, out, _ = plan(capsys, config, "model.activation_checkpointing=true")
    assert "activation checkpointing on" in out and float(memory_row(out, "patch")[5]) < 1


def test_memory_verdict_defaults_to_the_cuda_device(capsys, monkeypatch):
    import megapatch.commands.plan as plan_command

    config = str(REPO / "configs" / "paper-370m-patch.yaml")
    monkeypatch.setattr(plan_command, "_cuda_device_memory", lambda: (141 * 10**9, "CUDA device 0"))
    _, out, _ = plan(capsys, config)
    assert "fits    in 131.32 GiB (CUDA device 0): yes" in out
    monkeypatch.setattr(plan_command, "_cuda_device_memory", lambda: (None, "no CUDA device"))
    _, out, _ = plan(capsys, config, "--json")
    memory = json.loads(out)["memory"]
    assert memory["fits"] is None and memory["gpu_memory"] is None
    assert memory["phases"]["patch"]["params"] == 2 * 369_148_928  # bf16, DP 1: no padding
    _, out, _ = plan(capsys, config)
    assert "fits    no verdict: no CUDA device; pass --gpu-memory, e.g. 80GiB" in out


def test_bad_gpu_memory_is_one_line_and_exit_2(capsys):
    config = str(REPO / "configs" / "paper-370m-patch.yaml")
    code, out, err = plan(capsys, config, "--gpu-memory", "abc")
    assert code == 2 and out == ""
    assert err.startswith("megapatch plan: error: --gpu-memory 'abc': expected a size with a unit")
    assert len(err.strip().splitlines()) == 1
