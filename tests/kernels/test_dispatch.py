"""The one no-grad dispatch (kernels/backend.py) inside training and meta-testing (issue 14, item 1).

``train.py --preset tiny`` (cloning, ES, PES and the final meta-test) with ``--backend triton`` runs the fused
kernel (under the Triton interpreter on a CPU-only machine) and matches ``--backend torch`` within the
kernel's documented tolerance (kernels/README.md: atol 1e-5, rtol 1e-4 on logits and losses); ``eval.py
--backend`` likewise; forcing a backend that cannot run is a one-line error.  Interpreter cost is ~0.1 s per
program and example here, so the runs are short: 2 ES steps of 4 members x 4 examples, a 2 x 4 meta-test.
"""

from __future__ import annotations

import json

import pytest
import torch

import eval as eval_cli
import train as train_cli
from kernels import backend as kb
from kernels import vsml_fused
from vsml.engine.config import ConfigError, VSMLConfig
from vsml.engine.network import VSMLNetwork
from vsml.estimators.core import ESEstimator
from vsml.training.config import config_from_dict

ATOL, RTOL = 1e-5, 1e-4          # kernels/README.md, "Tolerance and precision"

pytestmark = pytest.mark.skipif(not (vsml_fused.INTERPRET or torch.cuda.is_available()),
                                reason="needs CUDA or TRITON_INTERPRET=1 at import")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHORT = ["--preset", "tiny", "--log.progress", "false", "--device", DEVICE, "--steps", "2", "--ckpt_every", "0",
         "--episode_length", "4", "--eval.every", "0", "--eval.length", "4", "--eval.episodes", "2"]


@pytest.fixture
def spies(monkeypatch):
    """Count calls of the fused kernel's entry point and record every ES population's member losses."""
    calls = {"fused": 0}
    real = vsml_fused.fused_episode

    def fused_spy(*a, **k):
        calls["fused"] += 1
        return real(*a, **k)

    monkeypatch.setattr(vsml_fused, "fused_episode", fused_spy)
    losses = []
    real_ml = ESEstimator.member_losses

    def ml_spy(self, *a, **k):
        out = real_ml(self, *a, **k)
        losses.append(out[0].detach().cpu().clone())
        return out

    monkeypatch.setattr(ESEstimator, "member_losses", ml_spy)
    return calls, losses


def _train(tmp_path, backend, *extra):
    rc = train_cli.main([*SHORT, "--out_dir", str(tmp_path), "--name", backend, "--backend", backend, *extra])
    assert rc == 0
    rd = tmp_path / backend
    rows = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    res = json.loads((rd / "meta_test" / "results.json").read_text())
    return rd, rows, res


def _close(a, b, what):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def test_train_tiny_triton_matches_torch_es(tmp_path, spies):
    calls, losses = spies
    rd_t, rows_t, res_t = _train(tmp_path, "torch")
    assert calls["fused"] == 0, "backend=torch must not reach the fused kernel"
    ref_losses = list(losses)
    losses.clear()
    rd_k, rows_k, res_k = _train(tmp_path, "triton")
    # the kernel really ran: every ES population (2 steps) and the final meta-test (1 batch of 2 episodes)
    assert calls["fused"] == 3, calls
    assert json.loads((rd_k / "config.json").read_text())["backend"] == "triton"
    # cloning (autograd: the torch path under either backend) gives the same θ, so the first ES step's
    # member losses compare directly; later steps drift only through rounding
    assert len(ref_losses) == len(losses) == 2
    _close(losses[0], ref_losses[0], "step-1 ES member losses")
    assert not torch.equal(losses[0], losses[0].flip(0)), "members must differ (antithetic noise)"
    es_t = [r for r in rows_t if "meta_train/loss_mean" in r]
    es_k = [r for r in rows_k if "meta_train/loss_mean" in r]
    _close(es_k[0]["meta_train/loss_mean"], es_t[0]["meta_train/loss_mean"], "step-1 loss_mean")
    # the final meta-test (θ after 2 ES steps; Adam's first steps are sign-like, so θ agrees closely)
    for key in ("loss", "online_accuracy"):
        _close(res_k["digits"]["vsml"][key], res_t["digits"]["vsml"][key], f"final meta-test {key}")
    _close(res_k["digits"]["vsml"]["curve_mean"], res_t["digits"]["vsml"]["curve_mean"], "meta-test curve")


