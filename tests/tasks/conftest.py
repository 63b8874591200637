"""Shared fixtures of the tasks tests: no network, a private cache folder, tiny IDX datasets."""

from __future__ import annotations

import urllib.request

import pytest
from tasks_helpers import write_mnist_style

import tasks.datasets as ds
from tasks.datasets import FileSpec, file_md5, replace_info


@pytest.fixture(autouse=True)
def _isolated_data_env(tmp_path, monkeypatch):
    """Every test: offline, its own cache folder, no $VSML_DATA_DIR, and no network access at all."""
    monkeypatch.setenv("VSML_OFFLINE", "1")
    monkeypatch.setenv("VSML_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VSML_DATA_DIR", raising=False)
    monkeypatch.setattr(ds, "DOWNLOAD_BACKOFF_S", 0.0)
    real_urlopen = urllib.request.urlopen

    def guarded_urlopen(req, *args, **kwargs):
        url = req.full_url if isinstance(req, urllib.request.Request) else str(req)
        if not url.startswith("file:"):
            raise AssertionError(f"network access attempted in a test: {url}")
        return real_urlopen(req, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", guarded_urlopen)
    yield


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """A tiny 'mnist' (60 train / 30 test) in <tmp>/data/mnist/, registered with its own checksums.

    Returns (data_dir, arrays, set_table) where set_table(**changes) patches DATASETS['mnist'] further.
    """
    data_dir = tmp_path / "data"
    arrays = write_mnist_style(data_dir / "mnist")
    files = {
        split: tuple(FileSpec(n, file_md5(data_dir / "mnist" / n)) for n in names)
        for split, names in (("train", ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")),
                             ("test", ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")))
    }
    info = replace_info("mnist", files=files, num_items={"train": 60, "test": 30}, mirrors=())
    monkeypatch.setitem(ds.DATASETS, "mnist", info)
    ds.clear_memory_cache()

    def set_table(**changes):
        monkeypatch.setitem(ds.DATASETS, "mnist", replace_info("mnist", **changes))
        ds.clear_memory_cache()

    yield data_dir, arrays, set_table
    ds.clear_memory_cache()
