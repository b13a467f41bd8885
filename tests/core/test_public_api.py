"""The public surface of `rigl_core` (its `__all__`) imports, and `import rigl_core` stays torch-free."""

from __future__ import annotations

import subprocess
import sys

import pytest

import rigl_core


@pytest.mark.parametrize("name", rigl_core.__all__)
def test_every_public_name_imports(name):
    value = getattr(rigl_core, name)
    assert value is not None
    assert getattr(value, "__name__", name).lower().replace("_", "") in {name.lower().replace("_", ""), "riglcallback"}


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rigl_core.nope  # noqa: B018


def test_import_rigl_core_does_not_import_torch():
    code = "import sys, rigl_core, rigl_core.spec; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