def test_train_tiny_triton_matches_torch_pes(tmp_path, spies):
    calls, _ = spies
    pes = ["--estimator", "pes", "--pes.particles", "1", "--pes.truncation", "2", "--pes.horizon", "4",
           "--clone.steps", "0", "--steps", "1"]
    _, rows_t, res_t = _train(tmp_path, "torch", *pes)
    assert calls["fused"] == 0
    _, rows_k, res_k = _train(tmp_path, "triton", *pes)
    assert calls["fused"] == 2, calls              # one PES truncation (2 particles) + the final meta-test
    row_t = next(r for r in rows_t if r.get("step") == 1 or "meta_train/loss" in r or "meta_train/loss_mean" in r)
    row_k = next(r for r in rows_k if r.get("step") == 1 or "meta_train/loss" in r or "meta_train/loss_mean" in r)
    key = "meta_train/loss_mean" if "meta_train/loss_mean" in row_t else "meta_train/loss"
    _close(row_k[key], row_t[key], f"PES {key}")
    _close(res_k["digits"]["vsml"]["loss"], res_t["digits"]["vsml"]["loss"], "final meta-test loss")


def test_eval_backend_triton_matches_torch(tmp_path, spies):
    calls, _ = spies
    rd, _, _ = _train(tmp_path, "torch", "--steps", "1", "--clone.steps", "0")
    outs = {}
    for be in ("torch", "triton"):
        before = calls["fused"]
        out = tmp_path / f"eval_{be}"
        assert eval_cli.main(["--checkpoint", str(rd), "--tasks", "digits", "--episodes", "2", "--length", "4",
                              "--baselines", "", "--backend", be, "--device", DEVICE, "--no-plot",
                              "--out", str(out)]) == 0
        assert (calls["fused"] > before) == (be == "triton")
        outs[be] = json.loads((out / "results.json").read_text())["digits"]["vsml"]
    _close(outs["triton"]["loss"], outs["torch"]["loss"], "eval loss")
    _close(outs["triton"]["curve_mean"], outs["torch"]["curve_mean"], "eval curve")


# ------------------------------------------------------------------------------------------------
# errors, config compatibility, the network's dispatch


