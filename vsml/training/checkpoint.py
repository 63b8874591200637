"""Checkpoints: full training state (resume) and θ-only files (evaluation, release).

* ``<run>/checkpoints/last.pt`` (and ``step_<n>.pt`` when kept): a ``torch.save`` dict of plain
  tensors, ints and dicts (loads with ``weights_only=True``): ``format``, ``theta``, ``optimizer``,
  ``rng``, ``step``, ``config`` (the resolved config as a dict), ``versions``, ``extra``.
* ``<run>/theta.safetensors``: θ only, with ``metadata = {"format", "config" (JSON), "step"}``.

Every write goes to a temporary file in the same folder, is fsync-ed, then renamed over the
target, so a crash or a kill never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "vsml-ckpt-v1"
THETA_FORMAT = "vsml-theta-v1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not fit the requested config."""


def versions() -> dict[str, str]:
    out = {"torch": str(torch.__version__), "python": platform.python_version()}
    try:
        import triton
        out["triton"] = str(triton.__version__)
    except Exception:  # noqa: BLE001 - triton is optional
        pass
    from vsml import __version__
    out["vsml"] = __version__
    return out


def atomic_write(path: str | Path, write_fn) -> None:
    """Call ``write_fn(tmp_path)``, fsync, then rename onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)        # mkstemp creates 0600; give the file normal permissions
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    def w(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)
    atomic_write(path, w)


def save_checkpoint(path: str | Path, *, theta: torch.Tensor, optimizer: dict, rng: dict, step: int,
                    config: dict[str, Any], extra: dict | None = None) -> None:
    payload = {"format": FORMAT, "theta": theta.detach().cpu().clone(), "optimizer": optimizer, "rng": rng,
               "step": int(step), "config": config, "versions": versions(), "extra": extra or {}}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint; a clear ``CheckpointError`` for a missing, corrupt or foreign file."""
    path = Path(path)
    if path.is_dir():
        cand = path / "checkpoints" / "last.pt"
        if not cand.exists():
            raise CheckpointError(f"no checkpoint in run directory {path} (expected {cand}); "
                                  "pass a run directory written by train.py or a .pt checkpoint file")
        path = cand
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)   # never weights_only=False (unsafe)
    except Exception as exc:  # noqa: BLE001 - any unpickling / zip error means a corrupt or foreign file
        raise CheckpointError(_unreadable_message(path, exc)) from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        got = ck.get("format") if isinstance(ck, dict) else type(ck).__name__
        raise CheckpointError(f"{path} is not a vsml checkpoint (expected format {FORMAT!r}, found {got!r}); "
                              "pass a run directory or a checkpoints/*.pt file written by train.py")
    for key in ("theta", "optimizer", "rng", "step", "config"):
        if key not in ck:
            raise CheckpointError(f"checkpoint {path} lacks the field {key!r}; it is incomplete or corrupt")
    ck["path"] = str(path)
    return ck


def _unreadable_message(path: Path, exc: Exception) -> str:
    """A corrupt / foreign .pt: say so, and point to what in the same run is still usable."""
    import pickle
    import zipfile
    foreign = isinstance(exc, pickle.UnpicklingError) and "weights_only" in str(exc)
    what = ("is not a vsml checkpoint (it holds pickled Python objects; vsml loads .pt files with "
            "weights_only=True only)" if foreign else f"is corrupt or not a vsml checkpoint ({type(exc).__name__})")
    if isinstance(exc, (zipfile.BadZipFile, EOFError)):
        what = f"is corrupt (truncated or damaged: {type(exc).__name__})"
    msg = f"checkpoint {path} {what}"
    run = path.parent.parent if path.parent.name == "checkpoints" else None
    if run is not None:
        olders = sorted(p for p in path.parent.glob("step_*.pt") if p != path)
        hints = []
        if (run / "theta.safetensors").exists():
            hints.append(f"the run's θ is intact in {run / 'theta.safetensors'} (evaluate it with eval.py "
                         f"--checkpoint {run / 'theta.safetensors'}, or start a new run from it with --init_from "
                         f"{run / 'theta.safetensors'})")
        if olders:
            hints.append(f"resume from an older checkpoint: python train.py --resume {olders[-1]}")
        if hints:
            msg += "; " + "; or ".join(hints)
        else:
            msg += "; restart the run"
    return msg


def save_theta(path: str | Path, theta: torch.Tensor, config: dict[str, Any], step: int,
               extra_metadata: dict[str, str] | None = None) -> None:
    """θ-only release file (safetensors), config stored as a JSON string in the metadata."""
    from safetensors.torch import save_file
    meta = {"format": THETA_FORMAT, "config": json.dumps(config), "step": str(int(step))}
    meta.update(extra_metadata or {})
    atomic_write(path, lambda tmp: save_file({"theta": theta.detach().cpu().contiguous()}, tmp, metadata=meta))


def load_theta(path: str | Path) -> tuple[torch.Tensor, dict[str, Any], dict[str, str]]:
    """Returns (θ, config dict, metadata)."""
    from safetensors import safe_open
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"θ file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            theta = fh.get_tensor("theta")
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path} is corrupt or not a safetensors θ file ({exc})") from exc
    if meta.get("format") != THETA_FORMAT:
        raise CheckpointError(f"{path} is not a {THETA_FORMAT} file (format={meta.get('format')!r})")
    return theta, json.loads(meta["config"]), meta
