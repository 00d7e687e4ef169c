"""Native binary-decomposition kernels (C, via cffi): quantize + bit-pack and AND/popcount conv.

Everything is validated here before C is called (dtypes, contiguity, sizes, ranges): a bad
argument raises ValueError, never reaches C.  The C side re-validates and returns an error code.

    act = quantize_pack(x, groups=1, scale=s, zero_point=z, bits=4)        # x float32 [N,C,H,W]
    conv = PackedConv(basis, coeffs, bias, cin=C, groups=1, kernel=(3, 3), pads=(1, 1, 1, 1),
                      bits=4, zero_point=z, scale=s)
    y = conv.run(act, N, H, W)                                            # float32 [N,Cout,OH,OW]

Environment: BDECOMP_ISA=scalar|avx2|avx512 forces a kernel; BDECOMP_KERNEL=auto|lut|popcount
the kernel family; BDECOMP_THREADS sets the default thread count (else the CPUs this process may use);
BDECOMP_MIN_PARALLEL_WORK=<int ≥ 0> overrides the work below which C runs a call on one thread
(0: always use the threads given — tests use it to exercise the parallel code on small inputs).

Speed: PackedConv.run and quantize_pack validate a (geometry, options) combination once and cache
the result (with the C parameter block and weight pointers); a repeated call only checks the
array's type, dtype, contiguity and shape — O(1) — before C runs, and C re-validates sizes.
"""
from __future__ import annotations

import math
import os
import operator

import numpy as np

# How idle OpenMP workers wait between parallel regions, read by libgomp when the extension below
# loads it (no effect if libgomp is already loaded; a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT
# wins).  Long spinning steals the cores onnxruntime segments and other processes need (2 threads
# were ~20x slower than 1 on a busy 2-core machine with libgomp's default); pure sleeping makes
# every layer pay a futex wake-up (~20-40 µs), so small layers could not use threads at all
# (ResNet-56 at 2 threads: 6.2 ms, as 1 thread).  A short spin bridges the gaps between
# consecutive layers and then sleeps.  3000 spins (tens of µs) rather than 30000 (~0.3 ms): a
# worker still spinning after a chain takes the core the onnxruntime segment after it needs.
# 2 threads, AVX-512 Zen 4, 2 cores, 3000 vs 30000: SqueezeNet `--budget 24 --float-when-faster`
# 3.86–3.92 vs 4.38–4.66 ms, ResNet-56 `--budget 12 --float-when-faster` 1.28 vs 1.27–1.31 ms,
# the all-native ResNet-56 k=Q=4 1.90 vs 1.86–1.88 ms.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["GOMP_SPINCOUNT"] = "3000"

try:
    from bdecomp.native._kernels import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "bdecomp's native kernels (bdecomp.native._kernels) are not built: install the package "
        "with `pip install .` (needs a C compiler with OpenMP, e.g. gcc) or build in place with "
        f"`python native/build_ffi.py`. Original error: {exc}"
    ) from exc

__all__ = [
    "ISAS",
    "available_isas",
    "default_isa",
    "default_threads",
    "bind_quantize_pack",
    "quantize_pack",
    "im2col_quantize_pack",
    "words_per_group",
    "PackedConv",
    "DepthwiseConv",
    "quantize_codes",
    "popcount_peak",
]

ISAS = ("scalar", "avx2", "avx512")
_ISA_IDS = {"scalar": lib.BD_ISA_SCALAR, "avx2": lib.BD_ISA_AVX2, "avx512": lib.BD_ISA_AVX512}
_STATUS = {
    lib.BD_EINVAL: "invalid argument",
    lib.BD_EUNSUPPORTED: "ISA not supported on this CPU/build",
    lib.BD_ENOMEM: "out of memory",
}
_MAX_DIM = 2**31 - 1

# The environment variables that change what a call does, read on every call of the fast paths
# below as part of their cache keys.  os.environ.get costs ~1 µs (key encoding); the underlying
# mapping of encoded keys, where CPython has one, is a plain dict lookup.
_ENV_NAMES = ("BDECOMP_ISA", "BDECOMP_KERNEL", "BDECOMP_THREADS")
try:
    _ENV_DATA = os.environ._data  # type: ignore[attr-defined]
    _ENV_KEYS = tuple(os.environ.encodekey(k) for k in _ENV_NAMES)  # type: ignore[attr-defined]

    def _env_state() -> tuple:
        d = _ENV_DATA
        return (d.get(_ENV_KEYS[0]), d.get(_ENV_KEYS[1]), d.get(_ENV_KEYS[2]))
except AttributeError:  # pragma: no cover - other Python implementations
    def _env_state() -> tuple:
        return tuple(os.environ.get(k) for k in _ENV_NAMES)
_U64 = np.dtype(np.uint64)


# ------------------------------------------------------------------------------------------------
# ISA and threads


def available_isas() -> list[str]:
    """ISAs this build can run on this CPU, slowest first (``scalar`` is always there)."""
    return [name for name in ISAS if lib.bd_isa_supported(_ISA_IDS[name])]


def default_isa() -> str:
    """``BDECOMP_ISA`` if set (must be supported here), else the best available ISA."""
    forced = os.environ.get("BDECOMP_ISA", "").strip().lower()
    if forced:
        if forced not in ISAS:
            raise ValueError(f"BDECOMP_ISA={forced!r} is not one of {', '.join(ISAS)}")
        if forced not in available_isas():
            raise RuntimeError(
                f"BDECOMP_ISA={forced!r} is not supported on this CPU "
                f"(available: {', '.join(available_isas())})"
            )
        return forced
    return available_isas()[-1]


def _resolve_isa(isa: str | None) -> int:
    if isa is None:
        isa = default_isa()
    if not isinstance(isa, str) or isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")
    if isa not in available_isas():
        raise RuntimeError(f"isa {isa!r} is not supported on this CPU (available: {available_isas()})")
    return _ISA_IDS[isa]


