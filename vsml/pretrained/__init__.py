"""Shipped, pretrained learned learning algorithms (θ only, safetensors with their config).

``python eval.py --checkpoint pretrained:NAME`` evaluates one; each has a model card ``NAME.md`` here.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.safetensors"))


def path(name: str) -> Path:
    p = HERE / f"{name}.safetensors"
    if not p.exists():
        raise KeyError(f"no pretrained learner named {name!r}; available: {', '.join(available()) or 'none'}")
    return p
