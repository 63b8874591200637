"""``python -m tasks`` and the shared argparse options (offline only)."""

from __future__ import annotations

import argparse

from tasks.cli import add_task_arguments, eval_families_from_args, family_from_args, main


def test_list_show_check(capsys, tmp_path):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "teacher_mlp" in out and "all-but:" in out and "invariances" in out
    assert main(["show", "mix:digits,sum+resize14", "--split", "test", "--episodes", "2", "--length", "5"]) == 0
    out = capsys.readouterr().out
    assert "digits: x (1, 5, 64)" in out and "sum+resize14: x (1, 5, 196)" in out
    assert main(["check", "--data-dir", str(tmp_path)]) == 0
    assert "mnist            missing" in capsys.readouterr().out


def test_download_failure_is_reported(capsys, tmp_path):
    assert main(["download", "no_such_dataset"]) == 1
    assert "FAILED" in capsys.readouterr().err


def test_argparse_helpers():
    parser = add_task_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--tasks", "mix:digits,random", "--eval-tasks", "sum,teacher_linear", "--offline"])
    assert family_from_args(args).name == "mix:digits,random"
    assert list(eval_families_from_args(args)) == ["sum", "teacher_linear"]
    defaults = parser.parse_args([])
    assert defaults.tasks == "offline" and defaults.data_dir is None