def usable_cpus() -> int:
    """The CPUs this process may run on (``taskset``, ``docker --cpuset-cpus``, a cgroup's cpuset):
    ``os.cpu_count()`` counts the whole machine, and more threads than usable CPUs make every
    layer's barrier wait for a descheduled thread."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """``BDECOMP_THREADS`` if set, else usable_cpus()."""
    env = os.environ.get("BDECOMP_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"BDECOMP_THREADS must be a positive integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"BDECOMP_THREADS must be a positive integer, got {env!r}")
        return min(n, int(lib.BD_MAX_THREADS))
    return min(usable_cpus(), int(lib.BD_MAX_THREADS))


def _threads(threads) -> int:
    if threads is None:
        return default_threads()
    t = _int("threads", threads)
    if t < 1:
        raise ValueError(f"threads must be ≥ 1, got {t}")
    return min(t, int(lib.BD_MAX_THREADS))


# ------------------------------------------------------------------------------------------------
# argument checking helpers


def _int(name, value) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _int_in(name, value, lo, hi) -> int:
    v = _int(name, value)
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")
    return v


def _pair(name, value, lo) -> tuple[int, int]:
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a pair of integers, got {value!r}") from None
    if len(items) != 2:
        raise ValueError(f"{name} must be a pair of integers, got {value!r}")
    return tuple(_int_in(name, v, lo, _MAX_DIM) for v in items)


def _float32_c(x: np.ndarray) -> np.ndarray:
    """x as C-contiguous float32 (integer and float inputs are converted, anything else refused)."""
    if x.dtype != np.float32:
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise ValueError(f"x must be a float array, got dtype {x.dtype}")
        x = x.astype(np.float32)
    return np.ascontiguousarray(x)


def _quant_args(bits, zero_point, scale, sign) -> tuple[bool, int, int, float]:
    """Checked (sign, bits, zero_point, scale) of a quantizer; sign mode is Q = 1 with no zero point."""
    sign = bool(sign)
    if sign:
        return sign, _int_in("bits", bits, 1, 1), 0, 1.0 if scale is None else _scale(scale)
    bits = _int_in("bits", bits, 1, 8)
    return sign, bits, _int_in("zero_point", zero_point, 0, 2**bits - 1), _scale(scale)


def _pads(pads) -> tuple[int, int, int, int]:
    """Four non-negative pads (top, left, bottom, right)."""
    try:
        pads_t = tuple(pads)
    except TypeError:
        raise ValueError(f"pads must be 4 integers (top, left, bottom, right), got {pads!r}") from None
    if len(pads_t) != 4:
        raise ValueError(f"pads must be 4 integers (top, left, bottom, right), got {pads!r}")
    return tuple(_int_in("pads", v, 0, _MAX_DIM) for v in pads_t)


def _scale(value) -> float:
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a positive finite number, got {value!r}") from None
    s32 = np.float32(s)
    if not (math.isfinite(s) and np.isfinite(s32) and s32 > 0):
        raise ValueError(f"scale must be a positive finite float32 number, got {value!r}")
    return float(s32)


def _channel_scales(value, channels: int):
    """Optional per-channel activation scales: None, or a private float32 C-contiguous copy of a
    1-D real array-like of ``channels`` entries, each finite and > 0 once rounded to float32."""
    if value is None:
        return None
    try:
        a = np.asarray(value)
    except Exception:  # ragged lists and the like  # noqa: BLE001
        raise ValueError(f"channel_scales must be a 1-D array of {channels} positive finite numbers, "
                         f"got {type(value).__name__}") from None
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"channel_scales must be a real numeric array, got dtype {a.dtype}")
    if a.ndim != 1 or a.shape[0] != channels:
        raise ValueError(f"channel_scales must be 1-D with one scale per channel (C = {channels}), "
                         f"got shape {a.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        a32 = np.array(a, dtype=np.float32, order="C", copy=True)  # never aliases the caller's array
    bad = ~(np.isfinite(a32) & (a32 > 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"channel_scales must be finite and > 0 (as float32); channel {i} has "
                         f"{a[i].item()!r} ({int(bad.sum())} bad of {channels})")
    return a32


def _check_array(name, a, dtype, shape=None):
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise ValueError(f"{name} must have dtype {np.dtype(dtype).name}, got {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray)")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")
    return a


def _check_status(rc, what):
    if rc != lib.BD_OK:
        raise ValueError(f"{what} failed in C: {_STATUS.get(rc, rc)}")


def words_per_group(channels_per_group: int) -> int:
    """64-bit words per group in the activation layout: ceil(Cg / 64)."""
    return (channels_per_group + 63) // 64


# ------------------------------------------------------------------------------------------------
# quantize + pack


def quantize_pack(
    x: np.ndarray,
    *,
    groups: int,
    scale: float,
    zero_point: int,
    bits: int,
    sign: bool = False,
    channel_axis: int = 1,
    threads: int | None = None,
    channel_scales=None,
    isa: str | None = None,
) -> np.ndarray:
    """Quantize float activations and pack them into bit planes.

    ``channel_axis=1``: x is [N, C, *spatial]; ``channel_axis=-1``: x is [..., C].  Codes are
    clamp(rint(x / s_c) + zero_point, 0, 2^bits − 1) (or [x ≥ 0] with ``sign``), s_c = ``scale``
    for every channel, or ``channel_scales[c]`` if given: a 1-D array-like of C scales (finite,
    > 0 in float32; ``scale`` must then still be valid but is unused; sign mode ignores them after
    validation).  The zero point is shared by all channels.  Returns uint64 of shape (pixels,
    groups, bits, ceil(C / groups / 64)) in the layout of bdecomp.h.  ``isa``: None (BDECOMP_ISA, else
    the best here), "scalar" (the plain loops) or "avx2" / "avx512" (the AVX2 code): the same bits.

    The checks of a (shape, options) combination run once and are cached: a repeated call on a
    float32 C-contiguous array only looks its plan up (channel_scales given as a numpy array are
    part of the cache key by value — dtype, shape and bytes —, other array-likes skip the cache).
    """
    fast = type(x) is np.ndarray and x.dtype == _F32 and x.flags.c_contiguous
    key = None
    if fast:
        if channel_scales is None:
            cs_key = None
        elif type(channel_scales) is np.ndarray:
            cs_key = (channel_scales.dtype.str, channel_scales.shape, channel_scales.tobytes())
        else:
            fast = False
    if fast:
        key = (x.shape, groups, scale, zero_point, bits, sign, channel_axis, threads, isa, _env_state(), cs_key)
        try:
            plan = _QP_PLANS.get(key)
        except TypeError:  # unhashable option: the checks below reject it
            plan, key = None, None
    if not fast or plan is None:
        x, plan = _quantize_pack_plan(x, groups, scale, zero_point, bits, sign, channel_axis, threads,
                                      channel_scales, isa)
        if key is not None and all(type(v) in (int, type(None)) for v in (groups, bits, zero_point, channel_axis, threads)) \
                and type(isa) in (str, type(None)):
            if len(_QP_PLANS) >= 256:
                _QP_PLANS.clear()
            _QP_PLANS[key] = plan
    return _quantize_pack_call(plan, x)


def _quantize_pack_call(plan, x: np.ndarray) -> np.ndarray:
    outer, channels, inner, groups_v, scale_v, zp, bits_v, sign_v, nthreads, shape, cs_ptr, isa_id = plan
    act = np.empty(shape, dtype=np.uint64)
    # cs_ptr: ffi.NULL or a cffi buffer over the plan's own float32 copy (alive with `plan`)
    rc = lib.bd_quantize_pack(ffi.from_buffer("float[]", x), outer, channels, inner, groups_v, scale_v,
                              cs_ptr, zp, bits_v, sign_v, ffi.from_buffer("uint64_t[]", act), isa_id, nthreads)
    if rc != lib.BD_OK:
        _check_status(rc, "bd_quantize_pack")
    return act


def bind_quantize_pack(x: np.ndarray, **options):
    """quantize_pack (same keyword options) resolved once for arrays of x's shape:
    f(x2) → packed activations, for float32 C-contiguous x2 of exactly that shape (checked, O(1));
    threads and the environment are read now.  The runtime's per-layer call."""
    x, plan = _quantize_pack_plan_options(x, options)
    shape = x.shape

    def f(x2):
        if type(x2) is not np.ndarray or x2.dtype != _F32 or not x2.flags.c_contiguous or x2.shape != shape:
            raise ValueError(f"x must be float32 C-contiguous of shape {shape}, got "
                             f"{getattr(x2, 'dtype', type(x2).__name__)} {getattr(x2, 'shape', '')}")
        return _quantize_pack_call(plan, x2)

    return f


