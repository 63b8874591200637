"""Issue 15: online-SGD teachers with weights kept in range (weight decay / clipping / RMS normalisation / decaying α)
vs plain SGD, MNIST-14 with projections, train split, 8 episodes x 4000.  Run from the repo root:
    python experiments/issue15_teachers.py
"""
import torch, math
import torch.nn.functional as F
from tasks import make_family
torch.manual_seed(0)
fam = make_family("mnist+resize14+proj", data_dir="../shared/datasets")
T=4000
b = fam.sample(8, T, seed=5, split="train")
x, y = b.x.reshape(8, T, -1), b.y.long()
def run(kind, alpha=1.0, tau=0, p=0.5, norm=0.0):
    E, T, D = x.shape; C = 10
    w = torch.randn(E, D, C) / D**0.5
    acc = []; wn = []
    for t in range(T):
        z = (w * x[:, t, :, None]).mean(1)
        acc.append((z.argmax(-1) == y[:, t]).float().mean().item())
        e = torch.softmax(z, -1) - F.one_hot(y[:, t], C).float()
        a = alpha / (1 + t / tau) ** p if tau else alpha
        w = w - a * x[:, t, :, None] * e[:, None, :]
        if norm:
            r = w.square().mean((1, 2), keepdim=True).sqrt()
            w = w * torch.clamp(norm / r, max=1.0)
        if t in (99, 299, 999, 1999, 3999): wn.append(round(w.std().item(), 2))
    acc = torch.tensor(acc)
    print(f"{kind:28s} online2k {acc[:2000].mean():.3f} last100@2k {acc[1900:2000].mean():.3f} last100@4k {acc[-100:].mean():.3f} std@100/300/1k/2k/4k {wn}", flush=True)
run("sgd a=1")
run("sgd a=0.3", alpha=0.3)
run("sgd a=0.1", alpha=0.1)
run("a=1 tau100 p.5", tau=100)
run("a=1 tau30 p1", tau=30, p=1)
run("a=1 tau100 p1", tau=100, p=1)
for n in (1.0, 2.0, 4.0): run(f"a=1 rmsnorm {n}", norm=n)
run("a=0.3 rmsnorm 2", alpha=.3, norm=2)
