"""Sources: where the raw (un-normalised, un-augmented) examples of a task family come from.

A :class:`Source` draws ``x`` [E, T, *shape] float32 on its natural scale (pixels in [0, 1] for image
datasets) and ``y`` [E, T] int64, optionally restricted to a per-episode class subset. The
:class:`~tasks.families.SourceFamily` then resizes, normalises with :meth:`Source.stats`, flattens and
augments. Sources defined here:

* :class:`ArraySource`: a fixed array of examples per split (datasets and the fixed ``random`` set);
* :class:`DatasetSource`: an :class:`ArraySource` over :func:`tasks.datasets.load_dataset`;
* the generated sources live in :mod:`tasks.generated`.
"""

from __future__ import annotations

import abc
import threading
import warnings
from collections.abc import Callable

import numpy as np
import torch

from .augment import relabel_to_subset, sample_indices
from .base import SPLITS, torch_generator
from .datasets import dataset_image_shape, dataset_num_classes, load_dataset, normalization_stats

__all__ = ["ArraySource", "DatasetSource", "Source"]


class Source(abc.ABC):
    """Raw example generator of one task family.

    Attributes:
        name: short name (``mnist``, ``sum``, ...).
        num_classes: C.
        image_shape: (H, W) for image data (enables resizing), ``None`` otherwise.
        feature_shape: shape of one example, (H, W) or (D,).
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int] | None
    feature_shape: tuple[int, ...]

    @property
    def input_dim(self) -> int:
        """D = number of features of one (un-resized) example."""
        return int(np.prod(self.feature_shape))

    def stats(self) -> tuple[float, float]:
        """Scalar (mean, std) used to normalise this source's inputs; (0, 1) unless overridden."""
        return 0.0, 1.0

    def prepare(self, split: str) -> None:
        """Load the data of ``split`` now (no-op for generated sources)."""

    def present_classes(self, split: str) -> torch.Tensor | None:
        """int64 [C'] classes that have examples in ``split`` when that is not all of them; None = all present.
        Random class subsets are drawn among these."""
        return None

    @abc.abstractmethod
    def draw(
        self, num_episodes: int, length: int, seed: int, split: str, subsets: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw raw episodes.

        Args:
            subsets: optional int64 [E, k] class ids per episode; then only those classes appear and the labels
                are their positions 0..k-1 in the row.

        Returns:
            x float32 [E, T, *feature_shape], y int64 [E, T].
        """

    def _relabel_full_subsets(self, y: torch.Tensor, subsets: torch.Tensor | None) -> torch.Tensor:
        """Default subset support for sources that cannot filter classes: only subsets of all C classes (a
        relabelling) are allowed."""
        if subsets is None:
            return y
        if subsets.shape[1] != self.num_classes:
            raise ValueError(
                f"{self.name}: class subsets of size {subsets.shape[1]} are not supported (only all "
                f"{self.num_classes} classes, i.e. a relabelling)"
            )
        return relabel_to_subset(y, subsets, self.num_classes)


class ArraySource(Source):
    """Episodes drawn from a fixed array of examples per split.

    Each episode draws ``length`` examples uniformly: without replacement when ``length`` <= pool size (the
    pool is the split, or the examples of the episode's class subset), as consecutive random permutations
    (epoch-wise) when longer, or always with replacement if ``replacement=True``. One gather ``data[idx]`` with
    idx [E, T] builds the whole batch.

    Args:
        name, num_classes, feature_shape, image_shape: see :class:`Source`.
        loader: split -> (data [N, *feature_shape] uint8 (scaled by 1/255) or float, labels int [N]).
        stats_fn: () -> (mean, std) for normalisation (computed from the train split by default).
        replacement: always sample with replacement.
    """

    def __init__(
        self,
        name: str,
        num_classes: int,
        feature_shape: tuple[int, ...],
        image_shape: tuple[int, int] | None,
        loader: Callable[[str], tuple[np.ndarray, np.ndarray]],
        stats_fn: Callable[[], tuple[float, float]] | None = None,
        replacement: bool = False,
    ) -> None:
        self.name = name
        self.num_classes = int(num_classes)
        self.feature_shape = tuple(feature_shape)
        self.image_shape = image_shape
        self._loader = loader
        self._stats_fn = stats_fn
        self.replacement = replacement
        self._splits: dict[str, dict[str, torch.Tensor]] = {}
        self._stats: tuple[float, float] | None = None
        self._lock = threading.Lock()

    def _split(self, split: str) -> dict[str, torch.Tensor]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        with self._lock:
            if split not in self._splits:
                data, labels = self._loader(split)
                with warnings.catch_warnings():  # the cached arrays are read-only; we never write to them
                    warnings.simplefilter("ignore", UserWarning)
                    data_t = torch.from_numpy(np.ascontiguousarray(data))  # [N, *feature_shape], no copy
                if tuple(data_t.shape[1:]) != self.feature_shape:
                    raise ValueError(
                        f"{self.name}/{split}: examples of shape {tuple(data_t.shape[1:])}, expected {self.feature_shape}"
                    )
                labels_t = torch.from_numpy(np.asarray(labels, dtype=np.int64).copy())  # [N]
                if labels_t.numel() == 0:
                    raise ValueError(f"{self.name}/{split}: no examples")
                if int(labels_t.min()) < 0 or int(labels_t.max()) >= self.num_classes:
                    raise ValueError(f"{self.name}/{split}: labels outside [0, {self.num_classes})")
                order = labels_t.argsort(stable=True)  # [N] example indices grouped by class
                counts = torch.bincount(labels_t, minlength=self.num_classes)  # [C]
                offsets = counts.cumsum(0) - counts  # [C] start of each class inside `order`
                self._splits[split] = {"data": data_t, "labels": labels_t, "order": order,
                                       "counts": counts, "offsets": offsets}
            return self._splits[split]

    def prepare(self, split: str) -> None:
        self._split(split)

    def present_classes(self, split: str) -> torch.Tensor | None:
        counts = self._split(split)["counts"]
        return None if bool((counts > 0).all()) else (counts > 0).nonzero().squeeze(1)

    def num_examples(self, split: str) -> int:
        """N of a split (loads it)."""
        return int(self._split(split)["labels"].numel())

    def stats(self) -> tuple[float, float]:
        if self._stats is None:
            if self._stats_fn is not None:
                self._stats = self._stats_fn()
            else:
                data = self._split("train")["data"]
                vals = data.to(torch.float64) / (255.0 if data.dtype == torch.uint8 else 1.0)
                self._stats = (float(vals.mean()), float(vals.std(unbiased=False)))
            if not self._stats[1] > 0:
                raise ValueError(f"{self.name}: zero standard deviation, cannot normalise")
        return self._stats

    def draw_indices(self, num_episodes, length, seed, split, subsets) -> tuple[torch.Tensor, torch.Tensor]:
        """The host-side half of :meth:`draw`: example indices int64 [E, T] into the split and labels int64
        [E, T] (CPU; O(E·T) work, from the batch's ``indices`` stream)."""
        s = self._split(split)
        gen = torch_generator(seed, split, "indices")
        e, t = num_episodes, length
        if subsets is None:
            pool = torch.full((e,), s["labels"].numel(), dtype=torch.int64)  # [E]
            real = sample_indices(pool, t, gen, replacement=self.replacement)  # [E, T]
            y = s["labels"][real]  # [E, T]
        else:
            subsets = subsets.cpu()
            sub_counts = s["counts"][subsets]  # [E, k]
            cum = sub_counts.cumsum(1)  # [E, k] end (exclusive) of each subset class in the virtual pool
            pool = cum[:, -1]  # [E]
            if bool((pool == 0).any()):
                bad = subsets[(pool == 0).nonzero()[0, 0]].tolist()
                raise ValueError(f"{self.name}/{split}: no examples of classes {bad}; choose other classes")
            v = sample_indices(pool, t, gen, replacement=self.replacement)  # [E, T] positions in the pool
            j = torch.searchsorted(cum, v, right=True)  # [E, T] subset slot: cum[j-1] <= v < cum[j]
            start = (cum - sub_counts).gather(1, j)  # [E, T] first pool position of that class
            cls = subsets.gather(1, j)  # [E, T] original class id
            real = s["order"][s["offsets"][cls] + (v - start)]  # [E, T] example index
            y = j
        return real, y

    def gather(self, real: torch.Tensor, split: str, device: torch.device | str | None = None) -> torch.Tensor:
        """x float32 [E, T, *feature_shape] = the split's examples ``real`` [E, T], built on ``device``: the
        split's data is copied there once (uint8 MNIST: 47 MB) and gathered there, so only the indices
        travel per batch."""
        s = self._split(split)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type == "cpu":
            data = s["data"]
        else:
            key = f"data@{dev}"
            with self._lock:
                if key not in s:
                    s[key] = s["data"].to(dev)
                data = s[key]
        x = data[real.to(dev)]  # [E, T, *feature_shape]
        return x.to(torch.float32).div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float32)

    def draw(self, num_episodes, length, seed, split, subsets):
        real, y = self.draw_indices(num_episodes, length, seed, split, subsets)
        return self.gather(real, split), y


class DatasetSource(ArraySource):
    """An :class:`ArraySource` over an image dataset of :mod:`tasks.datasets` (loaded lazily, on first use).

    Normalisation uses the dataset's own train-split statistics (:func:`tasks.datasets.normalization_stats`).
    """

    def __init__(self, name: str, data_dir: str | None = None, download: bool | None = None,
                 cache: bool = True) -> None:
        shape = dataset_image_shape(name)
        super().__init__(
            name=name,
            num_classes=dataset_num_classes(name),
            feature_shape=shape,
            image_shape=shape,
            loader=lambda split: load_dataset(name, split, data_dir, download=download, cache=cache),
            stats_fn=lambda: normalization_stats(name, data_dir, download=download, cache=cache),
        )
        self.data_dir = data_dir
