"""The hand-written CPU kernel (kernels/cpu_vsml.py + kernels/csrc/vsml_cpu.cpp) against the eager path.

The kernel is built once per machine (torch extensions cache; the module fixture below pays the one-off
build, ~15-25 s on the 2-core machine, printed on stderr) and only skipped when there is no C++ compiler.
Agreement is to float32 rounding (rtol 1e-4, atol 1e-5, as the torch.compile path's test): the kernel uses
its own exp polynomial and reciprocal, and sums in a different order.

Run: python -m pytest tests/kernels/test_cpu_kernel.py -q        (ISA variants: add -m slow)
"""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch

from kernels import cpu_vsml
from vsml import SubLSTMConfig, VSMLConfig, VSMLNetwork
from vsml.engine.cell import layer_update

TOL = dict(rtol=1e-4, atol=1e-5)


def _has_compiler() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None


@pytest.fixture(scope="module")
def kernel():
    """The native build (compiled once, then loaded from the cache)."""
    if not _has_compiler():
        pytest.skip("no C++ compiler (c++ / $CXX) on PATH: the CPU kernel cannot be built here")
    ok, why = cpu_vsml.available()
    assert ok, why          # a compiler is there, so a failed build is a bug, not a skip
    return cpu_vsml.load()


def _cfg(hidden=(), ln=False, bp=False, label=False, layerwise=False, micro=2, n=16, m=8, bil=False):
    return VSMLConfig(cell=SubLSTMConfig(layer_norm=ln, hidden=n, msg=m, bilinear=bil), hidden_sizes=hidden,
                      backward_pass=bp, feed_label=label, layerwise=layerwise, micro_ticks=micro)


def _theta(net, gen, e=None, scale=0.5):
    """A float32 θ with non-trivial biases and LN parameters; [L, P] or [E, L, P]."""
    th = net.init_theta(gen)
    th = th + scale * torch.randn(th.shape, generator=gen)
    if e is not None:
        th = th[None] + 0.3 * torch.randn((e, *th.shape), generator=gen)
    return th.contiguous()


def _layer_inputs(gen, e, a, b, m=8, n=16):
    fwd = torch.randn(e, a, m, generator=gen)
    bwd = torch.randn(e, b, m, generator=gen)
    h = 0.5 * torch.randn(e, a, b, n, generator=gen)
    c = torch.randn(e, a, b, n, generator=gen)
    return fwd, bwd, h, c


# (E, A, B): odd sizes, groups of 4 pairs that straddle inputs a, a tail group of 1-3 pairs, a single pair
LAYER_SHAPES = [(1, 1, 1), (2, 5, 3), (3, 7, 10), (1, 13, 33), (2, 3, 2)]


@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=str)
@pytest.mark.parametrize("ln", [False, True], ids=["noLN", "LN"])
@pytest.mark.parametrize("per_ep", [False, True], ids=["shared", "per-episode"])
@pytest.mark.parametrize("bil", [False, True], ids=["plain", "bilinear"])
def test_layer_update_matches_eager(kernel, shape, ln, per_ep, bil):
    """One layer update (micro-steps, both readouts and means) equals vsml.engine.cell.layer_update, also for
    the bilinear cell (SubLSTMConfig.bilinear)."""
    e, a, b = shape
    gen = torch.Generator().manual_seed(hash((shape, ln, per_ep, bil)) % 2**31)
    cfg = _cfg(ln=ln, micro=3 if per_ep else 2, bil=bil)
    net = VSMLNetwork(cfg)
    p = net.layer_params(_theta(net, gen, e if per_ep else None))[0]
    fwd, bwd, h, c = _layer_inputs(gen, e, a, b)
    with torch.no_grad():
        ref = layer_update(p, fwd, bwd, h, c, cfg.micro_ticks, cfg.cell.ln_eps)
        out = cpu_vsml.layer_update(cfg, p, fwd, bwd, h, c)
    for name, got, want in zip(("h", "c", "fwd_out", "bwd_out"), out, ref):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, **TOL, msg=lambda s: f"{name}: {s}")


