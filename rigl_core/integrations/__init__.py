"""Callbacks that put `rigl_core.RigL` into training loops a framework owns: `lightning.RigLCallback`
(PyTorch Lightning) and `huggingface.RigLCallback` (the Hugging Face Trainer). Each module imports its
framework when imported itself, so `rigl_core` never requires Lightning or transformers. `tracing`: the
Trainer's epochs and mask updates as OpenTelemetry spans, in a process that configured OpenTelemetry."""
