"""The run config: loading, overrides, inheritance, validation messages, hashing, saving."""

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from megapatch.config import (
    FIELD_DOCS,
    SECTIONS,
    config_from_dict,
    config_reference,
    load_config,
    parse_override,
    resolve_vocab_size,
    with_overrides,
)
from megapatch.errors import ConfigError
from megapatch.training.schedule import StagePlan, plan_for_world

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"

SMALL = {
    "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "ffn_hidden": 128, "seq_len": 16},
    "data": {"path": "data/x"},
    "patch": {"size": 4, "fraction": 0.5},
    "train": {
        "total_tokens": 64 * 40,
        "tokens_per_step": 64 * 4,
        "micro_batch_size": 4,
        "warmup_steps": 2,
    },
}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def small_yaml(tmp_path: Path, name: str = "small.yaml", **sections) -> Path:
    data = {k: dict(v) for k, v in SMALL.items()}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return write(tmp_path / name, yaml.safe_dump(data))


def config_error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    return message


# --------------------------------------------------------------------------- loading


def test_tiny_loads_with_resolved_defaults():
    cfg = load_config(TINY)
    assert cfg.run.name == "tiny"
    assert cfg.run.dir == os.path.join("runs", "tiny")
    assert cfg.checkpoint.dir == os.path.join("runs", "tiny", "checkpoints")
    assert cfg.data.seed == cfg.run.seed
    assert cfg.data.valid_path == cfg.data.path == "data/shakespeare"
    assert cfg.model.n_kv_heads == cfg.model.n_heads
    assert cfg.model.vocab_size == "auto"
    assert cfg.patch.fraction == pytest.approx(2 / 3)  # written as "2/3"
    assert cfg.train_data == "data/shakespeare" and cfg.valid_data == "data/shakespeare"


def test_overrides_are_yaml_scalars_and_ints_accept_integral_floats():
    cfg = load_config(
        TINY,
        [
            "train.total_tokens=2e6",
            "train.lr=1e-3",
            "patch.fraction=1/2",
            "logging.progress=false",
            "train.max_steps=null",
            "run.name=smoke",
        ],
    )
    assert cfg.train.total_tokens == 2_000_000 and isinstance(cfg.train.total_tokens, int)
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.patch.fraction == 0.5
    assert cfg.logging.progress is False
    assert cfg.train.max_steps is None
    assert cfg.run.dir == os.path.join("runs", "smoke")  # derived from the overridden name


def test_yaml_files_read_yaml_1_2_floats(tmp_path):
    path = small_yaml(tmp_path, train={"lr": "placeholder"})
    path.write_text(path.read_text().replace("lr: placeholder", "lr: 1e-3"))
    assert load_config(path).train.lr == 1e-3


def test_override_into_a_mapping_field_merges_deeply(tmp_path):
    path = small_yaml(
        tmp_path, parallel={"deepspeed": {"zero_optimization": {"overlap_comm": True}}}
    )
    cfg = load_config(path, ["parallel.deepspeed.zero_optimization.reduce_bucket_size=5e8"])
    assert cfg.parallel.deepspeed == {
        "zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 5e8}
    }


def test_parse_override_rejects_malformed_items():
    assert parse_override("a.b=") == ("a.b", None)
    for bad in ("noequals", "=3", "a..b=1"):
        with pytest.raises(ConfigError, match="expected section.key=value"):
            parse_override(bad)


def test_with_overrides_revalidates_and_rederives(tmp_path):
    cfg = load_config(TINY)
    moved = with_overrides(cfg, ["run.dir=elsewhere", "patch.size=1"])
    assert moved.checkpoint.dir == os.path.join("elsewhere", "checkpoints")
    assert moved.patch.size == 1
    with pytest.raises(ConfigError, match="patch.fraction"):
        with_overrides(cfg, ["patch.fraction=1"])


