"""Fault injection (issue 17): every failure a new user hit, reproduced, with the behaviour now expected.

Concurrent runs on one folder, kill -9 then resume (metrics.jsonl without duplicate steps), all-NaN
populations and non-finite θ (exit 3, the last good checkpoint intact), full / read-only output folders
(monkeypatched writes), bad task / device / init_from / baselines, wandb missing, corrupt or foreign
checkpoints.  Tiny configs, in-process except where a second process is the point.

Run: python -m pytest tests/test_faults.py -q
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import eval as eval_cli
import train as train_cli
from vsml.engine.config import ConfigError
from vsml.training.checkpoint import CheckpointError, load_checkpoint, load_theta
from vsml.training.rundir import RunDirError, RunLock, create_run_dir, truncate_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--log.progress", "false", "--eval.episodes", "1", "--eval.length", "8"]


def _main(tmp_path, *extra, name="t"):
    return train_cli.main([*TINY, "--out_dir", str(tmp_path / "runs"), "--name", name, *extra])


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith("[")]   # not progress
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _metric_steps(rd: Path, key: str = "meta_train/theta_norm") -> list[int]:
    rows = [json.loads(ln) for ln in (rd / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if key in r]


# ------------------------------------------------------------------------------------------------
# 1. concurrent runs on one run directory


def test_same_name_while_running_is_an_error_and_no_folder_is_shared(tmp_path, capsys):
    held, lock = create_run_dir(tmp_path / "runs", "t")          # "another process" running as t
    try:
        assert _main(tmp_path) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert "still running" in line and "--name" in line
        assert not (tmp_path / "runs" / "t-2").exists()
        # ... and by --resume on that folder: clear error, nothing touched
        (held / "checkpoints").mkdir()
        assert _main(tmp_path, name="other") == 0
        src = tmp_path / "runs" / "other"
        (held / "checkpoints" / "last.pt").write_bytes((src / "checkpoints" / "last.pt").read_bytes())
        capsys.readouterr()
        assert train_cli.main(["--resume", str(held), "--log.progress", "false"]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert "in use by another process" in line and str(os.getpid()) in line
    finally:
        lock.release()
    assert RunLock.holder(held) is None


def test_exclusive_creation_under_contention(tmp_path):
    """16 threads asking for one name at once: each gets its own folder (or the in-use error)."""
    got, errors, barrier = [], [], threading.Barrier(16)

    def worker():
        barrier.wait()
        try:
            got.append(create_run_dir(tmp_path, "same"))
        except RunDirError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dirs = [d for d, _ in got]
    assert len(dirs) == len(set(dirs)) and len(dirs) + len(errors) == 16
    assert all("still running" in e for e in errors)
    for _, lock in got:
        lock.release()


def test_two_processes_then_kill9_then_resume(tmp_path, capsys):
    """A real second process: it holds the lock while it runs; a same-name start and a --resume fail
    cleanly; after kill -9 the OS has dropped the lock, the resume works and metrics.jsonl has every
    step exactly once."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, "--steps", "100000", "--eval.every", "0",
           "--ckpt_every", "3", "--out_dir", str(tmp_path / "runs"), "--name", "k"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rd = tmp_path / "runs" / "k"
    try:
        deadline, lines = time.time() + 120, []
        while time.time() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "step 8/" in line or not line:
                break
        assert "step 8/" in lines[-1], "".join(lines)
        assert _main(tmp_path, name="k") == 2                       # same --name while it runs
        assert "still running" in _one_error_line(capsys.readouterr().err)
        assert train_cli.main(["--resume", str(rd), "--log.progress", "false"]) == 2
        assert "in use" in _one_error_line(capsys.readouterr().err)
        # kill right after a logged step that is not a checkpoint step: rows after the checkpoint exist
        while time.time() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if not line or (line.startswith("[vsml] step ") and int(line.split()[2].split("/")[0]) % 3):
                break
        assert lines[-1].startswith("[vsml] step "), "".join(lines)
    finally:
        proc.kill()                                                  # SIGKILL: no handler runs
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    ck = load_checkpoint(rd)
    logged = _metric_steps(rd)
    assert max(logged) >= ck["step"]      # almost always > (the kill follows a non-checkpoint step's line)
    total = ck["step"] + 2
    assert train_cli.main(["--resume", str(rd), "--steps", str(total - 2), "--log.progress", "false"]) == 0
    out = capsys.readouterr().out
    assert ("dropped" in out) == (max(logged) > ck["step"])
    assert _metric_steps(rd) == list(range(1, total + 1))            # no duplicates, no gaps
    assert load_checkpoint(rd)["step"] == total


