"""Data and initial states on the run's device, with per-episode streams (issue 14, item 2).

On the CPU the default draws keep the numbers of every earlier version (batch streams); on another device,
or when a subset of the episodes is asked for, the expensive per-episode draws (projection matrices, initial
states) come from per-episode streams, so a distributed rank builds only its own members and the result does
not depend on how the episodes are split.  CUDA runs the same code with CUDA generators (``-m gpu`` test).
"""

from __future__ import annotations

import pytest
import torch

from tasks import make_family
from tasks.base import sample_episodes
from vsml.engine.config import VSMLConfig
from vsml.engine.network import VSMLNetwork
from vsml.engine.params import episode_generators, truncated_normal
from vsml.estimators.core import ESEstimator
from vsml.estimators.es import ESConfig, pair_seed


def test_truncated_normal_per_row_generators():
    seeds = [11, 12, 13, 14]
    full = truncated_normal((4, 3, 5), 0.5, episode_generators(seeds))
    part = truncated_normal((2, 3, 5), 0.5, episode_generators(seeds[1:3]))
    assert torch.equal(full[1:3], part)                      # row i depends on generator i only
    assert full.abs().max() <= 1.0 + 1e-6                    # cut at ±2σ
    one = truncated_normal((3, 5), 0.5, torch.Generator().manual_seed(12))
    assert torch.equal(full[1], one)                         # a row is the single-generator draw of its seed
    with pytest.raises(ValueError, match="generators for a leading axis"):
        truncated_normal((3, 2), 1.0, episode_generators(seeds))


def test_init_state_per_episode_generators():
    net = VSMLNetwork(VSMLConfig(hidden_sizes=(4,)))
    full = net.init_state(4, 6, 3, episode_generators([1, 2, 3, 4]))
    part = net.init_state(2, 6, 3, episode_generators([3, 4]))
    for a, b in zip(full.c, part.c):
        assert torch.equal(a[2:], b)
    assert all(torch.count_nonzero(h) == 0 for h in full.h)


def test_es_initial_state_cpu_default_unchanged_and_pairs_split_invariant():
    net = VSMLNetwork(VSMLConfig())
    est = ESEstimator(net, ESConfig(pairs=4, seed=5))
    legacy = net.init_state(4, 7, 3, torch.Generator().manual_seed(pair_seed(5, 2, -1)))
    default = est.initial_state(4, 7, 3, step=2)
    assert all(torch.equal(a, b) for a, b in zip(legacy.c, default.c))        # CPU: the old numbers
    whole = est.initial_state(4, 7, 3, step=2, pairs=range(4))
    left = est.initial_state(4, 7, 3, step=2, pairs=range(1))
    right = est.initial_state(4, 7, 3, step=2, pairs=range(1, 4))
    for w, lft, r in zip(whole.c, left.c, right.c):
        assert torch.equal(w, torch.cat([lft, r]))                            # any split, same draws
    assert not torch.equal(whole.c[0], default.c[0])                          # per-pair streams differ


@pytest.mark.parametrize("spec", ["digits+classes3-5+perm+proj+labelperm", "digits+proj+noise25", "digits+affine+proj", "mix:digits+proj,digits+perm"])
def test_sample_episode_subsets_equal_the_whole(spec):
    fam = make_family(spec)
    whole = sample_episodes(fam, 5, 4, 9, "train", episodes=range(5))
    parts = [sample_episodes(fam, 5, 4, 9, "train", episodes=r) for r in (range(2), range(2, 3), range(3, 5))]
    assert torch.equal(torch.cat([p.x for p in parts]), whole.x)
    assert torch.equal(torch.cat([p.y for p in parts]), whole.y)
    assert parts[0].num_classes == whole.num_classes


def test_sample_cpu_default_keeps_batch_streams():
    fam = make_family("digits+proj")
    batch = fam.sample(3, 4, 9, "train")
    assert torch.equal(fam.sample(3, 4, 9, "train", device="cpu").x, batch.x)
    # the per-episode projections are different draws of the same distribution; everything before them is
    # shared (indices, labels)
    per_ep = fam.sample(3, 4, 9, "train", episodes=range(3))
    assert torch.equal(per_ep.y, batch.y) and not torch.equal(per_ep.x, batch.x)
    with pytest.raises(ValueError, match="contiguous range"):
        fam.sample(3, 4, 9, "train", episodes=range(0, 3, 2))
    with pytest.raises(ValueError, match="non-empty part"):
        fam.sample(3, 4, 9, "train", episodes=range(2, 5))


@pytest.mark.gpu
def test_cuda_sampling_and_states_stay_on_device_and_are_deterministic():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    fam = make_family("digits+classes3-5+perm+proj+labelperm")
    a = fam.sample(6, 5, 1, "train", device="cuda")
    b = fam.sample(6, 5, 1, "train", device="cuda")
    assert a.x.is_cuda and a.y.is_cuda and torch.equal(a.x, b.x)
    part = fam.sample(6, 5, 1, "train", device="cuda", episodes=range(2, 6))
    torch.testing.assert_close(part.x, a.x[2:], rtol=1e-6, atol=1e-6)        # bmm batch size may round
    net = VSMLNetwork(VSMLConfig())
    est = ESEstimator(net, ESConfig(pairs=4, seed=5))
    s1 = est.initial_state(4, 7, 3, step=2, device="cuda")
    s2 = est.initial_state(4, 7, 3, step=2, device="cuda", pairs=range(1, 3))
    assert s1.c[0].is_cuda and torch.equal(s1.c[0][1:3], s2.c[0])


def test_distributed_es_accepts_a_ranks_own_episodes():
    """A GPU rank gets only its pairs' episodes from the trainer (``sample_episodes`` with its shard); the
    estimate then equals the one-process estimate on the whole per-episode batch (2-rank group emulated on
    the CPU: rank 0 runs first and leaves its rows for rank 1's all-gather)."""
    from vsml.training.distributed import DistContext, ShardedEstimator

    rows: dict = {}

    class TwoRanks(DistContext):
        def all_gather_rows(self, local, counts):
            rows[self.rank] = local
            other = rows.get(1 - self.rank, torch.zeros(counts[1 - self.rank], local.shape[1]))
            return torch.cat([local, other] if self.rank == 0 else [other, local])

    net = VSMLNetwork(VSMLConfig())
    fam = make_family("digits+proj")
    cfg = ESConfig(pairs=3, seed=1)
    theta = net.init_theta(torch.Generator().manual_seed(0))
    whole = sample_episodes(fam, 3, 3, 4, "train", episodes=range(3))
    ref, _ = ESEstimator(net, cfg).estimate(theta, whole.x, whole.y, whole.num_classes, 0)
    for rank in (0, 1):
        ctx = TwoRanks(rank=rank, world_size=2)
        own = sample_episodes(fam, 3, 3, 4, "train", episodes=ctx.shard(3))
        assert own.x.shape[0] == len(ctx.shard(3))
        grad, _ = ShardedEstimator(ESEstimator(net, cfg), ctx).estimate(theta, own.x, own.y, own.num_classes, 0)
    torch.testing.assert_close(grad, ref, rtol=1e-6, atol=1e-7)        # rank 1 saw every member's loss
    with pytest.raises(ValueError, match="this rank's share"):
        ShardedEstimator(ESEstimator(net, cfg), TwoRanks(rank=0, world_size=2)).estimate(
            theta, whole.x[:2], whole.y[:2], 10, 0)
