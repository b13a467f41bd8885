"""Uploads: the architectures, datasets and weights users store, each visible to its owner only.

An architecture is either declarative layers (its spec is the Architecture JSON) or an uploaded
`torch.export` program (its spec is `{"program": {...what the upload check learnt}}`, the file itself
under the storage key `programs/<id>.pt2`).

Datasets and weights count against their owner's storage quota (store/quotas.py), checked in the
transaction that adds the row."""

from __future__ import annotations

from sqlalchemy import select, update

from store import quotas
from store.artifacts import issued_id
from store.db import ArchitectureRecord, DatasetRecord, WeightsRecord
from store.job_state import StorePart, lock_owners


def program_of(row: ArchitectureRecord | None) -> dict | None:
    """The program summary of an uploaded program's record, None for declarative layers (or no record)."""
    spec = row.spec if row is not None else None
    return spec["program"] if isinstance(spec, dict) and isinstance(spec.get("program"), dict) else None


class Uploads(StorePart):
    def add_architecture(self, name: str, spec: dict, params: int, owner: str = "local") -> ArchitectureRecord:
        with self.sessions.begin() as s:
            row = ArchitectureRecord(name=name, spec=spec, params=params, owner=owner)
            s.add(row)
        return row

    def get_architecture(self, arch_id: str, owner: str | None = None) -> ArchitectureRecord | None:
        return self._get_owned(ArchitectureRecord, arch_id, owner)

    def list_architectures(self, owner: str | None = None) -> list[ArchitectureRecord]:
        return self._list_owned(ArchitectureRecord, owner)

    def add_dataset(self, quota: quotas.Quota | None = None, **fields) -> DatasetRecord:
        """QuotaExceeded when the owner's datasets would pass `quota`."""
        return self._add_counted(DatasetRecord(**fields), "datasets", quota)

    def get_dataset(self, dataset_id: str, owner: str | None = None) -> DatasetRecord | None:
        return self._get_owned(DatasetRecord, dataset_id, owner)

    def list_datasets(self, owner: str | None = None) -> list[DatasetRecord]:
        return self._list_owned(DatasetRecord, owner)

    def add_weights(self, quota: quotas.Quota | None = None, **fields) -> WeightsRecord:
        """QuotaExceeded when the owner's weights would pass `quota`. `tensor_index`: {name: [dtype,
        shape]} from the file's header, what a job's submission checks the model against."""
        return self._add_counted(WeightsRecord(**fields), "weights", quota)

    def tensor_index(self, weights_id: str) -> dict | None:
        """The weights' {name: [dtype, shape]}, or None for weights stored before it was kept."""
        with self.sessions() as s:
            return s.scalar(select(WeightsRecord.tensor_index).where(WeightsRecord.id == weights_id))

    def set_tensor_index(self, weights_id: str, index: dict) -> None:
        """Keep the index of weights uploaded before it was (read once from their file)."""
        with self.sessions.begin() as s:
            s.execute(update(WeightsRecord).where(WeightsRecord.id == weights_id).values(tensor_index=index))

    def get_weights(self, weights_id: str, owner: str | None = None) -> WeightsRecord | None:
        return self._get_owned(WeightsRecord, weights_id, owner)

    def list_weights(self, owner: str | None = None) -> list[WeightsRecord]:
        return self._list_owned(WeightsRecord, owner)

    def _add_counted(self, row, kind: str, quota: quotas.Quota | None):
        with self.sessions.begin() as s:
            if quota is not None:
                lock_owners(s, [row.owner])
                quotas.check(s, row.owner, kind, quota, adding_bytes=row.size)
            s.add(row)
        return row

    def _get_owned(self, record, record_id: str, owner: str | None):
        """One upload by id; with `owner`, someone else's is as good as missing."""
        if not issued_id(record_id):
            return None
        with self.sessions() as s:
            query = select(record).where(record.id == record_id)
            if owner is not None:
                query = query.where(record.owner == owner)
            return s.scalars(query).first()

    def _list_owned(self, record, owner: str | None) -> list:
        with self.sessions() as s:
            query = select(record).order_by(record.created_at.desc())
            if owner is not None:
                query = query.where(record.owner == owner)
            return list(s.scalars(query))
