"""Distributed meta-training (vsml/training/distributed.py): gloo processes on localhost.

* the estimators on 2 ranks vs 1 process (ES bit-identical, BPTT / cloning to float tolerance), uneven
  shards, the θ-drift check (torch.multiprocessing, 2 gloo ranks);
* fault tolerance through ``torchrun --nproc_per_node 2 --max-restarts 1 train.py``: rank 0 killed
  after step 3 (test-only ``VSML_FAULT_INJECT``), the restarted group resumes from the step-2
  checkpoint and ends with θ and Adam state bit-identical to the 1-process run (so the 2-process run
  equals the 1-process run, ES);
* slow (``-m slow``): the same with rank 1 killed, and an uninterrupted torchrun run vs 1 process.

The default part takes ~40 s wall (~20 s CPU) on this project's 2-core machine under a load
average of ~6 (others' jobs); most of it is starting Python + torch in 2 x 2 workers + the agent.

Run: python -m pytest tests/test_distributed.py -q
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train as train_cli
from vsml.training.checkpoint import load_checkpoint
from vsml.engine.config import ConfigError
from vsml.training.distributed import (FAULT_ENV, FAULT_EXIT_CODE, DistConfig, DistContext, ThetaDriftError,
                              init_distributed, maybe_inject_fault, shard_range, state_checksum)

ROOT = Path(__file__).resolve().parents[1]
# ES only (clone.steps 0) so that the 2-process θ must equal the 1-process θ bit for bit
RUN = ["--preset", "tiny", "--log.progress", "false", "--clone.steps", "0", "--es.pairs", "4",
       "--task", "teacher_linear", "--eval.tasks", "teacher_linear",     # generated: no sklearn import
       "--steps", "6", "--ckpt_every", "2", "--eval.every", "0", "--dist.checksum_every", "1",
       "--dist.member_batch", "4"]


# ------------------------------------------------------------------------------------------------ units


def test_shard_range_partitions_and_balances():
    for n in (1, 2, 3, 7, 16):
        for w in (1, 2, 3, 4):
            if n < w:
                continue
            parts = [shard_range(n, r, w) for r in range(w)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_dist_config_validates():
    with pytest.raises(ConfigError, match="member_batch"):
        DistConfig(member_batch=3)
    with pytest.raises(ConfigError, match="checksum_every"):
        DistConfig(checksum_every=-1)
    with pytest.raises(ConfigError, match="backend"):
        DistConfig(backend="mpi")


def test_state_checksum_sees_every_bit():
    t = torch.randn(3, 5)
    u = t.clone()
    u.view(-1).view(torch.int32)[7] ^= 1                      # flip the lowest mantissa bit of one entry
    assert state_checksum(t) == state_checksum(t.clone())
    assert state_checksum(t) != state_checksum(u)
    assert state_checksum(t) != state_checksum(t.reshape(5, 3))


def _cfg(*flags):
    from vsml.training.cli import parse_config
    from vsml.training.presets import PRESETS
    return parse_config(["--preset", "tiny", *flags], PRESETS, "tiny", "")[0]


def test_refuses_what_cannot_run_distributed(monkeypatch):
    """From the estimators' declared capabilities (no names in the distributed module), in preflight."""
    from vsml.training.preflight import check_distributed
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for flags in (("pes",), ("tes",), ("bmg", "--episode_length", "120")):
        with pytest.raises(ConfigError, match=f"{flags[0]} cannot run on 2 processes"):
            check_distributed(_cfg("--estimator", *flags, "--clone.steps", "0"))
    with pytest.raises(ConfigError, match="es.pairs=1 is smaller than the number of processes"):
        check_distributed(_cfg("--es.pairs", "1", "--clone.steps", "0"))
    with pytest.raises(ConfigError, match="meta_batch=1 is smaller"):
        check_distributed(_cfg("--estimator", "bptt", "--meta_batch", "1", "--clone.steps", "0"))
    with pytest.raises(ConfigError, match=r"clone.episodes=1 is smaller.*--clone.steps 0"):
        check_distributed(_cfg("--clone.steps", "3", "--clone.episodes", "1"))
    check_distributed(_cfg("--clone.steps", "0", "--clone.episodes", "1"))   # a skipped phase is not checked
    check_distributed(_cfg("--estimator", "pes", "--clone.steps", "0"), world=1)
    with pytest.raises(ConfigError, match="nccl needs a CUDA device"):
        init_distributed(_cfg("--dist.backend", "nccl"))
    assert not dist.is_initialized()
    monkeypatch.delenv("RANK")
    ctx = init_distributed(_cfg("--estimator", "pes", "--clone.steps", "0"))   # one process: fine
    assert not ctx.distributed and ctx.is_main and not ctx.launched


