"""A zip's size as its end record declares it, read before `zipfile` parses the central directory.

Why: `zipfile.ZipFile` turns every directory entry into a Python object, so an archive declaring a
million members is a memory bomb of its own before any member is inflated. Dataset uploads
(rigl_core/data/safe_archive.py) and `torch.export` programs (rigl_core/models/program/archive.py)
read the two counts here first and refuse what is too large.
"""

from __future__ import annotations

import struct
import zipfile
from typing import BinaryIO

ALLOWED_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)


def directory_size(f: BinaryIO, size: int) -> tuple[int, int]:
    """(members, central-directory bytes) from the end record of the zip in `f` (`size` bytes long),
    zip64 included; follows zipfile's search order. Raises ValueError when there is no valid end record."""
    tail_len = min(size, 22 + 65_535)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    at = len(tail) - 22
    if at < 0 or tail[at:at + 4] != b"PK\x05\x06" or tail[-2:] != b"\0\0":
        at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + 22 > len(tail):
        raise ValueError("not a zip archive")
    _, _, _, _, entries, directory_bytes, _, _ = struct.unpack("<4s4H2LH", tail[at:at + 22])
    locator = at - 20
    if locator >= 0 and tail[locator:locator + 4] == b"PK\x06\x07":  # zip64
        _, _, record_at, _ = struct.unpack("<4sLQL", tail[locator:at])
        if record_at + 56 > size:
            raise ValueError("the zip64 end record lies outside the file")
        f.seek(record_at)
        record = f.read(56)
        if record[:4] != b"PK\x06\x06":
            raise ValueError("bad zip64 end record")
        entries, directory_bytes = struct.unpack("<4sQ2H2L4Q", record)[7:9]
    return entries, directory_bytes


def member_problem(info: zipfile.ZipInfo, max_ratio: float, ratio_floor: int) -> str | None:
    """Why one member can't be read safely (encrypted, an unknown compression, a decompression bomb),
    or None. Members inflating to less than `ratio_floor` bytes are never refused for their ratio."""
    if info.flag_bits & 0x1:
        return f"{info.filename} is encrypted"
    if info.compress_type not in ALLOWED_COMPRESSION:
        return f"{info.filename} uses an unsupported compression"
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > ratio_floor and ratio > max_ratio:
        return (f"{info.filename} inflates {ratio:,.0f}-fold, over the limit of {max_ratio:,.0f} "
                "(a decompression bomb?)")
    return None