def test_config_from_dict():
    cfg = config_from_dict(SMALL, ["model.n_kv_heads=2"])
    assert cfg.model.n_kv_heads == 2 and cfg.run.name == "run"


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "override, expected",
    [
        ("patch.sise=4", "unknown key 'patch.sise'; did you mean 'patch.size'?"),
        ("lr=1e-3", "unknown key 'lr'; did you mean 'train.lr'?"),
        (
            "model.warmup_steps=3",
            "unknown key 'model.warmup_steps'; did you mean 'train.warmup_steps'?",
        ),
        ("modle.d_model=3", "unknown key 'modle'; did you mean 'model'?"),
    ],
)
def test_unknown_keys_suggest_the_closest(tmp_path, override, expected):
    message = config_error(small_yaml(tmp_path), [override])
    assert message.startswith(f"override '{override}': ")
    assert expected in message


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = small_yaml(tmp_path, train={"warmup_step": 10})
    message = config_error(path)
    assert message.startswith(f"{path}: unknown key 'train.warmup_step'")
    assert "did you mean 'train.warmup_steps'?" in message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.d_model=wide", "model.d_model='wide': expected an integer"),
        ("model.n_layers=true", "model.n_layers=true: expected an integer"),
        ("train.total_tokens=2.5", "expected an integer (this number has a fractional part)"),
        ("train.lr=fast", "train.lr='fast': expected a number"),
        ("logging.progress=1", "logging.progress=1: expected true or false"),
        (
            "train.lr_decay=cosin",
            "expected one of 'cosine', 'linear', 'constant' (did you mean 'cosine'?)",
        ),
        ("model.vocab_size=big", "model.vocab_size='big': expected an integer or one of 'auto'"),
        ("run.name=[a, b]", "expected a string or null"),
        ("parallel.deepspeed=3", "parallel.deepspeed=3: expected a mapping"),
    ],
)
def test_wrong_types(tmp_path, override, expected):
    assert expected in config_error(small_yaml(tmp_path), [override])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.d_model=0", "model.d_model=0: expected a positive value"),
        ("model.n_layers=-2", "model.n_layers=-2: expected a positive value"),
        ("train.micro_batch_size=0", "train.micro_batch_size=0: expected a positive value"),
        ("train.tokens_per_step=-256", "train.tokens_per_step=-256: expected a positive value"),
        ("patch.size=0", "patch.size=0: expected a positive value"),
        ("train.warmup_steps=-1", "train.warmup_steps=-1: expected a value >= 0"),
        ("patch.fraction=1", "patch.fraction=1.0: expected a number in [0, 1)"),
        ("patch.fraction=1.5", "patch.fraction=1.5: expected a number in [0, 1)"),
        ("patch.fraction=-0.1", "patch.fraction=-0.1: expected a number in [0, 1)"),
        ("train.beta2=1", "train.beta2=1.0: expected a number in [0, 1)"),
        ("train.min_lr=1", "train.min_lr=1.0: expected at most train.lr"),
    ],
)
def test_out_of_range_values(tmp_path, override, expected):
    message = config_error(small_yaml(tmp_path), [override])
    assert message.startswith(f"override '{override}': ")
    assert expected in message


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.n_heads=3"], "model.n_heads=3: expected a divisor of model.d_model=64"),
        (["model.n_kv_heads=3"], "model.n_kv_heads=3: expected a divisor of model.n_heads=4"),
        (
            ["parallel.tensor_model_parallel_size=3"],
            "expected a divisor of model.n_heads=4 and model.n_kv_heads=4",
        ),
        (
            ["model.n_kv_heads=2", "parallel.tensor_model_parallel_size=4"],
            "parallel.tensor_model_parallel_size=4: expected a divisor of model.n_heads=4 and model.n_kv_heads=2",
        ),
        (["parallel.zero_stage=4"], "parallel.zero_stage=4: expected 0, 1, 2 or 3"),
        (
            ["parallel.sequence_parallel=true"],
            "parallel.sequence_parallel=true: expected false with TP=1 (it shards the sequence over the TP ranks)",
        ),
        (
            [
                "parallel.sequence_parallel=true",
                "parallel.tensor_model_parallel_size=4",
                "model.seq_len=18",
            ],
            "model.seq_len=18: expected a multiple of the TP size 4 under parallel.sequence_parallel",
        ),
        (
            ["model.d_model=36", "model.n_heads=4"],
            "an even head size d_model/n_heads for RoPE, not 9",
        ),
        (["data.path=null"], "expected exactly one of data.path and data.blend"),
        (["data.blend=[{path: a, weight: 1}]"], "expected exactly one of data.path and data.blend"),
        (["parallel.deepspeed.train_batch_size=8"], "expected no train_batch_size"),
        (["model.vocab_size=1"], "model.vocab_size=1: expected an integer >= 2"),
    ],
)
def test_cross_field_rules(tmp_path, overrides, expected):
    assert expected in config_error(small_yaml(tmp_path), overrides)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        # K x L = 64 must divide tokens per step so both phases have whole sequences
        (
            ["train.tokens_per_step=96"],
            "train.tokens_per_step=96: expected a multiple of model.seq_len x patch.size = 64",
        ),
        (
            ["train.tokens_per_step=100"],
            "train.tokens_per_step=100: expected a multiple of model.seq_len=16",
        ),
        (["patch.size=3"], "expected a multiple of model.seq_len x patch.size = 48"),
        (
            ["train.micro_batch_size=32"],
            "train.micro_batch_size=32: expected at most the 16 token-phase sequences",
        ),
        (
            ["train.micro_batch_size=3"],
            "micro_batch_size x DP=1 to divide the 16 token-phase sequences per step (e.g. 2)",
        ),
        (
            ["train.total_tokens=100"],
            "train.total_tokens=100: expected at least train.tokens_per_step=256",
        ),
        (["patch.fraction=0.99"], "patch.fraction=0.99: expected a smaller share"),
    ],
)
def test_the_plan_checks_the_batch_arithmetic(tmp_path, overrides, expected):
    # Whole sequences per step in every phase is the scheduler's rule: the config loads,
    # the plan (made by `megapatch plan`, `megapatch train` and the launchers) refuses it.
    cfg = load_config(small_yaml(tmp_path), overrides)
    with pytest.raises(ConfigError) as info:
        StagePlan.from_config(cfg, dp_size=1)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    assert expected in message


