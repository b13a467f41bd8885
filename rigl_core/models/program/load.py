"""`load_program`: a `.pt2` file in, a trainable ProgramModule out, without running anything from the file.

How `torch.export.load` (torch 2.14) would run code from a file, and what is done instead:

- it unpickles `data/sample_inputs/model.pt` with weights_only=True, then weights_only=False when that
  fails: here it is never loaded, and its opcodes must only rebuild tensors (pickle_scan.py);
- it unpickles tensors stored with `use_pickle` (weights_only=False), torchbind objects, opaque objects
  (pickle.loads) and legacy `model.pt` files, and loads AOTInductor shared libraries: all refused
  (payload.py, archive.py);
- it runs `sympy.sympify` (an eval) on every symbolic-size string: each is parsed with `ast` first
  (expressions.py);
- it resolves operator names by attribute lookup from torch/operator/math or extension handlers:
  ATen operators only (graph_rules.py);
- `.module()` execs `guards_code` and generated guard code: non-empty guards code is refused and the
  module is made with `check_guards=False`;
- torch.fx writes node and argument names into the `forward` source it runs: they must be
  identifiers (graph_rules.py).

The archive itself is read as an untrusted zip (archive.py). Then torch's own deserializer builds the
graph from the checked, sanitised JSON with the tensors read here, and trainable.py turns it into a
module. `inspect_program` is the upload's check: the same steps on meta tensors plus a value scan,
without holding the weights in memory.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from rigl_core.models.program import archive as pt2
from rigl_core.models.program.archive import ArchiveLimits, Pt2Archive
from rigl_core.models.program.errors import ProgramError
from rigl_core.models.program.graph_rules import check_document, sanitized
from rigl_core.models.program.payload import check_values, parameter_count, parse_config, read_payload
from rigl_core.models.program.pickle_scan import check_tensor_pickle
from rigl_core.models.program.shapes import program_shape
from rigl_core.models.program.trainable import ProgramModule, build_trainable

_DESERIALIZING = threading.Lock()  # torch's deserializer keeps its state in a module global


@dataclass(frozen=True)
class ProgramSummary:
    """What the service records about an uploaded program."""

    input_shape: list[int]
    num_classes: int
    params: int
    kernels: list[str]  # layers found for masking (linear/conv weights)
    notes: list[str]
    operators: int  # graph nodes


def load_program(path: str | Path, device: torch.device | str | None = None,
                 limits: ArchiveLimits = ArchiveLimits()) -> ProgramModule:
    """The program at `path` as a trainable module on `device` (`"meta"`: shapes only, no weights read).
    Raises ProgramError saying why the file is refused."""
    meta = device is not None and torch.device(device).type == "meta"
    with Pt2Archive(path, limits) as archive:
        doc, shape, weights, constants = _checked(archive)
        state = read_payload(archive, weights, meta)
        tensors = read_payload(archive, constants, meta)
    model = _build(doc, shape, state, tensors)
    return model if device is None or meta else model.to(device)


def inspect_program(path: str | Path, limits: ArchiveLimits = ArchiveLimits()) -> ProgramSummary:
    """Every check `load_program` makes, a scan of the values (no inf/NaN), and one meta forward at two
    batch sizes; the weights are streamed, never held."""
    with Pt2Archive(path, limits) as archive:
        doc, shape, weights, constants = _checked(archive)
        check_values(archive, weights + constants)
        model = _build(doc, shape, read_payload(archive, weights, True), read_payload(archive, constants, True))
    for batch in (2, 3):
        try:
            with torch.no_grad():
                out = model.eval()(torch.empty(batch, *shape.input_shape, device="meta"))
        except Exception as exc:  # noqa: BLE001 - a graph that cannot run at this batch size
            raise ProgramError(f"the program does not run on a batch of {batch}: {str(exc).splitlines()[0]}") \
                from None
        if tuple(out.shape) != (batch, shape.num_classes):
            raise ProgramError(f"the program returns {list(out.shape)} for a batch of {batch}")
    kernels = [name for name, module in model.named_modules()
               if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))]
    return ProgramSummary(shape.input_shape, shape.num_classes, parameter_count(weights),
                          kernels + [k.name for k in model.declared_kernels], model.plan_notes,
                          len(doc["graph_module"]["graph"]["nodes"]))


def _checked(archive: Pt2Archive):
    """The checked document, its shapes, and the weight and constant descriptions."""
    version = archive.read("archive_version", 64).decode("ascii", "replace").strip()
    from torch.export.pt2_archive.constants import ARCHIVE_VERSION_VALUE

    if version != ARCHIVE_VERSION_VALUE:
        raise ProgramError(f"archive version {version[:20]!r} is not this torch's ({ARCHIVE_VERSION_VALUE}); "
                           "export with the service's torch version")
    if archive.has("byteorder") and archive.read("byteorder", 64).strip() != b"little":
        raise ProgramError("only little-endian archives are accepted")
    if archive.has(pt2.SAMPLE_INPUTS):
        check_tensor_pickle(archive.read(pt2.SAMPLE_INPUTS, archive.limits.max_json), pt2.SAMPLE_INPUTS)
    doc = archive.json(pt2.MODEL_JSON)
    facts = check_document(doc)
    shape = program_shape(doc, facts)
    weights = parse_config(archive, pt2.WEIGHTS_CONFIG, "data/weights/", "weight_")
    constants = (parse_config(archive, pt2.CONSTANTS_CONFIG, "data/constants/", "tensor_")
                 if archive.has(pt2.CONSTANTS_CONFIG) else [])
    return doc, shape, weights, constants


def _build(doc: dict, shape, state: dict, constants: dict) -> ProgramModule:
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    try:
        with _DESERIALIZING:
            program = ExportedProgramDeserializer().deserialize(
                _dict_to_dataclass(schema.ExportedProgram, sanitized(doc)), state, constants, None)
        unlifted = program.module(check_guards=False)
    except ProgramError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch's own verdict on a graph that passed our rules
        raise ProgramError(f"the program does not load: {str(exc).splitlines()[0][:300] if str(exc) else exc!r}") \
            from None
    return build_trainable(unlifted, shape.batch_symbol, shape.input_shape, shape.num_classes)
