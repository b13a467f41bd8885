"""Reading a `torch.export.save` archive (`.pt2`) as an untrusted zip: bounded, member by member.

`torch.export.save` writes a zip whose members all sit under one root folder: the graph as JSON
(`models/model.json`), each weight's raw bytes (`data/weights/weight_N`) with a JSON config, tensor
constants the same way (`data/constants/`), the example inputs as a torch pickle
(`data/sample_inputs/model.pt`) and a few version files. This module checks the zip's shape before
anything is read: the end record (member count, directory size) before `zipfile` parses it, one safe
root folder and no path that climbs out of it, no member named twice, no encryption, only stored or
deflated members, the total inflated size and each member's ratio, and only the members above
(AOTInductor's compiled code, pickled legacy weights, extra files: refused by name). Reads are capped
at the member's declared size.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rigl_core.data.zip_directory import directory_size, member_problem
from rigl_core.models.program.errors import ProgramError

MODEL_JSON = "models/model.json"
WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
SAMPLE_INPUTS = "data/sample_inputs/model.pt"
VERSION_FILES = ("archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id")
PAYLOAD = re.compile(r"^data/(weights/weight|constants/tensor)_[0-9]{1,9}$")
ROOT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
RATIO_FLOOR = 1 << 20
CHUNK = 1 << 20
REFUSED_MEMBERS = (  # members torch.export.load would act on, each a way to run code or unpickle
    ("data/aotinductor/", "AOTInductor compiled code (a shared library) is not accepted"),
    ("data/weights/model.pt", "pickled weights (the legacy format) are not accepted; save with torch.export.save"),
    ("data/constants/model.pt", "pickled constants (the legacy format) are not accepted"),
    ("data/constants/custom_obj_", "custom class objects (torchbind) are not accepted"),
    ("data/constants/opaque_obj_", "pickled Python objects are not accepted"),
    ("extra/", "extra files are not accepted; export without extra_files"),
)


@dataclass(frozen=True)
class ArchiveLimits:
    """What one archive may hold. The service passes its upload settings; the defaults suit `rigl` locally."""

    max_inflated: int = 2 * 1024**3  # bytes, all members together
    max_ratio: float = 100.0  # inflated / compressed, per member over 1 MiB
    max_members: int = 20_000
    max_json: int = 64 * 1024**2  # the graph and each config
    max_directory: int = 4 * 1024**2  # central-directory bytes


class Pt2Archive:
    """An open, checked archive; `names` are relative to its root folder."""

    def __init__(self, path: str | Path, limits: ArchiveLimits = ArchiveLimits()):
        self.limits = limits
        path = Path(path)
        size = path.stat().st_size
        with open(path, "rb") as f:
            try:
                entries, directory_bytes = directory_size(f, size)
            except ValueError as exc:
                raise ProgramError(f"not a .pt2 archive ({exc}); write it with torch.export.save") from None
        if entries > limits.max_members or directory_bytes > limits.max_directory:
            raise ProgramError(f"the archive lists {entries:,} members in {directory_bytes:,} bytes, over the limit "
                               f"of {limits.max_members:,} members")
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise ProgramError(f"not a .pt2 archive: {str(exc).splitlines()[0]}") from None
        try:
            self.root, self.infos = self._check_members()
        except BaseException:
            self.zip.close()
            raise

    def __enter__(self) -> "Pt2Archive":
        return self

    def __exit__(self, *exc) -> None:
        self.zip.close()

    def _check_members(self) -> tuple[str, dict[str, zipfile.ZipInfo]]:
        infos = self.zip.infolist()
        if not infos:
            raise ProgramError("the archive is empty")
        roots = {info.filename.split("/", 1)[0] for info in infos}
        root = roots.pop() if len(roots) == 1 else None
        if root is None or not ROOT.fullmatch(root) or root in (".", ".."):
            raise ProgramError("unsafe member paths: every member must sit under one root folder (as torch.export.save "
                               "writes them)")
        by_name: dict[str, zipfile.ZipInfo] = {}
        inflated = 0
        for info in infos:
            name = info.filename[len(root) + 1:]
            unsafe = (not name or "\\" in name or "\0" in name or name.startswith("/")
                      or any(part in ("", ".", "..") for part in name.split("/")))
            if unsafe or info.filename.startswith("/") or info.is_dir():
                raise ProgramError(f"unsafe member path {info.filename[:200]!r}")
            if name in by_name:
                raise ProgramError(f"the archive names {name!r} twice")
            problem = member_problem(info, self.limits.max_ratio, RATIO_FLOOR)
            if problem is not None:
                raise ProgramError(problem)
            refused = next((why for prefix, why in REFUSED_MEMBERS if name.startswith(prefix)), None)
            if refused is not None:
                raise ProgramError(f"{name}: {refused}")
            if name not in (MODEL_JSON, WEIGHTS_CONFIG, CONSTANTS_CONFIG, SAMPLE_INPUTS, *VERSION_FILES) \
                    and not PAYLOAD.fullmatch(name):
                raise ProgramError(f"unexpected member {name[:200]!r}: a .pt2 holds one program named 'model' "
                                   "as torch.export.save writes it")
            inflated += info.file_size
            by_name[name] = info
        if inflated > self.limits.max_inflated:
            raise ProgramError(f"the archive inflates to {inflated:,} bytes, over the {self.limits.max_inflated:,}-"
                               "byte limit")
        for required in (MODEL_JSON, WEIGHTS_CONFIG, "archive_version"):
            if required not in by_name:
                raise ProgramError(f"{required} is missing: write the file with torch.export.save")
        return root, by_name

    def has(self, name: str) -> bool:
        return name in self.infos

    def size(self, name: str) -> int:
        return self.infos[name].file_size

    def chunks(self, name: str):
        """The member's bytes in CHUNK-sized pieces, no more than its declared size."""
        info = self.infos[name]
        left = info.file_size
        with self.zip.open(info) as member:
            while left:
                data = member.read(min(left, CHUNK))
                if not data:
                    raise ProgramError(f"{name} holds less data than the archive declares")
                left -= len(data)
                yield data

    def read(self, name: str, cap: int) -> bytes:
        if self.size(name) > cap:
            raise ProgramError(f"{name} is {self.size(name):,} bytes, over the {cap:,}-byte limit")
        return b"".join(self.chunks(name))

    def json(self, name: str):
        """A JSON member: bounded, and refused (not crashed on) when invalid or nested too deep."""
        try:
            return json.loads(self.read(name, self.limits.max_json))
        except (ValueError, RecursionError):
            raise ProgramError(f"{name} is not valid JSON") from None
