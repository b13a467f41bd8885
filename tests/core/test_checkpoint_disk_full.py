"""A full disk mid-checkpoint never costs the last good checkpoint: the write goes to a temp file, fsynced,
then renamed over the old one, so a write the filesystem refuses half-way (a fake writer raising
OSError(ENOSPC) after some bytes, as a full volume does) leaves the previous file byte for byte, no temp
file, and a NoSpaceError that names the file. The real full volume (a tmpfs) is in
tests/service/test_worker_lease.py."""

from __future__ import annotations

import errno
import hashlib

import pytest

import rigl_core.training.checkpoint as checkpoint
from helpers.specs import small_spec
from rigl_core.training.trainer import Callback, NoSpaceError, Trainer, is_no_space


class StopAt(Callback):
    def __init__(self, step: int):
        self.at = step

    def should_stop(self, trainer) -> bool:
        return trainer.step >= self.at


def test_a_checkpoint_write_the_full_disk_refuses_keeps_the_last_good_one(tmp_path, monkeypatch):
    trainer = Trainer(small_spec(), callbacks=[StopAt(3)])
    trainer.fit()
    path = trainer.save_checkpoint(tmp_path / "resume.pt")
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    trainer.step += 1  # a later state, whose write the disk refuses half-way

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"\0" * 4096)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(NoSpaceError) as raised:
        trainer.save_checkpoint(path)
    assert raised.value.path == path and is_no_space(raised.value)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == good  # the last good checkpoint, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resume.pt"]  # no temp file left
    monkeypatch.undo()
    resumed = Trainer(small_spec())
    resumed.load_checkpoint(path)
    assert resumed.step == 3


def test_the_write_is_fsynced_before_it_replaces_the_old_file(tmp_path, monkeypatch):
    """Temp file, fsync, then rename: a crash after the rename finds the new bytes on disk."""
    import os

    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(checkpoint.os, "replace", lambda a, b: (calls.append(("replace", str(a).endswith(".tmp"))),
                                                                 real_replace(a, b))[1])
    trainer = Trainer(small_spec(), callbacks=[StopAt(2)])
    trainer.fit()
    trainer.save_checkpoint(tmp_path / "resume.pt")
    assert calls == ["fsync", ("replace", True)]