def test_message_size_other_than_8(kernel):
    """M is a runtime size of the kernel (any M <= 16)."""
    gen = torch.Generator().manual_seed(5)
    for m, ln, bil in ((3, False, False), (16, True, False), (3, False, True), (16, True, True), (5, True, True)):
        cfg = _cfg(ln=ln, m=m, bil=bil)
        net = VSMLNetwork(cfg)
        p = net.layer_params(_theta(net, gen, 2))[0]
        fwd, bwd, h, c = _layer_inputs(gen, 2, 6, 5, m=m)
        with torch.no_grad():
            ref = layer_update(p, fwd, bwd, h, c, cfg.micro_ticks, cfg.cell.ln_eps)
            out = cpu_vsml.layer_update(cfg, p, fwd, bwd, h, c)
        for got, want in zip(out, ref):
            torch.testing.assert_close(got, want, **TOL)


def test_extreme_preactivations_stay_finite(kernel):
    """Saturated gates (|pre-activation| up to ~1e3) give σ, tanh at their limits, no inf/NaN."""
    gen = torch.Generator().manual_seed(6)
    cfg = _cfg()
    net = VSMLNetwork(cfg)
    p = net.layer_params(_theta(net, gen, 2, scale=0.0) * 40.0)[0]
    fwd, bwd, h, c = _layer_inputs(gen, 2, 9, 4)
    with torch.no_grad():
        ref = layer_update(p, 30 * fwd, 30 * bwd, h, 50 * c, 2, cfg.cell.ln_eps)
        out = cpu_vsml.layer_update(cfg, p, 30 * fwd, 30 * bwd, h, 50 * c)
    for got, want in zip(out, ref):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_work_items_threads_and_big_buffers(kernel):
    """Several work items per episode (partial Σ_a reduced afterwards), 1 vs 2 threads bit-identical, big
    outputs from the kernel's buffer cache: a result that is still referenced is never overwritten.  The
    bilinear cell (its Σ_a x_a h_ab goes through the same partial sums)."""
    gen = torch.Generator().manual_seed(7)
    cfg = _cfg(bil=True)
    net = VSMLNetwork(cfg)
    p = net.layer_params(_theta(net, gen, 1))[0]
    fwd, bwd, h, c = _layer_inputs(gen, 1, 150, 70)          # 10,500 pairs: several items, 2 threads
    fwd2, bwd2, h2, c2 = _layer_inputs(gen, 1, 150, 70)
    prev = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = cpu_vsml.layer_update(cfg, p, fwd, bwd, h, c)
            keep = [t.clone() for t in one]
            torch.set_num_threads(2)
            two = cpu_vsml.layer_update(cfg, p, fwd, bwd, h, c)
            other = cpu_vsml.layer_update(cfg, p, fwd2, bwd2, h2, c2)
            del two
            again = cpu_vsml.layer_update(cfg, p, fwd, bwd, h, c)   # may reuse freed buffers
            ref = layer_update(p, fwd, bwd, h, c, cfg.micro_ticks, cfg.cell.ln_eps)
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(one, keep):
        assert torch.equal(a, b)                               # not overwritten by later calls
    for a, b, r in zip(again, keep, ref):
        assert torch.equal(a, b)                               # deterministic across thread counts
        torch.testing.assert_close(a, r, **TOL)
    assert not torch.equal(other[0], keep[0])
    big = torch.Size([3, 200, 30, 16])                         # 1.15 MB: the huge-page / cache path
    fwd, bwd, h, c = _layer_inputs(gen, 3, 200, 30)
    with torch.no_grad():
        for _ in range(2):
            out = cpu_vsml.layer_update(cfg, net.layer_params(_theta(net, gen, 3))[0], fwd, bwd, h, c)
            assert out[0].shape == big and torch.isfinite(out[0]).all()