def test_data_blend_entries_are_checked(tmp_path):
    path = small_yaml(
        tmp_path, data={"path": None, "blend": [{"path": "a", "weight": 2}, {"path": "b"}]}
    )
    cfg = load_config(path)
    assert cfg.train_data == [{"path": "a", "weight": 2.0}, {"path": "b", "weight": 1.0}]
    assert cfg.valid_data == cfg.train_data
    typo = small_yaml(tmp_path, data={"path": None, "blend": [{"path": "a", "wieght": 2}]})
    assert "data.blend[0]" in config_error(typo) and "did you mean 'weight'?" in config_error(typo)
    bad_weight = small_yaml(tmp_path, data={"path": None, "blend": [{"path": "a", "weight": 0}]})
    assert "data.blend[0].weight=0: expected a positive number" in config_error(bad_weight)


def test_required_keys(tmp_path):
    data = {k: dict(v) for k, v in SMALL.items()}
    del data["model"]["d_model"]
    path = write(tmp_path / "c.yaml", yaml.safe_dump(data))
    assert (
        config_error(path) == f"{path}: model.d_model is required (D: width of the residual stream)"
    )


def test_file_level_errors(tmp_path):
    assert (
        config_error(tmp_path / "missing.yaml")
        == f"{tmp_path / 'missing.yaml'}: config file not found"
    )
    broken = write(tmp_path / "broken.yaml", "model:\n  d_model: [1, 2\n")
    assert config_error(broken).startswith(f"{broken}: invalid YAML at line")
    scalar = write(tmp_path / "scalar.yaml", "3\n")
    assert "expected a mapping of sections" in config_error(scalar)
    section = write(tmp_path / "section.yaml", "model: 3\n")
    assert "model=3: expected a mapping of model settings" in config_error(section)


# --------------------------------------------------------------------------- base inheritance


def test_base_inheritance_relative_to_the_file(tmp_path):
    small_yaml(tmp_path / "shared", "base.yaml", train={"lr": 1e-3})
    write(tmp_path / "shared" / "cluster.yaml", "parallel: {zero_stage: 2}\ntrain: {lr: 2.0e-3}\n")
    child = write(
        tmp_path / "recipes" / "child.yaml",
        """\
        base: [../shared/base.yaml, ../shared/cluster.yaml]
        model: {n_layers: 3}
        """,
    )
    cfg = load_config(child)
    assert cfg.model.n_layers == 3  # the file beats its bases
    assert cfg.model.d_model == 64  # inherited
    assert cfg.train.lr == 2e-3  # later bases beat earlier ones
    assert cfg.parallel.zero_stage == 2
    assert cfg.run.name == "child"  # named after the file that was loaded


def test_errors_name_the_base_file_that_set_the_value(tmp_path):
    base = small_yaml(tmp_path, "base.yaml", patch={"fraction": 1.5})
    child = write(tmp_path / "child.yaml", "base: base.yaml\nmodel: {n_layers: 3}\n")
    assert config_error(child).startswith(f"{base}: patch.fraction=1.5")


def test_base_errors(tmp_path):
    missing = write(tmp_path / "a.yaml", "base: nowhere.yaml\n")
    assert "base='nowhere.yaml': file not found" in config_error(missing)
    write(tmp_path / "x.yaml", "base: y.yaml\n")
    cycle = write(tmp_path / "y.yaml", "base: x.yaml\n")
    assert "inheritance cycle" in config_error(cycle)
    bad = write(tmp_path / "b.yaml", "base: 3\n")
    assert "expected a file name or a list of file names" in config_error(bad)


def test_paper_recipes_share_everything_but_the_patch_section():
    patch = load_config(REPO / "configs" / "paper-370m-patch.yaml")
    token = load_config(REPO / "configs" / "paper-370m-token.yaml")
    different = {line.split(":")[0] for line in patch.identity_diff(token)}
    assert different == {"patch.size", "patch.fraction"}
    assert patch.model.d_model == 1024 and patch.model.vocab_size == 32000
    assert (
        patch.train.tokens_per_step == 2_097_152 and patch.train.total_tokens == 135_000 * 2_097_152
    )
    big = load_config(REPO / "configs" / "paper-2.7b-patch.yaml")
    assert (big.parallel.tensor_model_parallel_size, big.parallel.zero_stage) == (2, 1)
    assert (patch.parallel.tensor_model_parallel_size, patch.parallel.zero_stage) == (1, 2)


