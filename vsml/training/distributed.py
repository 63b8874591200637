"""Distributed meta-training on ``torch.distributed`` (``torchrun``): ES, BPTT and cloning across
processes, θ kept bit-identical on every rank, rank-0-only I/O, elastic restarts from checkpoints.

Launch (README, "Distributed meta-training")::

    torchrun --standalone --nproc_per_node 4 train.py --preset cpu-mnist          # one node
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes 2 --nproc_per_node 8 \\
        --rdzv_backend c10d --rdzv_endpoint HOST:29400 --rdzv_id RUN --max-restarts 3 train.py ...  # nodes

:func:`init_distributed` reads the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``, ``TORCHELASTIC_RESTART_COUNT``) and joins the process group: gloo
on CPU, NCCL when ``device`` is CUDA (one GPU per process, ``cuda:LOCAL_RANK``).  Without those
variables it returns a one-process :class:`DistContext` whose collectives are no-ops, so the train
loop has a single code path.

ES (vsml.md §2.2; badger-bmg-es.md §D.1 "Shared-seed distribution"; style-anchors.md §4b item 4).
θ and the Adam state are identical on every rank.  At meta-step s every rank draws the *same*
global batch of P data episodes (from the step seed) and the same P initial states (from
(seed, s, −1)), and keeps the contiguous pair slice [⌊P·r/W⌋, ⌊P·(r+1)/W⌋) of rank r out of W.
It builds only its own members θ ± σε_i, with ε_i regenerated from (seed, s, i) by
:func:`vsml.estimators.es.pair_seed`, runs them, and all-gathers the member losses and accuracies (two
floats per member: the whole exchange).  Every rank then runs the same :func:`vsml.estimators.es.es_tell`
(regenerating all P noise vectors, O(P·|θ|) work, negligible next to the unrolls) and the same
Adam step, so θ stays bit-identical without any broadcast.  Unlike the reference's MPI code
(vsml.md §2.2, "Distribution over MPI ranks": per-rank keys and per-rank data, gradients
all-reduced) the noise, data and states do not depend on the number of processes: **a run with
W processes computes the same member losses as the one-process run**, hence the same θ.  The
losses are bit-identical when every member is computed by the same kernels on the same batch
shape: ``dist.member_batch`` fixes the number of members per unroll call, so with
``member_batch`` dividing 2P/W, the one-process run (same ``member_batch``) evaluates exactly the
same chunks.  (On this project's CPU the unroll is batch-size invariant anyway; GPU kernels may not
be.)  The cost of this exactness: every rank samples the whole global data batch and then slices
it, i.e. O(P·T·D) memory per rank -- on the CPU.  On a GPU the trainer asks the task family for this
rank's episodes only (``sample(..., episodes=shard)``: per-episode projection streams, drawn on the
device) and the initial states come from per-pair streams on the device (``ESEstimator.initial_state``),
so each rank draws only its own members and the result still does not depend on W.

BPTT (vsml.md §2.3).  The meta-batch of E episodes is split the same way; rank r computes the
unclipped gradient of its episodes' mean loss, scaled by E_r/E, and one all-reduce (sum) gives
the global mean meta-gradient; clipping to ``bptt.clip_grad_norm`` then sees the *global* norm
(as in the one-process run).  The sum over ranks changes the floating-point summation order, so
BPTT agrees with the one-process run to ~1e-6 relative, not bitwise; the all-reduced result is
the same on every rank, so θ still stays bit-identical across ranks.  (Adam divides by √v, so an
entry whose gradient is numerically zero, |g| ~ 1e-9, takes an lr-sized step whose sign is rounding
noise: in a 4-step tiny BPTT run 1 of 2,384 θ entries differed from the one-process run by 1e-3 =
lr, all others by < 1e-5.)  The cloning phase
(vsml/estimators/cloning.py) is sharded like BPTT; deep cloning is replicated.  PES / truncated ES
keep per-particle inner states across meta-steps and are refused under more than one process.
Which estimator shards, replicates or is refused is declared where it is registered
(``@register(name, distributed=..., parts=...)``, :class:`vsml.estimators.base.Capabilities`) and
checked by :func:`vsml.training.preflight.check_distributed` before the run folder exists; this
module has no estimator names.

One implementation of each estimator: ES, BPTT and cloning split their ``estimate`` into
``partial`` (the contribution of a slice of pairs / episodes) and ``reduce``
(:class:`vsml.estimators.base.ShardableEstimator`); :class:`ShardedEstimator` runs ``partial`` on
this rank's slice, combines across ranks (all-gather of rows / all-reduce sum) and ``reduce``s, so
the one-process ``estimate`` (``reduce(partial(everything))``) and the sharded one share every line
of estimator code.

Consistency check.  Every ``dist.checksum_every`` meta-steps the ranks all-gather a 64-bit hash of
θ and of the optimiser state; any difference raises :class:`ThetaDriftError` naming the step and
the ranks that differ from rank 0 (fail loudly instead of training W diverging copies).

Fault tolerance.  Only rank 0 writes (config, metrics, wandb, checkpoints, meta-tests).  Under
torchrun the run directory is ``out_dir/name`` *exactly* (no ``-2`` suffix), decided by rank 0 and
broadcast; if it holds ``checkpoints/last.pt`` (an elastic restart, ``TORCHELASTIC_RESTART_COUNT``
> 0, or a relaunch of the same command) the run resumes from it: rank 0 loads it and broadcasts
it.  Checkpoints are written every ``ckpt_every`` steps by vsml/training/checkpoint.py's atomic write
(temporary file, fsync, rename, fsync of the folder), so a killed worker costs at most one
checkpoint interval and never leaves a torn ``last.pt``; rank 0 also writes one when the step
loop fails (e.g. a peer died), which is consistent because θ, the optimiser and the step counter
change together with no collective in between.  A SIGINT/SIGTERM on any rank stops every rank
after the same meta-step (the stop flag is all-reduced each step).  Several nodes: the rendezvous
may put rank 0 on another node after a restart, so ``out_dir`` must be a filesystem every node
sees; and launch with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (see :func:`init_distributed`).

Test-only fault injection: ``VSML_FAULT_INJECT="RANK:STEP"`` makes the process of that global rank
exit with status 17 (``os._exit``, no clean-up) right after it completes meta-step STEP, on the
first attempt only (``TORCHELASTIC_RESTART_COUNT`` = 0 and a run that started at step 0, not from
a checkpoint), so that a restarted group runs through.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from vsml.engine.config import ConfigError

__all__ = ["DistConfig", "DistContext", "FAULT_ENV", "FAULT_EXIT_CODE", "NullLogger", "ShardedEstimator",
           "ThetaDriftError", "distribute_estimator", "init_distributed", "shard_range", "state_checksum"]

FAULT_ENV = "VSML_FAULT_INJECT"
FAULT_EXIT_CODE = 17


@dataclass(frozen=True)
class DistConfig:
    """Multi-process settings (``--dist.*``); they may change between a run and its resumption.

    Attributes:
        backend: "auto" (NCCL when ``device`` is CUDA, else gloo), "gloo" or "nccl".
        checksum_every: meta-steps between cross-rank checks that θ and the optimiser state are
            bit-identical (0: never).
        member_batch: ES members per unroll call on each process (an even number; 0: the process's
            whole share in one call).  Bounds memory; with the same value, runs with any number of
            processes evaluate identical chunks (bit-identical θ, see the module docstring) as long
            as it divides 2·pairs/processes.
        timeout_s: collective timeout in seconds (rank 0 runs the periodic meta-tests alone while
            the other ranks wait in the next collective, so keep it above a meta-test's duration).
    """

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    checksum_every: int = 10
    member_batch: int = 0
    timeout_s: float = 1800.0

    def __post_init__(self):
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"dist.backend must be auto, gloo or nccl; got {self.backend!r}")
        if self.checksum_every < 0:
            raise ConfigError(f"dist.checksum_every must be >= 0 (0: never), got {self.checksum_every}")
        if self.member_batch < 0 or self.member_batch % 2:
            raise ConfigError(f"dist.member_batch must be 0 (all members at once) or an even number of "
                              f"members (whole antithetic pairs), got {self.member_batch}")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ConfigError(f"dist.timeout_s must be a positive number of seconds, got {self.timeout_s}")


class ThetaDriftError(RuntimeError):
    """θ (or the optimiser state) is no longer bit-identical on every rank."""


def shard_range(n: int, rank: int, world: int) -> range:
    """Contiguous, balanced share of rank ``rank``: [⌊n·r/W⌋, ⌊n·(r+1)/W⌋) (sizes differ by <= 1)."""
    return range(n * rank // world, n * (rank + 1) // world)


def state_checksum(*tensors: torch.Tensor) -> int:
    """64-bit BLAKE2b hash of the raw bytes (dtype and shape included) of the given tensors."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def _optimizer_tensors(opt: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    if opt is None:
        return []
    out = []
    for st in opt.state.values():
        for k in sorted(st):
            if torch.is_tensor(st[k]):
                out.append(st[k])
    return out


class NullLogger:
    """What ranks other than 0 get instead of a :class:`vsml.training.loggers.RunLogger`: writes nothing."""

    wandb_id = None

    def log(self, metrics, step):
        pass

    def log_curves(self, task, curves, step):
        pass

    def log_image(self, key, path, step):
        pass

    def summary(self, values):
        pass

    def close(self):
        pass


@dataclass
class DistContext:
    """Where this process stands in the group, and the few collectives the train loop needs.

    With ``world_size == 1`` every collective returns its input (no process group needed).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    restart_count: int = 0
    launched: bool = False          # started by torchrun (the env variables were set)
    backend: str | None = None      # "gloo" / "nccl" when a process group is in use
    device: torch.device = torch.device("cpu")
    checksum_every: int = 0
    owns_group: bool = False
    first_step: int | None = None   # the first meta-step this process completed (1: a fresh start)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> range:
        return shard_range(n, self.rank, self.world_size)

    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        # NCCL moves CUDA tensors only; gloo is used with CPU tensors here
        return t.to(self.device) if self.backend == "nccl" else t.to("cpu")

    # ----------------------------------------------------------------------------------- collectives

    def all_gather_rows(self, local: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Concatenate every rank's ``local`` [counts[r], ...] in rank order -> [sum(counts), ...].

        Ranks may hold different row counts (padded to the largest for the collective).
        """
        if not self.distributed:
            return local
        m = max(counts)
        buf = self._comm(local.new_zeros((m, *local.shape[1:])))            # [m, ...]
        buf[: local.shape[0]] = self._comm(local)
        out = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.all_gather(out, buf)
        return torch.cat([o[:c] for o, c in zip(out, counts)]).to(local.device)   # [Σ counts, ...]

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over ranks; every rank receives the same bytes."""
        if not self.distributed:
            return t
        buf = self._comm(t.clone())
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(t.device)

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank (e.g. a stop signal)."""
        if not self.distributed:
            return bool(flag)
        buf = self._comm(torch.tensor([int(bool(flag))], dtype=torch.int64))
        dist.all_reduce(buf, op=dist.ReduceOp.MAX)
        return bool(buf.item())

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled)."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    # ----------------------------------------------------------------------------------- train-loop hooks

    def check_in_sync(self, step: int, theta: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Raise :class:`ThetaDriftError` on every rank unless θ and the optimiser state are
        bit-identical everywhere (one all-gather of a 64-bit hash)."""
        if not self.distributed:
            return
        mine = state_checksum(theta, *_optimizer_tensors(optimizer))
        sums = self.all_gather_rows(torch.tensor([[mine]], dtype=torch.int64), [1] * self.world_size)
        sums = [int(v) for v in sums.reshape(-1).tolist()]
        bad = [r for r, v in enumerate(sums) if v != sums[0]]
        if bad:
            raise ThetaDriftError(
                f"θ/optimiser state drifted between processes after meta-step {step}: rank(s) {bad} differ "
                f"from rank 0 (checksums {', '.join(f'rank {r}: {v:#018x}' for r, v in enumerate(sums))}). "
                "Every rank must apply the same update bit for bit; likely causes: non-deterministic kernels, "
                "different torch builds or hardware across nodes, or ranks that loaded different checkpoints. "
                "Restart from the last checkpoint (it is written by rank 0 only).")

    def after_step(self, step: int, theta: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Called once per completed meta-step: test-only fault injection, then the periodic checksum."""
        if self.first_step is None:
            self.first_step = step
        maybe_inject_fault(self, step)
        if self.checksum_every and step % self.checksum_every == 0:
            self.check_in_sync(step, theta, optimizer)

    def resolve_run_dir(self, out_dir: str, name: str) -> tuple[Path, Path | None]:
        """Under torchrun: (``out_dir/name``, its ``checkpoints/last.pt`` if rank 0 sees one, else None).

        Rank 0 decides and broadcasts, so every rank and every elastic restart agree on one
        directory; an existing checkpoint there means "resume".
        """
        decision = None
        if self.is_main:
            rd = Path(out_dir) / name
            ck = rd / "checkpoints" / "last.pt"
            decision = (str(rd), str(ck) if ck.exists() else None)
            if ck.exists():
                for tmp in ck.parent.glob(".*.tmp"):        # left by a writer killed mid-write
                    tmp.unlink(missing_ok=True)
        rd, ck = self.broadcast_object(decision)
        if self.is_main and (ck is not None or self.restart_count):
            how = f"elastic restart {self.restart_count}" if self.restart_count else "existing run directory"
            print(f"[vsml] {how}: " + (f"resuming from {ck}" if ck else f"no checkpoint in {rd} yet, starting "
                  "from step 0"), flush=True)
        return Path(rd), (Path(ck) if ck else None)

    def load_checkpoint(self, path: str | Path) -> dict:
        """Rank 0 loads the checkpoint and broadcasts it (a load error is raised on every rank)."""
        from vsml.training.checkpoint import CheckpointError, load_checkpoint
        if not self.distributed:
            return load_checkpoint(path)
        payload = None
        if self.is_main:
            try:
                payload = ("ok", load_checkpoint(path))
            except CheckpointError as exc:
                payload = ("error", str(exc))
        status, value = self.broadcast_object(payload)
        if status != "ok":
            raise CheckpointError(value)
        return value

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def maybe_inject_fault(ctx: DistContext, step: int) -> None:
    """Test-only: ``VSML_FAULT_INJECT="RANK:STEP"`` kills that rank after meta-step STEP, first attempt only
    (restart count 0 *and* a run that started at step 0 here: the restart count alone is per node, and
    a node that rejoins after another node's failure can see 0 again)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or ctx.restart_count != 0 or ctx.first_step not in (None, 1):
        return
    try:
        r, s = (int(v) for v in spec.split(":"))
    except ValueError:
        raise ConfigError(f"{FAULT_ENV} must look like RANK:STEP (e.g. 1:3), got {spec!r}") from None
    if r == ctx.rank and s == step:
        print(f"[vsml] {FAULT_ENV}: rank {ctx.rank} exits with status {FAULT_EXIT_CODE} after meta-step {step}",
              file=sys.stderr, flush=True)
        os._exit(FAULT_EXIT_CODE)


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return default if v in (None, "") else int(v)


def init_distributed(cfg: Any) -> DistContext:
    """Join the torchrun process group described by the environment (or none) for a TrainConfig.

    Which estimators run on several processes, and with how many parts, is checked earlier, before the
    run folder exists, from the estimators' declared capabilities
    (:func:`vsml.training.preflight.check_distributed`); this checks NCCL without CUDA and the GPUs.
    """
    dcfg: DistConfig = cfg.dist
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    device = torch.device(cfg.device)
    if not launched:
        return DistContext(device=device, checksum_every=dcfg.checksum_every)
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    restart = _env_int("TORCHELASTIC_RESTART_COUNT", 0)
    backend = dcfg.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(f"dist.backend=nccl needs a CUDA device, got device={cfg.device!r}; use dist.backend "
                          "gloo (or auto) on CPU")
    if device.type == "cuda":
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank} needs GPU {local_rank} but "
                              f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} are visible; "
                              "start at most one process per GPU (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=dcfg.timeout_s)
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and _env_int("GROUP_WORLD_SIZE", 1) == 1:
            # One node: torchrun's agent keeps one TCP store across restarts, and a restarted group's
            # gloo ranks could read the dead group's addresses from it ("Connection refused" in
            # connectFullMesh; pytorch/pytorch#135712): key each attempt apart.  The restart count is
            # the single agent's, hence the same on every rank.  Several nodes: agents count restarts
            # separately, so no such key exists; launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
            # (a fresh store per rendezvous round; README, "Distributed meta-training").
            store = dist.PrefixStore(f"vsml/attempt{restart}/", store)
        kw = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout, **kw)
        owns = True
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise RuntimeError(f"process group (rank {dist.get_rank()} of {dist.get_world_size()}) does not match "
                           f"the environment (RANK={rank}, WORLD_SIZE={world})")
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, restart_count=restart, launched=True,
                       backend=backend, device=device, checksum_every=dcfg.checksum_every, owns_group=owns)


# ------------------------------------------------------------------------------------------------
# estimators


class ShardedEstimator:
    """A :class:`vsml.estimators.base.ShardableEstimator` with its parts sharded over the processes.

    Every rank holds the same global batch (ES on a GPU: only its own pairs' episodes); rank r computes
    ``partial`` for its contiguous share of the parts (:func:`shard_range`), the contributions are
    combined across ranks (all-gather of the ES member rows, or all-reduce sum of the BPTT / cloning
    gradient shares) and every rank runs the same ``reduce``, so θ stays identical without a broadcast
    (module docstring).
    """

    def __init__(self, inner: Any, ctx: DistContext):
        self.inner, self.ctx = inner, ctx

    def estimate(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                 step: int) -> tuple[torch.Tensor, dict]:
        n, world = self.inner.num_parts(x), self.ctx.world_size
        local = self.inner.partial(theta, x, y, num_classes, step, self.ctx.shard(n))
        if self.inner.combine == "gather":
            counts = [self.inner.rows_per_part * len(shard_range(n, r, world)) for r in range(world)]
            total = self.ctx.all_gather_rows(local, counts)                  # [rows of all parts, ...]
        else:
            total = self.ctx.all_reduce_sum(local)
        return self.inner.reduce(theta, total, step)


def distribute_estimator(estimator: Any, ctx: DistContext) -> Any:
    """The estimator the train loop should use on this process.

    On one process: ``estimator`` unchanged.  Under several, by the batch estimator's ``distributed``
    attribute: inside an :class:`vsml.estimators.base.EpisodeBatchEstimator`, ``"shard"`` (ES, BPTT,
    shallow cloning) is wrapped in a :class:`ShardedEstimator`, ``"replicate"`` (deep cloning: every
    rank computes the same full gradient) is kept as is; anything else has no multi-process version
    (preflight refuses such a run from the registry's declaration before it starts).
    """
    from vsml.estimators.base import EpisodeBatchEstimator
    if not ctx.distributed:
        return estimator
    mode = getattr(getattr(estimator, "inner", None), "distributed", "refuse")
    if isinstance(estimator, EpisodeBatchEstimator) and mode == "shard":
        # on a GPU a rank builds only its own parts' episodes (per-episode streams, module docstring);
        # the CPU keeps the global draw, sliced, bit-identical to the one-process run
        own = estimator.inner.takes_own_share and ctx.device.type != "cpu"
        return replace(estimator, inner=ShardedEstimator(estimator.inner, ctx),
                       shard=ctx.shard(estimator.episodes) if own else None)
    if mode == "replicate":
        if ctx.is_main:
            print(f"[vsml] {type(estimator.inner).__name__} is replicated on every process (not sharded): "
                  "no speed-up", file=sys.stderr, flush=True)
        return estimator
    raise ConfigError(f"{type(getattr(estimator, 'inner', estimator)).__name__} has no multi-process version; "
                      "run it as one process")