UNROLL_CASES = [
    # (hidden, D, C, layer_norm, backward_pass, feed_label, layerwise, per_episode_theta)
    ((), 7, 3, False, False, False, False, True),
    ((), 5, 10, True, False, True, False, False),
    ((6,), 9, 3, False, False, True, True, True),
    ((5,), 4, 2, True, True, False, False, True),
    ((3,), 6, 4, False, True, True, True, False),
]
# the bilinear cell: (hidden, D, C, layer_norm, backward_pass, per_episode_theta)
UNROLL_BILINEAR = [((), 7, 3, False, False, True), ((4,), 5, 3, True, True, False)]


@pytest.mark.parametrize("hidden,d,c,ln,bp,label,layerwise,per_ep", UNROLL_CASES, ids=str)
def test_unroll_matches_eager(kernel, hidden, d, c, ln, bp, label, layerwise, per_ep, monkeypatch):
    """A whole online unroll, carried over two calls, through VSMLNetwork(compile=True) -- which now runs the
    CPU kernel for every layer update -- equals the eager unroll (logits, loss, final state)."""
    calls = []
    real = cpu_vsml.try_layer_update

    def counting(*args):
        out = real(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(cpu_vsml, "try_layer_update", counting)
    gen = torch.Generator().manual_seed(hash((hidden, d, c, ln, bp)) % 2**31)
    e, t = 3, 6
    cfg = _cfg(hidden, ln, bp, label, layerwise)
    eager, fast = VSMLNetwork(cfg), VSMLNetwork(cfg, compile=True)
    theta = _theta(eager, gen, e if per_ep else None)
    x, y = torch.randn(e, t, d, generator=gen), torch.randint(0, c, (e, t), generator=gen)
    st = eager.init_state(e, d, c, gen)
    st.h = [0.5 * torch.randn(h.shape, generator=gen) for h in st.h]
    with torch.no_grad():
        ref1 = eager.unroll(theta, x[:, :3], y[:, :3], c, state=st.clone())
        ref2 = eager.unroll(theta, x[:, 3:], y[:, 3:], state=ref1.state)
        out1 = fast.unroll(theta, x[:, :3], y[:, :3], c, state=st.clone())
        out2 = fast.unroll(theta, x[:, 3:], y[:, 3:], state=out1.state)
    sweeps = 2 if bp else 1
    assert calls and all(calls) and len(calls) == t * cfg.num_layers * sweeps
    assert fast._chunk_fn is None                             # the torch.compile path never ran
    for got, want in ((out1, ref1), (out2, ref2)):
        torch.testing.assert_close(got.logits, want.logits, **TOL)
        torch.testing.assert_close(got.loss, want.loss, **TOL)
        for k in range(cfg.num_layers):
            torch.testing.assert_close(got.state.h[k], want.state.h[k], **TOL)
            torch.testing.assert_close(got.state.c[k], want.state.c[k], **TOL)
            torch.testing.assert_close(got.state.bwd[k], want.state.bwd[k], **TOL)


def test_flat_theta_view_and_copy():
    """flat_theta recovers the θ set as a view when unflatten's layout is intact, else re-assembles it."""
    gen = torch.Generator().manual_seed(8)
    for ln in (False, True):
        cfg = _cfg((4,), ln=ln, layerwise=True)
        net = VSMLNetwork(cfg)
        for th in (_theta(net, gen), _theta(net, gen, 3)):
            for k, p in enumerate(net.layer_params(th)):
                flat = cpu_vsml.flat_theta(p, cfg)
                want = th[..., k, :].reshape(-1, th.shape[-1])
                assert torch.equal(flat, want)
                assert flat.data_ptr() == want.data_ptr()        # no copy
        # a CellParams whose fields are separate tensors (not views of one θ set) is copied
        p = net.layer_params(_theta(net, gen, 2))[0]
        p2 = type(p)(**{k: (v.clone() if v is not None else None) for k, v in vars(p).items()})
        assert torch.equal(cpu_vsml.flat_theta(p2, cfg), cpu_vsml.flat_theta(p, cfg))


def test_falls_back_where_it_does_not_apply(monkeypatch):
    """None (-> the torch.compile path) for N != 16, M > 16, float64, tensors that need grad, or
    VSML_CPU_KERNEL=off; no build is attempted for these."""
    monkeypatch.setattr(cpu_vsml, "load", lambda *a, **k: pytest.fail("must not build"))
    gen = torch.Generator().manual_seed(9)

    def attempt(cfg, dtype=torch.float32, grad=False):
        net = VSMLNetwork(cfg)
        th = _theta(net, gen, 2).to(dtype).requires_grad_(grad)
        p = net.layer_params(th)[0]
        fwd, bwd, h, c = (t.to(dtype) for t in _layer_inputs(gen, 2, 3, 2, cfg.cell.msg, cfg.cell.hidden))
        return cpu_vsml.try_layer_update(cfg, p, fwd, bwd, h, c)

    assert attempt(_cfg(n=8)) is None
    assert attempt(_cfg(m=17)) is None
    assert attempt(_cfg(), dtype=torch.float64) is None
    assert attempt(_cfg(), grad=True) is None
    monkeypatch.setenv("VSML_CPU_KERNEL", "off")
    assert attempt(_cfg()) is None
    monkeypatch.setenv("VSML_CPU_KERNEL", "sometimes")
    with pytest.raises(ValueError, match="VSML_CPU_KERNEL"):
        attempt(_cfg())


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    """No compiler / failed build: one RuntimeWarning, then the torch.compile path; VSML_CPU_KERNEL=on raises."""
    def broken(*a, **k):
        raise RuntimeError("could not build the CPU kernel (native): no compiler")

    monkeypatch.setattr(cpu_vsml, "load", broken)
    monkeypatch.setattr(cpu_vsml, "_warned", False)
    gen = torch.Generator().manual_seed(10)
    cfg = _cfg()
    net = VSMLNetwork(cfg)
    p = net.layer_params(_theta(net, gen, 1))[0]
    args = (cfg, p, *_layer_inputs(gen, 1, 2, 2))
    with pytest.warns(RuntimeWarning, match="torch.compile path"):
        assert cpu_vsml.try_layer_update(*args) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_vsml.try_layer_update(*args) is None       # warned only once
    monkeypatch.setenv("VSML_CPU_KERNEL", "on")
    with pytest.raises(RuntimeError, match="no compiler"):
        cpu_vsml.try_layer_update(*args)


def test_kernel_rejects_bad_inputs(kernel):
    """The C++ op checks shapes, dtypes and contiguity itself (clear errors, no crash)."""
    gen = torch.Generator().manual_seed(11)
    cfg = _cfg()
    net = VSMLNetwork(cfg)
    th = cpu_vsml.flat_theta(net.layer_params(_theta(net, gen, 2))[0], cfg).contiguous()
    fwd, bwd, h, c = _layer_inputs(gen, 2, 3, 4)
    op = kernel.layer_update
    with pytest.raises(RuntimeError, match="float32"):
        op(th, fwd.double(), bwd, h, c, 2, False, 1e-5, False)
    with pytest.raises(RuntimeError, match="hidden size must be 16"):
        op(th, fwd, bwd, h[..., :8].contiguous(), c[..., :8].contiguous(), 2, False, 1e-5, False)
    with pytest.raises(RuntimeError, match="values per set"):
        op(th[:, :-1].contiguous(), fwd, bwd, h, c, 2, False, 1e-5, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(th, fwd, bwd, h.transpose(1, 2), c, 2, False, 1e-5, False)
    with pytest.raises(RuntimeError, match="bwd_in"):
        op(th, fwd, bwd[:, :3].contiguous(), h, c, 2, False, 1e-5, False)
    with pytest.raises(RuntimeError, match="values per set"):      # a plain θ passed as a bilinear one
        op(th, fwd, bwd, h, c, 2, False, 1e-5, True)


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_portable_builds_match_eager(isa):
    """The AVX2 and scalar variants (for machines without AVX-512) build and agree with the eager path.
    Slow: each variant is a separate one-off build."""
    if not _has_compiler():
        pytest.skip("no C++ compiler")
    if isa == "avx2" and "avx2" not in open("/proc/cpuinfo").read():
        pytest.skip("this CPU has no AVX2")
    ok, why = cpu_vsml.available(isa)
    assert ok, why
    assert cpu_vsml.load(isa).isa() == isa
    gen = torch.Generator().manual_seed(12)
    for ln, bil in ((False, False), (True, False), (False, True), (True, True)):
        cfg = _cfg(ln=ln, bil=bil)
        net = VSMLNetwork(cfg)
        p = net.layer_params(_theta(net, gen, 2))[0]
        fwd, bwd, h, c = _layer_inputs(gen, 2, 7, 10)
        with torch.no_grad():
            ref = layer_update(p, fwd, bwd, h, c, cfg.micro_ticks, cfg.cell.ln_eps)
            out = cpu_vsml.layer_update(cfg, p, fwd, bwd, h, c, isa=isa)
        for got, want in zip(out, ref):
            torch.testing.assert_close(got, want, **TOL)


def test_auto_skips_a_portable_build(monkeypatch):
    """``auto`` does not use a build without AVX2/AVX-512 (slower than torch.compile); ``on`` does."""
    class Portable:
        def isa(self):
            return "scalar"

        def layer_update(self, *args):
            raise AssertionError("auto must not run the portable build")

    monkeypatch.setattr(cpu_vsml, "load", lambda *a, **k: Portable())
    monkeypatch.setattr(cpu_vsml, "_warned", False)
    monkeypatch.delenv("VSML_CPU_ISA", raising=False)
    gen = torch.Generator().manual_seed(13)
    cfg = _cfg()
    net = VSMLNetwork(cfg)
    p = net.layer_params(_theta(net, gen, 1))[0]
    args = (cfg, p, *_layer_inputs(gen, 1, 2, 2))
    with pytest.warns(RuntimeWarning, match="without AVX2/AVX-512"):
        assert cpu_vsml.try_layer_update(*args) is None
    monkeypatch.setenv("VSML_CPU_KERNEL", "on")
    with pytest.raises(AssertionError, match="must not run"):
        cpu_vsml.try_layer_update(*args)


@pytest.mark.parametrize("hidden,d,c,ln,bp,per_ep", UNROLL_BILINEAR, ids=str)
def test_unroll_bilinear_matches_eager(kernel, hidden, d, c, ln, bp, per_ep):
    """The bilinear cell's online unroll through the CPU kernel (backend "cpu") equals the eager unroll."""
    gen = torch.Generator().manual_seed(hash((hidden, d, c, ln, bp, per_ep)) % 2**31)
    e, t = 3, 6
    cfg = _cfg(hidden, ln, bp, bil=True)
    eager, fast = VSMLNetwork(cfg), VSMLNetwork(cfg, backend="cpu")
    theta = _theta(eager, gen, e if per_ep else None)
    x, y = torch.randn(e, t, d, generator=gen), torch.randint(0, c, (e, t), generator=gen)
    st = eager.init_state(e, d, c, gen)
    with torch.no_grad():
        ref = eager.unroll(theta, x, y, c, state=st.clone())
        out = fast.unroll(theta, x, y, c, state=st.clone())
    assert fast.no_grad_backend(theta) == "cpu" and fast._chunk_fn is None
    torch.testing.assert_close(out.logits, ref.logits, **TOL)
    for k in range(cfg.num_layers):
        torch.testing.assert_close(out.state.h[k], ref.state.h[k], **TOL)
