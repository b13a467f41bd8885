"""The fused condensed product `y[b, r] = Σ_j values[r, j] · x[b, indices[r, j]]`, compiled on first use.

Why a compiled loop: at batch 1 a dense layer is a matrix-vector product bound by memory bandwidth. A
90%-sparse condensed layer reads a tenth of the weight bytes, but only if the gather, the multiply and
the sum run in one pass: eager PyTorch writes the gathered (rows, k) matrix out first (barely faster
than dense), and Inductor turns the same expression into a scalar loop with a bounds check per element.
`condensed_kernel.c` is 20 lines of plain C that the compiler vectorises into AVX2/AVX-512 gathers; it is
built once per machine with the system C compiler into a cache folder and loaded with ctypes.

Where there is no compiler (or `RIGL_CONDENSED_KERNEL=off`), on GPUs, under autograd, and while tracing
for ONNX, `condensed_matmul` uses the plain-PyTorch expression instead: same results, less speed.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("condensed_kernel.c")
FLAGS = ["-O3", "-march=native", "-ffast-math", "-shared", "-fPIC"]
FUNCTIONS = {torch.uint8: "condensed_u8", torch.int16: "condensed_i16", torch.int32: "condensed_i32"}

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library or None, "why": why not


def cache_dir() -> Path:
    """`RIGL_KERNEL_CACHE`, else `$XDG_CACHE_HOME/rigl-service/kernels` (~/.cache by default)."""
    if os.environ.get("RIGL_KERNEL_CACHE"):
        return Path(os.environ["RIGL_KERNEL_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "rigl-service" / "kernels"


def _cpu_signature() -> bytes:
    """-march=native code runs only on CPUs with the same features: the cache key includes them."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith((b"flags", b"Features"))), b"")
    except OSError:
        return b""


def _compile(cc: str) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([cc, *FLAGS]).encode() + _cpu_signature()).hexdigest()[:16]
    target = cache_dir() / f"condensed-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # compile aside, then rename: atomic for other processes
        built = Path(tmp) / target.name
        subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(built)], check=True, capture_output=True, timeout=120)
        os.replace(built, target)
    return target


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None when they cannot be had here (`unavailable()` says why)."""
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        _state["lib"], _state["why"] = None, None
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if os.environ.get("RIGL_CONDENSED_KERNEL", "auto").lower() == "off":
            _state["why"] = "turned off (RIGL_CONDENSED_KERNEL=off)"
        elif cc is None:
            _state["why"] = "no C compiler (cc, gcc or clang) on PATH"
        else:
            try:
                lib = ctypes.CDLL(str(_compile(cc)))
                for name in FUNCTIONS.values():
                    getattr(lib, name).argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4
                    getattr(lib, name).restype = None
                _state["lib"] = lib
            except (OSError, subprocess.SubprocessError) as exc:
                _state["why"] = f"the kernel did not compile: {exc}"
        return _state["lib"]


def unavailable() -> str | None:
    """Why the compiled kernel is not used here, or None when it is."""
    library()
    return _state.get("why")


def reference_matmul(x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The plain-PyTorch product: differentiable, runs on any device, traces to ONNX Gather/Mul/ReduceSum."""
    return (x[:, indices.long()] * values).sum(-1)


def condensed_matmul(x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """x (N, in) @ the condensed (rows, k) layer -> (N, rows), with the compiled kernel where it applies."""
    usable = (x.device.type == "cpu" and x.dtype == values.dtype == torch.float32 and indices.dtype in FUNCTIONS
              and not (torch.is_grad_enabled() and (x.requires_grad or values.requires_grad))
              and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export() and not torch.compiler.is_compiling())
    lib = library() if usable else None
    if lib is None:
        return reference_matmul(x, indices, values)
    x = x.contiguous()
    rows, k = values.shape
    y = torch.empty(x.shape[0], rows, dtype=torch.float32)
    getattr(lib, FUNCTIONS[indices.dtype])(x.data_ptr(), indices.data_ptr(), values.data_ptr(), y.data_ptr(),
                                           x.shape[0], x.shape[1], rows, k)
    return y
