import subprocess
import sys


def test_help_lists_every_subcommand():
    out = subprocess.run(
        [sys.executable, "-m", "megapatch", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("prep", "plan", "train", "eval", "export", "generate", "compare", "bench"):
        assert name in out


def test_every_subcommand_has_a_help_page():
    from megapatch.cli import SUBCOMMANDS, main

    for name in SUBCOMMANDS:
        try:
            main([name, "--help"])
        except SystemExit as exc:  # argparse exits 0 after printing the help
            assert exc.code == 0, name


def test_bench_passes_its_arguments_to_the_benchmark_script(tmp_path):
    # `megapatch bench train --help` reaches bench/train.py's own parser, options included
    out = subprocess.run(
        [sys.executable, "-m", "megapatch", "bench", "train", "--help"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "--full" in out.stdout and "--profile" in out.stdout


def test_bench_without_a_checkout_is_one_clear_line(monkeypatch, tmp_path, capsys):
    from megapatch.cli import main
    from megapatch.commands import bench

    monkeypatch.setattr(bench, "BENCH_DIR", tmp_path / "bench")
    assert main(["bench", "ops"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "source checkout" in err[0], err
