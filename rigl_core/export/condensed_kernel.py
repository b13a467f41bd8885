"""The condensed product `y[b, r] = Σ_j values[r, j] · x[b, indices[r, j]]`, by the fastest path that applies.

- **A few rows (batch < 4) on CPU: a compiled loop.** A dense layer at batch 1 is a matrix-vector product
  bound by memory bandwidth. A 90%-sparse condensed layer reads a tenth of the weight bytes, but only if the
  gather, the multiply and the sum run in one pass: eager PyTorch writes the gathered (rows, k) matrix out
  first (barely faster than dense), and Inductor turns the same expression into a scalar loop with a bounds
  check per element. `condensed_kernel.c` is a short plain-C loop with 8-wide AVX2 gathers (the compiler's
  own vectorisation of the plain loop elsewhere); it is built once per machine with the system C compiler
  into a cache folder and loaded with ctypes.
- **More rows, on any device: `F.embedding_bag`.** With the input transposed, (in, batch), each output row
  is a weighted sum of k input rows: exactly an embedding bag with per-sample weights, which PyTorch runs
  with FBGEMM's JIT kernels on CPU (vectorised across the batch, no per-element gather) and its own kernel
  on CUDA; differentiable too.
- **Otherwise** (no compiler or `RIGL_CONDENSED_KERNEL=off` at batch < 4, tracing for ONNX or compiling):
  the plain expression `(x[:, indices] * values).sum(-1)`: same results, less speed.
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
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("condensed_kernel.c")
FLAGS = ["-O3", "-march=native", "-ffast-math", "-shared", "-fPIC"]
FUNCTIONS = {torch.uint8: "condensed_u8", torch.int16: "condensed_i16", torch.int32: "condensed_i32"}
BAG_FROM = 4  # rows per call from which embedding_bag beats the per-row gathers of the C loop

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library or None, "why": why not


def cache_dir() -> Path:
    """`RIGL_KERNEL_CACHE`, else `$XDG_CACHE_HOME/rigl-service/kernels` (~/.cache by default)."""
    if os.environ.get("RIGL_KERNEL_CACHE"):
        return Path(os.environ["RIGL_KERNEL_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "rigl-service" / "kernels"


def _cpu_line(*prefixes: bytes) -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(prefixes)), b"")
    except OSError:
        return b""


def _cpu_signature() -> bytes:
    """-march=native code runs only on CPUs with the same features: the cache key includes them."""
    return _cpu_line(b"flags", b"Features")


def flags() -> list[str]:
    """The compiler flags for this CPU: AMD's AVX2 gathers are slower than gcc's own vectorised loop, Intel's
    faster (condensed_kernel.c), so AMD builds the plain loop."""
    return [*FLAGS, "-DCONDENSED_PLAIN"] if b"AuthenticAMD" in _cpu_line(b"vendor_id") else list(FLAGS)


def _compile(cc: str) -> Path:
    source = SOURCE.read_bytes()
    options = flags()
    key = hashlib.sha256(source + " ".join([cc, *options]).encode() + _cpu_signature()).hexdigest()[:16]
    target = cache_dir() / f"condensed-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # compile aside, then rename: atomic for other processes
        built = Path(tmp) / target.name
        subprocess.run([cc, *options, str(SOURCE), "-o", str(built)], check=True, capture_output=True, timeout=120)
        os.replace(built, target)
    return target


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None when they cannot be had here (`unavailable()` says why)."""
    if "lib" in _state:  # the hot path: no lock once loaded
        return _state["lib"]
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
                    getattr(lib, name).argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 4
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


def bag_of(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat int32 indices, row offsets) of a (rows, k) index matrix, the embedding-bag form; compute once."""
    rows, k = indices.shape
    flat = indices.reshape(-1).to(torch.int32)
    return flat, torch.arange(0, rows * k, k, dtype=torch.int32, device=indices.device)


def condensed_matmul(x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                     bag: tuple[torch.Tensor, torch.Tensor] | None = None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (N, in) times the condensed (rows, k) layer, plus `bias` (rows,) if given -> (N, rows).
    `bag` is `bag_of(indices)`, cached by callers."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():  # ONNX export traces: the plain ops export
        y = reference_matmul(x, indices, values)
        return y if bias is None else y + bias
    batch = x.shape[0]
    if batch >= BAG_FROM:
        flat, offsets = bag if bag is not None else bag_of(indices)
        y = F.embedding_bag(flat, x.t().contiguous(), offsets, mode="sum", per_sample_weights=values.reshape(-1)).t()
        return y if bias is None else y + bias
    lib = library() if (x.device.type == "cpu" and x.dtype == values.dtype == torch.float32
                        and indices.dtype in FUNCTIONS and not (torch.is_grad_enabled() and (x.requires_grad or values.requires_grad))) else None
    if lib is None:
        y = reference_matmul(x, indices, values)
        return y if bias is None else y + bias
    x = x.contiguous()
    rows, k = values.shape
    y = torch.empty(batch, rows, dtype=torch.float32)
    getattr(lib, FUNCTIONS[indices.dtype])(x.data_ptr(), indices.data_ptr(), values.data_ptr(),
                                           None if bias is None else bias.data_ptr(), y.data_ptr(),
                                           batch, x.shape[1], rows, k)
    return y


class BoundRows:
    """One layer's compiled product with its weight, index and bias pointers bound once, so a call costs
    one ctypes call (the per-call Python around the kernel is most of a small layer's time at batch 1).
    Call it only with a contiguous float32 CPU input of fewer than BAG_FROM rows and no autograd."""

    def __init__(self, indices: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None):
        lib = library()
        self.ready = lib is not None and indices.dtype in FUNCTIONS and values.dtype == torch.float32 \
            and values.device.type == "cpu" and values.is_contiguous() and indices.is_contiguous()
        if not self.ready:
            return
        self.keep = (indices, values, bias)  # the pointers below stay valid while these live
        self.fn = getattr(lib, FUNCTIONS[indices.dtype])
        self.pointers = (indices.data_ptr(), values.data_ptr(), None if bias is None else bias.data_ptr())
        self.rows, self.k = values.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x.shape[0], self.rows)
        self.fn(x.data_ptr(), *self.pointers, y.data_ptr(), x.shape[0], x.shape[1], self.rows, self.k)
        return y
