"""A compiled CPU kernel for the embedding lookups of every model: weighted bags of table rows.

Every field vector the models read is ``out[n, f, :] = sum over slots s with field(s) = f of
coef[n, s] * W[rows[n, s], :]``: a single-valued field is one slot with ``coef = mask``, a
multi-valued one (genres) its slots with ``1 / #valid``, a session mean its positions x slots
with the position weights folded in (``layers.FieldEmbedding``). In PyTorch that is an
``index_select`` plus masks, products and sums forward, and an ``index_add`` (a generic
``scatter_add`` underneath) into a zero table backward. DeepFM's 27 lookups per row at batch
1,024, forward + backward, on this project's 2-core AMD EPYC (Zen 4) host with one thread: 3.1 ms
that way, 0.85 ms through the loops below (``benchmarks/profile_step.py --threads 1``, with
``METACTR_NATIVE=0`` / ``1``; the whole training step 10.1 against 8.4 ms); with two threads a
DeepFM training step is 1.11x faster (``benchmarks/ab_step.py --compare native``; the figures and
their dates are in ``docs/training.md``).

Why hand-written and not a library: FBGEMM's table-batched embeddings (the kernels CTR systems
use) ship as ``fbgemm-gpu-cpu`` wheels pinned to one PyTorch build each and bring their own fused
optimizers, which would change what our Adam does; ``F.embedding_bag`` has no per-slot field map
and was measured slower here (``docs/training.md``). The kernel is 40 lines of C, compiled once per
machine with the system's C compiler (``cc``, ``$CC``) into ``$METACTR_CACHE`` (default
``~/.cache/metactr``) and loaded with ``ctypes`` (which releases the GIL during the call: two
server threads run it at once). Without a compiler, or with ``METACTR_NATIVE=0``, every caller
uses its PyTorch path (the same sums); so does every call under a ``torch.func`` transform
(``vmap``/``grad`` of meta-learning), under ``torch.compile``, on a GPU, or when ``coef``
needs its gradient.

Autograd: the lookup and the scatter are each other's adjoint (both linear in the table with
constant ``coef``), so each one's backward is the other: gradients of any order are exact
(Meta-Embedding's ``create_graph=True`` step relies on it). Results equal the PyTorch paths up
to float rounding (the sums run in another order); the loops are serial, so they are
deterministic.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
/* One loop for both directions: for every slot s of row n with row r = rows[n, s] and field
   f = fmap[s], fwd adds coef * W[r] to out[n, f]; bwd (the adjoint) adds coef * G[n, f] to gW[r].
   Returns 0, n * S + s + 1 for a row outside [0, V), or -(s + 1) for a field outside [0, F). */
#define BAG(T, FWD, BWD)                                                                          \
static int64_t BWD##_loop(int fwd, const T* src, int64_t V, int64_t D, const int64_t* rows,      \
                          const T* coef, int64_t N, int64_t S, const int64_t* fmap, int64_t F,   \
                          T* dst) {                                                               \
  memset(dst, 0, sizeof(T) * (size_t)((fwd ? N * F : V) * D));                                   \
  for (int64_t n = 0; n < N; n++) {                                                               \
    const int64_t* rn = rows + n * S; const T* cn = coef + n * S;                                 \
    for (int64_t s = 0; s < S; s++) {                                                             \
      int64_t r = rn[s]; if (r < 0 || r >= V) return n * S + s + 1;                               \
      int64_t f = fmap[s]; if (f < 0 || f >= F) return -(s + 1);                                  \
      T c = cn[s]; if (c == 0) continue;                                                          \
      const T* x = fwd ? src + r * D : src + (n * F + f) * D;                                     \
      T* o = fwd ? dst + (n * F + f) * D : dst + r * D;                                           \
      for (int64_t d = 0; d < D; d++) o[d] += c * x[d];                                           \
    }                                                                                             \
  }                                                                                               \
  return 0;                                                                                       \
}                                                                                                 \
int64_t FWD(const T* W, int64_t V, int64_t D, const int64_t* rows, const T* coef, int64_t N,     \
            int64_t S, const int64_t* fmap, int64_t F, T* out) {                                 \
  return BWD##_loop(1, W, V, D, rows, coef, N, S, fmap, F, out);                                  \
}                                                                                                 \
int64_t BWD(const T* G, int64_t V, int64_t D, const int64_t* rows, const T* coef, int64_t N,     \
            int64_t S, const int64_t* fmap, int64_t F, T* gW) {                                  \
  return BWD##_loop(0, G, V, D, rows, coef, N, S, fmap, F, gW);                                   \
}
BAG(float, bag_fwd_f32, bag_bwd_f32)
BAG(double, bag_fwd_f64, bag_bwd_f64)
"""
_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
         ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