# --------------------------------------------------------------------------- identity and saving


def test_hash_ignores_key_order_and_non_identity_settings(tmp_path):
    cfg = load_config(small_yaml(tmp_path))
    reordered = {k: dict(reversed(list(v.items()))) for k, v in reversed(list(SMALL.items()))}
    assert (
        load_config(
            write(tmp_path / "r.yaml", yaml.safe_dump(reordered, sort_keys=False))
        ).config_hash()
        == cfg.config_hash()
    )
    same = with_overrides(
        cfg,
        [
            "logging.interval=1",
            "checkpoint.interval=7",
            "eval.interval=3",
            "train.micro_batch_size=2",
            "parallel.zero_stage=2",
            "model.activation_checkpointing=true",
            "data.path=./data/x/",
        ],
    )
    assert same.config_hash() == cfg.config_hash()
    for change in ("patch.size=2", "patch.fraction=0.25", "model.d_model=128", "run.seed=7",
                   "train.total_tokens=5120", "data.path=data/y", "data.seed=9"):  # fmt: skip
        other = with_overrides(cfg, [change])
        assert other.config_hash() != cfg.config_hash(), change
        assert other.identity_diff(cfg), change


def test_hash_is_stable_across_processes():
    code = "from megapatch.config import load_config; print(load_config('configs/tiny.yaml').config_hash())"
    hashes = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert hashes == {load_config(TINY).config_hash()}


def test_save_resolved_round_trips(tmp_path):
    cfg = load_config(TINY, ["train.lr=1e-3", "run.name='2e6'"])  # a name that looks like a number
    saved = cfg.save_resolved(tmp_path / "run")
    assert saved == tmp_path / "run" / "config.yaml"
    text = saved.read_text()
    assert f"config hash {cfg.config_hash()}" in text
    assert "# K: tokens averaged into one patch" in text  # field docs travel with the values
    again = load_config(saved)
    assert again.to_dict() == cfg.to_dict()
    assert again.config_hash() == cfg.config_hash()
    assert not [p for p in saved.parent.iterdir() if p.name != "config.yaml"]  # no temp files


def test_save_resolved_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    cfg = load_config(TINY)
    saved = cfg.save_resolved(tmp_path)
    before = saved.read_text()

    def broken(self, with_docs=True):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(cfg), "render_yaml", broken)
    with pytest.raises(RuntimeError):
        with_overrides(cfg, ["train.lr=1e-3"]).save_resolved(tmp_path)
    assert saved.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_every_field_is_documented():
    reference = config_reference()
    for name, cls in SECTIONS.items():
        for field_name in (f.name for f in dataclasses.fields(cls)):
            key = f"{name}.{field_name}"
            assert FIELD_DOCS.get(key), f"{key} has no docstring"
            assert f"`{key}`" in reference


# --------------------------------------------------------------------------- world and vocabulary


def test_plan_for_world(tmp_path):
    cfg = load_config(small_yaml(tmp_path, parallel={"tensor_model_parallel_size": 2}))
    plan = plan_for_world(cfg, 4)
    assert plan.dp_size == 2
    with pytest.raises(ConfigError, match="expected a divisor of the world size 3"):
        plan_for_world(cfg, 3)
    with pytest.raises(ConfigError, match="micro_batch_size x DP=8"):
        plan_for_world(cfg, 16)  # 16 token sequences per step, micro-batch 4, DP 8
    with pytest.raises(ConfigError, match="4 ranks on this node but only 2 devices"):
        plan_for_world(cfg, 4, local_world_size=4, local_devices=2)
    plan_for_world(cfg, 4, local_world_size=4, local_devices=None)  # CPU: no device count

    expects = with_overrides(cfg, ["parallel.nodes=2", "parallel.gpus_per_node=2"])
    assert plan_for_world(expects, 4).dp_size == 2
    with pytest.raises(ConfigError, match="= 4 ranks expected, but the launcher started 2"):
        plan_for_world(expects, 2)


def test_resolve_vocab_size(tmp_path):
    auto = load_config(small_yaml(tmp_path))
    assert resolve_vocab_size(auto, 4096) == 4096
    fixed = with_overrides(auto, ["model.vocab_size=5000"])
    assert resolve_vocab_size(fixed, 4096) == 5000
    with pytest.raises(ConfigError) as info:
        resolve_vocab_size(
            with_overrides(fixed, ["model.vocab_size=1000"]), 4096, "data/x/manifest.json"
        )
    message = str(info.value)
    assert "model.vocab_size=1000" in message and "4096 (from data/x/manifest.json)" in message
