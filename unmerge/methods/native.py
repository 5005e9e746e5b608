"""Optional fused CPU loops (``native.c``), compiled on first use with the system C compiler and loaded by ctypes.

The torch code in :mod:`unmerge.methods.kernels` and :mod:`unmerge.methods.sparsify` stays the reference and the
fallback: each native function does the same float32 operations in the same order (tests/test_native.py checks the
outputs are bitwise equal), in one pass over memory instead of one pass per torch op. ctypes releases the GIL for
the call, so the chunk pool's threads run them in parallel.

Build: ``$CC`` (default ``cc``) with ``-O3 -march=native -ffp-contract=off`` (no fused multiply-adds, no fast-math),
into ``$UNMERGE_NATIVE_CACHE`` (default ``<unmerge cache>/native``) under a name hashed from the source, the
compiler binary, the flags and this CPU's feature flags; written to a temporary file and renamed, so concurrent
processes are safe.
Without a compiler (or with ``UNMERGE_NATIVE=0``) everything runs in torch, with one log line saying so.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from unmerge.cache import default_cache_dir

Tensor = torch.Tensor
SOURCE = Path(__file__).with_name("native.c")
FLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno")
ARCH_FLAGS = ("-march=native",)  # dropped (and retried) where the compiler does not take it
_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}
_pointer = ctypes.c_void_p
_i64 = ctypes.c_int64
_f32 = ctypes.c_float
_int = ctypes.c_int


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def cache_dir() -> Path:
    return Path(os.environ.get("UNMERGE_NATIVE_CACHE", default_cache_dir() / "native"))


def _compile(compiler: str, target: Path) -> Path | None:
    """Compile SOURCE into ``target`` (atomically); None with a log line when the compiler fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for flags in (FLAGS + ARCH_FLAGS, FLAGS):
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        os.close(handle)
        try:
            done = subprocess.run([compiler, *flags, str(SOURCE), "-o", temporary, "-lm"], capture_output=True,
                                  text=True, timeout=120)
            if done.returncode == 0:
                os.replace(temporary, target)
                return target
            error = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        except (OSError, subprocess.SubprocessError) as exc:
            error = [str(exc)]
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    _log.info("unmerge: native kernels not built (%s: %s); the merges run in torch", compiler, error[0])
    return None


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.um_band_slack.restype = _int
    lib.um_band_slack.argtypes = []
    lib.um_band_scan.restype = None
    lib.um_band_scan.argtypes = [_pointer, _pointer, _int, _i64, _pointer, _pointer, _pointer, _pointer, _pointer,
                                 _pointer]
    lib.um_sum_combine.restype = _int
    lib.um_sum_combine.argtypes = [_pointer, _pointer, _int, _pointer, _pointer, _pointer, _pointer, _pointer, _int,
                                   _f32, _f32, _pointer, _i64]
    lib.um_ties_combine.restype = _i64
    lib.um_ties_combine.argtypes = [_pointer, _pointer, _int, _pointer, _pointer, _pointer, _pointer, _pointer, _int,
                                    _int, _int, _int, _int, _f32, _f32, _pointer, _i64, _pointer, _pointer]
    lib.um_all_finite.restype = _int
    lib.um_all_finite.argtypes = [_pointer, _i64]
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on first use; None where disabled or no compiler works."""
    if "lib" in _state:
        return _state["lib"]
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib = None
        if os.environ.get("UNMERGE_NATIVE", "1") != "0":
            compiler = os.environ.get("CC", "cc")
            found = shutil.which(compiler)
            if found is None:
                _log.info("unmerge: no C compiler (%s) found; the merges run in torch", compiler)
            else:
                binary = os.path.realpath(found)  # (its identity, not `cc --version`: no process at start-up)
                stat = os.stat(binary)
                key = hashlib.sha256("\0".join([SOURCE.read_text(), binary, str(stat.st_size), str(stat.st_mtime_ns),
                                                *FLAGS, *ARCH_FLAGS, platform.machine(), _cpu_flags()]
                                               ).encode()).hexdigest()[:20]
                target = cache_dir() / f"unmerge-native-{key}.so"
                path = target if target.exists() else _compile(compiler, target)
                lib = _declare(ctypes.CDLL(str(path))) if path is not None else None
        _state["lib"] = lib
        return lib


def reset() -> None:
    """Forget the loaded library (tests: toggle UNMERGE_NATIVE)."""
    with _lock:
        _state.clear()


def usable(*tensors: Tensor) -> bool:
    """Whether the kernels apply: float32, contiguous, on the CPU, and the library loaded."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors) and \
        library() is not None