load_error: str | None = None  # why the kernel is not in use (None: in use, or not tried yet)


def _cache_dir() -> Path:
    root = os.environ.get("METACTR_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME")
                                                           or os.path.expanduser("~/.cache"), "metactr")
    return Path(root) / "kernels"


def _cpu_key() -> str:
    """The compiled file depends on the CPU (``-march=native``): a cache shared between hosts keeps one per CPU."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in info.splitlines() if ln.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + platform.processor() + flags


def _compile(out: Path) -> None:
    cc = os.environ.get("CC", "cc")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, src = tempfile.mkstemp(suffix=".c", dir=out.parent)
    os.close(fd)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        Path(src).write_text(_SOURCE)
        err = ""
        for march in (["-march=native"], []):  # some compilers (or CPUs) have no -march=native
            r = subprocess.run([cc, "-O3", *march, "-shared", "-fPIC", "-o", tmp, src], capture_output=True,
                               text=True, timeout=120, check=False)
            if r.returncode == 0:
                os.replace(tmp, out)  # atomic: concurrent processes compile, one file wins whole
                return
            err = (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"exit {r.returncode}"]
        raise OSError(f"{cc}: {err[0]}")
    finally:
        for p in (src, tmp):
            Path(p).unlink(missing_ok=True)


def library() -> ctypes.CDLL | None:
    """The loaded kernel, compiling it on first use; None (reason in ``load_error``) when unavailable."""
    global _lib, _tried, load_error
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        if os.environ.get("METACTR_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
            load_error = "disabled by METACTR_NATIVE"
        else:
            key = hashlib.sha256((_SOURCE + _cpu_key()).encode()).hexdigest()[:16]
            path = _cache_dir() / f"bag_{key}.so"
            try:
                if not path.exists():
                    _compile(path)
                lib = ctypes.CDLL(str(path))
                for name in ("bag_fwd_f32", "bag_bwd_f32", "bag_fwd_f64", "bag_bwd_f64"):
                    fn = getattr(lib, name)
                    fn.restype, fn.argtypes = ctypes.c_int64, _ARGS
                _lib = lib
            except (OSError, subprocess.SubprocessError, AttributeError) as e:
                load_error = f"native kernel unavailable ({e}); using the PyTorch path"
        _tried = True
        return _lib


@contextlib.contextmanager
def enabled(on: bool):
    """Within the block the models use the kernel (``on``, where it is available) or their PyTorch
    path (as without a compiler): for A/B timings and equivalence tests."""
    global _lib, _tried
    lib = library()
    saved = _lib, _tried
    _lib, _tried = (lib if on else None), True
    try:
        yield
    finally:
        _lib, _tried = saved


def _transformed() -> bool:
    level = getattr(torch._C._functorch, "maybe_current_level", None)
    return level is None or level() is not None or torch.compiler.is_compiling()


def usable(weight: Tensor) -> bool:
    """Whether ``bag`` may run the compiled kernel on this table here (see the module docstring);
    its ``coef`` must also need no gradient."""
    return (weight.device.type == "cpu" and weight.dtype in _SUFFIX and weight.dim() == 2 and not _transformed()
            and library() is not None)


def _call(kind: str, src: Tensor, rows: Tensor, coef: Tensor, fmap: Tensor, n_fields: int, n_rows: int) -> Tensor:
    """One kernel call: ``fwd`` looks ``src`` (the table) up into ``[N, n_fields, D]``; ``bwd``
    scatters ``src`` (a gradient ``[N, n_fields, D]``) into a ``[n_rows, D]`` table."""
    dim = src.shape[-1]
    n, s = rows.shape
    out = torch.empty((n, n_fields, dim) if kind == "fwd" else (n_rows, dim), dtype=src.dtype)
    if n * s == 0 or dim == 0:
        return out.zero_()
    fn = getattr(library(), f"bag_{kind}_{_SUFFIX[src.dtype]}")
    bad = fn(src.data_ptr(), n_rows, dim, rows.data_ptr(), coef.data_ptr(), n, s, fmap.data_ptr(), n_fields,
             out.data_ptr())
    if bad < 0:
        raise ValueError(f"field map entry {int(fmap[-bad - 1])} at slot {-bad - 1} is outside [0, {n_fields})")
    if bad:
        k = bad - 1
        raise IndexError(f"index {int(rows.view(-1)[k])} is out of range for an embedding table of {n_rows} rows")
    return out


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, rows: Tensor, coef: Tensor, fmap: Tensor, n_fields: int) -> Tensor:
        ctx.save_for_backward(rows, coef, fmap)
        ctx.n_rows, ctx.n_fields = weight.shape[0], n_fields
        return _call("fwd", weight.detach().contiguous(), rows, coef, fmap, n_fields, weight.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows, coef, fmap = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the scatter as a Function, so that it has a gradient too
            return _Scatter.apply(grad, rows, coef, fmap, ctx.n_rows), None, None, None, None
        return _call("bwd", grad.contiguous(), rows, coef, fmap, ctx.n_fields, ctx.n_rows), None, None, None, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad: Tensor, rows: Tensor, coef: Tensor, fmap: Tensor, n_rows: int) -> Tensor:
        ctx.save_for_backward(rows, coef, fmap)
        ctx.n_fields = grad.shape[1]
        return _call("bwd", grad.detach().contiguous(), rows, coef, fmap, grad.shape[1], n_rows)

    @staticmethod
    def backward(ctx, grad_table: Tensor):
        rows, coef, fmap = ctx.saved_tensors
        return _Lookup.apply(grad_table, rows, coef, fmap, ctx.n_fields), None, None, None, None


def bag(weight: Tensor, rows: Tensor, coef: Tensor, fmap: Tensor, n_fields: int) -> Tensor:
    """``out[..., f, :] = sum_{s: fmap[s] = f} coef[..., s] * weight[rows[..., s]]``: ``[..., n_fields, D]``.

    ``rows`` long ``[..., S]`` into ``weight [V, D]``; ``coef [..., S]`` (no gradient); ``fmap``
    long ``[S]`` in ``[0, n_fields)``. Call only where ``usable(weight)``."""
    if coef.requires_grad:
        raise ValueError("native.bag: coef must not need its gradient (use the PyTorch path)")
    if coef.shape != rows.shape or fmap.shape != rows.shape[-1:] or rows.dtype != torch.long:
        raise ValueError(f"native.bag: rows {tuple(rows.shape)} ({rows.dtype}), coef {tuple(coef.shape)} and "
                         f"fmap {tuple(fmap.shape)} do not match (coef as rows, fmap one entry per slot)")
    lead = rows.shape[:-1]
    n = lead.numel()
    rows2 = rows.reshape(n, rows.shape[-1]).contiguous()
    coef2 = coef.reshape(n, coef.shape[-1]).contiguous()
    out = _Lookup.apply(weight, rows2, coef2.to(weight.dtype), fmap.contiguous(), n_fields)
    return out.view(*lead, n_fields, weight.shape[-1])
