"""Statistical check that the generated tasks are learnable by online SGD on a linear softmax model (predict
first, then update, batch 1), and that nothing is learnable once the labels are shuffled."""

from __future__ import annotations

import math

import pytest
import torch

from tasks import EpisodeBatch, make_family, meta_test


def online_sgd(batch: EpisodeBatch, lr: float) -> dict[str, torch.Tensor]:
    """E independent linear softmax learners, one per episode: predict y_t from x_t, then one SGD step."""
    e, t, d = batch.x.shape
    c = batch.num_classes
    w = torch.zeros(e, d, c, dtype=torch.float64)
    b = torch.zeros(e, c, dtype=torch.float64)
    x = batch.x.double()
    correct = torch.zeros(e, t)
    loss = torch.zeros(e, t)
    eye = torch.eye(c, dtype=torch.float64)
    for step in range(t):
        xt, yt = x[:, step], batch.y[:, step]  # [E, D], [E]
        logits = torch.einsum("ed,edc->ec", xt, w) + b  # [E, C]
        correct[:, step] = (logits.argmax(dim=1) == yt).float()
        logp = torch.log_softmax(logits, dim=1)
        loss[:, step] = -logp.gather(1, yt[:, None]).squeeze(1).float()
        g = logp.exp() - eye[yt]  # dL/dlogits [E, C]
        w -= lr * xt[:, :, None] * g[:, None, :]
        b -= lr * g
    return {"correct": correct, "loss": loss}


def shuffled(batch: EpisodeBatch, seed: int) -> EpisodeBatch:
    """Labels permuted in time within each episode: same label counts, no relation to x."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.rand(batch.y.shape, generator=gen).argsort(dim=1)  # [E, T]
    return EpisodeBatch(batch.x, batch.y.gather(1, perm), batch.num_classes, batch.name + "-shuffled")


def chance(batch: EpisodeBatch) -> float:
    """Best accuracy without using x: always predicting each episode's most frequent label."""
    counts = torch.nn.functional.one_hot(batch.y, batch.num_classes).sum(dim=1).float()  # [E, C]
    return float((counts.max(dim=1).values / batch.length).mean())


CASES = [
    # spec, lr, episodes, steps, minimum margin over chance (absolute accuracy)
    ("sum", 0.0005, 8, 1000, 0.15),
    ("teacher_linear[d=16,c=5]", 0.05, 8, 1000, 0.25),
    ("teacher_mlp[d=16,c=4,h=32]", 0.05, 8, 1000, 0.15),
]


@pytest.fixture(autouse=True)
def _one_thread():
    """A 1000-step loop of tiny ops runs much faster single-threaded on a small, busy CI machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("spec, lr, episodes, steps, margin", CASES)
def test_generated_tasks_are_learnable_and_shuffled_labels_are_not(spec, lr, episodes, steps, margin):
    batch = make_family(spec).sample(episodes, steps, seed=123, split="train")
    n = episodes * steps
    base = chance(batch)
    sd = math.sqrt(base * (1 - base) / n)  # binomial std of the mean accuracy at chance level

    acc = float(online_sgd(batch, lr)["correct"].mean())
    assert acc > base + max(margin, 8 * sd), f"{spec}: accuracy {acc:.3f} vs chance {base:.3f}"

    control = shuffled(batch, seed=1)
    acc_shuffled = float(online_sgd(control, lr)["correct"].mean())
    assert acc_shuffled < base + 4 * sd, f"{spec}: shuffled accuracy {acc_shuffled:.3f} vs chance {base:.3f}"
    assert acc_shuffled > 1.0 / batch.num_classes - 4 * sd  # and it is not broken the other way


def test_meta_test_with_online_sgd():
    fam = make_family("teacher_linear[d=8,c=3]")
    res = meta_test(lambda b: online_sgd(b, lr=0.05), fam, num_episodes=6, length=300, seed=0, batch_size=4)
    assert res["num_episodes"] == 6 and res["length"] == 300 and res["split"] == "test"
    assert res["final_accuracy"] > res["online_accuracy"] > 0.5  # it learns within the episode
    assert res["curve_mean"].shape == (300,)