def test_forced_backend_that_cannot_run_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="conv"):
        kb.check_backend("triton", DEVICE, VSMLConfig(conv="c4"))
    monkeypatch.setattr(vsml_fused, "INTERPRET", False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        assert train_cli.main([*SHORT, "--out_dir", str(tmp_path), "--backend", "triton"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: backend='triton' cannot run here") and "\n" not in err
        assert not any(tmp_path.iterdir()), "nothing may be written before the backend check"
        assert eval_cli.main(["--checkpoint", "pretrained:mnist14-clone-es", "--backend", "triton",
                              "--baselines", "", "--out", str(tmp_path / "e")]) == 2
        assert "backend='triton' cannot run here" in capsys.readouterr().err
    # the C++ kernel on a CUDA device, a non-VSML learner with a forced kernel
    with pytest.raises(kb.BackendError, match="C\\+\\+ CPU kernel"):
        kb.check_backend("cpu", "cuda", VSMLConfig())
    with pytest.raises(ConfigError, match="learner=vsml only"):
        kb.check_backend("compile", "cpu", None, learner="metarnn")
    monkeypatch.setenv("VSML_CPU_KERNEL", "off")
    with pytest.raises(kb.BackendError, match="VSML_CPU_KERNEL=off"):
        kb.check_backend("cpu", "cpu", VSMLConfig())


def test_old_config_compile_flag_maps_to_backend():
    from vsml.training.config import TrainConfig
    d = TrainConfig().to_dict()
    d.pop("backend")
    assert config_from_dict({**d, "compile": False}).backend == "torch"
    assert config_from_dict({**d, "compile": True}).backend == "auto"
    assert config_from_dict(TrainConfig(backend="cpu").to_dict()).backend == "cpu"


def test_network_dispatch_and_gradients(monkeypatch):
    """VSMLNetwork.unroll: each name takes its path; gradients always take the autograd path."""
    net = VSMLNetwork(VSMLConfig(), backend="triton")
    g = torch.Generator().manual_seed(0)
    theta = net.init_theta(g).to(DEVICE)
    x = torch.randn(2, 2, 5, generator=g).to(DEVICE)
    y = torch.randint(0, 3, (2, 2), generator=g).to(DEVICE)
    st = net.init_state(2, 5, 3, g).to(DEVICE)
    ref = VSMLNetwork(VSMLConfig()).unroll(theta, x, y, state=st)                 # eager (backend torch)
    with torch.no_grad():
        assert net.no_grad_backend(theta) == "triton"
        n0 = kb.KERNEL_CALLS["v1"]
        out = net.unroll(theta, x, y, state=st)
        assert kb.KERNEL_CALLS["v1"] == n0 + 1
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=RTOL)
    th = theta.clone().requires_grad_(True)                                       # BPTT under backend=triton
    assert net.no_grad_backend(th) == "torch"
    out_g = net.unroll(th, x, y, state=st)
    out_g.loss.mean().backward()
    assert th.grad is not None and torch.isfinite(th.grad).all()
    assert kb.KERNEL_CALLS["v1"] == n0 + 1
    assert VSMLNetwork(VSMLConfig(), compile=True).backend == "auto"
    assert VSMLNetwork(VSMLConfig()).backend == "torch"
    with pytest.raises(ValueError, match="unknown backend"):
        VSMLNetwork(VSMLConfig(), backend="cuda")
    with pytest.raises(kb.BackendError, match="unknown fused kernel version"):
        kb.fused_kernel("v0")


def test_compile_chunks_are_device_aware(monkeypatch):
    from vsml.engine import network as nw
    cpu = torch.device("cpu")
    assert nw.chunk_inputs(2048, 784, 10, 16, cpu) == max(1, nw.CHUNK_PAIRS // (2048 * 10))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 << 30, 80 << 30))
    assert nw.chunk_inputs(2048, 784, 10, 16, torch.device("cuda")) == 784          # the whole grid fits
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 30, 80 << 30))
    step = nw.chunk_inputs(2048, 784, 10, 16, torch.device("cuda"))
    assert 1 <= step < 784 and step * 2048 * 10 * 16 * nw.CUDA_FLOATS_PER_PAIR_PER_N * 4 <= (1 << 28)


# ------------------------------------------------------------------------------------------------
# GPU (pytest -m gpu; benchmarks/gpu_check.py runs these)


@pytest.mark.gpu
def test_gpu_auto_is_the_fused_kernel_and_train_step_matches_torch(tmp_path, spies):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    calls, losses = spies
    assert kb.resolve_backend("auto", "cuda", cfg=VSMLConfig()) == "triton"
    assert kb.resolve_backend("auto", "cuda", cfg=VSMLConfig(), requires_grad=True) == "torch"
    one = ["--steps", "1", "--clone.steps", "0", "--es.pairs", "8", "--episode_length", "20"]
    _, _, res_t = _train(tmp_path, "torch", *one)
    ref = list(losses)
    losses.clear()
    _, _, res_a = _train(tmp_path, "auto", *one)
    assert calls["fused"] == 2                       # the ES population and the final meta-test
    _close(losses[0], ref[0], "ES member losses on CUDA (ieee fp32 dots)")
    _close(res_a["digits"]["vsml"]["loss"], res_t["digits"]["vsml"]["loss"], "meta-test loss on CUDA")


def test_each_backend_takes_its_layer_path(monkeypatch):
    """torch -> eager layer updates, compile -> compiled chunks (never the C++ kernel), cpu -> the C++ kernel
    mode; recorded by a stand-in for the chunked layer update (no compilation happens)."""
    from vsml.engine import network as nw
    from vsml.engine.cell import layer_update
    seen = []

    def fake_chunked(self, p, fwd_in, bwd_in, h, c, mode="cpu"):
        seen.append(mode)
        return layer_update(p, fwd_in, bwd_in, h, c, self.cfg.micro_ticks, self.cfg.cell.ln_eps)

    monkeypatch.setattr(nw.VSMLNetwork, "_chunked_layer", fake_chunked)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 2, 5, generator=g), torch.randint(0, 3, (2, 2), generator=g)
    ref = None
    for be, want in (("torch", []), ("compile", ["compile"] * 2), ("cpu", ["cpu"] * 2), ("auto", ["cpu"] * 2)):
        net = VSMLNetwork(VSMLConfig(), backend=be)
        theta = net.init_theta(torch.Generator().manual_seed(1))
        seen.clear()
        with torch.no_grad():
            out = net.unroll(theta, x, y, num_classes=3, generator=torch.Generator().manual_seed(2))
        assert seen == want, (be, seen)
        ref = out.logits if ref is None else ref
        torch.testing.assert_close(out.logits, ref)
