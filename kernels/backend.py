"""Backend selection: one dispatch for every no-grad unroll of ``VSMLNetwork`` (ES members, PES particles,
meta-tests), and the seam where the fused Triton kernel's version is picked.

    from kernels.backend import resolve_backend, check_backend, unroll
    which = resolve_backend("auto", device, requires_grad=False, dtype=torch.float32, cfg=cfg)
    out = unroll(net, theta, x, y, num_classes=10, generator=g, backend="auto")   # EpisodeOutput

Names (``TrainConfig.backend``, ``eval.py --backend``, ``VSMLNetwork(cfg, backend=...)``):
    "torch"    the eager PyTorch path (``vsml.engine.cell.layer_update`` on the whole grid); differentiable.
    "compile"  ``torch.compile``d chunks of the layer update (``vsml.engine.cell._chunk_update``); chunks
               are cache-sized on the CPU and the whole grid (or what fits in memory) on CUDA.
    "cpu"      the hand-written C++ SIMD kernel (``kernels/cpu_vsml.py``), one call per layer update; CPU only.
    "triton"   the fused Triton kernel (``kernels/vsml_fused.py``): all T examples of an unroll in one
               launch.  CUDA, or the CPU interpreter when ``TRITON_INTERPRET=1`` was set before
               ``kernels`` was imported (tests).
    "auto"     no gradient needed: "triton" on CUDA (when it applies: triton importable, float32, dense
               layers, no ``bwd_reset``), else "compile"; "cpu" on the CPU (falling back to "compile" per
               layer update where the C++ kernel does not apply or cannot be built: the behaviour of
               ``VSMLNetwork(cfg, compile=True)`` before this switch existed); "compile" elsewhere.
               The interpreter is never chosen by "auto".

Gradients always take the autograd path: whatever the name, an unroll whose θ or state requires grad
under ``torch.enable_grad`` runs "torch" (``resolve_backend(..., requires_grad=True)`` raises only when
"triton" is forced through :func:`unroll`, the fused kernel's direct entry point).

Forcing a backend that cannot run here raises :class:`BackendError` (a ``ConfigError`` and a
``RuntimeError``) with a one-line reason: :func:`check_backend` is what ``train.py`` / ``eval.py`` call
before any work starts.

Fused-kernel versions: :func:`fused_kernel` is the one function that maps a version name ("v1", "v2") to
the kernel entry point; a new version is registered there (and in :data:`KERNELS`).
"""

from __future__ import annotations

import collections

import torch
import torch.nn.functional as F

from vsml.engine.config import ConfigError, VSMLConfig
from vsml.engine.state import EpisodeOutput, VSMLState

# kernels.vsml_fused (and triton) are imported on first use only: the torch / compile / cpu paths never
# need them, and importing triton costs ~1 s per process

BACKENDS = ("auto", "torch", "compile", "cpu", "triton")
#: fused Triton kernel versions :func:`fused_kernel` knows (v1: kernels/vsml_fused.py, v2: kernels/vsml_fused_v2.py)
KERNELS = ("v1", "v2")
DEFAULT_KERNEL = "v1"

#: fused-kernel launches per version since import (tests and benchmarks check that the kernel really ran)
KERNEL_CALLS: collections.Counter = collections.Counter()


class BackendError(ConfigError, RuntimeError):
    """A forced backend cannot run here (one line: what and why, and what to use instead)."""


# ------------------------------------------------------------------------------------------------
# the fused kernel's version seam


def fused_kernel(version: str = DEFAULT_KERNEL):
    """The fused kernel's entry point for ``version``: a function with the signature and result of
    :func:`kernels.vsml_fused.fused_episode` ``(cfg, theta, x, y, state, **options) -> FusedResult``.

    This is the only place that maps a version to its module; add a new version here."""
    if version == "v1":
        from . import vsml_fused
        return vsml_fused.fused_episode
    if version == "v2":
        from . import vsml_fused_v2
        return vsml_fused_v2.fused_episode_v2
    raise BackendError(f"unknown fused kernel version {version!r}; choose one of {KERNELS}")


