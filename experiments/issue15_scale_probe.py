"""Issue 15: why did cloning with long teacher burn-ins make the clone worse?  A no-grad probe.

For a cloned θ, runs the shallow student under teacher forcing next to online SGD (α = 1) on
``episodes`` streams of ``task`` (train split) and reports per tick window: the RMS of the cloning
target w·x and of the student's φ, the per-tick relative MSE (the cloning loss), and how saturated the
cell state is (fraction of |tanh(c)| > 0.95, max |c|).  Then, as the burn-in cloner does, it injects
the teacher's weights after B examples into cell element 0 of a fresh random state and reports the
relative MSE over the next 30 ticks (the burn-in window) against the carried state's.

    python experiments/issue15_scale_probe.py --checkpoint pretrained:mnist14-clone-es
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tasks import make_family
from vsml.engine.cell import forward_phi, lstm_micro_steps
from vsml.estimators.cloning import teacher_update
from vsml.evaluation.load import load_learner


def _forced_tick(net, p, x_t, y_t, h, c, w, e, c_num):
    """One teacher-forced tick of the shallow student next to online SGD (α = 1): the student sees x_t and
    the teacher's last error e; returns h', c', φ [E, A, B], the target w·x_t [E, A, B], and the teacher's
    updated w and new error (its logits read out with the student's κ = ``logit_scale``)."""
    cfg = net.cfg
    bwd = x_t.new_zeros(x_t.shape[0], c_num, cfg.cell.msg)
    if e is not None:
        bwd[..., cfg.error_idx] = e
    h, c = lstm_micro_steps(p, net.embed_input(x_t), bwd, h, c, cfg.micro_ticks)
    phi = forward_phi(p, h, x_t)[..., cfg.output_idx]
    tgt = w * x_t[:, :, None]
    e = torch.softmax(tgt.mean(1) * cfg.logit_scale, -1) - F.one_hot(y_t, c_num).to(x_t.dtype)
    return h, c, phi, tgt, teacher_update(w, x_t, e, 1.0), e


@torch.no_grad()
def probe(checkpoint, task, episodes, length, seed, data_dir, burn_ins=(0, 100, 300, 1000), window=30):
    _, net, theta, _ = load_learner(checkpoint, compile=False)
    p = net.layer_params(theta)[0]
    b = make_family(task, data_dir=data_dir).sample(episodes, length, seed=seed, split="train")
    x, y = b.x.reshape(episodes, length, -1), b.y.long()
    c_num = b.num_classes
    st = net.init_state(episodes, x.shape[-1], c_num, torch.Generator().manual_seed(seed))
    h, c = st.h[0], st.c[0]
    w = c[..., 0].clone()
    e = None
    rows = []
    snaps = {}
    for t in range(length):
        if t in burn_ins:
            snaps[t] = (h.clone(), c.clone(), w.clone(), None if e is None else e.clone())
        h, c, phi, tgt, w_next, e = _forced_tick(net, p, x[:, t], y[:, t], h, c, w, e, c_num)
        rows.append((tgt.square().mean().sqrt().item(), phi.square().mean().sqrt().item(),
                     ((phi - tgt).square().mean() / (tgt.var() + 1e-3)).item(),
                     (torch.tanh(c).abs() > 0.95).float().mean().item(), c.abs().max().item(),
                     w.std().item()))
        w = w_next
    edges = [q for q in (0, 10, 30, 100, 300, 1000, 2000, 5000, 10000) if q < length] + [length]
    out = {"windows": []}
    print(f"{checkpoint} on {task} (train split, {episodes} episodes), teacher forcing, carried state:")
    print("  window          target RMS   phi RMS   rel MSE   sat.frac   max|c|   teacher w std")
    for lo, hi in zip(edges[:-1], edges[1:]):
        r = torch.tensor(rows[lo:hi]).mean(0).tolist()
        out["windows"].append({"window": [lo, hi], "target_rms": r[0], "phi_rms": r[1], "rel_mse": r[2],
                               "sat_frac": r[3], "max_abs_c": r[4], "teacher_w_std": r[5]})
        print(f"  [{lo:>5},{hi:>5})  {r[0]:10.3f} {r[1]:9.3f} {r[2]:9.3f} {r[3]:9.3f} {r[4]:8.2f} {r[5]:10.3f}")
    # burn-in injection: fresh random state, teacher weights in cell element 0 (cloning_deep's burn-in)
    out["burn_in"] = []
    print(f"  burn-in B: rel MSE over ticks [B, B+{window}) — carried state vs teacher weights injected in c[...,0]")
    for bi in burn_ins:
        if bi + window > length:
            continue
        res = {}
        for mode in ("carried", "injected"):
            h0, c0, w0, e0 = snaps[bi]
            if mode == "injected":
                fresh = net.init_state(episodes, x.shape[-1], c_num, torch.Generator().manual_seed(seed + 1))
                h0, c0 = fresh.h[0], fresh.c[0].clone()
                c0[..., 0] = w0
            hh, cc, ww, ee, acc = h0, c0, w0, e0, []
            for t in range(bi, bi + window):
                hh, cc, phi, tgt, ww, ee = _forced_tick(net, p, x[:, t], y[:, t], hh, cc, ww, ee, c_num)
                acc.append(((phi - tgt).square().mean() / (tgt.var() + 1e-3)).item())
            res[mode] = sum(acc) / len(acc)
        out["burn_in"].append({"B": bi, **res})
        print(f"    B={bi:<5} carried {res['carried']:.3f}   injected {res['injected']:.3f}")
    return out


@dataclass(frozen=True)
class ProbeArgs:
    """The scale / burn-in probe of a shallow cloned θ."""

    checkpoint: str = "pretrained:mnist14-clone-es"
    task: str = "mnist+resize14+proj"
    episodes: int = 4
    length: int = 2000
    seed: int = 7
    data_dir: str | None = None
    json: str | None = None


if __name__ == "__main__":
    from vsml.training.cli import parse
    a = parse(ProbeArgs, prog="python experiments/issue15_scale_probe.py")
    o = probe(a.checkpoint, a.task, a.episodes, a.length, a.seed, a.data_dir)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(o, f, indent=1)
