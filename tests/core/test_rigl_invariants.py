"""RigL semantics checked at every update (docs/algorithm.md: "Drop and grow", "Grown weights and their
optimizer state", "Pitfalls we guard against")."""

from __future__ import annotations

import pytest
import torch
from helpers.sparse import OPTIMIZERS, backward, check_invariants_every_update, check_state_zero, setup_sparsifier

from rigl_core.sparse.sparsifier import SPARSIFIERS


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_rigl_invariants_every_update(optimizer):
    check_invariants_every_update(optimizer)


def test_grown_weights_state_zero_and_regrown_state_kept_adam():
    model, opt, sp, data, target = setup_sparsifier(optimizer="adam", delta_t=5)
    for step in range(26):
        backward(model, opt, data, target, step)
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
    model, opt, sp, data, target = setup_sparsifier()
    initial = {k: v.clone() for k, v in sp.masks.items()}
    for step in range(40):
        backward(model, opt, data, target, step)
        sp.step(step)
    changed = sum(int((initial[k] != v).sum()) for k, v in sp.masks.items())
    assert changed > 0
    for layer in sp.layers:
        assert int(sp.masks[layer.name].sum()) == sp.target_active[layer.name]


@pytest.mark.parametrize("method", ["rigl", "set", "snfs"])
def test_exploration_is_the_union_of_every_mask_so_far(method):
    model, opt, sp, data, target = setup_sparsifier(method=method)
    union = {k: v.clone() for k, v in sp.masks.items()}
    numel = sum(layer.numel for layer in sp.layers)
    assert sp.exploration() == pytest.approx(sum(int(m.sum()) for m in union.values()) / numel)
    seen = []
    for step in range(60):
        backward(model, opt, data, target, step)
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
    model, opt, sp, data, target = setup_sparsifier(delta_t=10, t_end=40, grad_accumulation_n=3)
    history = []
    for step in range(21):
        backward(model, opt, data, target, step)
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
    _, opt, static, data, target = setup_sparsifier(method="static")
    initial = {k: v.clone() for k, v in static.masks.items()}
    for step in range(12):
        for layer in static.layers:
            layer.weight.grad = torch.randn_like(layer.weight)
        static.step(step)
    assert all(torch.equal(initial[k], v) for k, v in static.masks.items())

    model, opt, set_sp, data, target = setup_sparsifier(method="set")
    bias = [p for n, p in model.named_parameters() if n.endswith("bias")][0]
    for step in range(9):
        backward(model, opt, data, target, step)
        b0 = bias.detach().clone()
        update = set_sp.step(step)
        if step == 4:
            assert update is not None and update.churn > 0
            assert not torch.equal(b0, bias.detach())  # SET takes the optimizer step on update iterations
    check_state_zero(opt, set_sp)


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
