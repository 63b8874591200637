"""Meta-train a learned learning algorithm.

    python train.py                                   # the default job (offline, ~10 min on 2 CPU cores)
    python train.py --preset tiny                     # seconds-long smoke run
    python train.py --preset bptt --steps 500         # backprop meta-training
    python train.py --preset cpu-mnist --data_dir ../shared/datasets
    python train.py --resume runs/default             # continue a run exactly where it stopped
    python train.py --help                            # every preset and field

Writes runs/<name>/: config.json, metrics.jsonl, checkpoints/last.pt, theta.safetensors and the final
meta-test (meta_test/results.json + PNG curves).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from vsml.training.checkpoint import CheckpointError, load_checkpoint
    from vsml.training.cli import parse_config
    from vsml.engine.config import ConfigError
    from vsml.training.presets import PRESETS
    from tasks import DatasetError
    from vsml.training.config import config_from_dict
    from vsml.training.trainer import train

    def extra(p):
        p.add_argument("--resume", default=None, metavar="RUN",
                       help="resume a run directory (or checkpoint .pt); its saved config is used, "
                            "with any flags given here applied on top (e.g. a larger --steps)")

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if "--resume" in argv or any(a.startswith("--resume=") for a in argv):
            # start from the saved config, then apply the user's overrides
            import argparse
            p = argparse.ArgumentParser(add_help=False)
            p.add_argument("--resume")
            ns, _ = p.parse_known_args(argv)
            saved = config_from_dict(load_checkpoint(ns.resume)["config"])
            presets = {"resumed": ("the config saved in the checkpoint", saved), **PRESETS}
            cfg, ns = parse_config(argv, presets, "resumed", __doc__, extra)
        else:
            cfg, ns = parse_config(argv, PRESETS, "default", __doc__, extra)
        train(cfg, resume=ns.resume)
    except (ConfigError, CheckpointError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