_F32 = np.dtype(np.float32)
_QP_PLANS: dict = {}


def _quantize_pack_plan_options(x, options: dict):
    """_quantize_pack_plan with quantize_pack's keyword options (bind_quantize_pack, Chain)."""
    options = dict(options)
    x, plan = _quantize_pack_plan(x, options.pop("groups"), options.pop("scale"), options.pop("zero_point"),
                                  options.pop("bits"), options.pop("sign", False), options.pop("channel_axis", 1),
                                  options.pop("threads", None), options.pop("channel_scales", None),
                                  options.pop("isa", None))
    if options:
        raise TypeError(f"unknown options: {', '.join(sorted(options))}")
    return x, plan


def _quantize_pack_plan(x, groups, scale, zero_point, bits, sign, channel_axis, threads, channel_scales=None,
                        isa=None):
    """quantize_pack's checks: (x as float32 C-contiguous, the C arguments and output shape)."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"x must be a numpy array, got {type(x).__name__}")
    x = _float32_c(x)
    groups = _int_in("groups", groups, 1, _MAX_DIM)
    sign, bits, zero_point, scale_v = _quant_args(bits, zero_point, scale, sign)
    channel_axis = _int("channel_axis", channel_axis)
    if channel_axis == 1:
        if x.ndim < 2:
            raise ValueError(f"channel_axis=1 needs x of shape [N, C, ...], got {x.shape}")
        outer, channels = x.shape[0], x.shape[1]
        inner = int(np.prod(x.shape[2:], dtype=np.int64))
    elif channel_axis == -1:
        if x.ndim < 1:
            raise ValueError("channel_axis=-1 needs x with at least one dimension")
        channels = x.shape[-1]
        outer = int(np.prod(x.shape[:-1], dtype=np.int64))
        inner = 1
    else:
        raise ValueError(f"channel_axis must be 1 (channel-first) or -1 (channel-last), got {channel_axis}")
    if x.size == 0 or outer == 0 or channels == 0 or inner == 0:
        raise ValueError(f"x must be non-empty, got shape {x.shape}")
    if channels % groups:
        raise ValueError(f"channels ({channels}) must be a multiple of groups ({groups})")
    wpg = words_per_group(channels // groups)
    cs = _channel_scales(channel_scales, int(channels))
    # the cffi buffer keeps the private float32 copy alive as long as the plan
    cs_ptr = ffi.NULL if cs is None else ffi.from_buffer("float[]", cs)
    return x, (outer, channels, inner, groups, scale_v, zero_point, bits, int(sign), _threads(threads),
               (outer * inner, groups, bits, wpg), cs_ptr, _resolve_isa(isa))


def im2col_quantize_pack(
    x: np.ndarray,
    *,
    kernel,
    strides=(1, 1),
    pads=(0, 0, 0, 0),
    dilations=(1, 1),
    scale: float,
    zero_point: int,
    bits: int,
    sign: bool = False,
    threads: int | None = None,
    channel_scales=None,
    isa: str | None = None,
) -> tuple[np.ndarray, int, int, int]:
    """Packed patches of a (groups = 1) convolution of x float32 [N, C, H, W], in one C pass:
    exactly ``quantize_pack(im2col(x), groups=1, ...)`` (taps in the zero padding get the code of
    0.0, i.e. zero_point).  ``channel_scales``: None, or a 1-D array-like of C per-channel scales
    as in quantize_pack (patch element (c, ky, kx) uses channel c's scale, i.e. quantize_pack of
    the im2col with the scales repeated KH·KW times each).  Returns (act, n, oh, ow): act is the
    (n·oh·ow, 1, bits, ceil(C·KH·KW / 64)) input of a 1×1 PackedConv with cin = C·KH·KW on an
    n × oh × ow image.  ``isa`` as in quantize_pack."""
    if not isinstance(x, np.ndarray) or x.ndim != 4:
        raise ValueError(f"x must be a float32 numpy array [N, C, H, W], got {getattr(x, 'shape', type(x).__name__)}")
    x = _float32_c(x)
    if x.size == 0:
        raise ValueError(f"x must be non-empty, got shape {x.shape}")
    sign, bits, zero_point, scale_v = _quant_args(bits, zero_point, scale, sign)
    n, c, h, w = (int(d) for d in x.shape)
    cs = _channel_scales(channel_scales, c)
    geo = PackedConv.__new__(PackedConv)  # geometry only: reuse the constructor's checks
    geo.kernel = _pair("kernel", kernel, 1)
    geo.strides = _pair("strides", strides, 1)
    geo.dilations = _pair("dilations", dilations, 1)
    geo.pads = _pads(pads)
    oh, ow = geo.output_hw(h, w)
    p = ffi.new("bd_conv_params *")
    p.n, p.h, p.w, p.c, p.groups, p.cout = n, h, w, c, 1, 1
    p.kh, p.kw = geo.kernel
    p.stride_h, p.stride_w = geo.strides
    p.pad_top, p.pad_left, p.pad_bottom, p.pad_right = geo.pads
    p.dil_h, p.dil_w = geo.dilations
    p.oh, p.ow = oh, ow
    p.bits, p.k, p.sign, p.zero_point = bits, 1, int(sign), zero_point
    p.scale, p.act_min, p.act_max = scale_v, -math.inf, math.inf
    words = lib.bd_im2col_words(p)
    if words <= 0:
        raise ValueError("invalid im2col parameters (C rejected the geometry)")
    act = np.empty((n * oh * ow, 1, bits, words_per_group(c * geo.kernel[0] * geo.kernel[1])), np.uint64)
    if act.size != words:
        raise ValueError("im2col size mismatch")
    cs_buf = ffi.NULL if cs is None else ffi.from_buffer("float[]", cs)  # alive for the call
    rc = lib.bd_im2col_quantize_pack(ffi.cast("const float *", ffi.from_buffer(x)), p, cs_buf,
                                     ffi.cast("uint64_t *", ffi.from_buffer(act)), _resolve_isa(isa), _threads(threads))
    _check_status(rc, "bd_im2col_quantize_pack")
    return act, n, oh, ow


# ------------------------------------------------------------------------------------------------
# packed convolution


# kernel family → (its C entry point, its chain step op)
_FAMILY_C = {"popcount": (lib.bd_conv, lib.BD_STEP_CONV), "lut": (lib.bd_conv_lut, lib.BD_STEP_CONV_LUT),
             "lut64": (lib.bd_conv_lut64, lib.BD_STEP_CONV_LUT64)}


class PackedConv:
    """A decomposed convolution (or gemm, as a 1×1 conv on 1×1 images) with weights packed once.

    basis: uint8 [cout, k, ceil(D/8)] (file layout, D = cin/groups·KH·KW); coeffs float32
    [cout, k]; bias float32 [cout] or None.  pads are (top, left, bottom, right).
    """

    def __init__(
        self,
        basis: np.ndarray,
        coeffs: np.ndarray,
        bias: np.ndarray | None,
        *,
        cin: int,
        groups: int,
        kernel,
        strides=(1, 1),
        pads=(0, 0, 0, 0),
        dilations=(1, 1),
        bits: int,
        zero_point: int,
        scale: float,
        sign: bool = False,
        act_min: float = -math.inf,
        act_max: float = math.inf,
    ):
        self.cin = _int_in("cin", cin, 1, _MAX_DIM)
        self.groups = _int_in("groups", groups, 1, _MAX_DIM)
        if self.cin % self.groups:
            raise ValueError(f"cin ({self.cin}) must be a multiple of groups ({self.groups})")
        self.kernel = _pair("kernel", kernel, 1)
        self.strides = _pair("strides", strides, 1)
        self.dilations = _pair("dilations", dilations, 1)
        self.pads = _pads(pads)
        self.sign = bool(sign)
        if self.sign:
            self.bits = _int_in("bits", bits, 1, 1)
            self.zero_point = 0
        else:
            self.bits = _int_in("bits", bits, 1, 8)
            self.zero_point = _int_in("zero_point", zero_point, 0, 2**self.bits - 1)
        self.scale = _scale(scale)
        try:
            self.act_min = float(act_min)
            self.act_max = float(act_max)
        except (TypeError, ValueError):
            raise ValueError("act_min / act_max must be numbers") from None
        if math.isnan(self.act_min) or math.isnan(self.act_max) or self.act_min > self.act_max:
            raise ValueError(f"need act_min ≤ act_max (not NaN), got {act_min}, {act_max}")

        _check_array("basis", basis, np.uint8)
        if basis.ndim != 3:
            raise ValueError(f"basis must be uint8 [cout, k, ceil(D/8)], got shape {basis.shape}")
        self.cout, self.k = int(basis.shape[0]), int(basis.shape[1])
        if self.cout < 1:
            raise ValueError("basis has no output channels")
        if not 1 <= self.k <= 8:
            raise ValueError(f"k (number of bases, basis.shape[1]) must be in [1, 8], got {self.k}")
        if self.cout % self.groups:
            raise ValueError(f"cout ({self.cout}) must be a multiple of groups ({self.groups})")
        self.depth = self.cin // self.groups * self.kernel[0] * self.kernel[1]
        if self.depth > int(lib.BD_MAX_DEPTH):
            raise ValueError(f"depth D = {self.depth} exceeds the limit {int(lib.BD_MAX_DEPTH)}")
        nbytes = (self.depth + 7) // 8
        if basis.shape[2] != nbytes:
            raise ValueError(
                f"basis must have ceil(D/8) = {nbytes} bytes per base (D = {self.depth}), "
                f"got {basis.shape[2]}"
            )
        _check_array("coeffs", coeffs, np.float32, (self.cout, self.k))
        if not np.all(np.isfinite(coeffs)):
            raise ValueError("coeffs must be finite")
        if bias is not None:
            _check_array("bias", bias, np.float32, (self.cout,))
            if not np.all(np.isfinite(bias)):
                raise ValueError("bias must be finite")
        self.coeffs = coeffs.copy()
        self.bias = None if bias is None else bias.copy()
        self._plans: dict = {}
        self.wpg = words_per_group(self.cin // self.groups)

        p = self._params(1, self.kernel[0], self.kernel[1], self.scale, self.zero_point, check=False)
        nw = lib.bd_weight_words(p)
        nt = lib.bd_tap_sum_count(p)
        if nw <= 0 or nt <= 0:
            raise ValueError("invalid convolution parameters (C rejected the weight geometry)")
        self.wpacked = np.zeros(nw, dtype=np.uint64)
        self.tap_sums = np.zeros(nt, dtype=np.int32)
        rc = lib.bd_pack_weights(
            p,
            ffi.cast("const uint8_t *", ffi.from_buffer(basis)),
            basis.size,
            ffi.cast("uint64_t *", ffi.from_buffer(self.wpacked)),
            ffi.cast("int32_t *", ffi.from_buffer(self.tap_sums)),
        )
        _check_status(rc, "bd_pack_weights")
        # the lookup-table families (affine, Q ≤ 8), weights packed once where this CPU runs them:
        # 16-entry tables on AVX2 / AVX-512 machines, 64-entry ones on AVX-512 VBMI
        self.wlut = self._pack_lut(p, "lut", [i for i in available_isas() if i != "scalar"])
        self.wlut64 = self._pack_lut(p, "lut64", [i for i in available_isas() if i == "avx512"])

    def _pack_lut(self, p, fam: str, isas: list[str]) -> np.ndarray | None:
        if self.sign or not any(getattr(lib, f"bd_{fam}_supported")(p, _ISA_IDS[i]) for i in isas):
            return None
        nb = getattr(lib, f"bd_{fam}_weight_bytes")(p)
        if nb <= 0:
            return None
        w = np.zeros(nb, dtype=np.uint8)
        rc = getattr(lib, f"bd_pack_weights_{fam}")(p, ffi.cast("const uint64_t *", ffi.from_buffer(self.wpacked)),
                                                     ffi.cast("uint8_t *", ffi.from_buffer(w)))
        _check_status(rc, f"bd_pack_weights_{fam}")
        return w

    # -- kernel family ------------------------------------------------------------------------

    def family(self, isa: str | None = None) -> str:
        """Kernel family run() uses on ``isa``: "lut" (16-entry lookup tables), "lut64" (64-entry
        tables, AVX-512 VBMI) or "popcount".

        ``BDECOMP_KERNEL=popcount|lut|lut64|auto`` forces it (a lookup-table family only where
        supported, else popcount); auto picks lut or popcount by a cost model of the two inner
        loops (cycles per output pixel and group); the runtime times every family instead."""
        return self._family(_resolve_isa(isa), os.environ.get("BDECOMP_KERNEL", "auto"))

    def families(self, isa: str | None = None) -> list[str]:
        """Kernel families runnable on ``isa`` for this layer (same results, different speed)."""
        isa_id = _resolve_isa(isa)
        if isa_id == lib.BD_ISA_SCALAR or self.wlut is None:
            return ["popcount"]
        return ["lut", "lut64", "popcount"] if self._lut64_on(isa_id) else ["lut", "popcount"]

    def _lut64_on(self, isa_id: int) -> bool:
        return self.wlut64 is not None and isa_id == lib.BD_ISA_AVX512

    def _family(self, isa_id: int, choice) -> str:
        if choice not in ("auto", "lut", "lut64", "popcount", "", None):
            raise ValueError(f"kernel family must be auto, lut, lut64 or popcount, got {choice!r}")
        if self.wlut is None or isa_id == lib.BD_ISA_SCALAR or choice == "popcount":
            return "popcount"
        if choice == "lut64":
            return "lut64" if self._lut64_on(isa_id) else "popcount"
        if choice == "lut":
            return "lut"
        cg, coutg = self.cin // self.groups, self.cout // self.groups
        kp = 4 if self.k <= 4 else 8
        # popcount: one 4-lane step (AND + nibble popcount of 256 bits) ≈ 2 cycles, two sets per
        # activation broadcast; LUT: one 32-lane vpshufb step ≈ 0.75 cycles, + its byte counters'
        # flushes (every 4th step at Q = 4, every 2nd at Q = 5, every one at Q = 6; Q > 6: two
        # table sets) plus ≈ 20 cycles per 128-lane pass.
        pop = coutg * (kp // 4) * self.wpg * self.bits * 2.0
        npass = -(-coutg * self.k // 128)
        step = 0.75 if self.bits < 4 else {4: 1.0, 5: 1.25, 6: 1.75}.get(self.bits, 2.0)
        lut = -(-coutg * self.k // 32) * -(-cg // 4) * step + 20.0 * npass
        return "lut" if lut < pop else "popcount"

    # -- geometry ---------------------------------------------------------------------------------

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilations
        pt, pl, pb, pr = self.pads
        eh = h + pt + pb - dh * (kh - 1) - 1
        ew = w + pl + pr - dw * (kw - 1) - 1
        if eh < 0 or ew < 0:
            raise ValueError(
                f"input {h}×{w} is smaller than the dilated kernel with padding "
                f"(kernel {self.kernel}, dilations {self.dilations}, pads {self.pads})"
            )
        return eh // sh + 1, ew // sw + 1

    def output_shape(self, n: int, h: int, w: int) -> tuple[int, int, int, int]:
        n = _int_in("n", n, 1, _MAX_DIM)
        h = _int_in("h", h, 1, _MAX_DIM)
        w = _int_in("w", w, 1, _MAX_DIM)
        oh, ow = self.output_hw(h, w)
        return (n, self.cout, oh, ow)

    def act_shape(self, n: int, h: int, w: int) -> tuple[int, int, int, int]:
        """Shape of the packed activations run() expects (what quantize_pack returns)."""
        return (n * h * w, self.groups, self.bits, self.wpg)

    def _params(self, n, h, w, scale, zero_point, check=True):
        p = ffi.new("bd_conv_params *")
        p.n, p.h, p.w, p.c = n, h, w, self.cin
        p.groups, p.cout = self.groups, self.cout
        p.kh, p.kw = self.kernel
        p.stride_h, p.stride_w = self.strides
        p.pad_top, p.pad_left, p.pad_bottom, p.pad_right = self.pads
        p.dil_h, p.dil_w = self.dilations
        if check:
            p.oh, p.ow = self.output_hw(h, w)
        p.bits, p.k, p.sign, p.zero_point = self.bits, self.k, int(self.sign), zero_point
        p.scale, p.act_min, p.act_max = scale, self.act_min, self.act_max
        return p

    # -- run --------------------------------------------------------------------------------------

    def run(
        self,
        act: np.ndarray,
        n: int,
        h: int,
        w: int,
        *,
        isa: str | None = None,
        threads: int | None = None,
        return_acc: bool = False,
        out: np.ndarray | None = None,
        scale: float | None = None,
        zero_point: int | None = None,
        family: str | None = None,
        residual: np.ndarray | None = None,
        clamp: bool = True,
    ):
        """Run on packed activations ``act`` (from quantize_pack with the same groups/bits) of an
        n×C×h×w input.  Returns float32 [n, cout, oh, ow], plus int32 A [n, oh, ow, cout, k] if
        ``return_acc``.  ``scale`` / ``zero_point`` override the construction values (dynamic
        quantization).  ``family`` forces the kernel family ("lut" / "lut64" / "popcount", see family()).
        ``residual`` (float32, C-contiguous, the output's shape) is added to every output before
        the clamp: a fused residual Add (bdecomp.h).  ``clamp=False`` skips the act_min/act_max
        clamp (the caller applies it after a broadcasting add of its own).

        Everything that depends only on the call's geometry and options (ISA, kernel family,
        threads, output shape, the C parameter block) is validated once and cached per
        (n, h, w, isa, threads, family, scale, zero point, environment); a repeated call only
        checks the activations' type, dtype, contiguity and shape (O(1)) before C runs."""
        key = (n, h, w, isa, threads, family, scale, zero_point, _env_state())
        try:
            plan = self._plans[key] if type(n) is int and type(h) is int and type(w) is int else None
        except (KeyError, TypeError):  # TypeError: an unhashable argument (validated below)
            plan = None
        if plan is None:
            plan = self._plan(n, h, w, isa, threads, family, scale, zero_point)
            try:
                if type(n) is int and type(h) is int and type(w) is int:
                    if len(self._plans) >= 64:  # dynamic quantizers: a new scale every call
                        self._plans.clear()
                    self._plans[key] = plan
            except TypeError:
                pass
        p, fam, wptr, oshape, act_shape, act_size, nthreads, isa_id = plan
        if type(act) is not np.ndarray or act.dtype != _U64 or not act.flags.c_contiguous or (
                act.shape != act_shape and (act.ndim == 4 or act.size != act_size)):
            _check_array("act", act, np.uint64)
            raise ValueError(
                f"act must be the packed activations of shape {act_shape} (pixels, groups, bits, "
                f"words) for n={n}, h={h}, w={w}; got shape {act.shape}")
        if out is None:
            out = np.empty(oshape, dtype=np.float32)
        else:
            _check_array("out", out, np.float32, oshape)
            if not out.flags.writeable:
                raise ValueError("out must be writeable")
        acc = np.empty((oshape[0], oshape[2], oshape[3], self.cout, self.k), np.int32) if return_acc else None
        self._call(plan, act, out, acc, residual, clamp)
        return (out, acc) if return_acc else out

    def _call(self, plan, act, out, acc, residual, clamp) -> None:
        """The C call of a checked plan on checked arrays (run() and bind())."""
        p, fam, wptr, oshape, _, _, nthreads, isa_id = plan
        if residual is not None or not clamp:
            p = _call_params(p, residual, oshape, clamp)
        rc = _FAMILY_C[fam][0](
                p, ffi.from_buffer("uint64_t[]", act), wptr, self._ts_ptr, self._coeffs_ptr,
                self._bias_ptr, ffi.from_buffer("float[]", out),
                ffi.NULL if acc is None else ffi.from_buffer("int32_t[]", acc), isa_id, nthreads)
        if rc != lib.BD_OK:
            _check_status(rc, "bd_conv")

    def bind(self, n: int, h: int, w: int, *, isa: str | None = None, threads: int | None = None,
             scale: float | None = None, zero_point: int | None = None, family: str | None = None):
        """run() for one call geometry and set of options, resolved once (ISA, family, threads
        and environment read now): f(act, residual=None, clamp=True) → float32 output.  The
        runtime's per-layer call, for which run()'s per-call option lookup was most of the
        Python time of small layers (ResNet-56: ~10 µs of Python per layer, against 60-120 µs of
        C).  f still checks act's type, dtype, contiguity and shape (O(1))."""
        plan = self._plan(n, h, w, isa, threads, family, scale, zero_point)
        oshape, act_shape = plan[3], plan[4]
        call = self._call

        def f(act, residual=None, clamp=True):
            if type(act) is not np.ndarray or act.dtype != _U64 or not act.flags.c_contiguous \
                    or act.shape != act_shape:
                raise ValueError(f"act must be uint64 C-contiguous of shape {act_shape}, got "
                                 f"{getattr(act, 'dtype', type(act).__name__)} {getattr(act, 'shape', '')}")
            out = np.empty(oshape, dtype=np.float32)
            call(plan, act, out, None, residual, clamp)
            return out

        return f

    def threads_used(self, n: int, h: int, w: int, threads: int | None = None) -> int:
        """Threads run() gives the C kernel for an n×C×h×w input: ``threads`` (default
        default_threads()) capped so that each thread has enough work (see bdecomp.h,
        BDECOMP_MIN_PARALLEL_WORK)."""
        n = _int_in("n", n, 1, _MAX_DIM)
        h = _int_in("h", h, 1, _MAX_DIM)
        w = _int_in("w", w, 1, _MAX_DIM)
        return int(lib.bd_conv_threads(self._params(n, h, w, self.scale, self.zero_point), _threads(threads)))

    def _plan(self, n, h, w, isa, threads, family, scale, zero_point):
        """Full validation of one call geometry; the cached part of run()."""
        isa_id = _resolve_isa(isa)
        fam = self._family(isa_id, family if family is not None else os.environ.get("BDECOMP_KERNEL", "auto"))
        nthreads = _threads(threads)
        n = _int_in("n", n, 1, _MAX_DIM)
        h = _int_in("h", h, 1, _MAX_DIM)
        w = _int_in("w", w, 1, _MAX_DIM)
        scale_v = self.scale if scale is None else _scale(scale)
        if self.sign:
            zp = 0
        else:
            zp = self.zero_point if zero_point is None else _int_in(
                "zero_point", zero_point, 0, 2**self.bits - 1)
        oshape = self.output_shape(n, h, w)
        act_shape = self.act_shape(n, h, w)
        p = self._params(n, h, w, scale_v, zp)
        act_size = lib.bd_act_words(p)
        if act_size != math.prod(act_shape):
            raise ValueError("act size does not match the convolution parameters")
        if not hasattr(self, "_ts_ptr"):  # weight pointers, once (the arrays live as long as self)
            self._wpacked_ptr = ffi.cast("const uint64_t *", ffi.from_buffer(self.wpacked))
            self._wlut_ptr, self._wlut64_ptr = (None if w is None else ffi.cast("const uint8_t *", ffi.from_buffer(w))
                                                for w in (self.wlut, self.wlut64))
            self._ts_ptr = ffi.cast("const int32_t *", ffi.from_buffer(self.tap_sums))
            self._coeffs_ptr = ffi.cast("const float *", ffi.from_buffer(self.coeffs))
            self._bias_ptr = (ffi.NULL if self.bias is None
                              else ffi.cast("const float *", ffi.from_buffer(self.bias)))
            # the pointers stay valid even if a caller rebinds the public attributes
            self._keep = (self.wpacked, self.wlut, self.wlut64, self.tap_sums, self.coeffs, self.bias)
        wptr = {"lut": self._wlut_ptr, "lut64": self._wlut64_ptr, "popcount": self._wpacked_ptr}[fam]
        return (p, fam, wptr, oshape, act_shape, int(act_size), nthreads, isa_id)


