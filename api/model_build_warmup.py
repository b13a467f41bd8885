"""Imported by the model-build fork server only (api/model_build.py): checks a tiny model once, so the
imports a first meta-device forward and plan pull in (about 1,000 modules, seconds on a small host) are
made once in the server, not again in every child it forks. Optional model libraries are imported too
when installed."""

from __future__ import annotations

import importlib
import json

from api.model_build import _measure

_measure(json.dumps({"name": "mlp", "hidden_sizes": [4]}), "[1, 2, 2]", 2,
         json.dumps({"method": "rigl", "sparsity": 0.5}), "classification", 100, True, 100)
for _name in ("torchvision", "timm"):
    try:
        importlib.import_module(_name)
    except ImportError:
        pass
try:  # a Hugging Face model's first build imports most of transformers' modeling code
    _measure(json.dumps({"name": "hf", "hf": {"model_type": "bert", "vocab_size": 8, "hidden_size": 2,
                                              "num_attention_heads": 1, "intermediate_size": 2,
                                              "num_hidden_layers": 1, "max_position_embeddings": 4}}),
             "[2]", 2, json.dumps({"method": "rigl", "sparsity": 0.5}), "sequence-classification", 100, True, 100)
except ImportError:
    pass
