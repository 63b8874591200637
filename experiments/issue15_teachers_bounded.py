"""Issue 15: weight-decayed and clipped online-SGD teachers vs plain SGD (MNIST-14, no projection, train split, 8 x 2000, seed 5).
    python experiments/issue15_teachers_bounded.py
"""
import torch, time, sys
import torch.nn.functional as F
from tasks import make_family
torch.manual_seed(0)
fam = make_family("mnist+resize14", data_dir="../shared/datasets")
b = fam.sample(8, 2000, seed=5, split="train")
x, y = b.x.reshape(8, 2000, -1), b.y.long()
print(x.shape, x.mean().item(), x.std().item(), x.abs().max().item())
def run(kind, alpha=1.0, lam=0.0, wmax=0.0):
    E, T, D = x.shape; C = 10
    w = torch.randn(E, D, C) / D**0.5
    acc = []; wn = []
    for t in range(T):
        z = (w * x[:, t, :, None]).mean(1)
        acc.append((z.argmax(-1) == y[:, t]).float().mean().item())
        e = torch.softmax(z, -1) - F.one_hot(y[:, t], C).float()
        w = w - alpha * x[:, t, :, None] * e[:, None, :]
        if lam: w = w * (1 - lam)
        if wmax: w = w.clamp(-wmax, wmax)
        if t in (9, 99, 299, 999, 1999): wn.append(round(w.abs().max().item(), 2)); wn.append(round(w.std().item(), 3))
    acc = torch.tensor(acc)
    print(f"{kind:28s} online {acc.mean():.3f} last100 {acc[-100:].mean():.3f} |w|max,std@10/100/300/1000/2000 {wn}", flush=True)
run("sgd a=1")
for lam in (1e-3, 3e-3, 1e-2): run(f"wd lam={lam}", lam=lam)
for wm in (0.5, 1.0, 2.0): run(f"clip {wm}", wmax=wm)
run("sgd a=0.5 clip1", alpha=0.5, wmax=1.0)
run("sgd a=0.3 clip1", alpha=0.3, wmax=1.0)