def quantize_codes(x: np.ndarray, *, scale: float, zero_point: int, bits: int, channel_scales=None,
                   threads: int | None = None, isa: str | None = None) -> np.ndarray:
    """uint8 codes of float activations x [N, C, *spatial] (same shape): exactly the codes
    quantize_pack packs (same arguments, channel axis 1), for the depthwise kernel."""
    if not isinstance(x, np.ndarray) or x.ndim < 2 or x.size == 0:
        raise ValueError(f"x must be a non-empty float32 array [N, C, ...], got {getattr(x, 'shape', type(x).__name__)}")
    x = _float32_c(x)
    _, bits, zero_point, scale_v = _quant_args(bits, zero_point, scale, False)
    outer, channels = int(x.shape[0]), int(x.shape[1])
    inner = int(math.prod(x.shape[2:]))
    cs = _channel_scales(channel_scales, channels)
    codes = np.empty(x.shape, dtype=np.uint8)
    rc = lib.bd_quantize_codes(ffi.from_buffer("float[]", x), outer, channels, inner, scale_v,
                               ffi.NULL if cs is None else ffi.from_buffer("float[]", cs), zero_point, bits,
                               ffi.from_buffer("uint8_t[]", codes), _resolve_isa(isa), _threads(threads))
    _check_status(rc, "bd_quantize_codes")
    return codes