def _fused_why_not(cfg: VSMLConfig | None) -> str | None:
    """Why the fused kernel cannot run this network config (None: it can)."""
    if cfg is None:
        return None
    from . import vsml_fused
    if cfg.conv:
        return "the fused kernel covers dense VSML layers only (this config has conv layers)"
    if cfg.bwd_reset:
        return "the fused kernel does not implement VSMLConfig.bwd_reset"
    if cfg.cell.hidden > vsml_fused.MAX_HIDDEN or cfg.cell.msg > vsml_fused.MAX_MSG:
        return (f"the fused kernel supports hidden <= {vsml_fused.MAX_HIDDEN} and msg <= {vsml_fused.MAX_MSG}, "
                f"got N={cfg.cell.hidden}, M={cfg.cell.msg}")
    return None


def _compile_why_not() -> str | None:
    """Why torch.compile cannot run in this interpreter (None: it can, as far as a cheap check tells)."""
    try:
        import torch._dynamo as dynamo
    except Exception as exc:   # pragma: no cover - depends on the install
        return f"torch._dynamo is not importable ({exc!r})"
    check = getattr(dynamo, "is_dynamo_supported", None)
    if check is not None and not check():
        return "torch.compile is not supported by this Python / torch build"
    return None


def _cpu_why_not(cfg: VSMLConfig | None, dev: torch.device, build: bool) -> str | None:
    if dev.type != "cpu":
        return f"backend 'cpu' is the C++ CPU kernel; the run's device is {dev} (use auto, compile or triton)"
    from . import cpu_vsml
    if cpu_vsml.mode() == "off":
        return "VSML_CPU_KERNEL=off disables the C++ CPU kernel"
    if cfg is not None and (cfg.cell.hidden != cpu_vsml.HIDDEN or cfg.cell.msg > cpu_vsml.MAX_MSG):
        return (f"the C++ CPU kernel needs N = {cpu_vsml.HIDDEN} and M <= {cpu_vsml.MAX_MSG}, got "
                f"N={cfg.cell.hidden}, M={cfg.cell.msg}")
    if build:
        ok, why = cpu_vsml.available()
        if not ok:
            return why
    return None


def resolve_backend(name: str, device, *, requires_grad: bool = False, dtype: torch.dtype = torch.float32,
                    cfg: VSMLConfig | None = None, strict_grad: bool = True) -> str:
    """Map a backend name to the one that runs: "torch", "compile", "cpu" or "triton".

    Args:
        name: one of :data:`BACKENDS`.
        device: where the tensors live (torch.device, string, or None for CPU).
        requires_grad: gradients must flow through the unroll.
        dtype: θ's dtype (the fused kernel computes in float32 only).
        cfg: the network config, when known (conv layers, bwd_reset, cell sizes decide what applies).
        strict_grad: with gradients and a forced "triton", raise (True: the kernel's direct entry point) or
            take the autograd path (False: what ``VSMLNetwork.unroll`` does, e.g. BPTT with backend=triton).
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if name == "torch":
        return "torch"
    if requires_grad and not (name == "triton" and strict_grad):
        return "torch"
    if name == "auto":
        if dev.type == "cuda":
            from . import vsml_fused
            if (vsml_fused.HAS_TRITON and not vsml_fused.INTERPRET and dtype == torch.float32
                    and _fused_why_not(cfg) is None and vsml_fused.fused_available(dev)[0]):
                return "triton"
            return "compile"
        return "cpu" if dev.type == "cpu" else "compile"
    if name == "triton":
        from . import vsml_fused
        ok, why = vsml_fused.fused_available(dev)
        if not ok:
            raise BackendError(f"backend='triton' cannot run here: {why}")
        if requires_grad:
            raise BackendError("backend='triton' is forward-only (no backward pass); gradients were requested "
                               "(θ or the state requires grad under torch.enable_grad). Use backend='torch' for "
                               "backprop meta-training, or run the unroll under torch.no_grad().")
        if dtype != torch.float32:
            raise BackendError(f"backend='triton' computes in float32 only, got θ of dtype {dtype}; cast θ and "
                               f"x with .float() or use backend='torch'")
        why = _fused_why_not(cfg)
        if why is not None:
            raise BackendError(f"backend='triton' cannot run this network: {why}; use auto, compile or torch")
        return "triton"
    if name == "cpu":
        why = _cpu_why_not(cfg, dev, build=False)
        if why is not None:
            raise BackendError(f"backend='cpu' cannot run here: {why}")
        if dtype != torch.float32:
            raise BackendError(f"backend='cpu' (the C++ kernel) computes in float32 only, got θ of dtype {dtype}")
        return "cpu"
    why = _compile_why_not()                                          # "compile"
    if why is not None:
        raise BackendError(f"backend='compile' cannot run here: {why}; use torch")
    return "compile"


def check_backend(name: str, device, cfg: VSMLConfig | None = None, learner: str = "vsml") -> None:
    """Fail early, with one line, when ``name`` is forced but cannot run on ``device`` for ``cfg``
    (builds the C++ kernel for "cpu").  "auto" and "torch" always pass.  ``learner``: backends other
    than auto/torch apply to the VSML network only."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name in ("auto", "torch"):
        return
    if learner != "vsml":
        raise BackendError(f"backend={name!r} applies to learner=vsml only (learner={learner!r} runs eager "
                           f"PyTorch); use backend auto or torch")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    resolve_backend(name, dev, cfg=cfg)
    if name == "cpu":
        why = _cpu_why_not(cfg, dev, build=True)
        if why is not None:
            raise BackendError(f"backend='cpu' cannot run here: {why}")


