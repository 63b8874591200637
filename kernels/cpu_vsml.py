"""Hand-written SIMD C++ kernel for the VSML layer update on CPU (``kernels/csrc/vsml_cpu.cpp``).

One call runs one dense-layer update of the whole ``[E, A, B]`` grid (shared/reference/vsml.md §1.2-1.3):
the message terms F = W_f →m, R = W_r ←m + β (§7.2), all ``micro_ticks`` micro-steps with frozen
messages, and both readouts with their means (→m'_b = mean_a φ_ab, ←m'_a = mean_b ψ_ab; mean-then-project
without LayerNorm, §7.3) accumulated inside the kernel.  No [E, A, B, 4N] tensor is ever formed.

    from kernels import cpu_vsml
    ok, why = cpu_vsml.available()                    # builds on first use (~1 min), then cached
    h2, c2, fwd_out, bwd_out = cpu_vsml.layer_update(cfg, p, fwd_in, bwd_in, h, c)

``VSMLNetwork(cfg, compile=True)`` uses it on its no-grad path when it applies (see :func:`applies`) and
``VSML_CPU_KERNEL`` allows it (``auto``, the default: when the build has AVX2 or AVX-512; ``on``: always,
a failed build raises; ``off``: never, the torch.compile path).
Anything the kernel does not cover (N != 16, M > 16, non-float32, non-CPU tensors, autograd) returns
``None`` from :func:`try_layer_update` so the caller runs the torch.compile path instead.

Build: ``torch.utils.cpp_extension.load`` into the default torch extensions cache
(``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``) with ``-O3 -march=native -fopenmp`` when the
compiler accepts ``-march=native`` (else a portable ``-O3`` build); the extension name carries a hash of
the CPU's flags and the ISA, so a cache shared between different machines never loads a foreign build.
When nothing can be built (no compiler, no headers) one warning line is printed and the torch.compile
path is used.  ``VSML_CPU_ISA=avx512|avx2|scalar`` forces a variant (``native`` = best the compiler
targets, the default).
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

from vsml.engine.config import VSMLConfig
from vsml.engine.params import CellParams, theta_size

SOURCE = Path(__file__).resolve().parent / "csrc" / "vsml_cpu.cpp"
ISAS = ("native", "avx512", "avx2", "scalar")
FAST_ISAS = ("avx512", "avx2")   # what ``auto`` uses; a native build without AVX2 is slower than torch.compile
MODES = ("auto", "on", "off")
HIDDEN = 16           # the kernel's N: one 16-float vector
MAX_MSG = 16

_lock = threading.Lock()
_modules: dict[str, object] = {}
_errors: dict[str, str] = {}
_warned = False


def mode() -> str:
    """``VSML_CPU_KERNEL``: auto (default; use the kernel where it applies and the build has AVX2 or AVX-512),
    on (use it wherever it applies, also the portable build; a build failure raises), off (never use it)."""
    m = os.environ.get("VSML_CPU_KERNEL", "auto").strip().lower() or "auto"
    if m not in MODES:
        raise ValueError(f"VSML_CPU_KERNEL={m!r}; choose one of {MODES}")
    return m


def _cpu_tag() -> str:
    """A short hash of the CPU model and flags: a native build is only reused on the same kind of CPU."""
    info = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    info += line
                if line.startswith("flags"):
                    break
    except OSError:
        info += platform.processor()
    return hashlib.sha1(info.encode()).hexdigest()[:8]


def _compiler_accepts(flag: str) -> bool:
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "t.cpp"
        src.write_text("int main() { return 0; }\n")
        try:
            r = subprocess.run([cxx, flag, "-c", str(src), "-o", str(Path(d) / "t.o")],
                               capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return r.returncode == 0


def _flags(isa: str) -> list[str]:
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-DNDEBUG"]
    if isa == "native":
        if _compiler_accepts("-march=native"):
            flags.append("-march=native")
    elif isa == "avx512":
        flags += ["-march=native", "-DVSML_CPU_ISA=512"]
    elif isa == "avx2":
        flags += ["-mavx2", "-mfma", "-DVSML_CPU_ISA=2"]
    elif isa == "scalar":
        flags += ["-DVSML_CPU_ISA=0"]
    return flags


class _Ops:
    """The extension's ops (registered with TORCH_LIBRARY under the build's own namespace)."""

    def __init__(self, ns):
        self.layer_update = ns.layer_update
        self._code = int(ns.isa_code())

    def isa(self) -> str:
        return {512: "avx512", 2: "avx2", 0: "scalar"}[self._code]


BUILD_NOTICE_S = 2.0    # a load taking longer than this is a (re)build: say so while the user waits


def _say(msg: str) -> None:
    """A line on stderr that does not tangle a live tqdm bar."""
    try:
        from tqdm.auto import tqdm
        tqdm.write(msg, file=sys.stderr)
    except ImportError:
        print(msg, file=sys.stderr)
    sys.stderr.flush()


def load(isa: str | None = None, verbose: bool = False):
    """Build (first time, printed with its duration) or load the extension module; raises on failure.

    ``isa``: one of :data:`ISAS` (default ``VSML_CPU_ISA`` or ``native``)."""
    isa = (isa or os.environ.get("VSML_CPU_ISA", "native")).strip().lower()
    if isa not in ISAS:
        raise ValueError(f"unknown ISA {isa!r}; choose one of {ISAS}")
    with _lock:
        if isa in _modules:
            return _modules[isa]
        if isa in _errors:
            raise RuntimeError(_errors[isa])
        from torch.utils import cpp_extension
        name = f"vsml_cpu_{isa}_{_cpu_tag()}"
        t0 = time.perf_counter()
        try:
            build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
            before = {f: f.stat().st_mtime for f in build_dir.glob("*.so")}
            flags = _flags(isa) + [f"-DVSML_NS={name}"]
            # a (re)build is a one-off wait of ~20-60 s: say so if loading takes more than a moment
            notice = threading.Timer(BUILD_NOTICE_S, _say, args=(
                f"[kernels.cpu_vsml] building the CPU kernel ({isa}) for this machine; this takes ~20-60 s "
                f"once, later runs load it from {build_dir} ...",))
            notice.daemon = True
            notice.start()
            try:
                cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=flags,
                                   extra_ldflags=["-fopenmp"], is_python_module=False, verbose=verbose)
            finally:
                notice.cancel()
            mod = _Ops(getattr(torch.ops, name))
        except Exception as exc:   # no compiler, no Python headers, unsupported flags, ...
            msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}"
            _errors[isa] = f"could not build the CPU kernel ({isa}): {msg}"
            raise RuntimeError(_errors[isa]) from exc
        if {f: f.stat().st_mtime for f in build_dir.glob("*.so")} != before:     # it was (re)built
            _say(f"[kernels.cpu_vsml] built the CPU kernel ({mod.isa()}, {' '.join(flags)}) in "
                 f"{time.perf_counter() - t0:.1f} s -> {build_dir}")
        _modules[isa] = mod
        return mod


def available(isa: str | None = None) -> tuple[bool, str]:
    """(True, isa name) if the kernel builds/loads here, else (False, why)."""
    try:
        return True, load(isa).isa()
    except RuntimeError as exc:
        return False, str(exc)


def applies(cfg: VSMLConfig, theta_set: torch.Tensor | None = None, *tensors: torch.Tensor) -> bool:
    """Whether the kernel covers this layer update: N = 16, M <= 16, float32 CPU tensors, no autograd."""
    if cfg.cell.hidden != HIDDEN or cfg.cell.msg > MAX_MSG:
        return False
    for t in ((theta_set,) if theta_set is not None else ()) + tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu" or t.requires_grad:
            return False
    return True


def flat_theta(p: CellParams, cfg: VSMLConfig) -> torch.Tensor:
    """The θ set behind the named views ``p`` as ``[1, P]`` (shared) or ``[E, P]`` (per episode).

    ``vsml.engine.params.unflatten`` makes every field a view into one θ set, W first; when that layout is intact
    the set is recovered without a copy (a strided view of the original θ), otherwise it is re-assembled
    in the storage order of ``vsml.engine.params.param_shapes``."""
    size = theta_size(cfg.cell)
    m = cfg.cell.msg
    w = p.W_f                                                     # [*b, 4N, M], the first field
    batch = w.shape[:-2]
    last = p.b_xphi if p.bilinear else (p.ln_bwd_b if p.ln_bwd_b is not None else p.b_bwd)   # the last field
    intact = (w.stride(-1) == 1 and w.stride(-2) == 2 * m + HIDDEN and last.stride(-1) == 1
              and last.storage_offset() + last.shape[-1] - w.storage_offset() == size
              and last.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
              and (len(batch) == 0 or last.stride(0) == w.stride(0)))
    if intact:
        if len(batch) == 0:
            return w.as_strided((1, size), (size, 1), w.storage_offset())
        return w.as_strided((batch[0], size), (w.stride(0), 1), w.storage_offset())
    W = torch.cat([p.W_f, p.W_r, p.W_h], -1)                       # [*b, 4N, 2M+N]
    parts = [W, p.beta, p.W_fwd, p.b_fwd, p.W_bwd, p.b_bwd]
    if p.ln_fwd_g is not None:
        parts += [p.ln_fwd_g, p.ln_fwd_b, p.ln_bwd_g, p.ln_bwd_b]
    if p.bilinear:
        parts += [p.W_xe, p.W_xphi, p.b_xphi]
    flat = torch.cat([t.reshape(*batch, -1) for t in parts], -1)  # [*b, P]
    return flat.reshape(-1, size)


def layer_update(cfg: VSMLConfig, p: CellParams, fwd_in: torch.Tensor, bwd_in: torch.Tensor,
                 h: torch.Tensor, c: torch.Tensor, isa: str | None = None):
    """One layer update through the kernel (no autograd).

    fwd_in [E, A, M], bwd_in [E, B, M], h, c [E, A, B, N]  ->  h', c' [E, A, B, N], →m' [E, B, M],
    ←m' [E, A, M]: the same as ``vsml.engine.cell.layer_update`` (to float32 rounding)."""
    mod = load(isa)
    th = flat_theta(p, cfg).contiguous()                           # [1 | E, P]
    return tuple(mod.layer_update(th, fwd_in.contiguous(), bwd_in.contiguous(), h.contiguous(),
                                  c.contiguous(), cfg.micro_ticks, cfg.cell.layer_norm, cfg.cell.ln_eps,
                                  cfg.cell.bilinear))