def test_under_torchrun_only_rank0_locks_and_every_rank_sees_its_error(tmp_path):
    from types import SimpleNamespace

    from vsml.training.trainer import _lock_run_dir
    other_rank = SimpleNamespace(is_main=False, broadcast_object=lambda obj: None)
    assert _lock_run_dir(other_rank, tmp_path / "r") is None
    assert not (tmp_path / "r").exists()                             # rank > 0 creates nothing
    failed_on_rank0 = SimpleNamespace(is_main=False, broadcast_object=lambda obj: "run directory x is in use")
    with pytest.raises(RunDirError, match="in use"):
        _lock_run_dir(failed_on_rank0, tmp_path / "r")
    rank0 = SimpleNamespace(is_main=True, broadcast_object=lambda obj: obj)
    lock = _lock_run_dir(rank0, tmp_path / "r")
    try:
        with pytest.raises(RunDirError, match="in use by another process"):
            _lock_run_dir(rank0, tmp_path / "r")                     # a second job on out_dir/name
    finally:
        lock.release()


def test_thread_policy(monkeypatch):
    from vsml.training.threads import apply_thread_policy
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("VSML_THREADS", raising=False)
        assert apply_thread_policy() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("VSML_THREADS", "2")
        assert apply_thread_policy() == min(2, len(os.sched_getaffinity(0)))
    finally:
        torch.set_num_threads(before)


def test_resuming_a_finished_run_does_nothing(tmp_path, capsys):
    assert _main(tmp_path) == 0
    rd = tmp_path / "runs" / "t"
    before = (rd / "metrics.jsonl").read_text()
    results = (rd / "meta_test" / "results.json").stat().st_mtime_ns
    assert (rd / "training_curves.png").stat().st_size > 0
    capsys.readouterr()
    assert train_cli.main(["--resume", str(rd), "--log.progress", "false"]) == 0
    out = capsys.readouterr().out
    assert "already finished" in out and "--steps" in out and "final meta-test" not in out
    assert (rd / "metrics.jsonl").read_text() == before
    assert (rd / "meta_test" / "results.json").stat().st_mtime_ns == results
    # more steps asked for: it continues
    assert train_cli.main(["--resume", str(rd), "--steps", "4", "--log.progress", "false"]) == 0
    assert load_checkpoint(rd)["step"] == 6
    assert _metric_steps(rd) == list(range(1, 7))


