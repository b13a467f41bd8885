"""`PATCH /v1/jobs/{id}`: edit a job's labels (name, tags, metadata) as a JSON merge patch (RFC 7396).

The labels are one document `{name, tags, metadata}` and the body patches it: a member left out stays,
`null` removes it (name: none, tags: none, metadata: `{}`), `tags` is replaced whole (a list), and
`metadata` is merged key by key, recursively, with `null` deleting a key. The rules for each label are
api/schemas.py's (`Name`, `Tags`, `bounded_metadata`), the same as at submission; the metadata caps are
checked on the merged result, inside the transaction that writes it (store/jobs.py `update_labels`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from api.schemas import METADATA_DESCRIPTION, Name, Tags, bounded_metadata

MERGE_PATCH = "application/merge-patch+json"


class LabelsPatch(BaseModel):
    """The body: any of name, tags, metadata (unknown members are refused)."""

    model_config = ConfigDict(extra="forbid")
    name: Name | None = None
    tags: Tags | None = None
    metadata: dict[str, Any] | None = Field(
        None, description="Merged into the job's metadata (a key set to null is deleted); the result must "
                          "satisfy: " + METADATA_DESCRIPTION)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 section 2: an object patch merges member by member (null deletes); anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def changes(patch: LabelsPatch, current_metadata: dict | None) -> dict:
    """The new values of the labels the patch names (store/jobs.py `update_labels` writes them). ValueError
    'metadata: …' when the merged metadata breaks the caps."""
    given = patch.model_fields_set
    out: dict[str, Any] = {}
    if "name" in given:
        out["name"] = patch.name
    if "tags" in given:
        out["tags"] = list(dict.fromkeys(patch.tags or []))  # once each, in the order given (as at submit)
    if "metadata" in given:
        merged = merge_patch(current_metadata or {}, patch.metadata) if patch.metadata is not None else {}
        try:
            out["metadata"] = bounded_metadata(merged)
        except ValueError as exc:
            raise ValueError(f"metadata: {exc} after the merge") from None
    return out
