"""Command-line helpers: shared argparse options for the train / eval scripts, and ``python -m tasks``.

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


def _cmd_list(_: argparse.Namespace) -> int:
    print("task names:", ", ".join(SOURCE_NAMES))
    print("aliases:", ", ".join(f"{k}={v}" for k, v in sorted(ALIASES.items())))
    print("modifiers (join with '+'):", ", ".join(MODIFIERS))
    print("combinators: mix:a,b,c   all-but:x[,y]")
    print("presets:")
    for k, v in PRESETS.items():
        print(f"  {k:12s} {v if len(v) < 100 else v[:97] + '...'}")
    print("eval suites:")
    for k, v in EVAL_SUITES.items():
        print(f"  {k:12s} {', '.join(v)}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    fam = make_family(args.spec, data_dir=args.data_dir, download=_download_opt(args))
    for batch in fam.sample_many(args.episodes, args.length, args.seed, args.split):
        counts = batch.y.flatten().bincount(minlength=batch.num_classes).tolist()
        print(f"{batch.name}: x {tuple(batch.x.shape)} y {tuple(batch.y.shape)} classes {batch.num_classes} "
              f"image_shape {batch.image_shape} x mean {float(batch.x.mean()):.3f} std {float(batch.x.std()):.3f} "
              f"label counts {counts}")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    status = 0
    for name in args.names:
        try:
            make_family(name, data_dir=args.data_dir, download=True).prepare(SPLITS)
            print(f"{name}: ok")
        except (DatasetError, ValueError) as exc:
            print(f"{name}: FAILED\n{exc}", file=sys.stderr)
            status = 1
    return status


def _cmd_check(args: argparse.Namespace) -> int:
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
    parser = argparse.ArgumentParser(prog="python -m tasks", description="VSML task families and datasets")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="names, modifiers, presets, eval suites")
    show = sub.add_parser("show", help="sample a small batch of a spec")
    show.add_argument("spec")
    show.add_argument("--split", default="train", choices=SPLITS)
    show.add_argument("--episodes", type=int, default=2)
    show.add_argument("--length", type=int, default=100)
    show.add_argument("--seed", type=int, default=0)
    dl = sub.add_parser("download", help="fetch, verify and decode datasets")
    dl.add_argument("names", nargs="+")
    sub.add_parser("check", help="which datasets are available offline")
    for p in (show, dl, sub.choices["check"]):
        p.add_argument("--data-dir", default=None)
    show.add_argument("--offline", action="store_true")
    args = parser.parse_args(argv)
    return {"list": _cmd_list, "show": _cmd_show, "download": _cmd_download, "check": _cmd_check}[args.cmd](args)