def test_truncate_metrics_drops_rows_after_the_step_and_torn_lines(tmp_path):
    rows = [{"step": s, "a": s} for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "a"')
    assert truncate_metrics(tmp_path, 2) == 3
    assert [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_interrupt_writes_checkpoint_and_training_curves(tmp_path, monkeypatch):
    from vsml.estimators import core
    orig = core.ESEstimator.estimate

    def estimate(self, theta, x, y, num_classes, step):
        if step == 3:
            raise KeyboardInterrupt                                  # Ctrl-C twice / during a step
        return orig(self, theta, x, y, num_classes, step)

    monkeypatch.setattr(core.ESEstimator, "estimate", estimate)
    with pytest.raises(SystemExit) as ei:
        _main(tmp_path, "--steps", "10", "--ckpt_every", "0")
    assert ei.value.code == 128 + signal.SIGINT
    rd = tmp_path / "runs" / "t"
    assert load_checkpoint(rd)["step"] == 3
    assert (rd / "training_curves.png").stat().st_size > 0
    assert RunLock.holder(rd) is None                                 # the lock went with the run


# ------------------------------------------------------------------------------------------------
# 3. divergence


def _nan_after(monkeypatch, first_bad_step: int):
    """Every ES member's loss is NaN from meta-step ``first_bad_step`` on (0-based step index)."""
    from vsml.estimators import core
    orig = core.ESEstimator.estimate

    def estimate(self, theta, x, y, num_classes, step):
        if step < first_bad_step:
            return orig(self, theta, x, y, num_classes, step)
        from vsml.estimators.es import es_tell
        losses = torch.full((2 * self.cfg.pairs,), float("nan"))
        return es_tell(theta, losses, self.cfg, step)

    monkeypatch.setattr(core.ESEstimator, "estimate", estimate)


def test_all_nan_population_stops_the_run_and_keeps_the_good_checkpoint(tmp_path, monkeypatch, capsys):
    _nan_after(monkeypatch, 4)            # steps 5, 6, 7 (1-based) have no finite member
    rc = _main(tmp_path, "--steps", "20", "--ckpt_every", "2", "--max_nonfinite_steps", "3", "--eval.every", "0")
    assert rc == 3
    cap = capsys.readouterr()
    line = _one_error_line(cap.err)
    assert "diverged" in line and "3 consecutive steps" in line and "steps 5-7" in line
    assert "last good checkpoint (step 4)" in line and "--resume" in line
    assert "nonfinite 4 (total" in cap.out                            # counted and shown in the log line
    rd = tmp_path / "runs" / "t"
    ck = load_checkpoint(rd)
    assert ck["step"] == 4 and torch.isfinite(ck["theta"]).all()
    assert load_theta(rd / "theta.safetensors")[2]["step"] == "4"
    assert not (rd / "meta_test").exists()                            # no final table with loss nan
    assert (rd / "training_curves.png").exists()
    rows = [json.loads(ln) for ln in (rd / "metrics.jsonl").read_text().splitlines()]
    norms = [r["meta_train/theta_norm"] for r in rows if "meta_train/theta_norm" in r]
    assert norms and all(isinstance(v, float) for v in norms)
    # the suggested way on: resume from the good checkpoint with a smaller --lr (it applies)
    monkeypatch.undo()
    assert train_cli.main(["--resume", str(rd), "--lr", "0.0025", "--steps", "4", "--log.progress", "false"]) == 0
    ck = load_checkpoint(rd)
    assert ck["step"] == 6 and ck["optimizer"]["meta"]["param_groups"][0]["lr"] == 0.0025
    assert _metric_steps(rd) == list(range(1, 7))


@pytest.mark.parametrize("what", ["θ", "the Adam state (exp_avg_sq)"])
def test_nonfinite_theta_or_adam_state_is_never_checkpointed(tmp_path, monkeypatch, capsys, what):
    from vsml.estimators import core
    orig = core.make_optimizer

    def poisoned(theta, lr, **kw):
        opt = orig(theta, lr, **kw)
        step = opt.step

        def bad_step(*a, **k):
            out = step(*a, **k)
            n = opt.state[theta]["step"]
            if float(n) >= 3:
                with torch.no_grad():
                    t = theta if what == "θ" else opt.state[theta]["exp_avg_sq"]
                    t.view(-1)[0] = float("inf")
            return out
        opt.step = bad_step
        return opt

    monkeypatch.setattr(core, "make_optimizer", poisoned)
    rc = _main(tmp_path, "--clone.steps", "0", "--steps", "10", "--ckpt_every", "2", "--eval.every", "0")
    assert rc == 3
    line = _one_error_line(capsys.readouterr().err)
    assert f"{what} became non-finite at step 3" in line and "(step 2)" in line
    ck = load_checkpoint(tmp_path / "runs" / "t")
    assert ck["step"] == 2 and torch.isfinite(ck["theta"]).all()


def test_huge_learning_rates(tmp_path, capsys):
    with pytest.raises(ConfigError, match="too large"):
        from vsml.training.config import TrainConfig
        TrainConfig(lr=1e38)
    with pytest.raises(SystemExit) as ei:                             # the parser reports the ConfigError
        _main(tmp_path, "--lr", "1e38")
    assert ei.value.code == 2
    assert "too large" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "t").exists()
    # the issue's --lr 3e37: diverges; the run stops with exit 3 instead of exiting 0 with loss nan
    rc = _main(tmp_path, "--lr", "3e37", "--clone.steps", "0", "--steps", "30", "--eval.every", "0",
               "--max_nonfinite_steps", "3")
    assert rc == 3
    assert "diverged" in _one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------------
# 4. ordinary mistakes: one line, exit 2, no run folder


@pytest.mark.parametrize("flags,words", [
    (["--task", "nope"], ["--task 'nope'", "unknown task name"]),
    (["--eval.tasks", "digits;nope"], ["--eval.tasks 'nope'", "unknown task name"]),
    (["--eval.baselines", "sgd,nope"], ["--eval.baselines", "unknown learner"]),
    (["--init_from", "pretrained:mnist14-clone-es", "--vsml.cell.hidden", "8"], ["--init_from", "shape"]),
    (["--init_from", "pretrained:nope"], ["no pretrained learner named 'nope'"]),
    (["--device", "nope"], ["--device 'nope'", "is not a device"]),
])
def test_ordinary_mistakes_one_line_exit_2_no_folder(tmp_path, capsys, flags, words):
    assert _main(tmp_path, *flags) == 2
    line = _one_error_line(capsys.readouterr().err)
    for w in words:
        assert w in line, line
    assert not (tmp_path / "runs" / "t").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only torch / machine")
def test_cuda_on_a_cpu_only_torch(tmp_path, capsys):
    assert _main(tmp_path, "--device", "cuda") == 2
    assert "--device cpu" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "runs" / "t").exists()
    assert eval_cli.main(["--baselines", "sgd", "--device", "cuda", "--episodes", "1", "--length", "2"]) == 2
    assert "--device cpu" in _one_error_line(capsys.readouterr().err)


