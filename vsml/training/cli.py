"""Command-line parsing for nested config dataclasses, with named presets.

A dataclass field ``es.sigma`` becomes the flag ``--es.sigma``; booleans take ``true/false``;
tuples take comma-separated values (``--vsml.hidden_sizes 32`` or ``--vsml.hidden_sizes ""``).
``--preset NAME`` picks a starting config; every other flag overrides a field of it.
``--help`` lists the presets and every field with its type and the preset's value.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable, Literal, get_args, get_origin, get_type_hints


def _field_types(cls) -> dict[str, Any]:
    return get_type_hints(cls)


def flatten(cfg: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """{dotted name: (type, value)} for every leaf field of a (nested) dataclass instance."""
    out: dict[str, tuple[Any, Any]] = {}
    hints = _field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        name = prefix + f.name
        if dataclasses.is_dataclass(v):
            out.update(flatten(v, name + "."))
        else:
            out[name] = (hints[f.name], v)
    return out


def _parse_bool(s: str) -> bool:
    t = s.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _converter(tp: Any) -> Callable[[str], Any]:
    origin, args = get_origin(tp), get_args(tp)
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    if origin is Literal:
        def lit(s: str):
            for a in args:
                if str(a) == s:
                    return a
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(map(str, args))}; got {s!r}")
        return lit
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        conv = _converter(inner[0])

        def opt(s: str):
            return None if s.strip().lower() in ("none", "null") else conv(s)
        return opt
    if origin is tuple:
        elem = _converter(args[0]) if args else str

        def tup(s: str):
            return tuple(elem(p.strip()) for p in s.split(",") if p.strip())
        return tup
    return str


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if origin is tuple:
        return "comma-list"
    if origin in (typing.Union, types.UnionType):
        return "|".join(_type_name(a) for a in args)
    return getattr(tp, "__name__", str(tp))


def replace_dotted(cfg: Any, name: str, value: Any) -> Any:
    """Return a copy of ``cfg`` with the dotted field ``name`` set to ``value``."""
    head, _, rest = name.partition(".")
    if rest:
        return dataclasses.replace(cfg, **{head: replace_dotted(getattr(cfg, head), rest, value)})
    return dataclasses.replace(cfg, **{head: value})


def parse_config(argv: list[str] | None, presets: dict[str, tuple[str, Any]], default_preset: str,
                 description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None
                 ) -> tuple[Any, argparse.Namespace]:
    """Parse ``argv`` into (config, namespace of the extra arguments).

    presets: {name: (one-line description, config instance)}.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=default_preset)
    known, _ = pre.parse_known_args(argv)
    if known.preset not in presets:
        raise SystemExit(f"unknown preset {known.preset!r}; choose one of: {', '.join(presets)}")
    base = presets[known.preset][1]

    epilog = "presets:\n" + "\n".join(f"  {n:<14} {d}" for n, (d, _) in presets.items())
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=default_preset, choices=list(presets),
                        help=f"starting config (default {default_preset}); flags below override it")
    if extra is not None:
        extra(parser)
    group = parser.add_argument_group(f"config fields (values shown are preset {known.preset!r})")
    leaves = flatten(base)
    for name, (tp, value) in leaves.items():
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        group.add_argument(f"--{name}", dest=f"cfg__{name}", type=_converter(tp), default=None,
                           metavar=_type_name(tp), help=f"(default: {shown})")
    ns = parser.parse_args(argv)
    # apply every override to a plain dict first, then build (and validate) the config once, so that
    # flags that are only consistent together (e.g. --learner metarnn --clone.steps 0) are accepted
    values = dataclasses.asdict(base)
    given = []
    for name in leaves:
        v = getattr(ns, f"cfg__{name}")
        if v is not None:
            d = values
            *path, last = name.split(".")
            for part in path:
                d = d[part]
            d[last] = v
            given.append(f"--{name}={v!r}")
    try:
        cfg = rebuild(type(base), values)
    except (ValueError, TypeError) as exc:
        parser.error(f"{exc} (flags given: {' '.join(given) or 'none'})")
    return cfg, ns


def rebuild(cls, values: dict[str, Any]) -> Any:
    """Construct a (nested) dataclass from ``dataclasses.asdict``-style values (inner configs first)."""
    hints = _field_types(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        v = values[f.name]
        tp = hints[f.name]
        if isinstance(v, dict) and isinstance(tp, type) and dataclasses.is_dataclass(tp):
            v = rebuild(tp, v)
        kwargs[f.name] = v
    return cls(**kwargs)
