"""Command lines from typed config dataclasses, built with tyro (https://brentyi.github.io/tyro).

Every CLI of the project (train.py, eval.py, ``python -m tasks``, the experiments, the cloning_deep
meta-test) is a dataclass plus one call into this module; the flags are derived from the dataclass
fields, so a field added to a config appears on every command line that uses it.

Conventions (the same for every CLI):

* a nested field ``es.sigma`` is the flag ``--es.sigma``; names keep their underscores
  (``--data_dir``); the hyphen spelling (``--data-dir``, ``--no-compile``) is accepted too;
* tuples take one comma-separated value: ``--vsml.hidden_sizes 32,64``, ``--vsml.hidden_sizes ""``,
  ``--vsml.conv c8k3s2,c16k3s1`` (element types with a ``parse`` classmethod, such as ``ConvSpec``,
  are built with it);
* ``X | None`` fields take ``none`` / ``null`` for None;
* config CLIs (``parse_config``) take booleans as values (``--log.progress false``; also 1/0, yes/no,
  on/off); script CLIs (``parse``) use plain switches (``--no_plot``) unless ``bool_values=True``;
* ``--preset NAME`` picks the starting config and every other flag overrides one of its fields; the
  config is built (and its ``__post_init__`` validation runs) once, after all flags are applied;
* a mistake (unknown flag, bad value, unknown preset, a config the dataclasses reject) prints ONE line
  ``<prog>: error: ...`` with the fix and exits with code 2; ``--help`` lists presets and every field
  with the value it takes in the chosen preset (``--preset NAME --help``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import io
import os
import re
import sys
import types
import typing
from collections.abc import Sequence
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import tyro
try:        # tyro's parse-error events (a private, experimental hook): exact one-line messages
    from tyro import _errors as _tyro_errors
    _HAS_HOOK = hasattr(_tyro_errors, "on_parse_error")
except ImportError:                    # without it, tyro's error box is condensed to one line instead
    _tyro_errors, _HAS_HOOK = None, False
from tyro.constructors import ConstructorRegistry, PrimitiveConstructorSpec, PrimitiveTypeInfo

__all__ = ["CliError", "parse", "parse_config", "fail", "flags_of"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class CliError(SystemExit):
    """A command-line mistake: raised as ``SystemExit(2)`` after its one-line message is printed."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message