def test_wandb_requested_but_not_installed(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setitem(sys.modules, "wandb", None)                  # "import wandb" raises ImportError
    assert _main(tmp_path, "--log.wandb", "offline") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "pip install wandb" in line and "--log.wandb disabled" in line
    assert not (tmp_path / "runs" / "t").exists()


def test_unwritable_out_dir(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    assert train_cli.main([*TINY, "--out_dir", str(tmp_path / "file" / "runs")]) == 2
    assert "--out_dir" in _one_error_line(capsys.readouterr().err)
    # a read-only folder (root ignores permission bits, so the filesystem's answer is faked)
    from vsml.training import rundir

    def ro(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "ro"))
    monkeypatch.setattr(rundir.tempfile, "mkstemp", ro)
    (tmp_path / "ro").mkdir()
    assert train_cli.main([*TINY, "--out_dir", str(tmp_path / "ro")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "read-only" in line and "--out_dir" in line
    assert list((tmp_path / "ro").iterdir()) == []


def test_disk_full_mid_run_one_line_and_last_good_checkpoint_kept(tmp_path, monkeypatch, capsys):
    import vsml.training.checkpoint as ckpt
    orig, calls = ckpt.atomic_write, {"n": 0}

    def full(path, write_fn):
        if Path(path).name == "last.pt":
            calls["n"] += 1
            if calls["n"] >= 3:                                          # the 3rd checkpoint hits a full disk
                def partial(tmp):
                    Path(tmp).write_bytes(b"half")
                    raise OSError(errno.ENOSPC, "No space left on device")
                return orig(path, partial)
        return orig(path, write_fn)

    monkeypatch.setattr(ckpt, "atomic_write", full)
    assert _main(tmp_path, "--steps", "6", "--eval.every", "0") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "no space left" in line and "last good checkpoint (step 2)" in line and "--resume" in line
    rd = tmp_path / "runs" / "t"
    assert load_checkpoint(rd)["step"] == 2
    assert not list((rd / "checkpoints").glob(".*.tmp"))               # no half-written file left


def test_disk_full_while_logging_metrics(tmp_path, monkeypatch, capsys):
    from vsml.training.loggers import RunLogger
    orig = RunLogger.log

    def log(self, metrics, step):
        if step >= 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return orig(self, metrics, step)

    monkeypatch.setattr(RunLogger, "log", log)
    assert _main(tmp_path, "--steps", "6", "--eval.every", "0") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "no space left" in line and "metrics.jsonl" in line and "(step 3)" in line
    assert load_checkpoint(tmp_path / "runs" / "t")["step"] == 3


def test_disk_full_before_the_first_step_leaves_no_folder(tmp_path, monkeypatch, capsys):
    from vsml.training import trainer

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(trainer, "atomic_write_text", full)            # config.json
    assert _main(tmp_path) == 2
    assert "no space left" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "runs" / "t").exists()


# ------------------------------------------------------------------------------------------------
# 5. words


def test_checkpoint_messages(tmp_path, capsys):
    assert _main(tmp_path, "--eval.every", "0") == 0
    rd = tmp_path / "runs" / "t"
    ck = rd / "checkpoints" / "last.pt"
    ck.write_bytes(ck.read_bytes()[:200])
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(rd)
    msg = str(ei.value)
    assert "corrupt" in msg and str(rd / "theta.safetensors") in msg and "step_" not in msg
    assert "weights_only=False" not in msg
    # a random pickle: refused by weights_only=True, reported without torch's unsafe advice
    torch.save({"obj": Path("x")}, tmp_path / "random.pt")
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(tmp_path / "random.pt")
    assert "not a vsml checkpoint" in str(ei.value) and "weights_only=False" not in str(ei.value)
    capsys.readouterr()
    assert eval_cli.main(["--checkpoint", str(tmp_path / "random.pt"), "--baselines", ""]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "not a vsml checkpoint" in line and "weights_only=False" not in line
    assert eval_cli.main(["--checkpoint", "pretrained:nope", "--baselines", ""]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "named 'nope';" in line and "\"" not in line


def test_tasks_list_names_the_guessing_games(capsys):
    from tasks.cli import main
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "guessing[" in out and "sinusoid[" in out


def test_eval_seed_changes_initial_states():
    from vsml.evaluation.evaluate import state_seed
    assert state_seed(22, 0) == 10_007                               # the default keeps published numbers
    assert len({state_seed(s, 0) for s in (1, 2, 3, 22)}) == 4
    assert state_seed(5, 0) != state_seed(5, 64)


def test_model_card_matches_the_shipped_config():
    from vsml.pretrained import HERE
    cfg = load_theta(HERE / "mnist14-clone-es.safetensors")[1]
    card = (HERE / "mnist14-clone-es.md").read_text()
    assert cfg["es"]["fitness"] == "raw"
    assert "centred ranks" not in card and "centered ranks" not in card


def test_no_error_message_names_a_rejected_flag():
    for f in ("tasks/datasets.py", "vsml/training/trainer.py", "vsml/training/preflight.py", "eval.py", "train.py"):
        assert "--data-dir" not in (ROOT / f).read_text(), f


def test_evaluate_reports_progress_per_task_and_learner():
    from vsml.evaluation.evaluate import FrozenLearner, evaluate
    from vsml.learners.registry import build
    lines: list[str] = []
    sgd = build("sgd")
    evaluate([FrozenLearner("sgd", sgd, sgd.init_theta())], ["digits"], 1, 5, seed=1, progress=lines.append)
    assert len(lines) == 2 and "(1/1) digits: sgd" in lines[0] and "online acc" in lines[1]


def test_kernel_build_says_what_it_is_doing(monkeypatch, capsys):
    import kernels.cpu_vsml as k
    from torch.utils import cpp_extension

    def slow_build(**kw):
        time.sleep(0.3)
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(cpp_extension, "load", slow_build)
    monkeypatch.setattr(k, "BUILD_NOTICE_S", 0.05)
    monkeypatch.setattr(k, "_errors", {})
    monkeypatch.setattr(k, "_modules", {})
    with pytest.raises(RuntimeError, match="could not build"):
        k.load("scalar")
    assert "building the CPU kernel (scalar)" in capsys.readouterr().err
