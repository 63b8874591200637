"""The typed-config command lines (vsml/training/cli.py on tyro): flags derived from the dataclasses,
presets with overrides on top, validation after every override, one-line errors with exit code 2.

Run: python -m pytest tests/test_cli.py -q
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vsml.engine.config import ConvSpec
from vsml.training.cli import CliError, flags_of, parse, parse_config
from vsml.training.config import TrainConfig
from vsml.training.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train as train_cli  # noqa: E402


def _cfg(*argv, preset="default"):
    return parse_config(list(argv), PRESETS, preset, "", prog="train.py")[0]


def _one_line_error(capsys, fn, *args) -> str:
    with pytest.raises(SystemExit) as exc:
        fn(*args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err                # one line, no usage block, no tyro box
    assert "│" not in err and "usage:" not in err
    return err


def test_preset_overrides_keep_the_other_preset_fields():
    cfg = _cfg("--preset", "cpu-mnist", "--steps", "5")
    assert cfg == dataclasses.replace(PRESETS["cpu-mnist"][1], steps=5)
    cfg = _cfg("--preset=deep", "--es.pairs", "3", "--vsml.cell.layer_norm", "false")
    deep = PRESETS["deep"][1]
    assert cfg.es.pairs == 3 and cfg.es.sigma == deep.es.sigma and not cfg.vsml.cell.layer_norm
    assert cfg.vsml.hidden_sizes == (32,) and cfg.vsml.feed_label and cfg.name == "deep"
    assert _cfg() == PRESETS["default"][1]                              # no flags: the preset itself


def test_value_syntax_tuples_bools_none_literals():
    cfg = _cfg("--vsml.hidden_sizes", "32,16", "--vsml.conv", "c8k3s2,c4-refbwd", "--log.progress", "off",
               "--lr", "none", "--es.noise_device", "null", "--log.wandb", "offline", "--eval.tasks", "digits;sum",
               "--backend", "torch", "--data_dir", "/x", "--clone.steps", "2000", preset="default-clone")
    assert cfg.vsml.hidden_sizes == (32, 16)
    assert cfg.vsml.conv == (ConvSpec(8, 3, 2), ConvSpec(4, 3, 1, bwd_norm="kernel"))
    assert cfg.log.progress is False and cfg.backend == "torch" and cfg.lr is None and cfg.es.noise_device is None
    assert cfg.log.wandb == "offline" and cfg.eval.tasks == "digits;sum" and cfg.data_dir == "/x"
    assert cfg.clone.steps == 2000
    assert _cfg("--vsml.hidden_sizes", "", preset="deep").vsml.hidden_sizes == ()
    assert _cfg("--data-dir", "/y").data_dir == "/y"                    # the hyphen spelling is an alias
    assert _cfg("--lr=0.5").lr == 0.5


def test_validation_runs_once_after_all_overrides(capsys):
    # the default-clone preset clones (clone.steps 800): --learner metarnn alone is inconsistent, with
    # --clone.steps 0 it is fine, whichever order the flags come in
    assert _cfg("--learner", "metarnn", "--clone.steps", "0", preset="default-clone").learner == "metarnn"
    assert _cfg("--clone.steps", "0", "--learner", "metarnn", preset="default-clone").clone.steps == 0
    err = _one_line_error(capsys, lambda *a: _cfg(*a, preset="default-clone"), "--learner", "metarnn")
    assert "clone.steps > 0 needs learner=vsml" in err


@pytest.mark.parametrize("argv,expect", [
    (["--es.pairz", "3"], "unknown flag --es.pairz; did you mean --es.pairs?"),
    (["--es.pairs", "x"], "--es.pairs: invalid literal for int()"),
    (["--preset", "nope"], "unknown preset 'nope'; choose one of: default, default-clone, tiny"),
    (["--estimator", "sgd"], "--estimator: expected one of es, bptt, tbptt, pes, tes, bmg, clone; got 'sgd'"),
    (["--log.progress", "maybe"], "--log.progress: expected true/false"),
    (["--data-dir"], "--data_dir needs a value"),                        # the real (underscore) flag name
    (["--es.sigma", "-1"], "ESConfig.sigma must be"),
    (["--steps", "-1"], "steps must be >= 1"),
])
def test_errors_are_one_line_with_exit_code_2(argv, expect, capsys):
    err = _one_line_error(capsys, train_cli.main, argv)
    assert err.startswith("train.py: error: ") and expect in err, err


def test_help_lists_presets_and_every_field(capsys):
    with pytest.raises(SystemExit) as exc:
        train_cli.main(["--preset", "cpu-mnist", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name, (desc, _) in PRESETS.items():
        assert name in out
    for flag in flags_of(TrainConfig):
        assert flag in out, flag
    assert "--resume" in out and "--preset" in out
    assert "mnist+resize14+proj" in out                                 # defaults shown are the preset's


@dataclass(frozen=True)
class _Inner:
    knob: int = 1

    def __post_init__(self):
        if self.knob < 0:
            raise ValueError("knob must be >= 0")


@dataclass(frozen=True)
class _Cfg:
    name: str = "a"
    inner: _Inner = field(default_factory=_Inner)


@dataclass(frozen=True)
class _ListArgs:
    items: tuple[str, ...] = ()


@dataclass(frozen=True)
class _ScriptArgs:
    checkpoint: str
    no_plot: bool = False
    seeds: tuple[int, ...] = (0, 1)


def test_a_new_config_field_appears_without_touching_the_parser():
    presets = {"base": ("", _Cfg()), "other": ("", _Cfg(name="b", inner=_Inner(7)))}
    cfg, _ = parse_config(["--preset", "other", "--inner.knob", "3"], presets, "base")
    assert cfg == _Cfg(name="b", inner=_Inner(3))
    with pytest.raises(CliError):
        parse_config(["--inner.knob", "-1"], presets, "base")


def test_script_clis_switches_and_required(capsys):
    a = parse(_ScriptArgs, ["--checkpoint", "x", "--no-plot", "--seeds", "3,4"])
    assert a == _ScriptArgs("x", True, (3, 4))
    # a list item's own commas inside [...] stay with it: analytic:sgd[boost=2,tau=250],runs/x
    assert parse(_ListArgs, ["--items", "analytic:sgd[boost=2,tau=250],runs/x,b[c]"]).items == (
        "analytic:sgd[boost=2,tau=250]", "runs/x", "b[c]")
    err = _one_line_error(capsys, parse, _ScriptArgs, [])
    assert "missing required argument(s): --checkpoint" in err


def test_horizon_study_bools_reject_unknown_values(capsys):
    import experiments.horizon_study as hs
    err = _one_line_error(capsys, hs.main, ["--report_only", "ture"])
    assert "--report_only: expected true/false" in err


def test_tasks_and_eval_cli_errors(capsys):
    import eval as eval_cli
    from tasks.cli import main as tasks_main
    assert "--split: expected one of train, test" in _one_line_error(capsys, tasks_main, ["show", "digits",
                                                                                           "--split", "tset"])
    assert "unknown flag --lenght; did you mean --length?" in _one_line_error(
        capsys, tasks_main, ["show", "digits", "--lenght", "3"])
    assert "--episodes and --length must be >= 1" in _one_line_error(capsys, eval_cli.main, ["--episodes", "0"])


def test_errors_stay_one_line_without_tyros_private_error_hook(monkeypatch, capsys):
    import vsml.training.cli as cli
    monkeypatch.setattr(cli, "_HAS_HOOK", False)         # tyro's box is condensed instead
    assert "--es.pairz" in _one_line_error(capsys, train_cli.main, ["--es.pairz", "3"])
    assert "ESConfig.sigma must be" in _one_line_error(capsys, train_cli.main, ["--es.sigma", "-1"])


def test_every_command_line_uses_the_typed_config_cli():
    """No hand-written argparse parser outside tasks.cli's helper for third-party scripts."""
    allowed = {ROOT / "tasks" / "cli.py"}
    files = [ROOT / "train.py", ROOT / "eval.py"]
    for d in ("vsml", "kernels", "tasks", "experiments", "benchmarks"):
        files += sorted((ROOT / d).rglob("*.py"))
    offenders = [str(p.relative_to(ROOT)) for p in files
                 if p not in allowed and "ArgumentParser(" in p.read_text()]
    assert not offenders, offenders


def test_help_into_a_closed_pipe_exits_quietly():
    """``train.py --help | head -1``: the reader leaves early; no BrokenPipeError traceback, exit 0."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    p = subprocess.Popen([sys.executable, "-c",
                          "import sys; sys.argv = ['train.py', '--help']; import runpy; "
                          "runpy.run_path('train.py', run_name='__main__')"],
                         cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    p.stdout.read(10)
    p.stdout.close()                   # the reader leaves after a few bytes
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