def _floats(values: list[float]) -> ctypes.Array:
    return (_f32 * len(values))(*values)


def _pointers(tensors: list[Tensor]) -> ctypes.Array:
    return (_pointer * len(tensors))(*(t.data_ptr() for t in tensors))


def all_finite(x: Tensor) -> bool:
    """No NaN/Inf among the values of a float32 chunk."""
    return bool(library().um_all_finite(x.data_ptr(), x.numel()))


_scratch = threading.local()


def band_scan(b: Tensor, models: list[Tensor], lows: list[float], highs: list[float]
              ) -> list[tuple[int, Tensor, bool]]:
    """For each model: (#{|m − b| > high}, the |m − b| in (low, high] in position order, whether every |m − b| is
    finite), for float32 1-D chunks; the models are scanned together (``b`` read once)."""
    n, count = b.numel(), len(models)
    lib = library()
    stride = n + lib.um_band_slack()  # (the vector loop stores whole vectors past the last entry)
    buffer = getattr(_scratch, "band", None)
    if buffer is None or buffer.numel() < stride * count:
        buffer = _scratch.band = torch.empty(stride * count)
    bands = [buffer[j * stride:(j + 1) * stride] for j in range(count)]
    kept, above, finite = (_i64 * count)(), (_i64 * count)(), (_int * count)()
    lib.um_band_scan(b.data_ptr(), _pointers(models), count, n, _floats(lows), _floats(highs), _pointers(bands),
                     kept, above, finite)
    return [(int(above[j]), bands[j][:kept[j]].clone(), bool(finite[j])) for j in range(count)]


@dataclass(frozen=True)
class Trim:
    """Each model's trim for the kernels: zero where −threshold ≤ τ ≤ threshold (hardshrink), times factor; where
    quota ≥ 0, of the entries with |τ| = tie only the first ``quota`` of the chunk are kept."""

    thresholds: list[float]
    factors: list[float]
    ties: list[float]
    quotas: list[int]

    def arrays(self) -> tuple[ctypes.Array, ctypes.Array, ctypes.Array, ctypes.Array]:
        return (_floats(self.thresholds), _floats(self.factors), _floats(self.ties),
                (_i64 * len(self.quotas))(*self.quotas))


def sum_combine(b: Tensor, models: list[Tensor], trim: Trim, weights: list[float], normalize: bool, divisor: float,
                lam: float, out: Tensor) -> bool:
    """out = b + λ Σ_t w_t trim_t(m_t − b) [/ divisor], over one chunk; whether every output value is finite."""
    return bool(library().um_sum_combine(b.data_ptr(), _pointers(models), len(models), *trim.arrays(),
                                         _floats(weights), int(normalize), divisor, lam, out.data_ptr(), b.numel()))


def ties_combine(b: Tensor, models: list[Tensor], trim: Trim, weights: list[float], weighted_sign: bool,
                 weighted_divisor: bool, normalize: bool, one_if_zero: bool, tie_break: bool, lam: float,
                 zero_sign: float, out: Tensor) -> tuple[int, int, bool]:
    """The TIES combine of ``_combine_chunk`` on trim_t(m_t − b) over one chunk; returns (Σ sgn Σ_t s_t, how many
    positions have Σ_t s_t = 0 and a nonzero agreeing sum; both 0 without ``tie_break``, whether every output value
    is finite)."""
    tied, finite = _i64(), _int()
    signs = library().um_ties_combine(b.data_ptr(), _pointers(models), len(models), *trim.arrays(), _floats(weights),
                                      int(weighted_sign), int(weighted_divisor), int(normalize), int(one_if_zero),
                                      int(tie_break), lam, zero_sign, out.data_ptr(), b.numel(), ctypes.byref(tied),
                                      ctypes.byref(finite))
    return int(signs), int(tied.value), bool(finite.value)