class DepthwiseConv(PackedConv):
    """A depthwise decomposed convolution (groups = cin = cout, affine quantizer) run straight
    from activation codes (``quantize_codes``) by bd_conv_depthwise: bit planes of one channel
    would waste almost every bit of each 64-bit word.  Same constructor as PackedConv; results
    (accumulators and float outputs) are bit-identical to PackedConv.run on the packed codes."""

    def __init__(self, basis: np.ndarray, coeffs: np.ndarray, bias: np.ndarray | None, **kw):
        super().__init__(basis, coeffs, bias, **kw)
        if self.sign or not (self.groups == self.cin == self.cout):
            raise ValueError("DepthwiseConv needs groups = cin = cout and an affine (not sign) quantizer")
        taps = self.kernel[0] * self.kernel[1]
        bits = np.unpackbits(basis, axis=-1, bitorder="little")[..., :taps]
        self.basis_pm = np.ascontiguousarray(2 * bits.astype(np.int8) - 1)  # [cout, k, KH·KW] ±1
        self._dw_ptrs = (ffi.cast("const int8_t *", ffi.from_buffer(self.basis_pm)),
                         ffi.cast("const float *", ffi.from_buffer(self.coeffs)),
                         ffi.NULL if self.bias is None else ffi.cast("const float *", ffi.from_buffer(self.bias)))
        self._dw_keep = (self.basis_pm, self.coeffs, self.bias)

    def family(self, isa: str | None = None) -> str:
        return "depthwise"

    def run_codes(self, codes: np.ndarray, *, threads: int | None = None, scale: float | None = None,
                  zero_point: int | None = None, return_acc: bool = False, residual: np.ndarray | None = None,
                  clamp: bool = True):
        """float32 [n, cout, oh, ow] (plus int32 A [n, oh, ow, cout, k] if ``return_acc``) from
        codes uint8 [n, cin, h, w]; ``residual`` and ``clamp`` as in PackedConv.run."""
        if type(codes) is not np.ndarray or codes.dtype != np.uint8 or codes.ndim != 4 \
                or not codes.flags.c_contiguous or codes.shape[1] != self.cin:
            raise ValueError(f"codes must be C-contiguous uint8 [N, {self.cin}, H, W], got "
                             f"{getattr(codes, 'dtype', type(codes).__name__)} {getattr(codes, 'shape', '')}")
        n, _, h, w = (int(d) for d in codes.shape)
        scale_v = self.scale if scale is None else _scale(scale)
        zp = self.zero_point if zero_point is None else _int_in("zero_point", zero_point, 0, 2**self.bits - 1)
        oshape = self.output_shape(n, h, w)
        p = self._params(n, h, w, scale_v, zp)
        if residual is not None or not clamp:
            p = _call_params(p, residual, oshape, clamp)
        out = np.empty(oshape, dtype=np.float32)
        acc = np.empty((n, oshape[2], oshape[3], self.cout, self.k), np.int32) if return_acc else None
        wptr, cptr, bptr = self._dw_ptrs
        rc = lib.bd_conv_depthwise(p, ffi.from_buffer("uint8_t[]", codes), wptr, cptr, bptr,
                                   ffi.from_buffer("float[]", out),
                                   ffi.NULL if acc is None else ffi.from_buffer("int32_t[]", acc), _threads(threads))
        _check_status(rc, "bd_conv_depthwise")
        return (out, acc) if return_acc else out


