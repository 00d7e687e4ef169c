"""cffi build script for the native kernels (API mode) → module ``bdecomp.native._kernels``.

Used by setup.py at install time (``pip install .``: ``cffi_modules=["native/build_ffi.py:ffibuilder"]``).
For an in-place development build run ``python native/build_ffi.py`` (writes the extension next to
this file's package path under the current directory).

Environment at build time:
  BDECOMP_SANITIZE=1   compile and link with -fsanitize=address,undefined (run python with
                       LD_PRELOAD=$(gcc -print-file-name=libasan.so) to load the result).

The cdef below mirrors native/bdecomp.h (cffi cannot read the header); keep the two in sync.
"""
import glob
import os

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))

CDEF = """
enum bd_isa { BD_ISA_SCALAR = 0, BD_ISA_AVX2 = 1, BD_ISA_AVX512 = 2 };
enum bd_status { BD_OK = 0, BD_EINVAL = -1, BD_EUNSUPPORTED = -2, BD_ENOMEM = -3 };

#define BD_MAX_DEPTH ...
#define BD_MAX_WORDS ...
#define BD_MAX_THREADS ...

typedef struct {
    int64_t n, h, w, c;
    int64_t groups;
    int64_t cout;
    int64_t kh, kw;
    int64_t stride_h, stride_w;
    int64_t pad_top, pad_left, pad_bottom, pad_right;
    int64_t dil_h, dil_w;
    int64_t oh, ow;
    int32_t bits;
    int32_t k;
    int32_t sign;
    int32_t zero_point;
    float scale;
    float act_min, act_max;
    const float *residual;
} bd_conv_params;

int bd_isa_supported(int32_t isa);
int64_t bd_act_words(const bd_conv_params *p);
int64_t bd_weight_words(const bd_conv_params *p);
int64_t bd_tap_sum_count(const bd_conv_params *p);
int bd_quantize_pack(const float *x, int64_t outer, int64_t channels, int64_t inner,
                     int64_t groups, float scale, const float *channel_scales, int32_t zero_point,
                     int32_t bits, int32_t sign, uint64_t *act, int32_t isa, int32_t nthreads);
int bd_pack_weights(const bd_conv_params *p, const uint8_t *basis, int64_t basis_bytes,
                    uint64_t *wpacked, int32_t *tap_sums);
int bd_conv(const bd_conv_params *p, const uint64_t *act, const uint64_t *wpacked,
            const int32_t *tap_sums, const float *coeffs, const float *bias, float *out,
            int32_t *acc, int32_t isa, int32_t nthreads);
double bd_popcount_peak(int32_t isa, double seconds);
int32_t bd_conv_threads(const bd_conv_params *p, int32_t nthreads);
int64_t bd_im2col_words(const bd_conv_params *p);
int bd_im2col_quantize_pack(const float *x, const bd_conv_params *p, const float *channel_scales,
                            uint64_t *act, int32_t isa, int32_t nthreads);
int64_t bd_lut_weight_bytes(const bd_conv_params *p);
int bd_pack_weights_lut(const bd_conv_params *p, const uint64_t *wpacked, uint8_t *wlut);
int bd_lut_supported(const bd_conv_params *p, int32_t isa);
int bd_conv_lut(const bd_conv_params *p, const uint64_t *act, const uint8_t *wlut,
                const int32_t *tap_sums, const float *coeffs, const float *bias, float *out,
                int32_t *acc, int32_t isa, int32_t nthreads);
int64_t bd_lut64_weight_bytes(const bd_conv_params *p);
int bd_pack_weights_lut64(const bd_conv_params *p, const uint64_t *wpacked, uint8_t *wlut);
int bd_lut64_supported(const bd_conv_params *p, int32_t isa);
int bd_conv_lut64(const bd_conv_params *p, const uint64_t *act, const uint8_t *wlut,
                  const int32_t *tap_sums, const float *coeffs, const float *bias, float *out,
                  int32_t *acc, int32_t isa, int32_t nthreads);
int bd_quantize_codes(const float *x, int64_t outer, int64_t channels, int64_t inner, float scale,
                      const float *channel_scales, int32_t zero_point, int32_t bits, uint8_t *codes,
                      int32_t isa, int32_t nthreads);
int bd_conv_depthwise(const bd_conv_params *p, const uint8_t *codes, const int8_t *basis_pm,
                      const float *coeffs, const float *bias, float *out, int32_t *acc,
                      int32_t nthreads);
enum bd_step_op { BD_STEP_QUANTIZE_PACK = 1, BD_STEP_CONV = 2, BD_STEP_CONV_LUT = 3, BD_STEP_CONV_LUT64 = 4 };
#define BD_NO_BUFFER ...
typedef struct {
    int32_t op;
    int32_t nthreads;
    int64_t src, dst, residual;
    int64_t outer, channels, inner, groups;
    float scale;
    const float *channel_scales;
    int32_t zero_point, bits, sign;
    const bd_conv_params *params;
    const void *weights;
    const int32_t *tap_sums;
    const float *coeffs, *bias;
    int32_t isa;
} bd_step;
int bd_run_steps(const bd_step *steps, int64_t nsteps, uint8_t *arena, int64_t arena_bytes,
                 void *const *external, int64_t nexternal, int64_t *failed);
int bd_codes_sweep(int64_t depth, int64_t rows, int64_t b0, int64_t b1, int32_t nvals,
                   const double *G, const double *T, double *U, double *V, uint8_t *codes,
                   const double *vals, const double *mids, const int64_t *vorder);
"""

SOURCES = sorted(os.path.basename(f) for f in glob.glob(os.path.join(HERE, "*.c")))


def _path(name):
    """Path of a file of this directory as distutils wants it (relative to cwd when possible)."""
    full = os.path.join(HERE, name)
    try:
        rel = os.path.relpath(full)
    except ValueError:  # other drive (Windows)
        return full
    return full if rel.startswith("..") else rel


_compile_args = ["-O3", "-fopenmp", "-std=c11", "-fno-strict-aliasing", "-ffp-contract=off"]
_link_args = ["-fopenmp"]
if os.environ.get("BDECOMP_SANITIZE", "") not in ("", "0"):
    _san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
    # -O1: the sanitizer build is for finding bugs, and -O3 with ASan takes minutes to compile
    _compile_args = [a for a in _compile_args if not a.startswith("-O")] + ["-O1"]
    _compile_args += _san + ["-fno-sanitize-recover=undefined"]
    _link_args += _san

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "bdecomp.native._kernels",
    '#include "bdecomp.h"',
    sources=[_path(f) for f in SOURCES],
    include_dirs=[HERE],
    depends=[_path(f) for f in ("bdecomp.h", "kernels.h", "reference.h", "output_transform.h", "epilogue_avx2.h",
                                "conv_driver.inc", "lut_driver.inc", "kernel_lut_avx2.c")],
    extra_compile_args=_compile_args,
    extra_link_args=_link_args,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
