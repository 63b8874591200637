"""``python -m tasks`` (one dataclass per subcommand, parsed by ``vsml.training.cli``) and argparse options
for scripts that build task families from flags.

``python -m tasks list``                       names, modifiers, presets and eval suites
``python -m tasks show SPEC [--split test]``   sample one small batch and print its shapes and label counts
``python -m tasks download NAME ...``          fetch, verify and decode datasets now (needs network)
``python -m tasks check``                      which datasets are available without downloading
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal, Union

from tyro.conf import Positional, arg, subcommand

from .base import SPLITS, TaskFamily
from .datasets import DATASETS, IMAGE_DATASETS, default_cache_dir, find_dataset_files
from .errors import DatasetError
from .registry import ALIASES, EVAL_SUITES, MODIFIERS, PRESETS, SOURCE_NAMES, eval_suite, make_family

__all__ = ["add_task_arguments", "eval_families_from_args", "family_from_args", "main"]


def add_task_arguments(parser: argparse.ArgumentParser, *, default_tasks: str = "offline",
                       default_eval: str = "offline") -> argparse.ArgumentParser:
    """Add ``--tasks``, ``--eval-tasks``, ``--data-dir`` and ``--offline`` to a parser."""
    g = parser.add_argument_group("tasks")
    g.add_argument("--tasks", default=default_tasks,
                   help="meta-training task spec, e.g. mnist+proj, mix:mnist,random,sum, all-but:fashion_mnist, "
                        f"or a preset ({', '.join(PRESETS)}); see tasks/registry.py")
    g.add_argument("--eval-tasks", default=default_eval,
                   help=f"meta-test suite ({', '.join(EVAL_SUITES)}) or comma-separated specs")
    g.add_argument("--data-dir", default=None,
                   help="folder with the dataset files (<dir>/mnist/..., <dir>/fashion-mnist/...); "
                        "also $VSML_DATA_DIR")
    g.add_argument("--offline", action="store_true", help="never download (same as VSML_OFFLINE=1)")
    return parser


def _download_opt(args: argparse.Namespace) -> bool | None:
    return False if getattr(args, "offline", False) else None


def family_from_args(args: argparse.Namespace) -> TaskFamily:
    """The meta-training family of ``--tasks``."""
    return make_family(args.tasks, data_dir=args.data_dir, download=_download_opt(args))


def eval_families_from_args(args: argparse.Namespace) -> dict[str, TaskFamily]:
    """spec -> family for every entry of ``--eval-tasks``."""
    return {spec: make_family(spec, data_dir=args.data_dir, download=_download_opt(args))
            for spec in eval_suite(args.eval_tasks)}


@dataclass(frozen=True)
class ListCmd:
    """names, modifiers, presets, eval suites"""


@dataclass(frozen=True)
class ShowCmd:
    """sample a small batch of a spec"""

    spec: Annotated[str, arg(metavar="SPEC"), Positional]   # a task spec, e.g. mix:digits,sum+resize14
    split: Literal[SPLITS] = "train"  # the split to sample (SPLITS)
    episodes: int = 2
    length: int = 100
    seed: int = 0
    data_dir: str | None = None       # folder with the dataset files (also $VSML_DATA_DIR)
    offline: bool = False             # never download (same as VSML_OFFLINE=1)


@dataclass(frozen=True)
class DownloadCmd:
    """fetch, verify and decode datasets"""

    names: Annotated[list[str], arg(metavar="NAME"), Positional]   # dataset names, e.g. mnist fashion_mnist
    data_dir: str | None = None       # where to put them (default: the user cache or $VSML_DATA_DIR)

    def __post_init__(self):
        if not self.names:
            raise ValueError("name at least one dataset, e.g. python -m tasks download mnist")


@dataclass(frozen=True)
class CheckCmd:
    """which datasets are available offline"""

    data_dir: str | None = None       # also look here (then $VSML_DATA_DIR, the user cache)


Command = Union[Annotated[ListCmd, subcommand("list")], Annotated[ShowCmd, subcommand("show")],
                Annotated[DownloadCmd, subcommand("download")], Annotated[CheckCmd, subcommand("check")]]


def _cmd_list(_: ListCmd) -> int:
    print("task names:", ", ".join(SOURCE_NAMES))
    print("aliases:", ", ".join(f"{k}={v}" for k, v in sorted(ALIASES.items())))
    print("modifiers (join with '+'):", ", ".join(MODIFIERS))
    print("combinators: mix:a,b,c   all-but:x[,y]")
    print("guessing games (learner=badger; regression, not classification): guessing[n=3], guessing[n=3-6], "
          "sinusoid[n=41,k=1-5,decay=1]")
    print("presets:")
    for k, v in PRESETS.items():
        print(f"  {k:12s} {v if len(v) < 100 else v[:97] + '...'}")
    print("eval suites:")
    for k, v in EVAL_SUITES.items():
        print(f"  {k:12s} {', '.join(v)}")
    return 0


def _cmd_show(args: ShowCmd) -> int:
    fam = make_family(args.spec, data_dir=args.data_dir, download=_download_opt(args))
    for batch in fam.sample_many(args.episodes, args.length, args.seed, args.split):
        counts = batch.y.flatten().bincount(minlength=batch.num_classes).tolist()
        print(f"{batch.name}: x {tuple(batch.x.shape)} y {tuple(batch.y.shape)} classes {batch.num_classes} "
              f"image_shape {batch.image_shape} x mean {float(batch.x.mean()):.3f} std {float(batch.x.std()):.3f} "
              f"label counts {counts}")
    return 0


def _cmd_download(args: DownloadCmd) -> int:
    status = 0
    for name in args.names:
        try:
            make_family(name, data_dir=args.data_dir, download=True).prepare(SPLITS)
            print(f"{name}: ok")
        except (DatasetError, ValueError) as exc:
            print(f"{name}: FAILED\n{exc}", file=sys.stderr)
            status = 1
    return status


def _cmd_check(args: CheckCmd) -> int:
    print(f"user cache: {default_cache_dir()}   $VSML_DATA_DIR: {os.environ.get('VSML_DATA_DIR') or '-'}")
    for name in IMAGE_DATASETS:
        if name not in DATASETS:
            print(f"  {name:16s} ships with a Python package")
            continue
        try:
            paths = [p for split in SPLITS for p in find_dataset_files(name, split, args.data_dir, download=False)]
            print(f"  {name:16s} ok ({paths[0].parent})")
        except DatasetError as exc:
            print(f"  {name:16s} missing ({type(exc).__name__})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m tasks``."""
    from vsml.training.cli import parse

    cmd = parse(Command, argv, prog="python -m tasks", description="VSML task families and datasets")
    run = {ListCmd: _cmd_list, ShowCmd: _cmd_show, DownloadCmd: _cmd_download, CheckCmd: _cmd_check}
    return run[type(cmd)](cmd)
