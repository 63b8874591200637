"""Helpers shared by the tasks tests (imported as a plain module: tests/tasks is on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tasks.idx import write_idx

REPO = Path(__file__).resolve().parents[2]


def shared_datasets_dir() -> Path | None:
    """The real IDX files: $VSML_TEST_SHARED_DATASETS, else <repo>/../shared/datasets; None if absent."""
    env = os.environ.get("VSML_TEST_SHARED_DATASETS")
    path = Path(env) if env else REPO.parent / "shared" / "datasets"
    return path if path.is_dir() else None


def make_images(n: int, seed: int, shape=(28, 28)) -> tuple[np.ndarray, np.ndarray]:
    """n uint8 images and labels 0..9 (every class present when n >= 10)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    return images, labels


def write_mnist_style(folder: Path, sizes=(60, 30), seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write MNIST-named IDX gzip files into ``folder``; returns split -> (images, labels)."""
    out = {}
    for split, prefix, n in (("train", "train", sizes[0]), ("test", "t10k", sizes[1])):
        images, labels = make_images(n, seed + (split == "test"))
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
        out[split] = (images, labels)
    return out