def fail(prog: str, message: str) -> typing.NoReturn:
    """Print ``<prog>: error: <message>`` on one line and exit with code 2."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise CliError(message)


# ------------------------------------------------------------------------------------------------------
# value parsing rules (a tyro constructor registry: the dataclasses themselves carry no CLI annotations)

def _parse_bool(s: str) -> bool:
    t = s.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError(f"expected true/false (or 1/0, yes/no, on/off), got {s!r}")


def _element_parser(tp: Any):
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    if isinstance(tp, type) and callable(getattr(tp, "parse", None)):
        return tp.parse
    return None


def _registry(bool_values: bool) -> ConstructorRegistry:
    reg = ConstructorRegistry()

    if bool_values:
        @reg.primitive_rule
        def _bool_rule(info: PrimitiveTypeInfo):
            if info.type is not bool:
                return None
            return PrimitiveConstructorSpec(
                nargs=1, metavar="{true,false}", instance_from_str=lambda a: _parse_bool(a[0]),
                is_instance=lambda x: isinstance(x, bool), str_from_instance=lambda x: [str(x).lower()])

    @reg.primitive_rule
    def _tuple_rule(info: PrimitiveTypeInfo):       # tuple[X, ...] <- "a,b,c"
        if info.type_origin is not tuple:
            return None
        args = get_args(info.type)
        if len(args) != 2 or args[1] is not Ellipsis:
            return None
        conv = _element_parser(args[0])
        if conv is None:
            return None
        name = getattr(args[0], "__name__", "X").upper()

        def from_str(a: list[str]) -> tuple:       # commas inside [...] (analytic:sgd[alpha=2,tau=500]) stay
            return tuple(conv(p.strip()) for p in re.split(r",(?![^\[]*\])", a[0]) if p.strip())
        return PrimitiveConstructorSpec(
            nargs=1, metavar=f"{name},...", instance_from_str=from_str,
            is_instance=lambda x: isinstance(x, tuple),
            str_from_instance=lambda x: [",".join(str(v).lower() if isinstance(v, bool) else str(v) for v in x)])

    @reg.primitive_rule
    def _optional_rule(info: PrimitiveTypeInfo):     # X | None <- "none" / "null" or an X
        if info.type_origin not in (typing.Union, types.UnionType):
            return None
        args = get_args(info.type)
        inner = [a for a in args if a is not type(None)]
        if len(args) != 2 or len(inner) != 1:
            return None
        conv = _element_parser(inner[0])
        if conv is None:
            return None
        name = getattr(inner[0], "__name__", "X").upper()

        def from_str(a: list[str]):
            return None if a[0].strip().lower() in ("none", "null") else conv(a[0])
        return PrimitiveConstructorSpec(
            nargs=1, metavar=f"{name}|none", instance_from_str=from_str,
            is_instance=lambda x: x is None or isinstance(x, inner[0]),
            str_from_instance=lambda x: ["none" if x is None else str(x)])
    return reg


# ------------------------------------------------------------------------------------------------------
# flags and errors

def flags_of(cls: Any, prefix: str = "") -> list[str]:
    """Every flag (``--a.b``) a dataclass type yields: its leaf fields, nested dataclasses dotted."""
    out = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out += flags_of(tp, prefix + f.name + ".")
        else:
            out.append(f"--{prefix}{f.name}")
    return out


def _normalise(argv: Sequence[str]) -> list[str]:
    """``--data-dir`` -> ``--data_dir`` (the flags are the field names; the hyphen form is an alias)."""
    out = []
    for a in argv:
        if a.startswith("--") and len(a) > 2 and a != "--":
            name, eq, value = a.partition("=")
            a = "--" + name[2:].replace("-", "_") + eq + value
        out.append(a)
    return out


def _flag(argument: Any) -> str:
    try:
        if argument.is_positional():
            return argument.display_name().upper()
        return argument.lowered.name_or_flags[-1]
    except Exception:  # noqa: BLE001  (tyro internals: best effort)
        return str(argument)


class _Reject(Exception):
    pass


def _hook(known: list[str]):
    ev = _tyro_errors

    def hook(event: Any) -> None:
        if isinstance(event, ev.UnrecognizedArgs):
            raise _Reject(_unknown(event.tokens, known))
        if isinstance(event, ev.InvalidChoice):
            raise _Reject(f"{_flag(event.argument)}: expected one of {', '.join(event.choices)}; "
                          f"got {event.value!r}")
        if isinstance(event, ev.BadValue):
            got = "" if event.offending_value is None else f", got {event.offending_value!r}"
            raise _Reject(f"{_flag(event.argument)} needs a value ({event.argument.lowered.metavar}){got}")
        if isinstance(event, ev.MissingArgs):
            names = ", ".join(_flag(a.arg) for a in event.missing_arguments)
            raise _Reject(f"missing required argument(s): {names}")
        if isinstance(event, ev.InstantiationFailure):
            where = f"{_flag(event.argument)}: " if event.argument is not None else ""
            raise _Reject(where + " ".join(str(event.message).split()))
    return hook


def _unknown(tokens: list[str], known: list[str]) -> str:
    flags = [t for t in tokens if t.startswith("-")]
    if not flags:
        return f"unexpected argument(s) {' '.join(tokens)}"
    bad = flags[0].split("=")[0]
    near = difflib.get_close_matches(bad, known, n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]}?" if near else ""
    return f"unknown flag {bad}{hint}"


def _condense(text: str) -> str:
    """tyro's own error box -> one line: the box's first section without its title (used only when the
    parse-error hook is unavailable or an event type is new to it)."""
    body: list[str] = []
    for ln in text.splitlines():
        t = ln.strip()
        if t.startswith("╭"):             # title bar
            continue
        t = t.strip("│").strip()
        if t.startswith("╰") or (t and set(t) <= set("─ ")):   # bottom or separator: end of first section
            if body:
                break
            continue
        if t:
            body.append(t)
    return " ".join(" ".join(body).split()) or "invalid arguments"


def parse(cls: type, argv: Sequence[str] | None = None, *, prog: str | None = None,
          description: str | None = None, default: Any = None, bool_values: bool = False) -> Any:
    """Parse ``argv`` into an instance of the dataclass ``cls`` (``default``: an instance whose values
    are the defaults).  Errors: one line on stderr, ``SystemExit(2)``."""
    prog = prog or os.path.basename(sys.argv[0]) or "prog"
    args = _normalise(sys.argv[1:] if argv is None else argv)
    return _run(cls, args, prog, _all_flags(cls), bool_values, description, default)


def _run(cls: type, args: list[str], prog: str, flags: list[str], bool_values: bool,
         description: str | None = None, default: Any = None) -> Any:
    markers = [tyro.conf.FlagConversionOff] if bool_values else [tyro.conf.FlagCreatePairsOff]
    kwargs: dict[str, Any] = {} if default is None else {"default": default}
    err = io.StringIO()            # tyro's own error output, replaced by one line
    try:
        hook = _tyro_errors.on_parse_error(_hook(["--help", *flags])) if _HAS_HOOK else contextlib.nullcontext()
        with hook, contextlib.redirect_stderr(err):
            out = tyro.cli(cls, args=args, prog=prog, description=description and inspect.cleandoc(description),
                           use_underscores=True, registry=_registry(bool_values), config=markers, **kwargs)
    except BrokenPipeError:        # `--help | head`: the reader left; stop quietly like other CLIs
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0) from None
    except _Reject as exc:
        fail(prog, f"{exc} (see {prog} --help)")
    except ValueError as exc:      # __post_init__ of a config at the top level: tyro lets those through
        fail(prog, " ".join(str(exc).split()))
    except SystemExit as exc:
        if exc.code in (0, None):  # --help
            sys.stderr.write(err.getvalue())
            raise
        fail(prog, f"{_condense(err.getvalue())} (see {prog} --help)")
    sys.stderr.write(err.getvalue())   # warnings printed while the configs were built
    return out


def _all_flags(tp: Any) -> list[str]:
    """flags_of for a dataclass, or for every member of a union of subcommand dataclasses."""
    if get_origin(tp) is Annotated:
        return _all_flags(get_args(tp)[0])
    if get_origin(tp) in (typing.Union, types.UnionType):
        return [f for a in get_args(tp) for f in _all_flags(a)]
    return flags_of(tp) if dataclasses.is_dataclass(tp) else []


# ------------------------------------------------------------------------------------------------------
# config + presets

def _preset_arg(argv: list[str]) -> str | None:
    """The value of the last ``--preset`` (as for every other flag, the last one wins)."""
    found = None
    for i, a in enumerate(argv):
        if a == "--preset" and i + 1 < len(argv):
            found = argv[i + 1]
        elif a.startswith("--preset="):
            found = a.split("=", 1)[1]
    return found


def parse_config(argv: Sequence[str] | None, presets: dict[str, tuple[str, Any]], default_preset: str,
                 description: str = "", extra: type | None = None, *, prog: str | None = None
                 ) -> tuple[Any, Any]:
    """Parse ``argv`` into (config, extra options).

    presets: {name: (one-line description, config instance)}; ``--preset NAME`` picks the starting
    config (default ``default_preset``), every other config flag overrides one of its fields.
    extra: an optional dataclass of command-line-only options (e.g. train.py's ``--resume``); its
    fields are flags at the top level next to the config's.  Returns (config, extra instance or None).
    """
    prog = prog or os.path.basename(sys.argv[0]) or "prog"
    args = _normalise(sys.argv[1:] if argv is None else argv)
    name = _preset_arg(args) or default_preset
    if name not in presets:
        fail(prog, f"unknown preset {name!r}; choose one of: {', '.join(presets)}")
    base = presets[name][1]
    cfg_cls = type(base)
    epilog = "presets: (--preset NAME; the defaults shown below are the chosen preset's values)\n" + "\n".join(
        f"  {n:<12} {d}" for n, (d, _) in presets.items())
    fields: list[tuple[str, Any, Any]] = [
        ("preset", Annotated[Literal[tuple(presets)], tyro.conf.arg(  # type: ignore[misc]
            help=f"starting config (default {default_preset}); every other flag overrides one of its fields")],
         dataclasses.field(default=name)),
        ("config", Annotated[cfg_cls, tyro.conf.arg(name="")], dataclasses.field(default=base)),
    ]
    if extra is not None:
        fields.append(("extra", Annotated[extra, tyro.conf.arg(name="")], dataclasses.field(default=extra())))
    args_cls = dataclasses.make_dataclass(f"{cfg_cls.__name__}Args", fields, frozen=True)
    description = f"{inspect.cleandoc(description or '')}\n\n{epilog}"
    flags = ["--preset", *flags_of(cfg_cls), *(flags_of(extra) if extra is not None else [])]
    out = _run(args_cls, args, prog, flags, True, description)
    return out.config, (out.extra if extra is not None else None)
