"""Models users export as `torch.export` programs, and archives rewritten into hostile ones.

The models are what the issue asks to be trainable: a CNN, an attention block, a model with buffers
(persistent and not) and README's residual MLP with a gate. `rewrite` copies a real `.pt2` member by
member, replacing, dropping or adding members, so each hostile archive differs from a valid one in
exactly one way.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

DIGITS = [1, 8, 8]  # the built-in digits dataset's samples


class SmallCNN(nn.Module):
    """Conv, BatchNorm, dropout and two linear layers, for the 8×8 digits."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(8 * 8 * 8, 32)
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.head(self.drop(torch.relu(self.fc(h))))


class AttentionBlock(nn.Module):
    """Self-attention over 8 tokens of width 16, then a pooled linear head."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.head(self.norm(x + h).mean(1))


class WithBuffers(nn.Module):
    """Fixed input statistics (persistent buffers), a non-persistent scale, BatchNorm running stats."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.register_buffer("mean", torch.full((1, 1, 1), 0.5))
        self.register_buffer("std", torch.full((1, 1, 1), 2.0))
        self.register_buffer("scale", torch.tensor(3.0), persistent=False)
        self.fc = nn.Linear(64, 32)
        self.bn = nn.BatchNorm1d(32)
        self.out = nn.Linear(32, classes)

    def forward(self, x):
        x = ((x - self.mean) / self.std).flatten(1)
        return self.out(torch.relu(self.bn(self.fc(x)))) * self.scale


class GatedResidualMLP(nn.Module):
    """README's example: residual blocks whose update is scaled by a learned sigmoid gate."""

    def __init__(self, features: int = 64, width: int = 128, classes: int = 10, blocks: int = 2):
        super().__init__()
        self.inp = nn.Linear(features, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"transform": nn.Linear(width, width), "gate": nn.Linear(width, width)})
            for _ in range(blocks))
        self.out = nn.Linear(width, classes)

    def forward(self, x):
        h = torch.relu(self.inp(x.flatten(1)))
        for block in self.blocks:
            h = h + torch.sigmoid(block["gate"](h)) * torch.relu(block["transform"](h))
        return self.out(h)


def export(model: nn.Module, shape: list[int], path: Path, dynamic: bool = True) -> Path:
    """`model` exported on a batch of 2 samples of `shape` (with a dynamic batch unless `dynamic` is False)."""
    from rigl_core.models.program import save_program

    torch.manual_seed(0)
    x = torch.randn(2, *shape)
    if not dynamic:
        torch.export.save(torch.export.export(model, (x,)), path)
        return path
    return save_program(model, x, path)


# ---------------------------------------------------------------------------------------------- hostile archives
def members(path: Path) -> tuple[str, dict[str, bytes]]:
    """(root folder, {name inside it: bytes}) of a .pt2."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        root = names[0].split("/", 1)[0]
        return root, {name[len(root) + 1:]: archive.read(name) for name in names}


def rewrite(source: Path, target: Path, replace: dict[str, bytes | None] | None = None,
            raw_names: dict[str, bytes] | None = None, compression: int = zipfile.ZIP_STORED) -> Path:
    """`source` with members replaced (None drops one, a new name adds one); `raw_names` are added under
    exactly the given zip names (path escapes)."""
    root, content = members(source)
    for name, data in (replace or {}).items():
        if data is None:
            content.pop(name, None)
        else:
            content[name] = data
    with zipfile.ZipFile(target, "w", compression) as archive:
        for name, data in content.items():
            archive.writestr(f"{root}/{name}", data)
        for name, data in (raw_names or {}).items():
            archive.writestr(name, data)
    return target


def edited_json(source: Path, member: str, edit) -> bytes:
    """The JSON member of `source` after `edit(document)` changed it in place."""
    document = json.loads(members(source)[1][member])
    edit(document)
    return json.dumps(document).encode()


class Payload:
    """A pickle that calls os.mkdir(marker) when unpickled: harmless, and visible if it ever runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


