"""End-to-end tests of train.py / eval.py on tiny configs: resume, signals, checkpoints, config errors, wandb.

Run: python -m pytest tests/test_train_eval.py -q
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import eval as eval_cli
import train as train_cli
from vsml.training.checkpoint import CheckpointError, load_checkpoint, load_theta

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--log.progress", "false"]


def _run(tmp_path, *extra, name="t"):
    rc = train_cli.main([*TINY, "--out_dir", str(tmp_path), "--name", name, *extra])
    assert rc == 0
    return tmp_path / name


def test_train_tiny_writes_run_directory(tmp_path, capsys):
    rd = _run(tmp_path)
    cfg = json.loads((rd / "config.json").read_text())
    assert cfg["task"] == "digits+proj" and cfg["resolved_lr"] == 0.025
    rows = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    assert any("meta_train/loss_mean" in r for r in rows)
    assert any("meta_test/digits/online_acc" in r for r in rows)
    ck = load_checkpoint(rd)
    assert ck["step"] == 5 and ck["config"]["name"] == "t"     # 2 cloning + 3 ES steps
    assert any("meta_train/clone_loss" in r for r in rows)
    theta, tcfg, meta = load_theta(rd / "theta.safetensors")
    assert torch.equal(theta, ck["theta"]) and tcfg["learner"] == "vsml"
    res = json.loads((rd / "meta_test" / "results.json").read_text())
    assert 0.0 <= res["digits"]["vsml"]["online_accuracy"] <= 1.0
    assert (rd / "meta_test" / "curve_digits.png").exists()
    out = capsys.readouterr().out
    assert "final meta-test" in out and "results" in out


def test_existing_run_is_never_overwritten(tmp_path):
    _run(tmp_path)
    rc = train_cli.main([*TINY, "--out_dir", str(tmp_path), "--name", "t", "--steps", "1"])
    assert rc == 0
    assert (tmp_path / "t-2" / "config.json").exists()
    assert load_checkpoint(tmp_path / "t")["step"] == 5


@pytest.mark.parametrize("estimator", ["es", "bptt", "tbptt", "tbptt-streams", "pes", "tes"])
def test_resume_equals_uninterrupted(tmp_path, estimator):
    streams = estimator == "tbptt-streams"
    estimator = "tbptt" if streams else estimator
    extra = ["--estimator", estimator, "--eval.every", "0"] + (["--bptt.streams", "2"] if streams else [])
    if estimator in ("bptt", "tbptt"):  # tbptt: episodes of 9 in windows of 3, so the resume is mid-episode
        extra += ["--meta_batch", "2", "--bptt.truncation", "3"] + (["--episode_length", "9"] if estimator == "tbptt" else [])
    if estimator in ("pes", "tes"):     # 4 truncations of 3 over a horizon of 5: resets inside truncations
        extra += ["--pes.particles", "2", "--pes.truncation", "3", "--pes.horizon", "5"]
    full = _run(tmp_path, *extra, "--steps", "4", name="full")
    part = _run(tmp_path, *extra, "--steps", "2", name="part")
    assert load_checkpoint(part)["step"] == 4                 # 2 cloning + 2 meta-training steps
    assert train_cli.main(["--resume", str(part), "--steps", "4", "--log.progress", "false"]) == 0
    a, b = load_checkpoint(full), load_checkpoint(part)
    assert b["step"] == 6
    assert torch.equal(a["theta"], b["theta"])
    assert torch.equal(a["optimizer"]["meta"]["state"][0]["exp_avg"], b["optimizer"]["meta"]["state"][0]["exp_avg"])
    if estimator in ("pes", "tes"):     # the persistent inner states and the accumulator resumed too
        pa, pb = a["extra"]["estimator"]["meta"], b["extra"]["estimator"]["meta"]
        assert (pa["t"], pa["episode"]) == (pb["t"], pb["episode"])
        assert torch.equal(pa["accum"], pb["accum"])
        assert all(torch.equal(u, v) for u, v in zip(pa["inner_leaves"], pb["inner_leaves"]))
    if estimator == "tbptt":            # the carried episodes and state resumed too
        sa, sb = a["extra"]["estimator"]["meta"]["streams"], b["extra"]["estimator"]["meta"]["streams"]
        assert [s["pos"] for s in sa] == [s["pos"] for s in sb] == ([3, 6] if streams else [3])
        for pa, pb in zip(sa, sb, strict=True):
            assert torch.equal(pa["x"], pb["x"]) and all(torch.equal(u, v) for u, v in zip(pa["leaves"], pb["leaves"]))


def test_average_every_makes_the_runs_theta_the_mean_of_its_meta_training_iterates(tmp_path, capsys):
    """--average_every K: θ̄ = mean of θ at meta-steps clone.steps + K, + 2K, ... (tiny: 2 cloning steps, then
    ES); theta.safetensors, eval.py's loader, --init_from and the final meta-test all use θ̄, the iterate stays in
    last.pt; an interrupted + resumed run averages exactly as an uninterrupted one."""
    from vsml.evaluation.load import load_learner
    rd = _run(tmp_path, "--eval.every", "0", "--steps", "5", "--average_every", "2", "--keep_checkpoints", "true",
              "--ckpt_every", "1", name="avg")
    its = {s: load_checkpoint(rd / "checkpoints" / f"step_{s:06d}.pt")["theta"] for s in range(1, 8)}
    want = ((its[4].double() + its[6].double()) / 2).float()           # steps 2+2, 2+4 (not 7 = 2+5)
    got, _, meta = load_theta(rd / "theta.safetensors")
    assert torch.equal(got, want) and not torch.equal(got, its[7])
    assert meta["average_of"] == "the mean of 2 θ at steps 4 and 6"
    assert torch.equal(load_learner(str(rd), compile=False)[2], want)               # eval.py --checkpoint RUN
    assert torch.equal(load_learner(str(rd / "checkpoints" / "last.pt"), compile=False)[2], want)
    assert torch.equal(load_checkpoint(rd)["theta"], its[7])                        # the iterate resumes
    assert "the mean of 2 θ at steps 4 and 6" in capsys.readouterr().out
    assert torch.equal(load_learner(str(rd / "checkpoints" / "step_000003.pt"), compile=False)[2], its[3])  # none yet
    part = _run(tmp_path, "--eval.every", "0", "--steps", "3", "--average_every", "2", name="part")
    assert train_cli.main(["--resume", str(part), "--steps", "5", "--log.progress", "false"]) == 0
    assert torch.equal(load_theta(part / "theta.safetensors")[0], want)
    res = json.loads((part / "meta_test" / "results.json").read_text())["digits"]["vsml"]["online_accuracy"]
    assert res == json.loads((rd / "meta_test" / "results.json").read_text())["digits"]["vsml"]["online_accuracy"]
    # changing K mid-run would mix two different means: refused with one line
    assert train_cli.main(["--resume", str(part), "--steps", "6", "--average_every", "3",
                           "--log.progress", "false"]) == 2
    assert "average_every" in capsys.readouterr().err


def test_average_every_must_not_be_negative(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train_cli.main([*TINY, "--out_dir", str(tmp_path), "--average_every", "-1"])
    assert exc.value.code == 2 and not list(tmp_path.iterdir())
    err = capsys.readouterr().err.strip()
    assert "average_every must be >= 0" in err and "\n" not in err


def test_resume_can_extend_the_cloning_phase(tmp_path, capsys):
    # a 2-step cloning run extended to 4 cloning steps == a 4-step cloning run, then the meta-steps
    full = _run(tmp_path, "--eval.every", "0", "--clone.steps", "4", "--steps", "2", name="full")
    part = _run(tmp_path, "--eval.every", "0", "--clone.steps", "2", "--steps", "0", name="part")
    assert train_cli.main(["--resume", str(part), "--clone.steps", "4", "--steps", "2",
                           "--log.progress", "false"]) == 0
    a, b = load_checkpoint(full), load_checkpoint(part)
    assert a["step"] == b["step"] == 6
    assert torch.equal(a["theta"], b["theta"])
    # past the cloning phase, clone.steps is fixed
    assert train_cli.main(["--resume", str(part), "--clone.steps", "8"]) == 2
    assert "past its cloning phase" in capsys.readouterr().err


def test_resume_refuses_incompatible_config(tmp_path, capsys):
    rd = _run(tmp_path, "--eval.every", "0")
    rc = train_cli.main(["--resume", str(rd), "--vsml.cell.layer_norm", "true"])
    assert rc == 2
    assert "cannot resume" in capsys.readouterr().err


def test_corrupt_checkpoint_clear_error(tmp_path):
    rd = _run(tmp_path, "--eval.every", "0")
    ck = rd / "checkpoints" / "last.pt"
    ck.write_bytes(ck.read_bytes()[: 200])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(rd)
    assert train_cli.main(["--resume", str(rd)]) == 2
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a vsml"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError):
        load_theta(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("flag,value,msg", [
    ("--steps", "-1", "steps must be >= 1"),   # (0 is allowed with clone.steps > 0: cloning only)
    ("--es.sigma", "-1", "sigma"),
    ("--vsml.micro_ticks", "0", "micro_ticks"),
    ("--lr", "-0.1", "lr must be"),
    ("--estimator", "sgd", "expected one of"),
])
def test_bad_config_values(flag, value, msg, capsys):
    with pytest.raises(SystemExit) as exc:
        train_cli.main([*TINY, flag, value])
    assert exc.value.code == 2
    assert msg in capsys.readouterr().err


def test_help_lists_presets_and_fields(capsys):
    with pytest.raises(SystemExit):
        train_cli.main(["--help"])
    out = capsys.readouterr().out
    for word in ("default", "tiny", "bptt", "cpu-mnist", "--es.sigma", "--vsml.hidden_sizes", "--estimator"):
        assert word in out


def test_sigint_writes_checkpoint_and_resume_works(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, "--steps", "100000", "--eval.every", "0",
           "--ckpt_every", "0", "--out_dir", str(tmp_path), "--name", "sig"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    lines = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "step 2/" in line:
            break
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, "".join(lines) + out
    assert "Resume with" in out
    ck = load_checkpoint(tmp_path / "sig")
    assert ck["step"] >= 2
    # --steps counts meta-training steps after the tiny preset's 2 cloning steps
    assert train_cli.main(["--resume", str(tmp_path / "sig"), "--steps", str(ck["step"] - 2 + 1),
                           "--log.progress", "false"]) == 0
    assert load_checkpoint(tmp_path / "sig")["step"] == ck["step"] + 1


def test_wandb_offline_run_has_logged_keys(tmp_path):
    pytest.importorskip("wandb")
    os.environ.pop("WANDB_MODE", None)
    try:
        rd = _run(tmp_path, "--log.wandb", "offline", "--steps", "2")
    finally:
        os.environ["WANDB_MODE"] = "disabled"
    runs = list((rd / "wandb").glob("offline-run-*"))
    assert runs, list(rd.iterdir())
    files = list(runs[0].rglob("*.wandb"))
    assert files
    # wandb's service process may still be flushing the record file when finish() returns on a
    # heavily loaded machine (seen once at load ~8 on 2 cores): poll briefly before judging.
    deadline = time.time() + 30
    while True:
        blob = files[0].read_bytes()
        if (b"meta_train/loss_mean" in blob and b"meta_test/digits/online_acc" in blob) or time.time() > deadline:
            break
        time.sleep(0.5)
    assert b"meta_train/loss_mean" in blob and b"meta_test/digits/online_acc" in blob


def test_eval_cli_on_run_and_baselines(tmp_path, capsys):
    rd = _run(tmp_path, "--eval.every", "0")
    out = tmp_path / "ev"
    rc = eval_cli.main(["--checkpoint", str(rd), "--tasks", "digits;sum", "--episodes", "2", "--length", "15",
                        "--baselines", "sgd,adam", "--out", str(out), "--no-compile"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"digits", "sum"}
    assert set(res["digits"]) == {"vsml", "sgd", "adam"}
    assert len(res["sum"]["vsml"]["curve_mean"]) == 15
    assert (out / "curve_digits.png").exists() and (out / "curve_sum.png").exists()
    table = capsys.readouterr().out
    assert "online acc" in table and "adam" in table
    rc = eval_cli.main(["--checkpoint", str(tmp_path / "missing"), "--episodes", "1", "--length", "2"])
    assert rc == 2


@pytest.mark.parametrize("learner", ["metarnn", "hebbian"])
def test_baseline_learners_meta_train_with_the_same_trainer(tmp_path, learner):
    rd = _run(tmp_path, "--learner", learner, "--clone.steps", "0", "--eval.every", "0", "--steps", "2",
              name=learner)
    ck = load_checkpoint(rd)
    assert ck["step"] == 2 and ck["config"]["learner"] == learner
    res = json.loads((rd / "meta_test" / "results.json").read_text())
    assert learner in res["digits"]


def test_cloning_needs_vsml(capsys):
    with pytest.raises(SystemExit) as exc:
        train_cli.main([*TINY, "--learner", "metarnn"])
    assert exc.value.code == 2
    assert "clone.steps > 0 needs learner=vsml" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["mnist14-clone-es", "mnist14-clone-long", "mnist14-clone-k2", "mnist14-bilinear",
                                  "mnist14-sgd-bptt", "mnist14-sgd-bptt-soup", "mnist14-sched-tbptt"])
def test_shipped_pretrained_learner_loads_by_name_and_learns(tmp_path, capsys, name):
    from vsml.pretrained import HERE
    assert (HERE / f"{name}.md").exists(), "every shipped learner has a model card"
    assert eval_cli.main(["--list-pretrained"]) == 0
    assert f"pretrained:{name}" in capsys.readouterr().out
    out = tmp_path / "pre"
    rc = eval_cli.main(["--checkpoint", f"pretrained:{name}", "--tasks", "digits", "--episodes", "4",
                        "--length", "200", "--baselines", "", "--no-compile", "--out", str(out)])
    assert rc == 0
    acc = json.loads((out / "results.json").read_text())["digits"]["vsml"]["online_accuracy"]
    assert acc > 0.3, acc            # chance is 0.1: the frozen θ learns an unseen dataset online
    assert eval_cli.main(["--checkpoint", "pretrained:nope", "--episodes", "1", "--length", "2"]) == 2


def test_shipped_soup_is_its_model_cards_command(tmp_path):
    """pretrained:mnist14-sgd-bptt-soup is, value for value, the command in its model card:
    θ = 0.25 θ(mnist14-sgd-bptt) + 0.75 θ(analytic:sgd), with mnist14-sgd-bptt's config."""
    from vsml.pretrained import HERE
    out = tmp_path / "soup.safetensors"
    subprocess.run([sys.executable, "experiments/issue15_soup.py", "--checkpoints",
                    "pretrained:mnist14-sgd-bptt,analytic:sgd", "--weights", "0.25,0.75", "--out", str(out)],
                   check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1])
    got, got_cfg, got_meta = load_theta(out)
    want, want_cfg, want_meta = load_theta(HERE / "mnist14-sgd-bptt-soup.safetensors")
    assert torch.equal(got, want) and got_cfg == want_cfg and got_meta == want_meta
    base, _, _ = load_theta(HERE / "mnist14-sgd-bptt.safetensors")
    assert 0 < float((want - base).abs().max()) < 2e-3       # a quarter of the meta-learned change, not a copy
    bad = subprocess.run([sys.executable, "experiments/issue15_soup.py", "--checkpoints",
                          "pretrained:mnist14-sgd-bptt,analytic:sgd", "--weights", "0.5,0.4", "--out", str(tmp_path / "b")],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert bad.returncode == 2 and "summing to 1" in bad.stderr and not (tmp_path / "b").exists()


def test_shipped_sched_tbptt_is_its_presets_checkpoint_average():
    """pretrained:mnist14-sched-tbptt is the uniform mean of the θ at steps 5, 10, ..., 40 of a run whose config is
    the sched-tbptt preset (the run was started with --steps 60 and stopped after 40: θ at step k does not depend on
    the total; it was averaged by experiments/issue15_soup.py before --average_every existed, which the preset now
    sets: the same float64 mean), and it is a meta-trained change of the schedule it started from, not a copy."""
    import dataclasses
    from vsml.evaluation.load import load_learner
    from vsml.pretrained import HERE
    from vsml.training import presets
    from vsml.training.config import config_from_dict
    theta, stored, meta = load_theta(HERE / "mnist14-sched-tbptt.safetensors")
    got, want = config_from_dict(stored), presets.get("sched-tbptt")
    assert got.average_every == 0 and want.average_every == 5 and want.ckpt_every == 5
    assert dataclasses.replace(got, name=want.name, steps=want.steps, data_dir=want.data_dir, average_every=5) == want
    assert meta["soup_of"] == ",".join(f"runs/s11-sched/checkpoints/step_{s:06d}.pt" for s in range(5, 41, 5))
    assert meta["soup_weights"] == ",".join(["0.125"] * 8)
    _, _, start, _ = load_learner(want.init_from, compile=False)
    assert 0 < float((theta - start).abs().max()) < 1e-3      # 40 Adam steps of 1e-5 at most move a value 4e-4
    assert "--preset sched-tbptt" in (HERE / "mnist14-sched-tbptt.md").read_text()


@pytest.mark.parametrize("name,preset", [("mnist14-clone-long", "clone-long-ce-mix"),
                                         ("mnist14-clone-k2", "clone-long-k2"), ("mnist14-bilinear", "clone-bil-k2"),
                                         ("mnist14-sgd-bptt", "sgd-bptt")])
def test_shipped_learner_config_is_its_presets(name, preset):
    """The model card's one command (``--preset``) resolves to the config stored with the shipped θ (every
    field that changes θ: the network incl. its logit scale, the cloning recipe, task, seed, start), and
    the preset stops at the shipped step."""
    import dataclasses
    from vsml.pretrained import HERE
    from vsml.training import presets
    from vsml.training.config import config_from_dict
    _, stored, meta = load_theta(HERE / f"{name}.safetensors")
    got, want = config_from_dict(stored), presets.get(preset)
    assert got.vsml == want.vsml
    assert dataclasses.replace(got.clone, steps=0) == dataclasses.replace(want.clone, steps=0)
    assert want.total_steps == int(meta["step"])
    keys = ["task", "seed", "lr", "estimator", "steps"]
    if want.steps:                      # meta-trained after (or without) cloning: what the estimator saw
        keys += ["init_from", "episode_length", "meta_batch", "bptt"]
    for key in keys:
        assert getattr(got, key) == getattr(want, key), key
    assert f"--preset {preset}" in (HERE / f"{name}.md").read_text()


def test_missing_data_is_a_clear_error_and_creates_no_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VSML_OFFLINE", "1")
    monkeypatch.setenv("VSML_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VSML_DATA_DIR", raising=False)
    (tmp_path / "empty").mkdir()
    import tasks.datasets
    tasks.datasets.clear_memory_cache()
    rc = train_cli.main([*TINY, "--task", "mnist", "--data_dir", str(tmp_path / "empty"),
                         "--out_dir", str(tmp_path / "runs"), "--name", "nodata"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error:" in err and "mnist" in err
    assert not (tmp_path / "runs" / "nodata").exists()


def test_resume_long_horizon_cloning_mid_episode(tmp_path):
    """Long-horizon cloning (issue 15) carries episodes across steps; a resume in the middle of an
    episode continues bit for bit (the carried state travels in the checkpoint)."""
    extra = ["--eval.every", "0", "--steps", "0", "--clone.length", "9", "--clone.truncation", "3",
             "--clone.own_error_max", "0.5", "--clone.own_error_ramp", "3"]
    full = _run(tmp_path, *extra, "--clone.steps", "5", name="full")
    part = _run(tmp_path, *extra, "--clone.steps", "2", name="part")
    assert load_checkpoint(part)["extra"]["estimator"]["clone"]["pos"] == 6
    assert train_cli.main(["--resume", str(part), "--clone.steps", "5", "--log.progress", "false"]) == 0
    a, b = load_checkpoint(full), load_checkpoint(part)
    assert a["step"] == b["step"] == 5
    assert torch.equal(a["theta"], b["theta"])


def test_teacher_errors_and_new_task_modifiers_run_through_train(tmp_path):
    """--clone.teacher_errors own and a family with the noise<p> / affine modifiers (issue 15) go through
    train.py into config.json, and the option changes the cloning target (θ differs from the "fed" run)."""
    extra = ["--eval.every", "0", "--steps", "0", "--clone.length", "9", "--clone.truncation", "3",
             "--clone.own_error_max", "1", "--clone.steps", "3", "--task", "mix:digits+proj+noise20,digits+affine"]
    own = _run(tmp_path, *extra, "--clone.teacher_errors", "own", name="own")
    fed = _run(tmp_path, *extra, name="fed")
    cfg = json.loads((own / "config.json").read_text())
    assert cfg["clone"]["teacher_errors"] == "own" and cfg["task"] == "mix:digits+proj+noise20,digits+affine"
    assert load_checkpoint(own)["config"]["clone"]["teacher_errors"] == "own"
    assert not torch.equal(load_checkpoint(own)["theta"], load_checkpoint(fed)["theta"])


def test_logit_scale_travels_from_train_to_eval(tmp_path, capsys):
    """--vsml.logit_scale (issue 15) is resolved into config.json and the checkpoint, and eval.py's learner
    reads out with it (its meta-test logits equal an unroll of a κ network, not of the κ = 1 one)."""
    from vsml.evaluation.load import load_learner
    rd = _run(tmp_path, "--vsml.logit_scale", "3", "--eval.every", "0", name="k3")
    assert json.loads((rd / "config.json").read_text())["vsml"]["logit_scale"] == 3.0
    assert load_checkpoint(rd)["config"]["vsml"]["logit_scale"] == 3.0
    _, net, theta, _ = load_learner(str(rd))
    assert net.cfg.logit_scale == 3.0
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 5, 64, generator=g), torch.randint(0, 10, (2, 5), generator=g)
    st = net.init_state(2, 64, 10, torch.Generator().manual_seed(1))
    from vsml import VSMLConfig, VSMLNetwork
    ref = VSMLNetwork(VSMLConfig(logit_scale=3.0)).unroll(theta, x, y, state=st.clone())
    plain = VSMLNetwork(VSMLConfig()).unroll(theta, x, y, state=st.clone())
    got = net.unroll(theta, x, y, state=st.clone())
    torch.testing.assert_close(got.logits, ref.logits)
    assert not torch.allclose(got.logits, plain.logits)
    assert eval_cli.main(["--checkpoint", str(rd), "--tasks", "digits", "--episodes", "2", "--length", "10"]) == 0