def test_torchrun_refusal_is_one_line_before_the_run_folder(monkeypatch, tmp_path, capsys):
    """train.py under a (pretend) 2-process launch of PES: exit 2, one line, no run folder written."""
    import train as train_cli
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "runs"
    rc = train_cli.main(["--preset", "tiny", "--estimator", "pes", "--clone.steps", "0", "--out_dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pes cannot run on 2 processes" in err[0]
    assert not out.exists() or not any(out.iterdir())
    assert not dist.is_initialized()


def test_a_new_estimator_declares_its_distribution(monkeypatch):
    """A registered estimator's capabilities decide, with no edit of the distributed module or trainer."""
    from vsml.estimators import base
    from vsml.training.preflight import check_distributed
    monkeypatch.setitem(base.REGISTRY, "es", base.REGISTRY["es"])
    monkeypatch.setitem(base.CAPABILITIES, "es", base.Capabilities("refuse", why="testing"))
    with pytest.raises(ConfigError, match="es cannot run on 3 processes: testing"):
        check_distributed(_cfg("--clone.steps", "0"), world=3)
    monkeypatch.setitem(base.CAPABILITIES, "es", base.Capabilities("replicate", parts=lambda cfg: ("x", 2)))
    with pytest.raises(ConfigError, match="x=2 is smaller than the number of processes"):
        check_distributed(_cfg("--clone.steps", "0"), world=3)
    check_distributed(_cfg("--clone.steps", "0"), world=2)


def test_fault_injection_spec_is_checked(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "one:three")
    with pytest.raises(ConfigError, match="RANK:STEP"):
        maybe_inject_fault(DistContext(), 1)
    monkeypatch.setenv(FAULT_ENV, "0:3")
    maybe_inject_fault(DistContext(restart_count=1), 3)     # restarted group: no fault
    maybe_inject_fault(DistContext(), 2)                     # another step: no fault


# ------------------------------------------------------------------------------------------------ 2 gloo ranks


def _estimator_worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from vsml.estimators.bptt import BPTTConfig
        from vsml.estimators.cloning import CloneConfig, CloneEstimator
        from vsml.engine.config import VSMLConfig
        from vsml.training.distributed import ShardedEstimator
        from vsml.estimators.es import ESConfig
        from vsml.estimators.core import BPTTEstimator, ESEstimator
        from vsml.engine.network import VSMLNetwork
        ctx = DistContext(rank=rank, world_size=world, launched=True, backend="gloo")
        net = VSMLNetwork(VSMLConfig(), compile=False)
        theta = net.init_theta(torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(1)
        res = {}
        for pairs in (4, 3):                                  # even and uneven shares (2 + 1 pairs)
            x, y = torch.randn(pairs, 7, 6, generator=g), torch.randint(0, 3, (pairs, 7), generator=g)
            cfg = ESConfig(pairs=pairs, sigma=0.1, seed=5)
            res[f"es{pairs}"] = ShardedEstimator(ESEstimator(net, cfg, max_batch=2), ctx).estimate(theta, x, y, 3, 11)
            if rank == 0:
                res[f"es{pairs}_ref"] = ESEstimator(net, cfg, max_batch=2).estimate(theta, x, y, 3, 11)
        x, y = torch.randn(5, 9, 6, generator=g), torch.randint(0, 3, (5, 9), generator=g)
        bcfg = BPTTConfig(truncation=4, clip_grad_norm=1e-3)   # tiny clip: clipping must see the global norm
        res["bptt"] = ShardedEstimator(BPTTEstimator(net, bcfg, seed=3), ctx).estimate(theta, x, y, 3, 2)
        ccfg = CloneConfig(steps=1, episodes=5, length=6)
        res["clone"] = ShardedEstimator(CloneEstimator(net, ccfg, seed=3), ctx).estimate(theta, x, y, 3, 2)
        if rank == 0:
            res["bptt_ref"] = BPTTEstimator(net, bcfg, seed=3).estimate(theta, x, y, 3, 2)
            res["clone_ref"] = CloneEstimator(net, ccfg, seed=3).estimate(theta, x, y, 3, 2)
        ctx.check_in_sync(1, theta)                           # identical: passes
        drifted = theta.clone()
        if rank == 1:
            drifted.view(-1)[0] += 1e-6
        try:
            ctx.check_in_sync(7, drifted)
            res["drift"] = None
        except ThetaDriftError as exc:
            res["drift"] = str(exc)
        torch.save(res, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_estimators_on_two_ranks_match_one_process(tmp_path):
    mp.start_processes(_estimator_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "res")), nprocs=2,
                       start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"res.{r}", weights_only=False) for r in (0, 1))
    for key in ("es4", "es3", "bptt", "clone"):                # every rank gets the same update
        assert torch.equal(r0[key][0], r1[key][0]), key
        assert r0[key][1] == r1[key][1], key
    for key in ("es4", "es3"):                                 # ES: bit-identical to one process
        assert torch.equal(r0[key][0], r0[key + "_ref"][0]), key
        assert r0[key][1] == r0[key + "_ref"][1], key
    for key in ("bptt", "clone"):                              # sum over ranks: float tolerance
        (g, m), (g_ref, m_ref) = r0[key], r0[key + "_ref"]
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-9)
        for k in m_ref:
            assert m[k] == pytest.approx(m_ref[k], rel=1e-5, abs=1e-9), (key, k)
    assert r0["bptt"][1]["clipped"] == 1.0 and r0["bptt"][0].norm() == pytest.approx(1e-3, rel=1e-4)
    for r in (r0, r1):
        assert r["drift"] is not None and "after meta-step 7" in r["drift"] and "rank(s) [1]" in r["drift"]


