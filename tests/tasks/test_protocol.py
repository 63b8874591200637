"""The meta-test protocol: metrics, curve and band, batching, determinism and input checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tasks import EpisodeBatch, make_family, meta_test, summarize
from tasks.protocol import moving_average


def predict_last_label(batch: EpisodeBatch) -> dict[str, torch.Tensor]:
    """A dummy online learner: predicts the previous label (0 at the first step)."""
    prev = torch.cat([torch.zeros_like(batch.y[:, :1]), batch.y[:, :-1]], dim=1)  # [E, T]
    correct = prev == batch.y
    return {"correct": correct, "loss": (~correct).float()}


def test_meta_test_metrics_and_shapes():
    fam = make_family("random")
    seen = []

    def run(batch):
        seen.append((batch.num_episodes, batch.info["split"]))
        return predict_last_label(batch)

    res = meta_test(run, fam, num_episodes=10, length=400, seed=1, batch_size=4)
    assert seen == [(4, "test"), (4, "test"), (2, "test")]
    assert res["num_episodes"] == 10 and res["length"] == 400 and res["name"] == "random"
    for key in ("curve_mean", "curve_lo", "curve_hi", "loss_curve_mean"):
        assert res[key].shape == (400,)
        assert isinstance(res[key], torch.Tensor) and res[key].dtype == torch.float64
    assert bool((res["curve_lo"] <= res["curve_mean"] + 1e-12).all())
    assert bool((res["curve_mean"] <= res["curve_hi"] + 1e-12).all())
    assert 0.0 <= float(res["curve_lo"].min()) and float(res["curve_hi"].max()) <= 1.0
    assert res["online_accuracy"] == pytest.approx(float(res["curve_mean"].mean()))
    assert res["final_accuracy"] == pytest.approx(float(res["curve_mean"][-100:].mean()))
    assert res["num_classes"] == 10 and res["chance"] == pytest.approx(0.1)
    assert res["loss"] == pytest.approx(1 - res["online_accuracy"])
    assert 0.0 < res["online_accuracy"] < 0.3  # predicting the last of 10 random labels: about 1/10
    assert res["episode_online_accuracy"].shape == (10,) and res["online_accuracy_ci95"] > 0
    again = meta_test(predict_last_label, fam, num_episodes=10, length=400, seed=1, batch_size=4)
    assert torch.equal(again["curve_mean"], res["curve_mean"])  # reproducible
    json.dumps({k: v.tolist() if torch.is_tensor(v) else v for k, v in res.items()})  # JSON-ready


def test_summarize_band_and_smoothing():
    correct = np.array([[1, 1, 0, 1], [0, 1, 0, 1]], dtype=float)
    res = summarize(correct, np.zeros_like(correct), final_window=2)
    np.testing.assert_allclose(res["curve_mean"], [0.5, 1, 0, 1])
    half = 1.96 * np.std([1, 0], ddof=1) / np.sqrt(2)
    assert res["curve_hi"][0] == pytest.approx(min(1.0, 0.5 + half))
    assert res["final_accuracy"] == pytest.approx(0.5) and res["online_accuracy"] == pytest.approx(0.625)
    np.testing.assert_allclose(moving_average(np.array([1.0, 0.0, 1.0, 1.0]), 2), [1.0, 0.5, 0.5, 1.0])
    smoothed = summarize(correct, np.zeros_like(correct), smooth=2)
    np.testing.assert_allclose(smoothed["curve_mean"], [0.5, 0.75, 0.5, 0.5])
    single = summarize(correct[:1], np.zeros((1, 4)))
    np.testing.assert_allclose(single["curve_lo"], single["curve_mean"])


def test_meta_test_rejects_bad_run_fn_output():
    fam = make_family("sum")
    with pytest.raises(KeyError, match="'correct' and 'loss'"):
        meta_test(lambda b: {"correct": torch.zeros(b.y.shape)}, fam, 2, length=10)
    with pytest.raises(ValueError, match="shape"):
        meta_test(lambda b: {"correct": torch.zeros(3), "loss": torch.zeros(3)}, fam, 2, length=10)
    with pytest.raises(ValueError):
        meta_test(predict_last_label, fam, 0, length=10)


def test_meta_test_defaults_to_2000_steps_on_the_test_split():
    res = meta_test(predict_last_label, make_family("sum"), num_episodes=2)
    assert res["length"] == 2000 and res["split"] == "test" and res["final_window"] == 100
