"""Masks and FLOPs beyond conv/linear: attention, RNNs, embeddings (opt-in) and GPT-2's Conv1D; plans whose
totals are the model's real sparsity; googlenet/inception train."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from rigl_core.cli import main
from rigl_core.export.packed import load_packed, save_packed
from rigl_core.sparse.layers import select_layers
from rigl_core.models.registry import build_model
from rigl_core.training.optim import param_groups
from rigl_core.sparse.plan import make_plan
from rigl_core.sparse.schedules import UpdateSchedule
from rigl_core.sparse.sparsifier import SPARSIFIERS
from rigl_core.spec import SparsitySpec

from helpers.sparse import Conv1D

L, E = 6, 16  # tokens, embedding width


class Attention(nn.Module):
    """Self-attention (packed in_proj) and cross-attention with kdim/vdim (separate q/k/v projections)."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(E, E)
        self.attn = nn.MultiheadAttention(E, 4, batch_first=batch_first)
        self.keys = nn.Linear(E, 8)
        self.cross = nn.MultiheadAttention(E, 2, kdim=8, vdim=8, batch_first=batch_first)
        self.head = nn.Linear(E, 3)

    def forward(self, x):  # x: (N, L, E)
        h = self.inp(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.attn(h, h, h, need_weights=False)[0]
        k = self.keys(h)
        h = self.cross(h, k, k, need_weights=False)[0]
        return self.head(h.mean(1 if self.batch_first else 0))


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(E, 12, num_layers=2, bidirectional=True, batch_first=True)
        self.lstm = nn.LSTM(24, 10, num_layers=2, bidirectional=True)  # (L, N, ·)
        self.head = nn.Linear(20, 3)

    def forward(self, x):
        h = self.gru(x)[0].transpose(0, 1)
        return self.head(self.lstm(h)[0][-1])


class Embedded(nn.Module):
    """Token ids (carried as floats by the plan's dummy input) -> embedding -> GPT-2 Conv1D -> head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(400, E)
        self.mlp = Conv1D(32, E)
        self.head = nn.Linear(32, 3)

    def forward(self, x):  # x: (N, L) ids
        return self.head(torch.relu(self.mlp(self.emb(x.long()))).mean(1))


def _inputs(name: str, n: int = 8) -> torch.Tensor:
    return torch.randint(0, 400, (n, L)).float() if name == "embedded" else torch.randn(n, L, E)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return {"attn_bf": lambda: Attention(True), "attn_sf": lambda: Attention(False), "rnn": Recurrent,
            "embedded": Embedded}[name]()


def _input_shape(name: str) -> list[int]:
    return [L] if name == "embedded" else [L, E]


def _sparsifier(model, plan, steps_between=2):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sp = SPARSIFIERS["rigl"]([lp.layer for lp in plan.masked], [lp.target_sparsity for lp in plan.masked], opt,
                             UpdateSchedule(delta_t=steps_between, t_end=7, alpha=0.3), seed=0)
    sp.init_masks()
    return opt, sp


def _fill_nonzero(model: nn.Module) -> None:
    """Every parameter nonzero (zero-initialised biases and heads included), so zeros counted later are masks'."""
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.05, 0.1)


def _measured(model, plan) -> tuple[float, float]:
    """(sparsity over the masked weights, over every parameter of the model), counted in the tensors."""
    masked = [lp.layer.weight for lp in plan.masked]
    zeros = sum(int((w == 0).sum()) for w in masked)
    everything = list(model.parameters())
    return (zeros / sum(w.numel() for w in masked),
            sum(int((p == 0).sum()) for p in everything) / sum(p.numel() for p in everything))


@pytest.mark.parametrize("name,embeddings", [("attn_bf", False), ("attn_sf", False), ("rnn", False),
                                             ("embedded", True), ("embedded", False)])
def test_masks_exact_and_totals_real(name, embeddings):
    model = _model(name)
    plan = make_plan(model, _input_shape(name), SparsitySpec(sparsity=0.8, embeddings=embeddings))
    totals = plan.to_dict()["totals"]
    assert totals["model_params"] == sum(p.numel() for p in model.parameters())
    _fill_nonzero(model)
    opt, sp = _sparsifier(model, plan)
    masked_sparsity, overall = _measured(model, plan)  # right after init: every active weight is nonzero
    assert masked_sparsity == pytest.approx(totals["sparsity"], abs=1e-12)
    assert overall == pytest.approx(totals["overall_sparsity"], abs=1e-12)
    assert totals["sparsity"] == pytest.approx(0.8, abs=0.01)
    x, y = _inputs(name), torch.randint(0, 3, (8,))
    updates = 0
    for step in range(8):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        updates += sp.step(step) is not None
        for layer in sp.layers:
            mask = sp.masks[layer.name]
            assert torch.count_nonzero(layer.weight.detach()[~mask]) == 0, layer.name
            assert int(mask.sum()) == sp.target_active[layer.name], layer.name
    assert updates == 4  # steps 0, 2, 4, 6: the masks moved while staying exact