# ------------------------------------------------------------------------------------------------
# the fused unroll


def fused_unroll_output(cfg: VSMLConfig, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                        state: VSMLState, kernel: str = DEFAULT_KERNEL, **kernel_kwargs) -> EpisodeOutput:
    """All T examples of x [E, T, D] through the fused kernel from ``state``; loss / correct are computed
    from the kernel's logits exactly as on the torch path.  Inputs are assumed checked
    (``VSMLNetwork.check_inputs``) and y int64."""
    e, t_len, _ = x.shape
    fn = fused_kernel(kernel)
    res = fn(cfg, theta.contiguous(), x.contiguous(), y.contiguous(), state.map(torch.Tensor.contiguous),
             check_labels=False, **kernel_kwargs)
    KERNEL_CALLS[kernel] += 1
    logits = res.logits
    loss = F.cross_entropy(logits.reshape(-1, num_classes), y.reshape(-1), reduction="none").reshape(e, t_len)
    correct = logits.argmax(-1) == y
    return EpisodeOutput(logits, loss, correct, res.state)


def _needs_grad(theta: torch.Tensor, state: VSMLState | None) -> bool:
    if not torch.is_grad_enabled():
        return False
    tensors = [theta] + ([] if state is None else [*state.h, *state.c, *state.bwd])
    return any(torch.is_tensor(t) and t.requires_grad for t in tensors)


def unroll(net, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
           num_classes: int | None = None, state: VSMLState | None = None,
           generator: torch.Generator | None = None, backend: str = "auto", kernel: str = DEFAULT_KERNEL,
           **kernel_kwargs) -> EpisodeOutput:
    """``net.unroll`` (a ``VSMLNetwork``) with an explicit backend; same arguments, same ``EpisodeOutput``.

    Unlike ``VSMLNetwork.unroll`` a forced "triton" with gradients requested raises instead of taking the
    autograd path.  ``kernel_kwargs`` go to the fused kernel (block_a, use_dot, precision, num_warps)."""
    if not torch.is_tensor(theta):
        raise TypeError(f"θ must be a torch.Tensor, got {type(theta).__name__}")
    which = resolve_backend(backend, theta.device, requires_grad=_needs_grad(theta, state), dtype=theta.dtype,
                            cfg=net.cfg)
    if which != "triton":
        if kernel_kwargs:
            raise TypeError(f"kernel options {sorted(kernel_kwargs)} only apply to the triton backend")
        return net.unroll(theta, x, y, num_classes=num_classes, state=state, generator=generator, backend=which)
    x, num_classes = net.check_inputs(theta, x, y, num_classes, state)
    y = y.long()
    if state is None:
        state = net.init_state(x.shape[0], x.shape[2], num_classes, generator, theta.dtype, theta.device)
    return fused_unroll_output(net.cfg, theta, x, y, num_classes, state, kernel=kernel, **kernel_kwargs)