# ------------------------------------------------------------------------------------------------ torchrun


def _torchrun(out_dir: Path, *extra: str, env: dict | None = None, max_restarts: int = 0):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(max_restarts), "train.py", *RUN, "--out_dir", str(out_dir), "--name", "d", *extra]
    e = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled",
         "PYTHONPATH": str(ROOT)}
    e.pop(FAULT_ENV, None)
    e.update(env or {})
    # own process group, so that a hang kills the workers too (not only the torchrun agent)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in 180 s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    assert train_cli.main([*RUN, "--out_dir", str(out), "--name", "d"]) == 0
    return load_checkpoint(out / "d")


@pytest.mark.slow   # the default suite covers the same through the killed-rank-0 run below (~15 s saved)
def test_torchrun_two_processes_equal_one_process(tmp_path, one_process_run):
    p = _torchrun(tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rd = tmp_path / "d"                                        # the exact name, written by rank 0 only
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d"]
    ck = load_checkpoint(rd)
    assert ck["step"] == 6 and ck["config"]["dist"]["checksum_every"] == 1
    assert torch.equal(ck["theta"], one_process_run["theta"])  # bit-identical θ after 6 ES steps
    _assert_same_adam(ck, one_process_run)
    rows = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "meta_train/loss_mean" in r]
    assert steps == [1, 2, 3, 4, 5, 6]                          # one writer: no duplicated rows
    assert (rd / "meta_test" / "results.json").exists()


@pytest.mark.parametrize("killed_rank", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_killed_worker_restarts_from_last_checkpoint(tmp_path, one_process_run, killed_rank):
    """2 processes, one killed after meta-step 3, checkpoints every 2 steps, --max-restarts 1: the
    restarted group resumes from the last checkpoint and ends with the θ (and Adam state) of the
    uninterrupted run, which is the 1-process run bit for bit (so this also checks 2 processes ==
    1 process through train.py).  Rank 0 killed: nothing after the step-2 checkpoint survives.  Rank 1
    killed: rank 0's collective fails and it may write a (consistent) step-3 checkpoint on the way out."""
    p = _torchrun(tmp_path, env={FAULT_ENV: f"{killed_rank}:3"}, max_restarts=1)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    assert f"rank {killed_rank} exits with status {FAULT_EXIT_CODE} after meta-step 3" in log
    assert "elastic restart 1: resuming from" in log
    # rank 0 killed: from the step-2 checkpoint; rank 1 killed: step 3 if rank 0 wrote its exit
    # checkpoint before torchrun stopped it, else step 2
    resumed = re.findall(rf"resumed {re.escape(str(tmp_path / 'd'))} at step (\d+)", log)
    assert resumed and set(resumed) <= ({"2"} if killed_rank == 0 else {"2", "3"}), log[-4000:]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d"]  # no d-2
    ck = load_checkpoint(tmp_path / "d")
    assert ck["step"] == 6 and torch.equal(ck["theta"], one_process_run["theta"])
    _assert_same_adam(ck, one_process_run)
    assert not list((tmp_path / "d" / "checkpoints").glob(".*.tmp"))
    if killed_rank == 0:                                       # died before logging step 3: no duplicate rows
        rows = [json.loads(line) for line in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "meta_train/loss_mean" in r] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "d" / "meta_test" / "results.json").exists()


def _assert_same_adam(ck, ref):
    for a, b in zip(ck["optimizer"]["meta"]["state"].values(), ref["optimizer"]["meta"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
