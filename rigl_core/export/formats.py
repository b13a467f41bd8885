"""The export formats a run writes and a user downloads, by name and file name. Torch-free, so the API's
`format=` check and the client CLI (`rigl download --format`) read the same list as the writers
(rigl_core/export/pipeline.py) without importing torch."""

from __future__ import annotations

REPORT = "report.json"
DENSE_EXPORT = "model.safetensors"
PACKED_EXPORT = "model.packed.safetensors"
COMPRESSED_EXPORT = "model.compressed.safetensors"
CONDENSED_EXPORT = "model.condensed.safetensors"
ONNX_EXPORT = "model.onnx"

# format name -> file name, in the order a run writes them
EXPORTS = {"dense": DENSE_EXPORT, "packed": PACKED_EXPORT, "compressed": COMPRESSED_EXPORT,
           "condensed": CONDENSED_EXPORT, "onnx": ONNX_EXPORT}
EXPORT_FORMATS = tuple(EXPORTS)
