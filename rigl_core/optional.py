"""Optional dependencies: import one, or say which pip extra brings it.

Why: `pip install rigl-service` brings only what training needs (torch, torchvision, numpy, pydantic,
safetensors, tqdm). Everything else (the service, the client, built-in datasets, report PNGs) lives
in an extra, and a user who reaches for it without the extra gets one line naming the install
command instead of a ModuleNotFoundError traceback from deep inside the library.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

PACKAGE = "rigl-service"
# What `rigl serve`, `rigl worker` and `rigl keys` cannot start without (all in the 'service' extra).
SERVICE_MODULES = ("fastapi", "uvicorn", "celery", "sqlalchemy", "pydantic_settings", "alembic", "prometheus_client",
                   "boto3")


class MissingExtra(ImportError):
    """A feature's optional dependency is not installed; the message names the extra to install."""

    def __init__(self, feature: str, extra: str, module: str):
        super().__init__(f"{feature} needs the '{extra}' extra: pip install \"{PACKAGE}[{extra}]\" "
                         f"(no module named {module!r})", name=module)
        self.feature, self.extra, self.module = feature, extra, module


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import `module`, or raise MissingExtra naming `extra`. A module that is installed but fails to
    import for another reason raises its own error: only a missing package becomes an install hint."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise MissingExtra(feature, extra, exc.name or module) from exc


def missing(*modules: str) -> list[str]:
    """The top-level modules among `modules` that are not installed (without importing them)."""
    return [m for m in modules if not _installed(m)]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder that refuses it (or a broken stub): not usable
        return False


def add_unavailable_command(subparsers, name: str, extra: str, modules: list[str], help: str) -> None:
    """Register `rigl NAME` as a stub that prints the install hint and exits 2, whatever its
    arguments (`--help` included), so a library-only install says what to install instead of
    failing inside the command or hiding it."""
    import argparse

    # No option prefix: every argument (`--help`, `--port 8000`) is taken as text, none is an error.
    parser = subparsers.add_parser(name, help=f"{help} (needs the '{extra}' extra)", add_help=False,
                                   prefix_chars="\0")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    def unavailable(args) -> int:
        import sys

        print(f"rigl {name}: error: needs the '{extra}' extra: pip install \"{PACKAGE}[{extra}]\" "
              f"(not installed: {', '.join(modules)})", file=sys.stderr)
        return 2

    parser.set_defaults(handler=unavailable)
