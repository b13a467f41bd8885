"""RigL Service's library. `from rigl_core import RigL` is the API for your own training loop
(rigl_core/sparse/rigl.py); it is imported lazily so `import rigl_core.spec` (the API server, the CLI)
does not pay for torch."""

__all__ = ["RigL"]


def __getattr__(name: str):
    if name == "RigL":
        from rigl_core.sparse.rigl import RigL

        return RigL
    raise AttributeError(f"module 'rigl_core' has no attribute {name!r}")
