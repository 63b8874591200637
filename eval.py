"""Meta-test a trained learner online on unseen tasks, next to baselines.

    python eval.py --checkpoint runs/default                          # a run directory
    python eval.py --checkpoint runs/default/theta.safetensors --tasks "digits;sum" --length 2000
    python eval.py --checkpoint runs/cpu-mnist --tasks "fashion_mnist+resize14" --data_dir ../shared/datasets
    python eval.py --baselines sgd,adam --tasks digits                # baselines only

Writes <out>/results.json (per task and learner: online accuracy, final accuracy, loss, the per-step
curve with its 95% band) and one PNG learning-curve plot per task, and prints a table.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vsml.evaluation.load import load_learner


@dataclass(frozen=True)
class EvalArgs:
    """Meta-test options (every flag: ``python eval.py --help``)."""

    checkpoint: str | None = None   # run directory, checkpoint .pt, θ .safetensors, or pretrained:NAME (see --list_pretrained)
    list_pretrained: bool = False   # list the shipped learners and exit
    tasks: str | None = None        # task specs separated by ';' (default: the run's eval tasks)
    baselines: str = "sgd,adam"     # comma-separated baselines ('' for none)
    episodes: int | None = None     # episodes per task (default 16; a badger run: its eval.episodes)
    length: int | None = None       # examples per episode (T) (default 2000; a badger run: its eval.length inner steps)
    seed: int = 22
    smooth: int = 25                # trailing window (steps) each episode's curve is averaged over before the band
    out: str | None = None          # output folder (default <run>/eval or eval_out)
    data_dir: str | None = None     # folder with the dataset files (or set VSML_DATA_DIR)
    device: str = "cpu"
    # no-grad path of a VSML learner (kernels/backend.py): auto (default: the fused Triton kernel on CUDA, the
    # C++ kernel on CPU), torch (eager), compile, cpu, triton; a forced one that cannot run is a one-line error
    backend: Literal["auto", "torch", "compile", "cpu", "triton"] | None = None
    no_compile: bool = False        # eager PyTorch path (the same as --backend torch)
    no_plot: bool = False

    def __post_init__(self):
        if (self.episodes is not None and self.episodes < 1) or (self.length is not None and self.length < 1):
            raise ValueError(f"--episodes and --length must be >= 1, got {self.episodes} and {self.length}")
        if self.no_compile and self.backend not in (None, "torch"):
            raise ValueError(f"--no-compile means --backend torch; it contradicts --backend {self.backend}")


def main(argv: list[str] | None = None) -> int:
    from vsml.training.cli import fail, parse

    args = parse(EvalArgs, argv, prog="eval.py", description=__doc__)
    if args.list_pretrained:
        from vsml.pretrained import HERE, available
        for name in available():
            print(f"pretrained:{name}    (model card: {HERE / (name + '.md')})")
        return 0
    user_episodes, user_length = args.episodes, args.length     # None: not given (a badger run uses its own)
    episodes = 16 if args.episodes is None else args.episodes
    length = 2000 if args.length is None else args.length

    from vsml.evaluation.evaluate import (
        FrozenLearner,
        evaluate,
        parse_task_list,
        summary_table,
        write_results,
    )
    from tqdm.auto import tqdm

    from vsml.learners import registry
    from vsml.training.checkpoint import CheckpointError
    from vsml.training.preflight import check_device
    from vsml.training.threads import apply_thread_policy

    def say(msg: str) -> None:
        tqdm.write(msg, file=sys.stderr)

    apply_thread_policy()
    backend = args.backend or ("torch" if args.no_compile else "auto")
    learners, tasks, out = [], args.tasks, args.out
    try:
        check_device(args.device)
        if args.checkpoint:
            say(f"[eval] loading {args.checkpoint} ...")
            name, learner, theta, cfg_dict = load_learner(args.checkpoint, args.device, backend=backend)
            from kernels.backend import check_backend
            check_backend(backend, args.device, getattr(learner, "cfg", None), learner=name)
            if hasattr(learner, "no_grad_backend"):
                print(f"[eval] {name}: backend {backend} -> {learner.no_grad_backend(theta)} on {args.device}")
            if registry.spec(name).metric == "guessing":   # Guessing Game: its meta-test, analyses, run plots
                from vsml.evaluation.badger_eval import eval_run
                return eval_run(args.checkpoint, learner, theta, cfg_dict, tasks, user_episodes, user_length,
                                args.seed, args.out, plot=not args.no_plot)
            learners.append(FrozenLearner(name, learner, theta))
            tasks = tasks or cfg_dict.get("eval", {}).get("tasks", "digits")
            if out is None:
                if args.checkpoint.startswith("pretrained:"):
                    out = f"eval_{args.checkpoint.split(':', 1)[1]}"
                else:
                    p = Path(args.checkpoint)
                    out = str((p if p.is_dir() else p.parent) / "eval")
        for b in [s.strip() for s in args.baselines.split(",") if s.strip()]:
            bl = registry.build(b)
            learners.append(FrozenLearner(b, bl, bl.init_theta()))
    except (CheckpointError, KeyError, ValueError) as exc:     # ValueError covers ConfigError / BackendError
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) and exc.args else exc}", file=sys.stderr)
        return 2
    if not learners:
        fail("eval.py", "nothing to evaluate: pass --checkpoint and/or --baselines")
    tasks = tasks or "digits"
    from tasks import DatasetError
    try:
        say(f"[eval] {len(learners)} learner(s) x {len(parse_task_list(tasks))} task(s), {episodes} episodes "
            f"x {length} examples each (seed {args.seed}) ...")
        res = evaluate(learners, parse_task_list(tasks), episodes, length, args.seed, args.data_dir,
                       smooth=max(1, args.smooth), progress=say)
    except (DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths = write_results(res, out or "eval_out", plot=not args.no_plot)
    print(summary_table(res))
    print(f"\nresults: {paths['json']}")
    for k, p in paths.items():
        if k != "json":
            print(f"plot {k}: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
