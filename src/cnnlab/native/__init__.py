"""C kernels for the CPU, compiled on first use with the system C compiler and loaded with ctypes.

No build step at install time and no torch headers: `kernels.c` is plain C11, compiled in about
6 seconds (20-25 without AVX-512) with `-O3 -march=native -fopenmp` into a cache folder and
reused while its source, the compiler and the CPU stay the same. OpenMP makes it share
PyTorch's libgomp and its threads; a compiler without OpenMP gets a single-threaded build.
Every caller keeps a PyTorch fallback, taken when `library()` returns None: no C compiler
(set `CC` to pick one), a failed build, or `CNNLAB_NATIVE=0` in the environment.
`CNNLAB_CFLAGS` adds compiler flags after the usual ones: the tests build with `-mno-avx512f`
to check the portable code paths of an AVX-512 CPU.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c11", "-shared", "-fPIC")
OPENMP = "-fopenmp"
BUILD_TIMEOUT_S = 120
_build_lock = threading.Lock()


class ConvPoolGeometry(ctypes.Structure):
    """Mirror of `Geometry` in kernels.c."""

    _fields_ = [
        (name, ctypes.c_int32)
        for name in (
            "in_h",
            "in_w",
            "in_c",
            "out_c",
            "kh",
            "kw",
            "pad_top",
            "pad_left",
            "conv_h",
            "conv_w",
            "pool_h",
            "pool_w",
            "relu",
            "out_rows",
            "out_cols",
        )
    ]


LANES = 16  # LANES in kernels.c: weights and gradients have out_c rounded up to a multiple
MAX_TAPS = 128  # MAX_TAPS in kernels.c: kh * kw * in_c at most
MAX_WINNERS_CHANNELS = 256  # MAX_BLOCKS * LANES in kernels.c: winners_backward's most out_c
MAX_RUN = 256  # MAX_RUN_VECTORS * LANES in kernels.c: the longest run (kw * in_c values for
# pooled_weight_grad, (kw + 1) * in_c for pooled_input_grad, rounded up to whole vectors)


def cache_dir() -> Path:
    """Where built kernels live: $CNNLAB_CACHE_DIR, else $XDG_CACHE_HOME/cnnlab, else
    ~/.cache/cnnlab; a `native` folder inside."""
    root = os.environ.get("CNNLAB_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME")
    base = Path(root) if root else Path.home() / ".cache"
    if not os.environ.get("CNNLAB_CACHE_DIR"):
        base = base / "cnnlab"
    return base / "native"


def _cpu_signature() -> str:
    """The CPU's feature flags: -march=native code must not run on another CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CC") or next(
        (path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None
    )


def _compile(compiler: str, flags: list[str], output: str) -> None:
    subprocess.run(
        [compiler, *flags, "-o", output, str(SOURCE)],
        check=True,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )


