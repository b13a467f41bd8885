"""RigL semantics checked at every update (rigl_spec.md §0, §3, §7.12)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rigl_core.sparse.layers import select_layers
from rigl_core.sparse.distributions import layer_sparsities
from rigl_core.sparse.schedules import UpdateSchedule
from rigl_core.sparse.sparsifier import SPARSIFIERS

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
}


def _setup(method="rigl", optimizer="sgd", delta_t=4, t_end=40, sparsity=0.8, seed=0, grad_accumulation_n=1):
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


def _batch(data, target, step, size=32):
    i = (step * size) % len(data)
    return data[i : i + size], target[i : i + size]


def _backward(model, opt, data, target, step):
    """One minibatch's dense gradients, as a training loop computes them before `sparsifier.step`."""
    x, y = _batch(data, target, step)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def _check_state_zero(opt, sp):
    for layer in sp.layers:
        inactive = ~sp.masks[layer.name]
        assert torch.count_nonzero(layer.weight[inactive]) == 0, f"{layer.name}: inactive weight nonzero"
        for key, value in opt.state.get(layer.weight, {}).items():
            if torch.is_tensor(value) and value.shape == layer.weight.shape:
                assert torch.count_nonzero(value[inactive]) == 0, f"{layer.name}: {key} nonzero at inactive"


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_rigl_invariants_every_update(optimizer):
    model, opt, sp, data, target = _setup(optimizer=optimizer)
    targets = {layer.name: sp.target_active[layer.name] for layer in sp.layers}
    updates = []
    for step in range(60):
        _backward(model, opt, data, target, step)
        before = {l.name: l.weight.detach().clone() for l in sp.layers}
        grads = {l.name: l.weight.grad.detach().clone() for l in sp.layers}
        others_before = [p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias")]
        update = sp.step(step)
        if not sp.schedule.is_update_step(step):
            assert update is None
            _check_state_zero(opt, sp)
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
        _check_state_zero(opt, sp)
    assert updates == list(range(0, 40, 4))  # t mod ΔT == 0 and t < T_end; none after T_end


def test_grown_weights_state_zero_and_regrown_state_kept_adam():
    model, opt, sp, data, target = _setup(optimizer="adam", delta_t=5)
    for step in range(26):
        _backward(model, opt, data, target, step)
        state_before = {l.name: opt.state[l.weight]["exp_avg"].clone() if l.weight in opt.state else None
                        for l in sp.layers}
        update = sp.step(step)
        if update is None or state_before[sp.layers[0].name] is None:
            continue
        for layer in sp.layers:
            d = sp.last_details[layer.name]
            grown, old = d["grown"], d["old"].reshape(-1)
            exp_avg = opt.state[layer.weight]["exp_avg"].reshape(-1)
            assert torch.count_nonzero(exp_avg[grown & ~old]) == 0
            assert torch.equal(exp_avg[grown & old], state_before[layer.name].reshape(-1)[grown & old])


def test_masks_actually_change_and_nnz_is_kept():
    model, opt, sp, data, target = _setup()
    initial = {k: v.clone() for k, v in sp.masks.items()}
    for step in range(40):
        _backward(model, opt, data, target, step)
        sp.step(step)
    changed = sum(int((initial[k] != v).sum()) for k, v in sp.masks.items())
    assert changed > 0
    for layer in sp.layers:
        assert int(sp.masks[layer.name].sum()) == sp.target_active[layer.name]


@pytest.mark.parametrize("method", ["rigl", "set", "snfs"])
def test_exploration_is_the_union_of_every_mask_so_far(method):
    model, opt, sp, data, target = _setup(method=method)
    union = {k: v.clone() for k, v in sp.masks.items()}
    numel = sum(layer.numel for layer in sp.layers)
    assert sp.exploration() == pytest.approx(sum(int(m.sum()) for m in union.values()) / numel)
    seen = []
    for step in range(60):
        _backward(model, opt, data, target, step)
        update = sp.step(step)
        if update is None:
            continue
        for name, mask in sp.masks.items():
            union[name] |= mask
            assert torch.equal(sp.ever_active[name], union[name])
            assert update.layers[name].ever_active == int(union[name].sum())
        expected = sum(int(m.sum()) for m in union.values()) / numel
        assert update.exploration == pytest.approx(expected) == pytest.approx(sp.exploration())
        seen.append(update.exploration)
    assert seen == sorted(seen) and seen[-1] > 0.2  # grows past the 20% density as weights are regrown elsewhere
    restored = SPARSIFIERS[method](sp.layers, [sp.sparsity[layer.name] for layer in sp.layers], opt, sp.schedule)
    restored.load_state_dict(sp.state_dict())  # resume keeps the history, not just the masks
    assert restored.ever_active_counts() == sp.ever_active_counts()


def test_grad_accumulation_scores_average_last_n_batches():
    model, opt, sp, data, target = _setup(delta_t=10, t_end=40, grad_accumulation_n=3)
    history = []
    for step in range(21):
        _backward(model, opt, data, target, step)
        history.append({l.name: l.weight.grad.detach().clone() for l in sp.layers})
        if step == 20:
            expected = {n: sum(h[n] for h in history[18:21]).abs() for n in history[-1]}
            sp.observe_gradients(step)  # what sp.step() does first
            for index, layer in enumerate(sp.layers):
                assert torch.allclose(sp.grow_score(index, layer), expected[layer.name], atol=1e-6)
            break
        sp.step(step)
        if step not in (8, 9, 18, 19):
            assert not sp.grad_sums  # dense gradients kept only right before an update


def test_static_masks_never_change_and_set_grows_randomly():
    _, opt, static, data, target = _setup(method="static")
    initial = {k: v.clone() for k, v in static.masks.items()}
    for step in range(12):
        for layer in static.layers:
            layer.weight.grad = torch.randn_like(layer.weight)
        static.step(step)
    assert all(torch.equal(initial[k], v) for k, v in static.masks.items())

    model, opt, set_sp, data, target = _setup(method="set")
    bias = [p for n, p in model.named_parameters() if n.endswith("bias")][0]
    for step in range(9):
        _backward(model, opt, data, target, step)
        b0 = bias.detach().clone()
        update = set_sp.step(step)
        if step == 4:
            assert update is not None and update.churn > 0
            assert not torch.equal(b0, bias.detach())  # SET takes the optimizer step on update iterations
    _check_state_zero(opt, set_sp)


def test_fast_topk_is_exact():
    from rigl_core.sparse.masking import topk_indices

    generator = torch.Generator().manual_seed(0)
    for n, k in ((300_000, 10), (300_000, 30_000), (1_000_000, 5_000)):
        scores = torch.randn(n, generator=generator)
        scores[: n // 2] = -float("inf")  # like kept/inactive positions
        got = set(topk_indices(scores, k).tolist())
        assert got == set(torch.topk(scores, k).indices.tolist())
    ties = torch.zeros(500_000)
    ties[:100] = 1.0
    picked = topk_indices(ties, 1000)
    assert picked.numel() == 1000 and ties[picked].sum() == 100  # all the ones, then any of the tied zeros
