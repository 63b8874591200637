"""The real MNIST and Fashion-MNIST IDX files in shared/datasets (skipped cleanly when absent)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tasks_helpers import shared_datasets_dir

from tasks import make_family
from tasks.datasets import (
    DATASETS,
    file_md5,
    find_dataset_files,
    load_dataset,
    normalization_stats,
    verify_file,
)

SHARED = shared_datasets_dir()
pytestmark = pytest.mark.skipif(SHARED is None, reason="shared/datasets not present")

MNIST_COUNTS = {
    "train": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
    "test": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
}
FASHION_COUNTS = {"train": [6000] * 10, "test": [1000] * 10}


@pytest.fixture(scope="module")
def real():
    """Both datasets, both splits, loaded once (no disk cache, no download)."""
    return {
        (name, split): load_dataset(name, split, SHARED, download=False, cache=False)
        for name in ("mnist", "fashion_mnist")
        for split in ("train", "test")
    }


@pytest.mark.parametrize("name, counts", [("mnist", MNIST_COUNTS), ("fashion_mnist", FASHION_COUNTS)])
@pytest.mark.parametrize("split, n", [("train", 60000), ("test", 10000)])
def test_shapes_labels_checksums(real, name, counts, split, n):
    images, labels = real[(name, split)]
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), counts[split])
    img_path, lbl_path = find_dataset_files(name, split, SHARED, download=False)
    for path, spec in zip((img_path, lbl_path), DATASETS[name].files[split]):
        assert path.parent.parent == SHARED
        assert verify_file(path, spec) == spec.md5 == file_md5(path)  # MD5 and SHA-256 both checked


def test_own_normalization_statistics(real):
    mnist = normalization_stats("mnist", SHARED, download=False, cache=False)
    fashion = normalization_stats("fashion_mnist", SHARED, download=False, cache=False)
    assert mnist == pytest.approx((0.13066, 0.30811), abs=5e-5)  # the well-known MNIST values
    assert fashion == pytest.approx((0.28604, 0.35302), abs=5e-5)
    assert abs(mnist[0] - fashion[0]) > 0.1  # Fashion-MNIST does not reuse MNIST's statistics


def test_real_episodes(real):
    fam = make_family("fashion_mnist+classes3+resize14", data_dir=str(SHARED), download=False, cache=False)
    b = fam.sample(4, 100, seed=0, split="test")
    assert b.x.shape == (4, 100, 196) and b.num_classes == 3 and torch.isfinite(b.x).all()
    full = make_family("mnist", data_dir=str(SHARED), download=False, cache=False).sample(8, 2000, 0, "test")
    for e in range(8):
        assert torch.unique(full.x[e], dim=0).shape[0] >= 1990  # without replacement (MNIST has few duplicates)
