"""RigL Service's library: sparse training with RigL (Evci et al., ICML 2020).

The public surface is the names below; everything else (the modules under `sparse/`, `training/`,
`models/`, `data/`, `export/`, `report/`) is internal and may move between releases.

    from rigl_core import RigL             # three lines in your own training loop
    from rigl_core import Trainer, JobSpec  # the whole job: data, model, loop, checkpoints
    from rigl_core import make_plan         # per-layer densities and FLOPs, without training

Names are imported on first use, so `import rigl_core` (the API server, the client CLI) does not pay
for torch until a torch-backed name is asked for.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    # sparse training in your own loop, and the plan it follows
    "RigL": "rigl_core.sparse.rigl",
    "make_plan": "rigl_core.sparse.plan",
    "Plan": "rigl_core.sparse.plan",
    # a whole job
    "JobSpec": "rigl_core.spec",
    "Trainer": "rigl_core.training.trainer",
    "Callback": "rigl_core.training.trainer",
    # exports
    "save_dense": "rigl_core.export.packed",
    "save_packed": "rigl_core.export.packed",
    "load_packed": "rigl_core.export.packed",
    "save_compressed_model": "rigl_core.export.packed",
    "read_compressed": "rigl_core.export.compressed",
    "export_onnx": "rigl_core.export.onnx",
    # framework callbacks (need the `lightning` / `models` extras)
    "RigLLightningCallback": ("rigl_core.integrations.lightning", "RigLCallback"),
    "RigLHFCallback": ("rigl_core.integrations.huggingface", "RigLCallback"),
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    where = _PUBLIC.get(name)
    if where is None:
        raise AttributeError(f"module 'rigl_core' has no attribute {name!r}")
    module, attr = where if isinstance(where, tuple) else (where, name)
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
