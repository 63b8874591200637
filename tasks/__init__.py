"""Tasks for VSML meta-training and meta-testing: datasets, task distributions and the meta-test protocol.

Main entry points:

* :func:`make_family` (spec language, e.g. ``"mnist+proj"``, ``"mix:mnist,random,sum"``, ``"all-but:kmnist"``)
  -> :class:`TaskFamily`, whose ``sample(E, T, seed, split)`` returns an :class:`EpisodeBatch`
  (x float32 [E, T, D], y int64 [E, T]);
* :func:`meta_test`: online evaluation of a frozen learner (online / final accuracy, curve with 95% band);
* :func:`load_dataset`, :func:`normalization_stats`, :func:`read_idx`, :func:`write_idx`: the data layer.
"""

from .base import SPLITS, EpisodeBatch, TaskFamily, derive_seed, numpy_rng, torch_generator
from .datasets import (
    DATASETS,
    IMAGE_DATASETS,
    PACKAGE_DATASETS,
    default_cache_dir,
    find_dataset_files,
    load_dataset,
    normalization_stats,
)
from .errors import ChecksumError, DatasetError, DatasetNotFoundError, DownloadError, IDXFormatError
from .families import Augmentation, MixtureFamily, SourceFamily
from .idx import read_idx, write_idx
from .protocol import meta_test, summarize
from .registry import (
    ALL_BUT_UNIVERSE,
    EVAL_SUITES,
    PRESETS,
    SOURCE_NAMES,
    eval_suite,
    make_family,
    parse_spec,
)

__all__ = [
    "ALL_BUT_UNIVERSE",
    "DATASETS",
    "EVAL_SUITES",
    "IMAGE_DATASETS",
    "PACKAGE_DATASETS",
    "PRESETS",
    "SOURCE_NAMES",
    "SPLITS",
    "Augmentation",
    "ChecksumError",
    "DatasetError",
    "DatasetNotFoundError",
    "DownloadError",
    "EpisodeBatch",
    "IDXFormatError",
    "MixtureFamily",
    "SourceFamily",
    "TaskFamily",
    "default_cache_dir",
    "derive_seed",
    "eval_suite",
    "find_dataset_files",
    "load_dataset",
    "make_family",
    "meta_test",
    "normalization_stats",
    "numpy_rng",
    "parse_spec",
    "read_idx",
    "summarize",
    "torch_generator",
    "write_idx",
]
