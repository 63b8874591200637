"""The VSML network in PyTorch: sub-LSTM grids, message passing, tick schedules, online episodes.

This is the reference path of the project (the fused Triton kernel in ``kernels/`` is tested
against it).  Equations are those of ``shared/reference/vsml.md``:

* one sub-LSTM micro-step (§1.2)::

      u = [→m_a, ←m_b, h_ab]                   (2M + N)
      ĩ, g̃, f̃, õ = split4(W u + β)
      c' = σ(f̃ + 5) ⊙ c + σ(ĩ − 5) ⊙ tanh(g̃)
      h' = σ(õ) ⊙ tanh(c')
      φ = W_fwd h' + b_fwd,   ψ = W_bwd h' + b_bwd      (optionally LayerNorm-ed)

* a dense layer (§1.3): the micro-step runs ``micro_ticks`` times on every (a, b) pair with the
  incoming messages frozen; then →m'_b = mean_a φ_ab and ←m'_a = mean_b ψ_ab;
* boundaries (§1.4): pixel x_a in forward element ``input_idx``; logit
  ŷ_b = bound · tanh(κ·→m_b[output_idx] / bound) (κ = ``logit_scale``, 1 in the reference); error
  e = softmax(ŷ) − onehot(y) in backward element ``error_idx`` and, with ``feed_label``, the label in
  element ``label_idx``;
* schedules (§1.5): forward-only (one sweep per example; e_t enters the last layer at tick t+1
  and moves back one layer per tick) or backward-pass (forward sweep, then a reverse sweep
  carrying e_t down, then the error is reset).

Cheap formulation (vsml.md §7.2-7.3): W is split by columns into W_f, W_r, W_h so the message
terms ``→m_a W_fᵀ`` [E, A, 4N] and ``←m_b W_rᵀ`` [E, B, 4N] broadcast over the grid instead of
materialising [E, A, B, 2M+N]; without LayerNorm the readouts are mean-then-project
(mean_a(W h + b) = W mean_a(h) + b), so only one small matmul per layer and direction.

Batching: a leading episode axis E everywhere; θ is either shared ([L, P]) or one set per
episode ([E, L, P], an ES population).  No Python loop runs over sub-LSTMs or episodes; the
only Python loops are over time, layers and micro-ticks.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from vsml.engine.config import VSMLConfig
from vsml.engine.params import CellParams, check_theta, unflatten
from vsml.engine.cell import _chunk_update, _expand_to_grid, _linear, layer_update
from vsml.engine.state import EpisodeOutput, VSMLState, init_state

#: sub-LSTMs per compiled chunk on the no-grad path (measured on a 2-core AVX-512 CPU: chunks of
#: ~16k pairs keep the gates in cache and run 1.4-1.7x faster than the whole grid at once)
CHUNK_PAIRS = 16384
#: the names of ``kernels.backend.BACKENDS`` (kept here so the eager path never imports ``kernels``)
BACKENDS = ("auto", "torch", "compile", "cpu", "triton")
#: bytes of temporaries per sub-LSTM (in units of N floats) a compiled chunk may hold on CUDA: gates
#: (4N), h, c in and out (4N), message terms and readouts; generous, so a chunk never runs out of memory
CUDA_FLOATS_PER_PAIR_PER_N = 16
#: fraction of the free CUDA memory one compiled chunk may use
CUDA_CHUNK_MEMORY_FRACTION = 0.25


def read_logits(cfg: VSMLConfig, m: torch.Tensor) -> torch.Tensor:
    """The read-out of the logits from the last layer's output element: ŷ = bound · tanh(κ·m / bound), with
    bound = ``cfg.tanh_bound`` and κ = ``cfg.logit_scale`` (m [..., C] -> ŷ [..., C]).  The one place this is
    written in PyTorch (the Triton kernels repeat it); κ = 1 is bitwise the reference read-out."""
    bound = cfg.tanh_bound
    return bound * torch.tanh(m * cfg.logit_scale / bound)


def chunk_inputs(e: int, a: int, b: int, n: int, device: torch.device) -> int:
    """Inputs a per compiled chunk of a [E, A, B] layer update (device-aware).

    CPU: ``CHUNK_PAIRS // (E·B)`` (cache-sized chunks, measured fastest).  CUDA: the whole grid when its
    temporaries fit in a quarter of the free memory, else as many inputs as do (never cache-sized
    chunks: on a GPU every chunk is a launch, and E=2048 x B=10 would give one launch per input).
    Other devices: the whole grid."""
    if device.type == "cpu":
        return max(1, CHUNK_PAIRS // (e * b))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        per_input = e * b * n * CUDA_FLOATS_PER_PAIR_PER_N * 4             # bytes per input a
        return max(1, min(a, int(free * CUDA_CHUNK_MEMORY_FRACTION) // per_input))
    return a


# --------------------------------------------------------------------------------------------
# the network


class VSMLNetwork:
    """Functional VSML network: θ and the state are passed in, nothing is stored but the config.

    Typical use::

        net = VSMLNetwork(VSMLConfig())
        theta = net.init_theta(torch.Generator().manual_seed(0))           # [1, 2384]
        out = net.unroll(theta, x, y, num_classes=10, generator=g)        # x [E, T, D], y [E, T]
        out2 = net.unroll(theta, x2, y2, state=out.state)                 # continue the episode
    """

    meta_trainable = True
    #: init_state draws on the generator's device (a CUDA generator keeps the draw on the GPU), and takes a
    #: list of per-episode generators (vsml.learners.base.state_generator, ESEstimator.initial_state)
    device_generators = True

    def __init__(self, cfg: VSMLConfig, compile: bool = False, backend: str | None = None, kernel: str = "v1"):
        """``backend`` picks the no-grad path (``kernels/backend.py``): "auto" (the fused Triton kernel on
        CUDA, the C++ kernel on the CPU, torch.compile chunks otherwise), "torch" (eager), "compile",
        "cpu" or "triton".  With autograd on, the eager path always runs.  ``backend=None`` keeps the
        older switch: ``compile=True`` means "auto", ``compile=False`` "torch".  ``kernel``: the fused
        kernel's version (``kernels.backend.fused_kernel``).  The first compiled call per shape compiles
        (seconds to a minute on a small CPU)."""
        self.cfg = cfg
        if backend is None:
            backend = "auto" if compile else "torch"
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        self.backend = backend
        self.kernel = kernel
        self.compile = backend != "torch"
        self._chunk_fn = None
        # no-grad path: the hand-written CPU kernel (kernels/cpu_vsml.py) where it applies, builds and
        # VSML_CPU_KERNEL is not 'off'; False forces the torch.compile chunks (under backend auto / cpu)
        self.cpu_kernel = True

    def no_grad_backend(self, theta: torch.Tensor, state: VSMLState | None = None,
                        backend: str | None = None) -> str:
        """The path an unroll of θ (and ``state``) takes now: "torch", "compile", "cpu" or "triton"
        (``kernels.backend.resolve_backend``; autograd -> "torch")."""
        grad = torch.is_grad_enabled() and (theta.requires_grad or (state is not None and any(
            t.requires_grad for t in (*state.h, *state.c, *state.bwd))))
        name = backend or self.backend
        if name == "torch" or grad:
            return "torch"
        from kernels.backend import resolve_backend
        return resolve_backend(backend or self.backend, theta.device, requires_grad=grad, dtype=theta.dtype,
                               cfg=self.cfg, strict_grad=False)

    def _chunked_layer(self, p: CellParams, fwd_in, bwd_in, h, c, mode: str = "cpu"):
        """No-grad layer update.  ``mode`` "cpu": the C++ kernel when it applies (auto: else fall through;
        a forced backend="cpu" raises instead), "compile": the compiled chunk function, looping over
        chunks of inputs a (:func:`chunk_inputs`: cache-sized on the CPU, memory-sized on CUDA)."""
        if mode == "cpu" and self.cpu_kernel:
            try:
                from kernels.cpu_vsml import try_layer_update
            except ImportError:                                 # kernels/ not installed next to vsml/
                self.cpu_kernel = False
            else:
                out = try_layer_update(self.cfg, p, fwd_in, bwd_in, h, c)
                if out is not None:
                    return out
                if self.backend == "cpu":
                    from kernels.backend import BackendError
                    raise BackendError("backend='cpu': the C++ kernel does not apply to this layer update "
                                       "(float32 CPU tensors, N=16, M<=16, no autograd) or could not be built")
        if self._chunk_fn is None:
            import torch._dynamo.config as dcfg
            # one graph per chunk shape and θ mode: ES populations, meta-test batches, several tasks
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(dcfg, name):
                    setattr(dcfg, name, max(getattr(dcfg, name), 64))
            self._chunk_fn = torch.compile(_chunk_update, dynamic=False)
        e, a, b, _ = h.shape
        f_term = _linear(fwd_in, p.W_f)                         # [E, A, 4N]
        r_term = _linear(bwd_in, p.W_r, p.beta)                 # [E, B, 4N]
        xs, es = (fwd_in[..., 0], bwd_in[..., 0]) if p.bilinear else (None, None)   # [E, A], [E, B]
        step = chunk_inputs(e, a, b, self.cfg.cell.hidden, h.device)
        if step >= a:
            h2, c2, fsum, bwd_out = self._chunk_fn(p, f_term, r_term, h, c, self.cfg.micro_ticks, self.cfg.cell.ln_eps,
                                                   xs, es)
        else:
            h2, c2 = torch.empty_like(h), torch.empty_like(c)
            bwd_out = h.new_empty(e, a, self.cfg.cell.msg)
            fsum = 0
            for a0 in range(0, a, step):
                a1 = min(a, a0 + step)
                hh, cc, fs, bo = self._chunk_fn(p, f_term[:, a0:a1], r_term, h[:, a0:a1], c[:, a0:a1],
                                                self.cfg.micro_ticks, self.cfg.cell.ln_eps,
                                                None if xs is None else xs[:, a0:a1], es)
                h2[:, a0:a1], c2[:, a0:a1], bwd_out[:, a0:a1] = hh, cc, bo
                fsum = fsum + fs
        fwd_out = fsum / a                                      # mean over a, [E, B, M]
        if p.ln_fwd_g is None:
            fwd_out = fwd_out + _expand_to_grid(p.b_fwd, 3)
        return h2, c2, fwd_out, bwd_out

    # -- parameters and state ---------------------------------------------------------------

    def init_theta(self, generator: torch.Generator | None = None, dtype=torch.float32, device=None):
        from vsml.engine.params import init_theta
        return init_theta(self.cfg, generator, dtype, device)

    def init_state(self, num_episodes: int, in_dim: int, num_classes: int,
                   generator: torch.Generator | None = None, dtype=torch.float32, device=None) -> VSMLState:
        return init_state(self.cfg, num_episodes, in_dim, num_classes, generator, dtype, device)

    def layer_params(self, theta: torch.Tensor) -> list[CellParams]:
        """Named views of θ for each layer k: θ[..., min(k, L-1), :]."""
        nl = self.cfg.num_theta_sets
        sets = [unflatten(theta[..., i, :], self.cfg.cell) for i in range(nl)]
        return [sets[min(k, nl - 1)] for k in range(self.cfg.num_layers)]

    # -- boundary conditions -----------------------------------------------------------------

    def embed_input(self, x_t: torch.Tensor) -> torch.Tensor:
        """x_t [E, D] -> forward messages into layer 1 [E, D, M], pixel in element ``input_idx``."""
        msg = x_t.new_zeros(*x_t.shape, self.cfg.cell.msg)
        msg[..., self.cfg.input_idx] = x_t
        return msg

    def logits_from(self, fwd_out: torch.Tensor) -> torch.Tensor:
        """Last layer's forward message [E, C, M] -> logits [E, C] = bound · tanh(κ·m[output_idx] / bound)."""
        return read_logits(self.cfg, fwd_out[..., self.cfg.output_idx])

    def error_message(self, logits: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
        """e = softmax(ŷ) − onehot(y): the gradient of CE w.r.t. the clipped logits (inner batch 1).
        Returns the backward message into the last layer [E, C, M] = (e, λ·y, 0, ...)."""
        onehot = F.one_hot(y_t, logits.shape[-1]).to(logits.dtype)   # [E, C]
        err = torch.softmax(logits, dim=-1) - onehot
        msg = logits.new_zeros(*logits.shape, self.cfg.cell.msg)
        msg[..., self.cfg.error_idx] = err
        if self.cfg.feed_label:
            msg[..., self.cfg.label_idx] = onehot
        return msg

    # -- one tick ------------------------------------------------------------------------------

    def tick(self, theta: torch.Tensor, state: VSMLState, x_t: torch.Tensor, y_t: torch.Tensor,
             fused: bool | str = False) -> tuple[torch.Tensor, VSMLState]:
        """Process example t: predict ŷ_t from x_t (before y_t is used), then feed y_t's error.

        theta [L, P] or [E, L, P], x_t [E, D], y_t [E] -> logits [E, C] and the new state.
        ``fused``: the no-grad layer update: False / "torch" (eager), "compile" (compiled chunks), True /
        "cpu" (the C++ kernel, else compiled chunks).  The fused Triton kernel runs whole unrolls
        (:meth:`unroll`), not ticks.
        """
        cfg = self.cfg
        params = self.layer_params(theta)

        geo = cfg.conv_geometry(x_t.shape[-1])                        # conv layers first (vsml/engine/conv.py)

        def layer(k, fwd_in, bwd_in, h_k, c_k):
            p = params[k]
            if k < len(geo):                                          # conv: eager PyTorch path only
                from vsml.engine.conv import conv_layer_update
                return conv_layer_update(p, cfg.conv[k], geo[k], fwd_in, bwd_in, h_k, c_k, cfg.micro_ticks,
                                         cfg.cell.ln_eps)
            if fused and fused != "torch":
                return self._chunked_layer(p, fwd_in, bwd_in, h_k, c_k, "compile" if fused == "compile" else "cpu")
            return layer_update(p, fwd_in, bwd_in, h_k, c_k, cfg.micro_ticks, cfg.cell.ln_eps)

        k_last = cfg.num_layers - 1
        h, c, bwd = list(state.h), list(state.c), list(state.bwd)
        fwd = self.embed_input(x_t)                                   # [E, D, M]
        if not cfg.backward_pass:
            # one sweep: layer k reads fwd from layer k-1 (this tick) and bwd from layer k+1 (last tick)
            for k in range(cfg.num_layers):
                h[k], c[k], fwd, bwd_out = layer(k, fwd, bwd[k], h[k], c[k])   # fwd: [E, B_k, M]
                if k > 0:
                    bwd[k - 1] = bwd_out                              # [E, A_k, M], read by layer k-1 next tick
            logits = self.logits_from(fwd)                            # [E, C]
            bwd[k_last] = self.error_message(logits, y_t)             # enters the last layer at t+1
        else:
            # forward sweep (the last layer's error input is zero), remembering each layer's input
            fwd_ins = []
            for k in range(cfg.num_layers):
                fwd_ins.append(fwd)
                h[k], c[k], fwd, _ = layer(k, fwd, bwd[k], h[k], c[k])
            logits = self.logits_from(fwd)
            # reverse sweep: the error enters the last layer and moves down one layer per update
            msg = self.error_message(logits, y_t)
            for k in range(k_last, -1, -1):
                h[k], c[k], _, bwd_out = layer(k, fwd_ins[k], msg, h[k], c[k])
                if k > 0:
                    msg = bwd_out                                     # [E, A_k, M]
                    bwd[k - 1] = msg
            bwd[k_last] = torch.zeros_like(bwd[k_last])               # error reset after the sweep
            if cfg.bwd_reset:                                         # not in the reference (VSMLConfig.bwd_reset)
                bwd = [torch.zeros_like(b) for b in bwd]
        return logits, VSMLState(h, c, bwd)

    # -- an online episode ---------------------------------------------------------------------

    def check_inputs(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int | None,
                     state: VSMLState | None) -> tuple[torch.Tensor, int]:
        """Validate an unroll's inputs; returns x flattened to [E, T, D] and the class count."""
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor [E, T, D] (or [E, T, H, W, ...]), got "
                            f"{type(x).__name__} {getattr(x, 'dtype', '')}")
        if x.dim() < 3:
            raise ValueError(f"x must have shape [E, T, D] (episodes, time, features); got {list(x.shape)}. "
                             f"For a single episode use x[None].")
        x = x.reshape(x.shape[0], x.shape[1], -1)                    # [E, T, D]
        if not torch.is_tensor(y) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"y must be an integer tensor of class indices [E, T], got "
                            f"{type(y).__name__} {getattr(y, 'dtype', '')}")
        if tuple(y.shape) != tuple(x.shape[:2]):
            raise ValueError(f"y has shape {list(y.shape)} but x has [E, T] = {list(x.shape[:2])}")
        if x.dtype != theta.dtype:
            raise TypeError(f"x has dtype {x.dtype} but θ has {theta.dtype}; cast one of them")
        if x.device != theta.device or y.device != theta.device:
            raise ValueError(f"x ({x.device}), y ({y.device}) and θ ({theta.device}) must be on one device")
        check_theta(theta, self.cfg, x.shape[0])
        if state is not None:
            if num_classes is not None and num_classes != state.num_classes:
                raise ValueError(f"num_classes={num_classes} but the carried state has {state.num_classes}")
            num_classes = state.num_classes
            if self.cfg.conv:
                from vsml.engine.conv import check_state
                check_state(self.cfg, state, x.shape[0], x.shape[2])
            elif state.num_episodes != x.shape[0] or state.in_dim != x.shape[2]:
                raise ValueError(f"the carried state is for E={state.num_episodes}, D={state.in_dim} but x "
                                 f"has E={x.shape[0]}, D={x.shape[2]}")
        if num_classes is None:
            raise ValueError("num_classes is required when no state is passed in")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]")
        return x, num_classes

    def unroll(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int | None = None,
               state: VSMLState | None = None, generator: torch.Generator | None = None,
               backend: str | None = None) -> EpisodeOutput:
        """Run a stream of examples online through the network.

        Args:
            theta: [L, P] shared by all episodes, or [E, L, P] one set per episode.
            x: [E, T, D] (or [E, T, H, W, ...], flattened) inputs.
            y: [E, T] integer labels; y_t is only used after ŷ_t has been computed.
            num_classes: C; required unless ``state`` is given.
            state: carried state from a previous call (truncated unrolls); None draws a fresh
                random state with ``generator`` (one draw per episode).
            backend: override this network's ``backend`` for this call (see ``__init__``).
        Returns:
            EpisodeOutput with logits [E, T, C], loss [E, T], correct [E, T] and the final state.
        """
        x, num_classes = self.check_inputs(theta, x, y, num_classes, state)
        e, t_len, d = x.shape
        y = y.long()
        if state is None:
            state = self.init_state(e, d, num_classes, generator, theta.dtype, theta.device)
        which = self.no_grad_backend(theta, state, backend)
        if which == "triton":                                      # all T examples in one kernel launch
            from kernels.backend import fused_unroll_output
            return fused_unroll_output(self.cfg, theta, x, y, num_classes, state, kernel=self.kernel)
        fused = which if which != "torch" else False
        logits = []
        for t in range(t_len):
            lg, state = self.tick(theta, state, x[:, t], y[:, t], fused)
            logits.append(lg)
        logits_t = torch.stack(logits, 1) if logits else x.new_zeros(e, 0, num_classes)   # [E, T, C]
        loss = F.cross_entropy(logits_t.reshape(-1, num_classes), y.reshape(-1),
                               reduction="none").reshape(e, t_len)                        # [E, T]
        correct = logits_t.argmax(-1) == y
        return EpisodeOutput(logits_t, loss, correct, state)
