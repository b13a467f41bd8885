"""Constant fan-in sparsity (sparsity.structure fan-in, method srigl): every active neuron keeps exactly k
inputs after every step, for every method and optimizer; ablation bookkeeping; exact resume; the plan."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rigl_core import RigL
from rigl_core.sparse.fan_in import fan_in_drop_and_grow, row_counts, to_rows
from rigl_core.spec import JobSpec, SparsitySpec

from helpers.sparse import Conv1D

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01),
}


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 64),
                         nn.ReLU(), nn.Linear(64, 10))


def batches(n: int):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 32, 3, 8, 8, generator=generator)
    return x, (x.mean(dim=(2, 3, 4)) * 40).long().clamp(0, 9)


def assert_constant_fan_in(rigl: RigL) -> None:
    sparsifier = rigl.sparsifier
    for layer in sparsifier.layers:
        mask = sparsifier.masks[layer.name]
        counts = row_counts(mask, layer.kind)
        k = sparsifier.fan_in[layer.name]
        assert set(counts[counts > 0].tolist()) == {k}, (layer.name, counts.unique().tolist(), k)
        assert int((counts > 0).sum()) == sparsifier.active_neurons[layer.name]
        assert not bool((layer.weight.detach() * ~mask).any()), f"{layer.name}: inactive weight not zero"


def train(rigl: RigL, model: nn.Module, optimizer, steps: int, start: int = 0, check: bool = True):
    x, y = batches(steps + start)
    for step in range(start, start + steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[step]), y[step]).backward()
        if rigl.step():
            optimizer.step()
        if check:
            assert_constant_fan_in(rigl)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("method", ["rigl", "set", "static", "srigl"])
def test_every_active_neuron_keeps_exactly_k_inputs_every_step(method, optimizer):
    model = net()
    opt = OPTIMIZERS[optimizer](model.parameters())
    options = {} if method == "srigl" else {"structure": "fan-in"}
    rigl = RigL(model, opt, sparsity=0.9, total_steps=60, method=method, delta_t=5, **options)
    assert_constant_fan_in(rigl)
    before = {n: m.clone() for n, m in rigl.masks.items()}
    train(rigl, model, opt, 60)
    if method != "static":
        assert any(not torch.equal(before[n], m) for n, m in rigl.masks.items()), "masks never changed"


def test_grown_weights_start_at_zero_and_optimizer_state_is_cleared():
    model = net()
    opt = OPTIMIZERS["adam"](model.parameters())
    rigl = RigL(model, opt, sparsity=0.9, total_steps=40, method="rigl", structure="fan-in", delta_t=5)
    train(rigl, model, opt, 4, check=False)  # steps 0..3; step 5 is the first update
    x, y = batches(6)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x[4]), y[4]).backward()
    rigl.step(), opt.step()
    old = {n: m.clone() for n, m in rigl.masks.items()}
    opt.zero_grad()
    nn.functional.cross_entropy(model(x[5]), y[5]).backward()
    assert rigl.step() is False  # RigL's update replaces the optimizer step
    for layer in rigl.sparsifier.layers:
        grown = rigl.masks[layer.name] & ~old[layer.name]
        assert grown.any()
        assert not bool(layer.weight.detach()[grown].any())
        state = opt.state[layer.weight]
        assert not bool(state["exp_avg"][grown].any()) and not bool(state["exp_avg_sq"][grown].any())


def test_drop_is_layer_wide_and_each_neuron_grows_back_what_it_lost():
    torch.manual_seed(3)
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[:, :3] = True  # k = 3 everywhere
    weight = torch.randn(4, 10) * mask
    weight[0, :3] = torch.tensor([0.01, 0.02, 5.0])  # neuron 0 holds the two smallest weights of the layer
    grow = torch.rand(4, 10)
    result, k, alive = fan_in_drop_and_grow(mask, weight, grow, 2, "linear", 3)
    assert (k, alive) == (3, 4)
    kept = result.kept.view(4, 10)
    assert kept[0].sum() == 1 and bool(kept[1:, :3].all())  # both drops came from neuron 0
    assert row_counts(result.new_mask, "linear").tolist() == [3, 3, 3, 3]
    regrown = result.grown.view(4, 10)[0]
    assert regrown.sum() == 2 and not bool((regrown & kept[0]).any())


def test_ablation_removes_weak_neurons_shares_their_budget_and_spares_the_output_layer():
    model = net()
    opt = OPTIMIZERS["sgd"](model.parameters())
    rigl = RigL(model, opt, sparsity=0.9, total_steps=60, method="rigl", structure="fan-in", delta_t=5,
                ablation_threshold=1.0)  # a neuron needs all its inputs salient: some must go
    budget = {n: int(m.sum()) for n, m in rigl.masks.items()}
    train(rigl, model, opt, 60)
    hidden = rigl.sparsifier.layers[1].name
    output = rigl.sparsifier.layers[-1].name
    neurons = {"0": 16, hidden: 64, output: 10}
    assert rigl.sparsifier.active_neurons[hidden] < neurons[hidden]
    assert rigl.sparsifier.active_neurons[output] == 10  # the model's outputs are never ablated
    for name, active in rigl.sparsifier.active_neurons.items():  # survivors share the layer's first budget
        k, fan_in = rigl.sparsifier.fan_in[name], to_rows(rigl.masks[name], "linear").shape[1]
        assert active * k <= budget[name] < active * (k + 1) or k == fan_in, (name, active, k, budget[name])
    report = rigl.report()
    rows = {r["name"]: r for r in report["layers"]}
    assert rows[hidden]["active_neurons"] == rigl.sparsifier.active_neurons[hidden]
    assert rows[hidden]["fan_in"] == rigl.sparsifier.fan_in[hidden]
    updates = [u for u in [rigl.last_update] if u is not None]
    for update in updates:
        assert update.layers[hidden].active_neurons == rigl.sparsifier.active_neurons[hidden]


def test_resume_from_state_dict_is_exact():
    def run(split: int | None):
        model = net()
        opt = OPTIMIZERS["sgd"](model.parameters())
        rigl = RigL(model, opt, sparsity=0.9, total_steps=40, method="srigl", delta_t=5, ablation_threshold=0.9)
        if split is None:
            train(rigl, model, opt, 40, check=False)
            return model, rigl
        train(rigl, model, opt, split, check=False)
        saved = copy.deepcopy((model.state_dict(), opt.state_dict(), rigl.state_dict()))
        model2 = net()
        opt2 = OPTIMIZERS["sgd"](model2.parameters())
        rigl2 = RigL(model2, opt2, sparsity=0.9, total_steps=40, method="srigl", delta_t=5, ablation_threshold=0.9)
        model2.load_state_dict(saved[0]), opt2.load_state_dict(saved[1]), rigl2.load_state_dict(saved[2])
        assert rigl2.sparsifier.neuron_counts() == rigl.sparsifier.neuron_counts()
        train(rigl2, model2, opt2, 40 - split, start=split, check=False)
        return model2, rigl2

    whole, whole_rigl = run(None)
    resumed, resumed_rigl = run(17)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert whole_rigl.sparsifier.neuron_counts() == resumed_rigl.sparsifier.neuron_counts()


def test_plan_rounds_densities_to_whole_fan_ins_and_says_where_it_moved_them():
    model = nn.Sequential(nn.Flatten(), nn.Linear(30, 8), nn.ReLU(), nn.Linear(8, 3))
    spec = SparsitySpec(method="rigl", structure="fan-in", sparsity=0.9, distribution="uniform",
                        dense_first_layer=False)
    rigl = RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.9, total_steps=10,
                structure="fan-in", distribution="uniform", dense_first_layer=False)
    plan = rigl.plan()
    rows = {r["name"]: r for r in plan["layers"]}
    assert rows["1"]["fan_in"] == 3 and rows["1"]["density"] == pytest.approx(0.1)
    assert rows["3"]["fan_in"] == 1 and rows["3"]["density"] == pytest.approx(1 / 8)  # 0.8 of an input rounds up
    assert any(w.startswith("3: fan-in rounds its density 0.1000 to 0.1250") for w in plan["warnings"]), plan["warnings"]
    assert spec.fan_in


@pytest.mark.parametrize("sparsity, field", [
    ({"method": "gmp", "structure": "fan-in"}, "sparsity.structure"),
    ({"method": "snfs", "structure": "fan-in"}, "sparsity.structure"),
    ({"method": "rigl", "structure": "fan-in", "pattern": "2:4"}, "sparsity.structure"),
    ({"method": "rigl", "ablation_threshold": 0.3}, "sparsity.ablation_threshold"),
    ({"method": "static", "structure": "fan-in", "ablation_threshold": 0.3}, "sparsity.ablation_threshold"),
    ({"method": "srigl", "structure": "unstructured"}, "sparsity.structure"),
])
def test_bad_combinations_name_the_field(sparsity, field):
    with pytest.raises(ValueError, match=field):
        JobSpec.model_validate({"model": {"name": "mlp"}, "dataset": {"name": "synthetic"}, "sparsity": sparsity})


def test_srigl_is_rigl_with_fan_in_and_the_papers_threshold():
    spec = SparsitySpec(method="srigl")
    assert (spec.structure, spec.ablation_threshold) == ("fan-in", 0.3)
    assert SparsitySpec(method="srigl", ablation_threshold=0.5).ablation_threshold == 0.5


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.proj = Conv1D(24, 16)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        h = self.attn(x, x, x, need_weights=False)[0]
        return self.head(torch.relu(self.proj(h)).mean(1))


def test_attention_projections_and_gpt2_conv1d_keep_a_constant_fan_in():
    torch.manual_seed(0)
    model = Block()
    opt = OPTIMIZERS["adam"](model.parameters())
    rigl = RigL(model, opt, sparsity=0.8, total_steps=30, method="srigl", delta_t=5, distribution="uniform",
                dense_first_layer=False)
    kinds = {layer.name: layer.kind for layer in rigl.sparsifier.layers}
    assert kinds.get("attn.in_proj") == "attention" and kinds.get("proj") == "conv1d_hf"
    assert row_counts(rigl.masks["proj"], "conv1d_hf").shape == (24,)  # Conv1D's neurons are its columns
    generator = torch.Generator().manual_seed(2)
    for _ in range(30):
        x = torch.randn(8, 5, 16, generator=generator)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), torch.randint(0, 10, (8,), generator=generator)).backward()
        if rigl.step():
            opt.step()
        assert_constant_fan_in(rigl)