class Chain:
    """Quantize + pack and convolution steps run by one C call (bd_run_steps): the runtime's runs
    of native layers between onnxruntime segments, whose one-by-one Python calls cost ~8 µs per
    layer (ResNet-56: ~10 % of its latency).  Each step is resolved and validated when added,
    exactly as bind_quantize_pack / PackedConv.bind do, and calls the same C entry point, so the
    results are bit for bit those of the one-by-one calls.

    Every step writes a new buffer; buffers live in one arena, placed when the chain is first run
    so that a buffer's bytes are reused once its last reader has run (a small arena stays in
    cache) — except the buffers marked with keep(), which the caller reads afterwards.
    `concat(refs)` makes conv outputs consecutive parts of one new buffer (a batch-1 channel
    concatenation that costs nothing: each conv writes its part in place).  `run()`
    takes an arena from the chain's pool (a new one when all are in use, so concurrent runs share
    nothing) and `release()` gives it back; `external(shape)` is a slot for a caller's float32
    array passed to run().

        c = Chain(); xin = c.external((1, 16, 32, 32))
        act, _ = c.quantize_pack(xin, (1, 16, 32, 32), groups=1, scale=0.1, zero_point=0, bits=4)
        y, shape = c.conv(kernel, act, 1, 32, 32); c.keep(y)
        arena = c.run([x]); out = c.view(arena, y, shape).copy(); c.release(arena)
    """

    def __init__(self):
        self._fields: list[dict] = []
        self._keep_alive: list = []  # cffi objects and kernels the steps point to
        self.external_shapes: list[tuple[int, ...]] = []
        self._sizes: list[int] = []  # bytes of each buffer (references 0, 1, ...)
        self._kept: set[int] = set()
        self._parts: dict[int, tuple[int, int]] = {}  # concatenated buffer → (whole, byte offset)
        self._offsets: list[int] | None = None
        self._steps = None
        self._pool: list[np.ndarray] = []
        self.arena_bytes = 0

    def external(self, shape: tuple[int, ...]) -> int:
        """A reference to the next float32 C-contiguous array of `shape` given to run()."""
        self.external_shapes.append(tuple(int(d) for d in shape))
        return -len(self.external_shapes)

    def keep(self, ref: int) -> None:
        """Keep buffer `ref` intact until the end of the run (the caller reads it)."""
        self._kept.add(ref)

    def _buffer(self, nbytes: int) -> int:
        self._sizes.append(int(nbytes))
        self._offsets = None
        return len(self._sizes) - 1

    def concat(self, refs: list[int]) -> int:
        """A buffer whose consecutive parts are the outputs `refs` of conv steps (none already
        part of another concat): for batch 1, their concatenation along the channel axis."""
        conv_outputs = {f["dst"] for f in self._fields if f["op"] in {op for _, op in _FAMILY_C.values()}}
        if len(set(refs)) != len(refs) or any(r not in conv_outputs or r in self._parts for r in refs):
            raise ValueError("concat parts must be distinct conv outputs of this chain, not already concatenated")
        whole = self._buffer(sum(self._sizes[r] for r in refs))
        offset = 0
        for r in refs:
            self._parts[r] = (whole, offset)
            offset += self._sizes[r]
        return whole

    def quantize_pack(self, src: int, shape: tuple[int, ...], **options) -> tuple[int, tuple[int, ...]]:
        """quantize_pack (same keyword options) of the float32 array of `shape` at `src`; returns
        (reference, shape) of the packed activations."""
        x = np.empty(shape, np.float32)  # for the checks: only its shape is used
        _, plan = _quantize_pack_plan_options(x, options)
        outer, channels, inner, groups, scale_v, zp, bits, sign, nthreads, act_shape, cs_ptr, isa_id = plan
        self._keep_alive.append(cs_ptr)
        dst = self._buffer(8 * math.prod(act_shape))
        self._add(op=lib.BD_STEP_QUANTIZE_PACK, nthreads=nthreads, src=src, dst=dst, outer=outer,
                  channels=channels, inner=inner, groups=groups, scale=scale_v, channel_scales=cs_ptr,
                  zero_point=zp, bits=bits, sign=sign, isa=isa_id)
        return dst, act_shape

    def conv(self, kernel: "PackedConv", act: int, n: int, h: int, w: int, *, residual: int | None = None,
             isa: str | None = None, threads: int | None = None, scale: float | None = None,
             zero_point: int | None = None, family: str | None = None) -> tuple[int, tuple[int, ...]]:
        """kernel.run(...) on the packed activations at `act` (plus the float32 residual at
        `residual`, clamped as run() does by default); returns (reference, shape) of the float32
        output."""
        p, fam, wptr, oshape, _, _, nthreads, isa_id = kernel._plan(n, h, w, isa, threads, family, scale,
                                                                     zero_point)
        self._keep_alive += [p, kernel]
        out = self._buffer(4 * math.prod(oshape))
        self._add(op=_FAMILY_C[fam][1], nthreads=nthreads, src=act, dst=out,
                  residual=lib.BD_NO_BUFFER if residual is None else residual, params=p, weights=wptr,
                  tap_sums=kernel._ts_ptr, coeffs=kernel._coeffs_ptr, bias=kernel._bias_ptr, isa=isa_id)
        return out, oshape

    def _add(self, **fields) -> None:
        fields.setdefault("residual", lib.BD_NO_BUFFER)
        self._fields.append(fields)
        self._steps = None

    def __len__(self) -> int:
        return len(self._fields)

    def _place(self) -> None:
        """Arena offsets: each step's output takes the best-fitting free piece (or the end of the
        arena) — the whole concatenated buffer when it is the first part written — and a piece
        is freed after the last step that reads or writes it (any of its parts) unless kept."""
        def whole(r: int) -> int:
            return self._parts[r][0] if r in self._parts else r

        first, last = {}, {}
        for i, f in enumerate(self._fields):
            first.setdefault(whole(f["dst"]), i)
            for r in (f["src"], f["residual"], f["dst"]):
                if 0 <= r:
                    last[whole(r)] = i
        kept = {whole(r) for r in self._kept}
        offsets, free, end = [0] * len(self._sizes), [], 0
        for i, f in enumerate(self._fields):
            w = whole(f["dst"])
            if first[w] == i:
                size = -(-self._sizes[w] // 64) * 64
                fits = [j for j, (_, n) in enumerate(free) if n >= size]
                if fits:
                    j = min(fits, key=lambda j: (free[j][1], free[j][0]))
                    offsets[w] = free.pop(j)[0]
                else:
                    offsets[w], end = end, end + size
            dead = {whole(r) for r in (f["src"], f["residual"], f["dst"])
                    if 0 <= r and last[whole(r)] == i and whole(r) not in kept}
            free += [(offsets[r], -(-self._sizes[r] // 64) * 64) for r in sorted(dead)]
        for r, (w, off) in self._parts.items():
            offsets[r] = offsets[w] + off
        self._offsets, self.arena_bytes, self._pool = offsets, end, []
        self._steps = None

    def run(self, external: list[np.ndarray]) -> np.ndarray:
        """Run every step; returns the arena (uint8) holding the buffers (see view(), release())."""
        if self._offsets is None:
            self._place()
        if self._steps is None:
            self._steps = ffi.new("bd_step[]", max(1, len(self._fields)))
            for i, f in enumerate(self._fields):
                for name, v in f.items():
                    if name in ("src", "dst", "residual") and v >= 0:
                        v = self._offsets[v]
                    setattr(self._steps[i], name, v)
        if len(external) != len(self.external_shapes):
            raise ValueError(f"expected {len(self.external_shapes)} external arrays, got {len(external)}")
        ptrs = ffi.new("void *[]", max(1, len(external)))
        for i, (a, shape) in enumerate(zip(external, self.external_shapes)):
            if type(a) is not np.ndarray or a.dtype != _F32 or not a.flags.c_contiguous or a.shape != shape:
                raise ValueError(f"external array {i} must be float32 C-contiguous of shape {shape}, got "
                                 f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
            ptrs[i] = ffi.from_buffer("float[]", a)
        try:
            arena = self._pool.pop()
        except IndexError:
            arena = np.empty(max(64, self.arena_bytes), np.uint8)
        failed = ffi.new("int64_t *")
        rc = lib.bd_run_steps(self._steps, len(self._fields), ffi.from_buffer("uint8_t[]", arena), self.arena_bytes,
                              ptrs, len(external), failed)
        if rc != lib.BD_OK:
            _check_status(rc, f"bd_run_steps (step {failed[0]})")
        return arena

    def release(self, arena: np.ndarray) -> None:
        """Give an arena back for later runs (the caller no longer reads its buffers)."""
        if arena.size >= self.arena_bytes and len(self._pool) < 4:
            self._pool.append(arena)

    def view(self, arena: np.ndarray, ref: int, shape: tuple[int, ...]) -> np.ndarray:
        """The float32 array of `shape` in buffer `ref` of an arena run() returned."""
        off = self._offsets[ref]
        return arena[off:off + 4 * math.prod(shape)].view(np.float32).reshape(shape)


def _call_params(p, residual: np.ndarray | None, oshape: tuple[int, ...], clamp: bool):
    """A copy of the parameter block `p` for one call: pointing at `residual`, without the clamp
    if not `clamp` (the cached block is never changed, so concurrent calls share nothing)."""
    q = ffi.new("bd_conv_params *", p[0])
    if residual is not None:
        _check_array("residual", residual, np.float32, oshape)
        q.residual = ffi.cast("const float *", ffi.from_buffer("float[]", residual))
    if not clamp:
        q.act_min, q.act_max = -math.inf, math.inf
    return q


# ------------------------------------------------------------------------------------------------


def popcount_peak(isa: str | None = None, seconds: float = 0.2) -> float:
    """One thread's AND+popcount throughput on ``isa`` in bit-operations per second."""
    isa_id = _resolve_isa(isa)
    try:
        sec = float(seconds)
    except (TypeError, ValueError):
        raise ValueError(f"seconds must be a positive number, got {seconds!r}") from None
    if not (math.isfinite(sec) and 0 < sec <= 60):
        raise ValueError(f"seconds must be in (0, 60], got {seconds!r}")
    return float(lib.bd_popcount_peak(isa_id, sec))


def codes_sweep(G: np.ndarray, T: np.ndarray, U: np.ndarray, V: np.ndarray, codes: np.ndarray,
                vals: np.ndarray, mids: np.ndarray, vorder: np.ndarray, b0: int, b1: int) -> None:
    """Rows [b0, b1) of one coordinate sweep of the data-aware fit, in place on U, V and codes
    (decomposer.decompose._codes_data_aware; the arithmetic is in native/fit_codes.c). A Python
    loop over rows spent most of a conversion's fitting time in per-row numpy calls and in
    comparing every row's target with all 2^k − 1 midpoints."""
    depth, rows = T.shape
    nvals = vals.shape[1] if vals.ndim == 2 else 0
    for name, a, dtype, shape in (("G", G, np.float64, (depth, depth)), ("T", T, np.float64, (depth, rows)),
                                  ("U", U, np.float64, (depth, rows)), ("V", V, np.float64, (depth, rows)),
                                  ("codes", codes, np.uint8, (rows, depth)), ("vals", vals, np.float64, (rows, nvals)),
                                  ("mids", mids, np.float64, (rows, nvals - 1)),
                                  ("vorder", vorder, np.int64, (rows, nvals))):
        _check_array(name, a, dtype, shape)
    for name, a in (("U", U), ("V", V), ("codes", codes)):
        if not a.flags.writeable:
            raise ValueError(f"{name} must be writeable")
    ptr = lambda t, a: ffi.cast(t, ffi.from_buffer(a))
    rc = lib.bd_codes_sweep(depth, rows, _int("b0", b0), _int("b1", b1), nvals, ptr("const double *", G),
                            ptr("const double *", T), ptr("double *", U), ptr("double *", V),
                            ptr("uint8_t *", codes), ptr("const double *", vals), ptr("const double *", mids),
                            ptr("const int64_t *", vorder))
    _check_status(rc, "bd_codes_sweep")
