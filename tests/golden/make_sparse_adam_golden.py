#!/usr/bin/env python3
"""Golden values for meft's lazy Adam from torch.optim.SparseAdam.

Writes sparse_adam_golden.json: an initial parameter matrix, a sequence of optimizer steps
(each with several micro-batches of row-sparse gradients, a learning rate, a clip factor and a
weight decay) and torch's parameter and Adam state after every step. meft's semantics on top of
SparseAdam: gradients are summed over micro-batches, multiplied by the clip factor, and touched
rows get decoupled weight decay p *= 1 - lr * wd before the Adam update.

Run once where PyTorch is installed (Debian: apt-get install python3-torch):
    /usr/bin/python3 tests/golden/make_sparse_adam_golden.py
"""
import json
import os

import torch

torch.manual_seed(1234)
ROWS, DIM = 7, 5
BETAS, EPS = (0.9, 0.999), 1e-8

param = torch.nn.Parameter(torch.randn(ROWS, DIM) * 0.1)
initial = param.detach().clone()
opt = torch.optim.SparseAdam([param], lr=1.0, betas=BETAS, eps=EPS)

plan = [
    # (micro-batches as row lists, lr, clip, weight_decay)
    ([[0, 2, 5], [2, 3]], 1e-2, 1.0, 0.0),
    ([[1, 2]], 5e-3, 0.5, 0.1),
    ([[6], [0, 6], [6, 4]], 2e-2, 0.75, 0.0),
    ([[2, 3, 5]], 1e-2, 1.0, 0.05),
    ([[0, 1, 2, 3, 4, 5, 6]], 1e-3, 0.9, 0.0),
]

steps = []
for micro_rows, lr, clip, wd in plan:
    micro = []
    total = None
    for rows in micro_rows:
        values = torch.randn(len(rows), DIM)
        micro.append({"rows": rows, "grads": values.flatten().tolist()})
        g = torch.sparse_coo_tensor(torch.tensor([rows]), values, (ROWS, DIM))
        total = g if total is None else total + g
    total = (total.coalesce() * clip).coalesce()
    touched = total.indices()[0]
    with torch.no_grad():
        if wd != 0.0:
            param[touched] = param[touched] * (1.0 - lr * wd)
    for group in opt.param_groups:
        group["lr"] = lr
    param.grad = total
    opt.step()
    state = opt.state[param]
    steps.append({
        "micro_batches": micro, "lr": lr, "clip": clip, "weight_decay": wd,
        "param": param.detach().flatten().tolist(),
        "exp_avg": state["exp_avg"].flatten().tolist(),
        "exp_avg_sq": state["exp_avg_sq"].flatten().tolist(),
        "step": int(state["step"]),
    })

out = {
    "generator": "torch.optim.SparseAdam, torch " + torch.__version__,
    "rows": ROWS, "dim": DIM, "beta1": BETAS[0], "beta2": BETAS[1], "eps": EPS,
    "initial": initial.flatten().tolist(), "steps": steps,
}
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sparse_adam_golden.json")
with open(path, "w") as f:
    json.dump(out, f, indent=1)
print("wrote", path)