def test_names_kinds_and_state_dict_keys():
    names = {l.name: l for l in select_layers(_model("attn_bf"), "erk")}
    assert list(names) == ["inp", "attn.in_proj", "attn.out_proj", "keys", "cross.q_proj", "cross.k_proj",
                           "cross.v_proj", "cross.out_proj", "head"]
    assert names["attn.in_proj"].param_name == "attn.in_proj_weight"
    assert names["attn.in_proj"].shape == (3 * E, E)
    assert names["cross.k_proj"].shape == (E, 8)
    rnn = [l.name for l in select_layers(_model("rnn"), "erk")]
    assert rnn[:4] == ["gru.weight_ih_l0", "gru.weight_hh_l0", "gru.weight_ih_l0_reverse", "gru.weight_hh_l0_reverse"]
    assert len([n for n in rnn if n.startswith("lstm.")]) == 8
    emb = {l.name: l for l in select_layers(_model("embedded"), "uniform")}
    assert emb["mlp"].fan_shape == (32, E) and emb["mlp"].shape == (E, 32)  # Conv1D stores (in, out)
    assert not emb["emb"].masked and "sparsity.embeddings" in emb["emb"].reason
    assert not emb["mlp"].masked and emb["mlp"].reason == "first layer dense"  # the embedding is not "first"
    for model in (_model("attn_sf"), _model("rnn"), _model("embedded")):
        state = model.state_dict()
        assert all(l.param_name in state for l in select_layers(model, "erk"))
    # exclude by the attention module's name reaches its packed projection
    excluded = {l.name: l.masked for l in select_layers(_model("attn_bf"), "erk", exclude=["attn"])}
    assert not excluded["attn.in_proj"] and excluded["attn.out_proj"]


def test_flops_counted_where_used():
    dense = SparsitySpec(method="dense")
    rows = {r["name"]: r for r in make_plan(_model("attn_sf"), [L, E], dense).to_dict()["layers"]}
    assert rows["attn.in_proj"]["flops_dense"] == 2 * 3 * E * E * L  # 2·3E·E per token
    assert rows["attn.out_proj"]["flops_dense"] == 2 * E * E * L  # its own hook never fires
    assert rows["cross.k_proj"]["flops_dense"] == 2 * E * 8 * L
    assert rows["cross.out_proj"]["flops_dense"] == 2 * E * E * L
    plan = make_plan(_model("attn_bf"), [L, E], dense)
    assert plan.to_dict()["totals"]["flops_attention"] == 2 * 4 * L * L * E  # two attentions, 4·L·S·E each
    rows = {r["name"]: r for r in make_plan(_model("rnn"), [L, E], SparsitySpec()).to_dict()["layers"]}
    assert rows["gru.weight_hh_l1_reverse"]["flops_dense"] == 2 * 3 * 12 * 12 * L  # once per time step
    assert rows["lstm.weight_ih_l1"]["flops_dense"] == 2 * 4 * 10 * 20 * L
    rows = {r["name"]: r for r in make_plan(_model("embedded"), [L], SparsitySpec(embeddings=True)).to_dict()["layers"]}
    assert rows["emb"]["flops_dense"] == 0 and rows["emb"]["masked"]  # a lookup
    assert rows["mlp"]["flops_dense"] == 2 * E * 32 * L


def test_erk_uses_fan_in_and_out():
    plan = make_plan(_model("embedded"), [L], SparsitySpec(distribution="er", embeddings=True))
    by = {lp.layer.name: lp.target_sparsity for lp in plan.layers}
    raw = {"emb": (400 + E) / (400 * E), "mlp": (E + 32) / (E * 32), "head": (32 + 3) / (32 * 3)}
    # ER densities are proportional to (fan_in + fan_out)/(fan_in·fan_out) for layers below density 1
    assert (1 - by["emb"]) / (1 - by["mlp"]) == pytest.approx(raw["emb"] / raw["mlp"], rel=1e-6)


def test_tied_weights_one_mask_every_use_counted():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, E)
            self.out = nn.Linear(E, 50, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, x):
            return self.out(self.emb(x.long()))[:, -1]

    plan = make_plan(Tied(), [L], SparsitySpec(embeddings=True))
    (lp,) = plan.layers
    assert lp.layer.name == "emb" and lp.layer.tied == ["out"] and lp.layer.masked
    assert lp.flops_dense == 2 * 50 * E * L