def _build(compiler: str, target: Path, extra_flags: tuple[str, ...]) -> None:
    """Compile SOURCE into target atomically (concurrent builders each write a temporary file
    and the last rename wins, so a reader never sees a half-written library); with OpenMP
    where the compiler has it, else single-threaded."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".tmp")
    os.close(fd)
    try:
        try:
            _compile(compiler, [*FLAGS, *extra_flags, OPENMP], tmp)
        except subprocess.CalledProcessError:
            log.info("%s has no OpenMP: building cnnlab's C kernels single-threaded", compiler)
            _compile(compiler, [*FLAGS, *extra_flags], tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))  # a CDLL releases the GIL during each call
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    geometry = ctypes.POINTER(ConvPoolGeometry)
    # (geometry, x, w, bias, batch, y, y_is_bf16, argmax, threads)
    lib.conv_pool_forward.argtypes = [geometry, pointer, pointer, pointer, i64, pointer, i32]
    lib.conv_pool_forward.argtypes += [pointer, i32]
    lib.conv_pool_forward.restype = ctypes.c_int
    # (geometry, x, w, bias, batch, y, argmax, threads)
    lib.conv_pool_forward_pairs.argtypes = lib.conv_pool_forward.argtypes
    lib.conv_pool_forward_pairs.restype = ctypes.c_int
    lib.conv_pool_forward_bf16.argtypes = [geometry, pointer, pointer, pointer, i64, pointer]
    lib.conv_pool_forward_bf16.argtypes += [pointer, i32, i32]
    lib.conv_pool_forward_bf16.restype = ctypes.c_int
    lib.conv_pool_bf16_available.argtypes = []
    lib.conv_pool_bf16_available.restype = ctypes.c_int
    # (geometry, x, grad, grad_is_bf16, argmax, batch, chunk, grad_w, grad_b, threads)
    lib.conv_pool_weight_grad.argtypes = [geometry, pointer, pointer, i32, pointer, i64, i64]
    lib.conv_pool_weight_grad.argtypes += [pointer, pointer, i32]
    lib.conv_pool_weight_grad.restype = ctypes.c_int
    # (x, is_bf16, batch, h, w, c, pool_h, pool_w, y, argmax, threads)
    lib.max_pool_forward.argtypes = [pointer, i32, i64, i32, i32, i32, i32, i32, pointer, pointer]
    lib.max_pool_forward.argtypes += [i32]
    lib.max_pool_forward.restype = ctypes.c_int
    # (grad_y, is_bf16, argmax, batch, h, w, c, pool_h, pool_w, grad_x, threads)
    lib.max_pool_backward.argtypes = [pointer, i32, pointer, i64, i32, i32, i32, i32, i32, pointer]
    lib.max_pool_backward.argtypes += [i32]
    lib.max_pool_backward.restype = ctypes.c_int
    # (geometry, x, x_is_bf16, grad, grad_is_bf16, argmax, batch, chunk, grad_w, grad_b, threads)
    lib.pooled_weight_grad.argtypes = [geometry, pointer, i32, pointer, i32, pointer, i64, i64]
    lib.pooled_weight_grad.argtypes += [pointer, pointer, i32]
    lib.pooled_weight_grad.restype = ctypes.c_int
    # (geometry, w, grad, grad_is_bf16, argmax, batch, grad_x, x_is_bf16, threads)
    lib.pooled_input_grad.argtypes = [geometry, pointer, pointer, i32, pointer, i64]
    lib.pooled_input_grad.argtypes += [pointer, i32, i32]
    lib.pooled_input_grad.restype = ctypes.c_int
    # (x, is_bf16, batch, h, w, c, pool_h, pool_w, relu, p, seed, y, code, threads)
    lib.pool_dropout_forward.argtypes = [pointer, i32, i64, i32, i32, i32, i32, i32, i32]
    lib.pool_dropout_forward.argtypes += [ctypes.c_float, ctypes.c_uint64, pointer, pointer, i32]
    lib.pool_dropout_forward.restype = ctypes.c_int
    # (y, is_bf16, code, n, relu, p, seed, threads)
    lib.act_dropout_forward.argtypes = [pointer, i32, pointer, i64, i32, ctypes.c_float]
    lib.act_dropout_forward.argtypes += [ctypes.c_uint64, i32]
    lib.act_dropout_forward.restype = ctypes.c_int
    # (grad_y, is_bf16, code, batch, h, w, c, pool_h, pool_w, p, grad_x, threads)
    lib.pool_dropout_backward.argtypes = [pointer, i32, pointer, i64, i32, i32, i32, i32, i32]
    lib.pool_dropout_backward.argtypes += [ctypes.c_float, pointer, i32]
    lib.pool_dropout_backward.restype = ctypes.c_int
    # (geometry, x, is_bf16, w, w_is_bf16, grad, grad_is_bf16, code, p, batch, chunk, grad_x,
    #  grad_w, grad_b, max_method, threads)
    lib.winners_backward.argtypes = [geometry, pointer, i32, pointer, i32, pointer, i32, pointer]
    lib.winners_backward.argtypes += [ctypes.c_float, i64, i64, pointer, pointer, pointer, i32, i32]
    lib.winners_backward.restype = ctypes.c_int
    # (geometry, x_is_bf16, w_is_bf16, grad_is_bf16, max_method): 0-2, fused.WINNERS_METHODS
    lib.winners_method.argtypes = [geometry, i32, i32, i32, i32]
    lib.winners_method.restype = ctypes.c_int
    # (kh, run): whether winners_backward has registers for kh rows of run vectors
    lib.winners_shape_supported.argtypes = [i32, i32]
    lib.winners_shape_supported.restype = ctypes.c_int
    # (x, y, is_bf16, n, p, seed, threads)
    lib.dropout.argtypes = [pointer, pointer, i32, i64, ctypes.c_float, ctypes.c_uint64, i32]
    lib.dropout.restype = ctypes.c_int
    # (x, x_is_bf16, batch, in_f, hidden, out_f, w1, b1, relu, p, seed, w2, b2, parts, xf,
    #  act, dropped, factor, logits, threads)
    lib.dense_head_forward.argtypes = [pointer, i32, i64, i32, i32, i32, pointer, pointer, i32]
    lib.dense_head_forward.argtypes += [ctypes.c_float, ctypes.c_uint64, pointer, pointer, i32]
    lib.dense_head_forward.argtypes += [pointer, pointer, pointer, pointer, pointer, i32, i32]
    lib.dense_head_forward.restype = ctypes.c_int
    # (grad_logits, batch, in_f, hidden, out_f, w1, relu, w2, parts, xf, act, dropped, factor,
    #  grad_x, x_is_bf16, grad_w1, grad_b1, grad_w2, grad_b2, threads)
    lib.dense_head_backward.argtypes = [pointer, i64, i32, i32, i32, pointer, i32, pointer, i32]
    lib.dense_head_backward.argtypes += [pointer, pointer, pointer, pointer, pointer, i32]
    lib.dense_head_backward.argtypes += [pointer, pointer, pointer, pointer, i32, i32]
    lib.dense_head_xf_floats.argtypes = [i64, i32, i32]
    lib.dense_head_xf_floats.restype = i64
    lib.dense_head_backward.restype = ctypes.c_int
    # (logits, labels, n, k, smoothing, grad, loss, correct)
    lib.softmax_cross_entropy.argtypes = [pointer, pointer, i64, i32, ctypes.c_double, pointer]
    lib.softmax_cross_entropy.argtypes += [pointer, pointer]
    lib.softmax_cross_entropy.restype = ctypes.c_int
    # (arrays, sizes, count)
    lib.all_finite.argtypes = [pointer, pointer, i32]
    lib.all_finite.restype = ctypes.c_int
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on the first call; None where they cannot be had."""
    if os.environ.get("CNNLAB_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    compiler = _compiler()
    if compiler is None:
        log.info("no C compiler found (set CC): using PyTorch for the fused conv-pool block")
        return None
    key = hashlib.sha256()
    extra_flags = tuple(shlex.split(os.environ.get("CNNLAB_CFLAGS", "")))
    flags = " ".join([*FLAGS, *extra_flags, OPENMP])
    for part in (SOURCE.read_bytes(), compiler.encode(), flags.encode()):
        key.update(part)
    key.update(_cpu_signature().encode())
    target = cache_dir() / f"{SOURCE.stem}-{key.hexdigest()[:16]}.so"
    with _build_lock:
        try:
            if not target.exists():
                log.info("compiling cnnlab's C kernels with %s (once per machine)", compiler)
                _build(compiler, target, extra_flags)
            return _load(target)
        except (OSError, subprocess.SubprocessError) as error:
            detail = getattr(error, "stderr", "") or str(error)
            log.warning(
                "could not build cnnlab's C kernels with %s (%s); using PyTorch instead "
                "(slower first conv-pool blocks). Set CNNLAB_NATIVE=0 to skip the attempt.",
                compiler,
                detail.strip().splitlines()[-1] if detail.strip() else type(error).__name__,
            )
            return None
