"""Meta-train a learned learning algorithm.

    python train.py                                   # the default job (offline; measured time: README)
    python train.py --preset tiny                     # seconds-long smoke run
    python train.py --preset bptt --steps 500         # backprop meta-training
    python train.py --preset cpu-mnist --data_dir ../shared/datasets
    python train.py --resume runs/default             # continue a run exactly where it stopped
    python train.py --help                            # every preset and field

Writes runs/<name>/: config.json, metrics.jsonl, checkpoints/last.pt, theta.safetensors, the final
meta-test (meta_test/results.json + PNG curves) and training_curves.png.  --steps counts the steps
after the clone.steps cloning steps.  Exit codes: 0 done, 2 a mistake in the command (one error
line, no run folder left), 3 the run diverged (last good checkpoint kept), 128+N a signal.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainArgs:
    """Options of this command line that are not part of the run's config."""

    # resume a run directory (or checkpoint .pt); its saved config is the starting point, with any flags
    # given here applied on top (e.g. a larger --steps)
    resume: str | None = None


def main(argv: list[str] | None = None) -> int:
    from tasks import DatasetError
    from vsml.engine.config import ConfigError
    from vsml.training.checkpoint import CheckpointError, load_checkpoint
    from vsml.training.cli import parse, parse_config
    from vsml.training.config import config_from_dict
    from vsml.training.presets import PRESETS
    from vsml.training.threads import apply_thread_policy
    from vsml.training.trainer import DivergenceError, train

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        presets, default = PRESETS, "default"
        if any(a == "--resume" or a.startswith("--resume=") for a in argv):
            # start from the saved config, then apply the user's overrides
            resume = parse(TrainArgs, _resume_tokens(argv), prog="train.py").resume
            saved = config_from_dict(load_checkpoint(resume)["config"])
            presets, default = {"resumed": ("the config saved in the checkpoint", saved), **PRESETS}, "resumed"
        cfg, extra = parse_config(argv, presets, default, __doc__, TrainArgs, prog="train.py")
        apply_thread_policy()
        train(cfg, resume=extra.resume)
    except (ConfigError, CheckpointError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DivergenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    return 0


def _resume_tokens(argv: list[str]) -> list[str]:
    """The ``--resume RUN`` / ``--resume=RUN`` tokens of ``argv``."""
    for i, a in enumerate(argv):
        if a.startswith("--resume="):
            return [a]
        if a == "--resume":
            return argv[i:i + 2]
    return []


if __name__ == "__main__":
    sys.exit(main())