def test_export_packs_new_kinds(tmp_path):
    model = _model("attn_bf")
    plan = make_plan(model, [L, E], SparsitySpec(sparsity=0.8))
    _, sp = _sparsifier(model, plan)
    path = save_packed(model, sp.masks, tmp_path / "p.safetensors")
    meta = json.loads(__import__("safetensors").safe_open(str(path), "pt").metadata()["rigl"])
    assert {"attn.in_proj_weight", "cross.q_proj_weight", "attn.out_proj.weight"} <= set(meta["tensors"])
    unpacked = load_packed(path)
    assert all(torch.equal(unpacked[k], v) for k, v in model.state_dict().items())


def test_weight_decay_reaches_new_kernels_not_embeddings():
    model = _model("embedded")
    decay = {id(p) for p in param_groups(model, 1e-4, kernels_only=True)[0]["params"]}
    assert id(model.mlp.weight) in decay and id(model.emb.weight) not in decay
    attn = _model("rnn")
    decay = {id(p) for p in param_groups(attn, 1e-4, kernels_only=True)[0]["params"]}
    assert id(attn.gru.weight_hh_l1_reverse) in decay and id(attn.gru.bias_ih_l0) not in decay


def test_warns_about_large_unmasked_weights():
    class Big(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(40, 64))  # no maskable layer type
            self.emb = nn.Embedding(400, 64)
            self.fc = nn.Linear(64, 64)
            self.head = nn.Linear(64, 3)

        def forward(self, x):
            return self.head(self.fc(self.emb(x.long()) + self.pos[: x.shape[1]])).mean(1)

    warnings = make_plan(Big(), [L], SparsitySpec()).warnings()
    assert len(warnings) == 2 and "emb (25,600 weights" in warnings[0] and "sparsity.embeddings" in warnings[0]
    assert warnings[1].startswith("pos (2,560 weights")
    assert not any("fc" in w for w in make_plan(Big(), [L], SparsitySpec(exclude=["fc"])).warnings())
    assert len(make_plan(Big(), [L], SparsitySpec(embeddings=True)).warnings()) == 1
    assert make_plan(Big(), [L], SparsitySpec(method="dense")).warnings() == []


def test_vit_b_16_plan_masks_attention(capsys):
    """The issue's figures: in_proj masked, whole model really ~0.9 sparse, kernel FLOPs by hand."""
    assert main(["plan", "--model", "vit_b_16", "--sparsity", "0.9", "--json"]) == 0
    out = capsys.readouterr()
    plan = json.loads(out.out)
    assert "warning" not in out.err
    rows = {r["name"]: r for r in plan["layers"]}
    in_proj = rows["encoder.layers.encoder_layer_0.self_attention.in_proj"]
    assert in_proj["masked"] and in_proj["shape"] == [2304, 768]
    t = plan["totals"]
    assert t["model_params"] == 86_567_656 and t["masked_params"] == 86_292_480
    assert t["sparsity"] == pytest.approx(0.9, abs=1e-5) and t["overall_sparsity"] == pytest.approx(0.897, abs=1e-3)
    tokens, e = 197, 768
    per_block = 2 * tokens * (3 * e * e + e * e + 2 * e * 3072)  # in_proj, out_proj, MLP
    patchify = 2 * 196 * e * 3 * 16 * 16
    assert t["flops_dense"] == 12 * per_block + patchify + 2 * e * 1000
    assert t["flops_attention"] == 12 * 4 * tokens * tokens * e
    assert (t["flops_dense"] + t["flops_attention"]) / 1e9 == pytest.approx(35.1, abs=0.1)


def test_small_vit_plan_matches_built_model():
    import torchvision

    def vit():
        torch.manual_seed(0)
        return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                    hidden_dim=32, mlp_dim=64, num_classes=10)

    plan = make_plan(vit(), [3, 32, 32], SparsitySpec(sparsity=0.9))
    model = vit()
    _fill_nonzero(model)  # torchvision zero-initialises the head
    real = make_plan(model, [3, 32, 32], SparsitySpec(sparsity=0.9))
    _sparsifier(model, real)
    masked_sparsity, overall = _measured(model, real)
    t = plan.to_dict()["totals"]
    assert masked_sparsity == pytest.approx(t["sparsity"], abs=1e-12)
    assert overall == pytest.approx(t["overall_sparsity"], abs=1e-12)
    assert sum(int(lp.layer.masked) for lp in plan.layers if lp.layer.name.endswith("in_proj")) == 2


@pytest.mark.parametrize("name,side", [("googlenet", 32), ("inception_v3", 75)])
def test_aux_logit_models_train(name, side):
    model = build_model(name, 10, [3, side, side]).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    out = model(torch.randn(2, 3, side, side))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)
    nn.functional.cross_entropy(out, torch.tensor([1, 2])).backward()
    opt.step()
    assert not any("aux" in n for n, _ in model.named_parameters())
    assert math.isfinite(float(out.detach().sum()))
