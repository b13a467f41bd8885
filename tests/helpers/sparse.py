"""What the sparsifier tests share: a small MLP with a sparsifier on it, its minibatches, the per-update
RigL invariant check (test_rigl_invariants runs it in fp32, test_precision under bf16 autocast), and
MaskWatch, the same check on a Trainer (test_precision, test_kernels); a replica of GPT-2's Conv1D."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rigl_core.sparse.distributions import layer_sparsities
from rigl_core.sparse.layers import select_layers
from rigl_core.sparse.schedules import UpdateSchedule
from rigl_core.sparse.sparsifier import SPARSIFIERS
from rigl_core.training.trainer import Callback

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
}


def setup_sparsifier(method="rigl", optimizer="sgd", delta_t=4, t_end=40, sparsity=0.8, seed=0, grad_accumulation_n=1):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 30), nn.ReLU(), nn.Linear(30, 5))
    layers = [l for l in select_layers(model, "erk") if l.masked]
    sparsities = layer_sparsities([l.shape for l in layers], sparsity, "erk")
    opt = OPTIMIZERS[optimizer](model.parameters())
    schedule = UpdateSchedule(delta_t=delta_t, t_end=t_end, alpha=0.3)
    sp = SPARSIFIERS[method](layers, sparsities, opt, schedule, seed=seed, grad_accumulation_n=grad_accumulation_n)
    sp.init_masks()
    sp.record_details = True
    data = torch.randn(512, 20)
    target = (data[:, :5].argmax(1))
    return model, opt, sp, data, target


def batch(data, target, step, size=32):
    i = (step * size) % len(data)
    return data[i : i + size], target[i : i + size]


def backward(model, opt, data, target, step):
    """One minibatch's dense gradients, as a training loop computes them before `sparsifier.step`."""
    x, y = batch(data, target, step)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def check_state_zero(opt, sp):
    for layer in sp.layers:
        inactive = ~sp.masks[layer.name]
        assert torch.count_nonzero(layer.weight[inactive]) == 0, f"{layer.name}: inactive weight nonzero"
        for key, value in opt.state.get(layer.weight, {}).items():
            if torch.is_tensor(value) and value.shape == layer.weight.shape:
                assert torch.count_nonzero(value[inactive]) == 0, f"{layer.name}: {key} nonzero at inactive"


def check_invariants_every_update(optimizer: str, backward=backward) -> None:
    """RigL at every update over 60 steps: drop smallest |w|, grow largest |g|, nnz constant, no optimizer
    step on update iterations, inactive weights and optimizer state exactly 0. `backward` computes one
    minibatch's gradients (test_precision passes one under bf16 autocast)."""
    model, opt, sp, data, target = setup_sparsifier(optimizer=optimizer)
    targets = {layer.name: sp.target_active[layer.name] for layer in sp.layers}
    updates = []
    for step in range(60):
        backward(model, opt, data, target, step)
        before = {l.name: l.weight.detach().clone() for l in sp.layers}
        grads = {l.name: l.weight.grad.detach().clone() for l in sp.layers}
        others_before = [p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias")]
        update = sp.step(step)
        if not sp.schedule.is_update_step(step):
            assert update is None
            check_state_zero(opt, sp)
            continue
        updates.append(step)
        fraction = 0.3 / 2 * (1 + math.cos(math.pi * step / 40))
        assert update.drop_fraction == pytest.approx(fraction)
        # no optimizer step on an update iteration: biases untouched too
        for b0, (n, p) in zip(others_before, [(n, p) for n, p in model.named_parameters() if n.endswith("bias")]):
            assert torch.equal(b0, p.detach()), n
        for layer in sp.layers:
            d = sp.last_details[layer.name]
            old, kept, grown = d["old"].reshape(-1), d["kept"], d["grown"]
            new = sp.masks[layer.name].reshape(-1)
            n_active = targets[layer.name]
            k = int(fraction * n_active)
            assert int(new.sum()) == n_active  # nnz constant
            assert int(kept.sum()) == n_active - k and int(grown.sum()) == k
            assert not (kept & grown).any()  # kept ∩ grown = ∅ (no kept position chosen for growth)
            assert not (kept & ~old).any()  # only active weights can be kept
            w_old = before[layer.name].reshape(-1)
            w_new = layer.weight.detach().reshape(-1)
            dropped = old & ~kept
            # dropped are the k smallest |w| among active
            if k:
                assert w_old[dropped].abs().max() <= w_old[kept].abs().min()
            # grown are the k largest |dense gradient| among non-kept positions
            g = grads[layer.name].reshape(-1).abs()
            if k:
                assert g[grown].min() >= g[~kept & ~grown].max()
            regrown = grown & old
            fresh = grown & ~old
            assert torch.count_nonzero(w_new[fresh]) == 0  # newly grown start at 0
            assert torch.equal(w_new[regrown], w_old[regrown])  # dropped-and-regrown keep their value
            assert torch.equal(w_new[kept], w_old[kept])  # and no SGD step moved the kept ones
        check_state_zero(opt, sp)
    assert updates == list(range(0, 40, 4))  # t mod ΔT == 0 and t < T_end; none after T_end


class MaskWatch(Callback):
    """After every mask update: inactive weights exactly 0 and nnz at its target."""

    def __init__(self):
        self.updates = 0
        self.losses = []

    def on_step(self, trainer, metrics):
        self.losses.append(metrics["loss"])

    def on_mask_update(self, trainer, update):
        self.updates += 1
        assert trainer.leak_check()["ok"], trainer.leak_check()
        for name, target in trainer.sparsifier.target_active.items():
            assert int(trainer.sparsifier.masks[name].sum()) == target


class Conv1D(nn.Module):
    """A replica of transformers.pytorch_utils.Conv1D (GPT-2): weight stored (in, out)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], self.nf)
