"""Issue 15 diagnostic: is the Fashion-MNIST gap the input normalisation?  Meta-tests a learner and online
SGD on Fashion-MNIST 14×14 (train split, validation seed) twice: normalised with its own train-split
statistics (background at −0.81, the protocol) and with MNIST's (background at −0.42, as the learner
saw in training).  Prints online / last-100 accuracy per learner and normalisation.

    python experiments/issue15_norm_probe.py --checkpoint pretrained:mnist14-clone-k2 --data_dir ../shared/datasets
"""
from __future__ import annotations

from dataclasses import dataclass

from tasks import make_family, sources
from vsml.evaluation.evaluate import FrozenLearner, evaluate, parse_task_list
from vsml.evaluation.load import load_learner
from vsml.learners import registry


@dataclass(frozen=True)
class NormArgs:
    """Fashion-MNIST with its own vs MNIST's normalisation."""

    checkpoint: str = "pretrained:mnist14-clone-k2"
    episodes: int = 8
    length: int = 2000
    seed: int = 101
    data_dir: str | None = None


if __name__ == "__main__":
    from vsml.training.cli import parse
    a = parse(NormArgs, prog="python experiments/issue15_norm_probe.py")
    _, learner, theta, _ = load_learner(a.checkpoint)
    sgd = registry.build("sgd")
    learners = [FrozenLearner(a.checkpoint, learner, theta), FrozenLearner("sgd", sgd, sgd.init_theta())]
    mnist_stats = make_family("mnist", data_dir=a.data_dir).source.stats()
    own_stats = sources.ArraySource.stats
    for mode in ("own statistics", "MNIST's statistics"):
        if mode != "own statistics":   # Fashion-MNIST's source normalised with MNIST's (mean, std)
            sources.ArraySource.stats = lambda self: mnist_stats if "fashion" in self.name else own_stats(self)
        res = evaluate(learners, parse_task_list("fashion_mnist+resize14"), a.episodes, a.length, a.seed,
                       a.data_dir, split="train", smooth=1)
        for task, per in res.items():
            for name, r in per.items():
                print(f"{task} ({mode}): {name:40s} online {r['online_accuracy']:.3f} last100 {r['final_accuracy']:.3f}")
    sources.ArraySource.stats = own_stats