def try_layer_update(cfg: VSMLConfig, p: CellParams, fwd_in: torch.Tensor, bwd_in: torch.Tensor,
                     h: torch.Tensor, c: torch.Tensor):
    """:func:`layer_update` if the kernel is enabled, applies and builds; ``None`` otherwise (the caller
    falls back to the torch.compile path).  A failed build warns once (``VSML_CPU_KERNEL=on``: raises)."""
    global _warned
    m = mode()
    if m == "off" or not applies(cfg, p.beta, fwd_in, bwd_in, h, c):
        return None
    try:
        mod = load()
    except RuntimeError as exc:
        if m == "on":
            raise
        if not _warned:
            _warned = True
            warnings.warn(f"{exc}; using the torch.compile path instead", RuntimeWarning, stacklevel=3)
        return None
    if m == "auto" and mod.isa() not in FAST_ISAS and "VSML_CPU_ISA" not in os.environ:
        # the portable build is several times slower than torch.compile's vectorised code
        if not _warned:
            _warned = True
            warnings.warn(f"the CPU kernel built without AVX2/AVX-512 ({mod.isa()}); using the torch.compile "
                          f"path (VSML_CPU_KERNEL=on forces the kernel)", RuntimeWarning, stacklevel=3)
        return None
    return layer_update(cfg, p, fwd_in, bwd_in, h, c)
