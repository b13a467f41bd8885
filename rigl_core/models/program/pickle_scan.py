"""Proving a torch-saved pickle holds only tensors, without unpickling it.

`torch.export.save` stores the example inputs (`data/sample_inputs/model.pt`) with `torch.save`: a
zip holding `data.pkl` and raw storages. `torch.export.load` unpickles it with `weights_only=True`
and, when that fails, *again with `weights_only=False`*: a crafted file runs any code it names. The
service never loads it at all (the program's input shape comes from the graph), but it refuses a
file whose pickle could do anything but rebuild tensors, so a hostile archive is named as such.

The check reads the opcodes with `pickletools.genops` (a parser: nothing is executed) and allows
only the globals a tensor needs (`_rebuild_tensor_v2`, the typed storages, `OrderedDict`). Globals
named on the stack (STACK_GLOBAL) must come from the two string pushes just before them; anything it
cannot prove (memo lookups, INST/OBJ, the extension registry) is refused.
"""

from __future__ import annotations

import io
import pickletools
import zipfile

from rigl_core.data.zip_directory import directory_size
from rigl_core.models.program.errors import ProgramError

MAX_PICKLE = 1 << 20  # bytes of data.pkl: a few tensors need a few hundred
MAX_MEMBERS = 4096
STORAGES = ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
ALLOWED_GLOBALS = frozenset(
    {("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict"), ("torch", "Size")}
    | {("torch", f"{kind}Storage") for kind in STORAGES}
)
STRING_PUSHES = ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING",
                 "STRING")
NEVER = ("INST", "OBJ", "EXT1", "EXT2", "EXT4")  # instantiate by name / from the extension registry


def check_tensor_pickle(data: bytes, name: str) -> None:
    """Raise ProgramError unless `data` (a torch.save zip) could only rebuild tensors, tuples and dicts."""
    try:
        entries, directory = directory_size(io.BytesIO(data), len(data))  # before zipfile parses it
        if entries > MAX_MEMBERS or directory > MAX_MEMBERS * 1024:
            raise ProgramError(f"{name}: holds {entries:,} members")
        inner = zipfile.ZipFile(io.BytesIO(data))
        infos = inner.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        if isinstance(exc, ProgramError):
            raise
        raise ProgramError(f"{name}: not a torch.save file") from None
    pickles = [info for info in infos if info.filename.endswith("data.pkl")]
    if len(pickles) != 1:
        raise ProgramError(f"{name}: expected one data.pkl, found {len(pickles)}")
    if pickles[0].file_size > MAX_PICKLE or pickles[0].compress_type != zipfile.ZIP_STORED:
        raise ProgramError(f"{name}: its pickle is over {MAX_PICKLE:,} bytes or compressed")
    with inner.open(pickles[0]) as member:
        check_opcodes(member.read(MAX_PICKLE + 1), name)


def check_opcodes(pickle_bytes: bytes, name: str) -> None:
    """Walk the opcodes; every global must be allowed and provably named."""
    recent: list[str | None] = []  # string pushes since the last other opcode (MEMOIZE/PUT ignored)
    try:
        for opcode, arg, _ in pickletools.genops(pickle_bytes):
            op = opcode.name
            if op in NEVER:
                raise ProgramError(f"{name}: the pickle uses {op}, which can call any class; only tensors "
                                   "are accepted")
            if op == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
                _allow(module, attr, name)
            elif op == "STACK_GLOBAL":
                if len(recent) < 2 or recent[-1] is None or recent[-2] is None:
                    raise ProgramError(f"{name}: the pickle names a global it does not spell out; only tensors "
                                       "are accepted")
                _allow(recent[-2], recent[-1], name)
            if op in STRING_PUSHES:
                recent.append(str(arg))
            elif op not in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
                recent = []
    except ProgramError:
        raise
    except ValueError as exc:  # genops: a truncated or malformed pickle
        raise ProgramError(f"{name}: not a valid pickle ({exc})") from None


def _allow(module: str, attr: str, name: str) -> None:
    if (module, attr) not in ALLOWED_GLOBALS:
        raise ProgramError(f"{name}: the pickle calls {module[:80]}.{attr[:80]}; only tensors are accepted "
                           "(a pickle payload?)")
