"""Generated tasks (no files needed): ``random``, ``sum``, random teachers, and ``mnist1d``.

* ``random`` (memorisation, vsml.md §3.4): a **fixed** set of ``n`` = 20 examples x ~ N(0, 1) of shape 28x28
  with labels uniform over 10 classes; the train and test splits use different fixed sets (both derived from
  the ``data_seed``, default 0, so they are the same in every process). Episodes draw from the set with
  replacement, so in a 2000-step episode each example appears about 100 times.
* ``sum`` ("sum sign", 2 classes): an infinite stream; x ~ TruncatedNormal(mean u, std 1, cut at u +- 2) of
  shape 28x28 with u ~ U(-1, 1) drawn per example; label 1 if sum(x) >= 0, else 0.
* ``teacher_linear`` / ``teacher_mlp``: x ~ N(0, I_D); a teacher drawn **per episode** (linear: W [D, C] with
  entries N(0, 1/D); MLP: tanh(x W1) W2 with W1 [D, H] ~ N(0, 1/D), W2 [H, C] ~ N(0, 1/H)); the label is the
  argmax of the teacher's logits. D, C and H are configurable (defaults 64, 10, 64).
* ``mnist1d``: the MNIST-1D signals (Greydanus 2020; 4000 train / 1000 test signals of length 40, 10 classes),
  built offline by the optional ``mnist1d`` package from its templates (seed 42). Without the package a
  :class:`DatasetNotFoundError` says how to install it.

The generated inputs are already on a unit scale, so their normalisation is the identity (mean 0, std 1),
except ``mnist1d``, normalised with its train-split mean and std.
"""

from __future__ import annotations

import functools
import math
import random as _py_random

import numpy as np
import torch

from .base import numpy_rng, torch_generator, truncated_normal
from .errors import DatasetNotFoundError
from .sources import ArraySource, Source

__all__ = ["MNIST1DSource", "RandomSource", "SumSource", "TeacherSource", "load_mnist1d", "truncated_normal"]


class RandomSource(ArraySource):
    """The ``random`` memorisation task: a fixed set of ``num_examples`` Gaussian images with random labels per
    split, sampled with replacement. Same set in every process (derived from ``data_seed``)."""

    def __init__(self, num_examples: int = 20, num_classes: int = 10, side: int = 28, data_seed: int = 0) -> None:
        if num_examples < 1 or num_classes < 2 or side < 1:
            raise ValueError("random: need n >= 1, c >= 2, side >= 1")

        def loader(split: str) -> tuple[np.ndarray, np.ndarray]:
            rng = numpy_rng(data_seed, split, "random-set")
            x = rng.standard_normal((num_examples, side, side)).astype(np.float32)  # [n, side, side]
            y = rng.integers(0, num_classes, size=num_examples)  # [n]
            return x, y

        super().__init__(
            name="random",
            num_classes=num_classes,
            feature_shape=(side, side),
            image_shape=(side, side),
            loader=loader,
            stats_fn=lambda: (0.0, 1.0),
            replacement=True,
        )


class SumSource(Source):
    """The ``sum`` task: label = [sum(x) >= 0] for x ~ TruncatedNormal(u, 1) with u ~ U(-1, 1) per example."""

    def __init__(self, side: int = 28) -> None:
        self.name = "sum"
        self.num_classes = 2
        self.feature_shape = (side, side)
        self.image_shape = (side, side)

    def draw(self, num_episodes, length, seed, split, subsets):
        gen = torch_generator(seed, split, "sum")
        e, t = num_episodes, length
        u = torch.rand(e, t, generator=gen) * 2.0 - 1.0  # [E, T] per-example mean
        x = truncated_normal((e, t, *self.feature_shape), 1.0, gen)  # [E, T, H, W]
        x.add_(u[:, :, None, None])
        y = (x.sum(dim=(2, 3)) >= 0).to(torch.int64)  # [E, T]
        return x, self._relabel_full_subsets(y, subsets)


class TeacherSource(Source):
    """Random-teacher classification: x ~ N(0, I_D), label = argmax of a per-episode random teacher.

    Args:
        kind: ``"linear"`` (logits x W) or ``"mlp"`` (logits tanh(x W1) W2).
        input_dim: D. num_classes: C. hidden: H (MLP only).

    Class subsets of size k keep k of the teacher's C output columns (the argmax is over those), so every
    subset size is supported.
    """

    def __init__(self, kind: str = "linear", input_dim: int = 64, num_classes: int = 10, hidden: int = 64) -> None:
        if kind not in ("linear", "mlp"):
            raise ValueError(f"teacher kind must be 'linear' or 'mlp', got {kind!r}")
        if input_dim < 1 or num_classes < 2 or hidden < 1:
            raise ValueError("teacher: need d >= 1, c >= 2, h >= 1")
        self.kind = kind
        self.name = f"teacher_{kind}"
        self.num_classes = int(num_classes)
        self.feature_shape = (int(input_dim),)
        self.image_shape = None
        self.hidden = int(hidden)

    def draw(self, num_episodes, length, seed, split, subsets):
        e, t, d, c = num_episodes, length, self.feature_shape[0], self.num_classes
        gen_x = torch_generator(seed, split, "teacher-x")
        gen_w = torch_generator(seed, split, "teacher-w")
        x = torch.randn(e, t, d, generator=gen_x)  # [E, T, D]
        if self.kind == "linear":
            w_out = torch.randn(e, d, c, generator=gen_w) / math.sqrt(d)  # [E, D, C]
            feats = x
        else:
            w1 = torch.randn(e, d, self.hidden, generator=gen_w) / math.sqrt(d)  # [E, D, H]
            w_out = torch.randn(e, self.hidden, c, generator=gen_w) / math.sqrt(self.hidden)  # [E, H, C]
            feats = torch.tanh(torch.bmm(x, w1))  # [E, T, H]
        if subsets is not None:
            k = subsets.shape[1]
            w_out = w_out.gather(2, subsets[:, None, :].expand(e, w_out.shape[1], k))  # [E, D|H, k]
        y = torch.bmm(feats, w_out).argmax(dim=2)  # [E, T] in 0..C-1 (or 0..k-1 with a subset)
        return x, y


@functools.lru_cache(maxsize=1)
def load_mnist1d() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Build MNIST-1D offline with the ``mnist1d`` package's default arguments (seed 42): split ->
    (x float32 [N, 40], y int64 [N]). The package seeds Python's and NumPy's global RNGs; their states are
    saved and restored around the call."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise DatasetNotFoundError(
            "task 'mnist1d' needs the optional package mnist1d (pip install mnist1d); it generates the "
            "MNIST-1D signals offline from templates written in its code."
        ) from exc
    np_state, py_state = np.random.get_state(), _py_random.getstate()
    try:
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        _py_random.setstate(py_state)
    return {
        "train": (np.asarray(d["x"], dtype=np.float32), np.asarray(d["y"], dtype=np.int64)),
        "test": (np.asarray(d["x_test"], dtype=np.float32), np.asarray(d["y_test"], dtype=np.int64)),
    }


class MNIST1DSource(ArraySource):
    """MNIST-1D signals (length 40, 10 classes) as an :class:`ArraySource`; needs the ``mnist1d`` package."""

    def __init__(self) -> None:
        super().__init__(
            name="mnist1d",
            num_classes=10,
            feature_shape=(40,),
            image_shape=None,
            loader=lambda split: load_mnist1d()[split],
        )

