"""Issue 15 probe (not product code): run a command with the sub-LSTM output h = σ(o)·S·tanh(c/S) in place of
σ(o)·tanh(c) (S = $H_BOUND; S = 1 is the engine's cell, vsml/engine/cell.py::gates_to_state), to test
whether a wider range of h lets a clone follow SGD's growing weights (RESULTS.md, issue 15, sixth session).
Only the eager PyTorch path is patched: train.py must get --backend torch, and every learner loaded through
vsml.evaluation.load.load_learner is forced onto the torch backend.  θ trained with S ≠ 1 is only meaningful
under this script with the same S.

    H_BOUND=4 python experiments/issue15_hbound_probe.py train.py --task mnist+resize14+proj --clone.steps 600 \
        --steps 0 --vsml.logit_scale 2 --backend torch --seed 3 --name i15-hb4-s1 --data_dir ../shared/datasets
    H_BOUND=4 python experiments/issue15_hbound_probe.py train.py --preset clone-long-k2 --init_from runs/i15-hb4-s1 \
        --clone.steps 200 --backend torch --name i15-hb4-s2 --data_dir ../shared/datasets
    H_BOUND=4 python experiments/issue15_hbound_probe.py experiments/issue15_val.py \
        --checkpoints runs/i15-hb4-s2/checkpoints/step_000200.pt --episodes 16 --baselines "" --data_dir ../shared/datasets
"""
from __future__ import annotations

import os

import torch

import vsml.engine.cell as C
from vsml.engine.cell import GATE_F_OFFSET, GATE_I_OFFSET

S = float(os.environ.get("H_BOUND", "1"))


def gates_to_state(gates, c, tanh=torch.tanh):
    """C.gates_to_state with h' = σ(o)·S·tanh(c'/S)."""
    gi, gg, gf, go = gates.chunk(4, dim=-1)
    c = torch.sigmoid(gf + GATE_F_OFFSET) * c + torch.sigmoid(gi + GATE_I_OFFSET) * tanh(gg)
    return torch.sigmoid(go) * (S * tanh(c / S)), c


if __name__ == "__main__":
    from issue15_probe_runner import run_script
    C.gates_to_state = gates_to_state
    run_script("H_BOUND=S python experiments/issue15_hbound_probe.py")