def pickle_payload(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


def torch_save_payload(marker: Path) -> bytes:
    """A `torch.save` file (zip with data.pkl) whose pickle runs os.mkdir(marker)."""
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    return buffer.getvalue()


def _weights_config(source: Path, edit) -> bytes:
    return edited_json(source, "data/weights/model_weights_config.json", edit)


def _first_weight(document: dict) -> dict:
    return next(iter(document["config"].values()))


def _set_batch_expression(text: str):
    def edit(document: dict) -> None:
        graph = document["graph_module"]["graph"]
        name = document["graph_module"]["signature"]["input_specs"][-1]["user_input"]["arg"]["as_tensor"]["name"]
        graph["tensor_values"][name]["sizes"][0]["as_expr"]["expr_str"] = text
    return edit


def _first_node(edit_node):
    def edit(document: dict) -> None:
        edit_node(document["graph_module"]["graph"]["nodes"][0])
    return edit


def _model_json(source: Path, edit) -> bytes:
    return edited_json(source, "models/model.json", edit)


def _raw_pickle_protocol_4(marker: Path) -> bytes:
    """A torch.save-shaped zip whose data.pkl names its global on the stack (STACK_GLOBAL)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(Payload(marker), protocol=4))
        archive.writestr("archive/version", b"3\n")
    return buffer.getvalue()


def _member(name: str, content):
    """A builder adding (or replacing) one member: `content(marker)` bytes, or fixed bytes."""
    return lambda v, t, m: rewrite(v, t, {name: content(m) if callable(content) else content})


def _pickled_tensor(config_member: str, payload_member: str, config):
    """A builder: the config `config(valid)` (an entry marked use_pickle) and a pickle payload as its storage."""
    return lambda v, t, m: rewrite(v, t, {config_member: config(v), payload_member: torch_save_payload(m)})


def _bomb() -> bytes:
    return bytes(64 * 1024 * 1024)  # deflates about 1000-fold


# (id, build(valid .pt2, target path, marker) -> hostile .pt2, what the refusal says). The marker is a
# folder a payload would create if anything unpickled or evaluated it.
HOSTILE = [
    ("pickle-in-sample-inputs",
     _member("data/sample_inputs/model.pt", torch_save_payload),
     "data/sample_inputs/model.pt: the pickle calls posix.mkdir"),
    ("stack-global-pickle-in-sample-inputs",
     _member("data/sample_inputs/model.pt", _raw_pickle_protocol_4),
     "the pickle calls posix.mkdir"),
    ("pickled-weight",
     _pickled_tensor("data/weights/model_weights_config.json", "data/weights/weight_0",
                     lambda v: _weights_config(v, lambda d: _first_weight(d).update(use_pickle=True))),
     "is stored as a pickle"),
    ("pickled-constant",
     _pickled_tensor("data/constants/model_constants_config.json", "data/constants/tensor_0",
                     lambda v: json.dumps({"config": {"c": {"path_name": "tensor_0", "is_param": False,
                                                            "use_pickle": True, "tensor_meta": None}}}).encode()),
     "is stored as a pickle"),
    ("custom-class-object",
     _member("data/constants/custom_obj_0", pickle_payload),
     "custom class objects (torchbind) are not accepted"),
    ("opaque-python-object",
     _member("data/constants/opaque_obj_0", pickle_payload),
     "pickled Python objects are not accepted"),
    ("legacy-pickled-weights",
     _member("data/weights/model.pt", torch_save_payload),
     "pickled weights (the legacy format)"),
    ("legacy-pickled-constants",
     _member("data/constants/model.pt", torch_save_payload),
     "pickled constants (the legacy format)"),
    ("aotinductor-shared-library",
     _member("data/aotinductor/model/model.so", b"\x7fELF"),
     "AOTInductor compiled code"),
    ("extra-file", _member("extra/notes.txt", b"hello"), "extra files are not accepted"),
    ("second-program", _member("models/other.json", b"{}"), "unexpected member"),
    ("zip-bomb",
     lambda v, t, m: rewrite(v, t, {"data/weights/weight_0": _bomb()}, compression=zipfile.ZIP_DEFLATED),
     "(a decompression bomb?)"),
    ("path-climbing-out", lambda v, t, m: rewrite(v, t, raw_names={f"{members(v)[0]}/../../evil": b"x"}),
     "unsafe member path"),
    ("absolute-path", lambda v, t, m: rewrite(v, t, raw_names={"/tmp/evil": b"x"}), "unsafe member paths"),
    ("backslash-path", lambda v, t, m: rewrite(v, t, raw_names={f"{members(v)[0]}\\..\\evil": b"x"}),
     "unsafe member paths"),
    ("python-callable-as-operator",
     lambda v, t, m: rewrite(v, t, {"models/model.json": _model_json(v, _first_node(
         lambda node: node.update(target="torch.os.system")))}),
     "'torch.os.system' is not an ATen operator"),
    ("extension-operator",
     lambda v, t, m: rewrite(v, t, {"models/model.json": _model_json(v, _first_node(
         lambda node: node.update(target="#evil:op")))}),
     "is not an ATen operator"),
    ("guards-code",
     lambda v, t, m: rewrite(v, t, {"models/model.json": _model_json(v, lambda d: d.update(
         guards_code=[f"__import__('os').mkdir({str(m)!r})"]))}),
     "guards_code holds Python code"),
    ("python-in-a-symbolic-size",
     lambda v, t, m: rewrite(v, t, {"models/model.json": _model_json(v, _set_batch_expression(
         f"__import__('os').mkdir({str(m)!r}) or Symbol('s0', positive=True, integer=True)"))}),
     "is not a symbolic size (it would run as Python code)"),
    ("code-in-a-node-name",
     lambda v, t, m: rewrite(v, t, {"models/model.json": _model_json(v, _first_node(
         lambda node: node.update(name=f"x = __import__('os').mkdir({str(m)!r})")))}),
     "is not a plain identifier"),
    ("code-in-the-forward-signature",
     lambda v, t, m: rewrite(v, t, {"models/model.json": _model_json(v, lambda d: d["graph_module"][
         "module_call_graph"][0]["signature"].update(forward_arg_names=[f"x=__import__('os').mkdir({str(m)!r})"]))}),
     "is not a plain identifier"),
    ("custom-object-argument",
     lambda v, t, m: rewrite(v, t, {"models/model.json": _model_json(v, _first_node(
         lambda node: node["inputs"].append({"name": "obj", "arg": {"as_custom_obj": {
             "name": "obj", "class_fqn": "__torch__.torch.classes.evil.Obj"}}, "kind": 1})))}),
     "a custom class object (torchbind)"),
    ("not-a-zip", lambda v, t, m: (t.write_bytes(b"not a zip at all" * 100), t)[1], "not a .pt2 archive"),
]
