"""Load a trained learner from a run directory, a ``.pt`` checkpoint, a θ ``.safetensors`` file,
``pretrained:NAME`` or a hand-built ``analytic:NAME`` θ (vsml/engine/analytic.py); used by ``eval.py``,
deep-cloning comparisons and the studies."""

from __future__ import annotations

from pathlib import Path


def load_learner(path: str, device: str = "cpu", compile: bool = True, backend: str | None = None):
    """(name, learner, θ, train config dict) from a run dir, a .pt checkpoint or a θ .safetensors file.

    ``backend``: the VSML network's no-grad path (kernels/backend.py); None: "auto" if ``compile`` else
    "torch" (the run's own setting is not reused: the machine may differ)."""
    import torch

    from vsml.learners.registry import build_learner
    from vsml.training.averaging import checkpoint_theta
    from vsml.training.checkpoint import CheckpointError, load_checkpoint, load_theta
    from vsml.training.config import config_from_dict
    if path.startswith("analytic:"):
        return _load_analytic(path, device, compile, backend)
    if path.startswith("pretrained:"):
        from vsml.pretrained import path as pretrained_path
        path = str(pretrained_path(path.split(":", 1)[1]))
    p = Path(path)
    if p.suffix == ".safetensors" or (p.is_dir() and (p / "theta.safetensors").exists()
                                      and not (p / "checkpoints" / "last.pt").exists()):
        theta, cfg_dict, _ = load_theta(p if p.suffix == ".safetensors" else p / "theta.safetensors")
    else:
        ck = load_checkpoint(p)
        theta, cfg_dict = checkpoint_theta(ck), ck["config"]      # θ̄ when the run averages (--average_every)
    cfg = config_from_dict(cfg_dict)
    from dataclasses import replace
    if backend is None:
        backend = "auto" if compile else "torch"
    cfg = replace(cfg, backend=backend, device=device)
    learner = build_learner(cfg)
    want = tuple(learner.init_theta().shape)
    if tuple(theta.shape) != want:
        raise CheckpointError(f"{path}: θ has shape {list(theta.shape)} but its config ({cfg.learner}) needs {list(want)}")
    return cfg.learner, learner, theta.to(device=device, dtype=torch.float32), cfg_dict


def _load_analytic(spec: str, device: str, compile: bool, backend: str | None):
    """``analytic:NAME[...]``: the hand-built θ in its default learner config (vsml/engine/analytic.py)."""
    from vsml.engine.analytic import analytic_theta, default_config
    from vsml.learners.registry import build_learner
    from vsml.training.config import TrainConfig
    cfg = TrainConfig(name=spec, vsml=default_config(spec), device=device,
                      backend=backend or ("auto" if compile else "torch"))
    theta = analytic_theta(spec, cfg.vsml)
    return "vsml", build_learner(cfg), theta.to(device), cfg.to_dict()
