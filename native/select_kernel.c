/*
 * Parameter validation, buffer sizes, weight packing and run-time kernel selection.
 *
 * The dispatch table below is the only global of the native code.  bd_conv validates every
 * parameter here and then calls the kernel of the requested ISA (if this CPU supports it), so
 * kernels never see inconsistent sizes.
 */
#define _POSIX_C_SOURCE 199309L
#include <math.h>
#include <string.h>
#include <time.h>

#include "bdecomp.h"
#include "kernels.h"
#include "reference.h"

typedef struct {
    const char *name;
    bd_conv_fn conv;
    bd_peak_fn peak;
} bd_kernel_entry;

static const bd_kernel_entry bd_kernels[3] = {
    [BD_ISA_SCALAR] = {"scalar", bd_conv_reference, bd_peak_scalar},
    [BD_ISA_AVX2] = {"avx2", bd_conv_avx2, bd_peak_avx2},
    [BD_ISA_AVX512] = {"avx512", bd_conv_avx512, bd_peak_avx512},
};

double bd_now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int bd_isa_supported(int32_t isa)
{
    switch (isa) {
    case BD_ISA_SCALAR:
        return 1;
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    case BD_ISA_AVX2:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    case BD_ISA_AVX512:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vpopcntdq") &&
               __builtin_cpu_supports("popcnt");
#endif
    default:
        return 0;
    }
}

/* ---------------------------------------------------------------------------------------------
 * Validation */

#define BD_MAX_DIM 2147483647LL /* any single size or stride: keeps every product checkable */

static int in_range(int64_t v, int64_t lo, int64_t hi) { return v >= lo && v <= hi; }

/* a·b·c·… ≤ BD_MAX_WORDS without overflow; returns -1 on overflow */
int64_t bd_checked_prod(const int64_t *f, int count)
{
    int64_t r = 1;
    for (int i = 0; i < count; ++i) {
        if (f[i] < 0 || __builtin_mul_overflow(r, f[i], &r) || r > BD_MAX_WORDS) return -1;
    }
    return r;
}

int bd_geom_weights(const bd_conv_params *p, bd_geom *gm)
{
    if (!p || !gm) return BD_EINVAL;
    if (!in_range(p->c, 1, BD_MAX_DIM) || !in_range(p->groups, 1, BD_MAX_DIM) ||
        !in_range(p->cout, 1, BD_MAX_DIM) || !in_range(p->kh, 1, BD_MAX_DIM) ||
        !in_range(p->kw, 1, BD_MAX_DIM))
        return BD_EINVAL;
    if (p->k < 1 || p->k > 8) return BD_EINVAL;
    if (p->c % p->groups != 0 || p->cout % p->groups != 0) return BD_EINVAL;
    gm->cg = p->c / p->groups;
    gm->coutg = p->cout / p->groups;
    gm->wpg = (gm->cg + 63) / 64;
    gm->kp = p->k <= 4 ? 4 : 8;
    const int64_t t[2] = {p->kh, p->kw};
    gm->taps = bd_checked_prod(t, 2);
    if (gm->taps < 0) return BD_EINVAL;
    const int64_t d[2] = {gm->cg, gm->taps};
    gm->depth = bd_checked_prod(d, 2);
    if (gm->depth < 0 || gm->depth > BD_MAX_DEPTH) return BD_EINVAL;
    const int64_t ww[4] = {p->cout, gm->taps, gm->wpg, gm->kp};
    const int64_t ts[3] = {p->cout, gm->taps, p->k};
    if (bd_checked_prod(ww, 4) < 0 || bd_checked_prod(ts, 3) < 0) return BD_EINVAL;
    return BD_OK;
}

static int validate_conv(const bd_conv_params *p, bd_geom *gm)
{
    if (bd_geom_weights(p, gm) != BD_OK) return BD_EINVAL;
    if (!in_range(p->n, 1, BD_MAX_DIM) || !in_range(p->h, 1, BD_MAX_DIM) ||
        !in_range(p->w, 1, BD_MAX_DIM) || !in_range(p->stride_h, 1, BD_MAX_DIM) ||
        !in_range(p->stride_w, 1, BD_MAX_DIM) || !in_range(p->dil_h, 1, BD_MAX_DIM) ||
        !in_range(p->dil_w, 1, BD_MAX_DIM) || !in_range(p->pad_top, 0, BD_MAX_DIM) ||
        !in_range(p->pad_left, 0, BD_MAX_DIM) || !in_range(p->pad_bottom, 0, BD_MAX_DIM) ||
        !in_range(p->pad_right, 0, BD_MAX_DIM) || !in_range(p->oh, 1, BD_MAX_DIM) ||
        !in_range(p->ow, 1, BD_MAX_DIM))
        return BD_EINVAL;
    if (p->bits < 1 || p->bits > 8) return BD_EINVAL;
    if (p->sign != 0 && p->sign != 1) return BD_EINVAL;
    if (p->sign && p->bits != 1) return BD_EINVAL;
    if (!p->sign && (p->zero_point < 0 || p->zero_point > (1 << p->bits) - 1)) return BD_EINVAL;
    if (!(isfinite(p->scale) && p->scale > 0.0f)) return BD_EINVAL;
    if (isnan(p->act_min) || isnan(p->act_max) || p->act_min > p->act_max) return BD_EINVAL;
    /* output size: every term < 2^33, no overflow in int64 */
    const int64_t eh = p->h + p->pad_top + p->pad_bottom - p->dil_h * (p->kh - 1) - 1;
    const int64_t ew = p->w + p->pad_left + p->pad_right - p->dil_w * (p->kw - 1) - 1;
    if (eh < 0 || ew < 0) return BD_EINVAL;
    if (p->oh != eh / p->stride_h + 1 || p->ow != ew / p->stride_w + 1) return BD_EINVAL;
    /* buffer sizes */
    const int64_t a[5] = {p->n, p->h, p->w, p->groups * (int64_t)p->bits, gm->wpg};
    const int64_t o[4] = {p->n, p->cout, p->oh, p->ow};
    const int64_t c[5] = {p->n, p->oh, p->ow, p->cout, p->k};
    if (bd_checked_prod(a, 5) < 0 || bd_checked_prod(o, 4) < 0 || bd_checked_prod(c, 5) < 0)
        return BD_EINVAL;
    return BD_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Sizes */

int64_t bd_act_words(const bd_conv_params *p)
{
    bd_geom gm;
    if (validate_conv(p, &gm) != BD_OK) return 0;
    const int64_t a[5] = {p->n, p->h, p->w, p->groups * (int64_t)p->bits, gm.wpg};
    return bd_checked_prod(a, 5);
}

int64_t bd_weight_words(const bd_conv_params *p)
{
    bd_geom gm;
    if (bd_geom_weights(p, &gm) != BD_OK) return 0;
    const int64_t ww[4] = {p->cout, gm.taps, gm.wpg, gm.kp};
    return bd_checked_prod(ww, 4);
}

int64_t bd_tap_sum_count(const bd_conv_params *p)
{
    bd_geom gm;
    if (bd_geom_weights(p, &gm) != BD_OK) return 0;
    const int64_t ts[3] = {p->cout, gm.taps, p->k};
    return bd_checked_prod(ts, 3);
}

/* ---------------------------------------------------------------------------------------------
 * Weights: file layout (bits of element d = (c·KH + ky)·KW + kx) → kernel layout */

int bd_pack_weights(const bd_conv_params *p, const uint8_t *basis, int64_t basis_bytes,
                    uint64_t *wpacked, int32_t *tap_sums)
{
    bd_geom gm;
    if (bd_geom_weights(p, &gm) != BD_OK) return BD_EINVAL;
    if (!basis || !wpacked || !tap_sums) return BD_EINVAL;
    const int64_t nbytes = (gm.depth + 7) / 8; /* per (co, j) */
    const int64_t need[3] = {p->cout, p->k, nbytes};
    if (basis_bytes != bd_checked_prod(need, 3)) return BD_EINVAL;
    const int64_t T = gm.taps, K = p->k, KP = gm.kp, WPG = gm.wpg;
    memset(wpacked, 0, (size_t)bd_weight_words(p) * sizeof(uint64_t));
    memset(tap_sums, 0, (size_t)bd_tap_sum_count(p) * sizeof(int32_t));
    for (int64_t co = 0; co < p->cout; ++co)
        for (int64_t j = 0; j < K; ++j) {
            const uint8_t *bits = basis + (co * K + j) * nbytes;
            for (int64_t d = 0; d < gm.depth; ++d) {
                const int64_t c = d / T, t = d % T;
                const int plus = (bits[d >> 3] >> (d & 7)) & 1;
                if (plus) wpacked[((co * T + t) * WPG + c / 64) * KP + j] |= (uint64_t)1 << (c % 64);
                tap_sums[(co * T + t) * K + j] += plus ? 1 : -1;
            }
        }
    return BD_OK;
}

/* Threads worth using for a layer: one per ~2^22 bit-operations (≈ 6 µs of work at the kernels'
 * real rates).  Workers spin briefly between layers (GOMP_SPINCOUNT, set by the Python package),
 * so handing work to a thread costs ~1-2 µs, not a futex wake-up: ResNet-56 k=Q=4 at 2 threads,
 * where every layer is ~0.1 ms, 3.9 ms with this, 5.4 ms with 2^24, 6.2 ms with 2^26 (= 1 thread).
 * Results do not depend on the thread count. */
static int32_t useful_threads(const bd_conv_params *p, const bd_geom *gm, int32_t nthreads)
{
    if (nthreads <= 0) nthreads = 1;
    if (nthreads > BD_MAX_THREADS) nthreads = BD_MAX_THREADS;
    const double work = (double)p->n * (double)p->oh * (double)p->ow * (double)p->cout *
                        (double)gm->depth * (double)p->k * (double)p->bits;
    const double cap = work / (double)bd_min_parallel_work(1 << 22);
    if (!(cap >= (double)nthreads)) nthreads = cap < 1.0 ? 1 : (int32_t)cap; /* cap = inf: all */
    return nthreads;
}

/* ---------------------------------------------------------------------------------------------
 * Lookup-table kernel families: 16-entry tables (kernel_lut_avx2.c) and 64-entry ones
 * (kernel_lut64_avx512.c), each with its weight layout */

typedef int64_t (*bd_lut_groups_fn)(const bd_geom *gm);
typedef int64_t (*bd_lut_npass_fn)(const bd_conv_params *p, const bd_geom *gm);
typedef void (*bd_lut_pack_fn)(const bd_conv_params *p, const bd_geom *gm, const uint64_t *wpacked, uint8_t *wl);

/* G·npass·taps·groups·(bytes of a pass's blocks for one tap and group), or 0 on invalid parameters */
static int64_t lut_weight_bytes(const bd_conv_params *p, bd_lut_npass_fn npass, bd_lut_groups_fn groups,
                                int64_t pass_bytes)
{
    bd_geom gm;
    if (bd_geom_weights(p, &gm) != BD_OK) return 0;
    const int64_t f[5] = {p->groups, npass(p, &gm), gm.taps, groups(&gm), pass_bytes};
    return bd_checked_prod(f, 5);
}

static int lut_pack_weights(const bd_conv_params *p, const uint64_t *wpacked, uint8_t *wlut, int64_t bytes,
                            bd_lut_pack_fn pack)
{
    bd_geom gm;
    if (bd_geom_weights(p, &gm) != BD_OK || !wpacked || !wlut || bytes <= 0) return BD_EINVAL;
    pack(p, &gm, wpacked, wlut);
    return BD_OK;
}

int64_t bd_lut_weight_bytes(const bd_conv_params *p)
{
    return lut_weight_bytes(p, bd_lut_npass, bd_lut_nq, 128);
}

int bd_pack_weights_lut(const bd_conv_params *p, const uint64_t *wpacked, uint8_t *wlut)
{
    return lut_pack_weights(p, wpacked, wlut, bd_lut_weight_bytes(p), bd_lut_pack_weights);
}

int bd_lut_supported(const bd_conv_params *p, int32_t isa)
{
    if (!p || p->sign || p->bits < 1 || p->bits > 8) return 0;
    if (isa != BD_ISA_AVX2 && isa != BD_ISA_AVX512) return 0;
    return bd_isa_supported(isa) && bd_isa_supported(BD_ISA_AVX2);
}

int64_t bd_lut64_weight_bytes(const bd_conv_params *p)
{
    return lut_weight_bytes(p, bd_lut64_npass, bd_lut64_ng, 256);
}

int bd_pack_weights_lut64(const bd_conv_params *p, const uint64_t *wpacked, uint8_t *wlut)
{
    return lut_pack_weights(p, wpacked, wlut, bd_lut64_weight_bytes(p), bd_lut64_pack_weights);
}

int bd_lut64_supported(const bd_conv_params *p, int32_t isa)
{
#if defined(__x86_64__) || defined(__i386__)
    if (!p || p->sign || p->bits < 1 || p->bits > 8 || isa != BD_ISA_AVX512) return 0;
    return bd_isa_supported(BD_ISA_AVX512) && __builtin_cpu_supports("avx512vbmi");
#else
    (void)p; (void)isa;
    return 0;
#endif
}

/* ---------------------------------------------------------------------------------------------
 * Entry points */

static int check_conv_args(const bd_conv_params *p, bd_geom *gm, const void *act, const void *w,
                           const int32_t *tap_sums, const float *coeffs, const float *bias,
                           const float *out)
{
    if (validate_conv(p, gm) != BD_OK) return BD_EINVAL;
    if (!act || !w || !tap_sums || !coeffs || !out) return BD_EINVAL;
    for (int64_t i = 0; i < p->cout * (int64_t)p->k; ++i)
        if (!isfinite(coeffs[i])) return BD_EINVAL;
    if (bias)
        for (int64_t i = 0; i < p->cout; ++i)
            if (!isfinite(bias[i])) return BD_EINVAL;
    return BD_OK;
}

int bd_check_isa(int32_t isa)
{
    if (isa < BD_ISA_SCALAR || isa > BD_ISA_AVX512) return BD_EINVAL;
    return bd_isa_supported(isa) ? BD_OK : BD_EUNSUPPORTED;
}

/* 1 on an AVX-512 CPU without VPOPCNTDQ (Skylake-SP, Cascade Lake: its kernels resolve to the
 * AVX2 ISA), where the 16-entry lookup tables run their AVX-512VL build, with 32 registers instead
 * of 16: on an Intel Xeon that build ran 1.06–1.23x as fast on 16–512-channel layers.  Where the
 * AVX512 ISA exists, isa = AVX2 keeps the AVX2 build (what BDECOMP_ISA=avx2 tests there). */
static int lut_vl_below_avx512(void)
{
#if defined(__x86_64__) || defined(__i386__)
    return !bd_isa_supported(BD_ISA_AVX512) && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
#else
    return 0;
#endif
}

/* The checks of a lookup-table entry point: arguments, ISA, the family's support here, and the
 * size of its tables (input rows widened by the left and right padding, `tb` bytes per group of
 * `gch` channels and table set, bd_lut_sets of them). */
static int check_lut_call(const bd_conv_params *p, bd_geom *gm, const uint64_t *act, const uint8_t *wlut,
                          const int32_t *tap_sums, const float *coeffs, const float *bias, const float *out,
                          int32_t isa, int (*supported)(const bd_conv_params *, int32_t), bd_lut_groups_fn groups,
                          int64_t tb, int gch)
{
    if (check_conv_args(p, gm, act, wlut, tap_sums, coeffs, bias, out) != BD_OK) return BD_EINVAL;
    if (isa < BD_ISA_SCALAR || isa > BD_ISA_AVX512) return BD_EINVAL;
    if (p->sign || p->bits > 8) return BD_EINVAL;
    if (!supported(p, isa)) return BD_EUNSUPPORTED;
    const int64_t tab[5] = {p->n, p->h, p->w + p->pad_left + p->pad_right, p->groups * groups(gm),
                            bd_lut_sets(p->bits, gch) * tb};
    return bd_checked_prod(tab, 5) < 0 ? BD_EINVAL : BD_OK;
}

int bd_conv_lut(const bd_conv_params *p, const uint64_t *act, const uint8_t *wlut,
                const int32_t *tap_sums, const float *coeffs, const float *bias, float *out,
                int32_t *acc, int32_t isa, int32_t nthreads)
{
    bd_geom gm;
    const int rc = check_lut_call(p, &gm, act, wlut, tap_sums, coeffs, bias, out, isa, bd_lut_supported, bd_lut_nq, 16, 4);
    if (rc != BD_OK) return rc;
    nthreads = useful_threads(p, &gm, nthreads);
    return (isa == BD_ISA_AVX512 || lut_vl_below_avx512() ? bd_conv_lut_avx512vl : bd_conv_lut_avx2)(
        p, &gm, act, wlut, tap_sums, coeffs, bias, out, acc, nthreads);
}

int bd_conv_lut64(const bd_conv_params *p, const uint64_t *act, const uint8_t *wlut,
                  const int32_t *tap_sums, const float *coeffs, const float *bias, float *out,
                  int32_t *acc, int32_t isa, int32_t nthreads)
{
    bd_geom gm;
    const int rc = check_lut_call(p, &gm, act, wlut, tap_sums, coeffs, bias, out, isa, bd_lut64_supported,
                                  bd_lut64_ng, 64, 6);
    if (rc != BD_OK) return rc;
    nthreads = useful_threads(p, &gm, nthreads);
    return bd_conv_lut64_avx512(p, &gm, act, wlut, tap_sums, coeffs, bias, out, acc, nthreads);
}

int bd_conv(const bd_conv_params *p, const uint64_t *act, const uint64_t *wpacked,
            const int32_t *tap_sums, const float *coeffs, const float *bias, float *out,
            int32_t *acc, int32_t isa, int32_t nthreads)
{
    bd_geom gm;
    if (validate_conv(p, &gm) != BD_OK) return BD_EINVAL;
    if (!act || !wpacked || !tap_sums || !coeffs || !out) return BD_EINVAL;
    const int isa_rc = bd_check_isa(isa);
    if (isa_rc != BD_OK) return isa_rc;
    for (int64_t i = 0; i < p->cout * (int64_t)p->k; ++i)
        if (!isfinite(coeffs[i])) return BD_EINVAL;
    if (bias)
        for (int64_t i = 0; i < p->cout; ++i)
            if (!isfinite(bias[i])) return BD_EINVAL;
    nthreads = useful_threads(p, &gm, nthreads);
    return bd_kernels[isa].conv(p, &gm, act, wpacked, tap_sums, coeffs, bias, out, acc, nthreads);
}

int bd_conv_depthwise(const bd_conv_params *p, const uint8_t *codes, const int8_t *basis_pm,
                      const float *coeffs, const float *bias, float *out, int32_t *acc,
                      int32_t nthreads)
{
    bd_geom gm;
    if (validate_conv(p, &gm) != BD_OK || !codes || !basis_pm || !coeffs || !out) return BD_EINVAL;
    if (p->sign || p->groups != p->c || p->cout != p->c) return BD_EINVAL;
    for (int64_t i = 0; i < p->cout * (int64_t)p->k; ++i)
        if (!isfinite(coeffs[i])) return BD_EINVAL;
    if (bias)
        for (int64_t i = 0; i < p->cout; ++i)
            if (!isfinite(bias[i])) return BD_EINVAL;
    const int64_t in[4] = {p->n, p->c, p->h, p->w};
    if (bd_checked_prod(in, 4) < 0) return BD_EINVAL;
    return bd_depthwise_impl(p, codes, basis_pm, coeffs, bias, out, acc, nthreads);
}

int32_t bd_conv_threads(const bd_conv_params *p, int32_t nthreads)
{
    bd_geom gm;
    if (validate_conv(p, &gm) != BD_OK) return 0;
    return useful_threads(p, &gm, nthreads);
}

int64_t bd_im2col_words(const bd_conv_params *p)
{
    bd_geom gm;
    if (validate_conv(p, &gm) != BD_OK || p->groups != 1) return 0;
    const int64_t a[4] = {p->n * p->oh, p->ow, (int64_t)p->bits, (gm.depth + 63) / 64};
    return bd_checked_prod(a, 4);
}

int bd_im2col_quantize_pack(const float *x, const bd_conv_params *p, const float *channel_scales,
                            uint64_t *act, int32_t isa, int32_t nthreads)
{
    if (!x || !act || bd_im2col_words(p) <= 0) return BD_EINVAL;
    const int64_t in[4] = {p->n, p->c, p->h, p->w};
    if (bd_checked_prod(in, 4) < 0) return BD_EINVAL;
    if (p->sign) channel_scales = NULL; /* sign mode uses no scale */
    if (bd_check_channel_scales(channel_scales, p->c) != BD_OK) return BD_EINVAL;
    const int isa_rc = bd_check_isa(isa);
    if (isa_rc != BD_OK) return isa_rc;
    return bd_im2col_pack_impl(x, p, channel_scales, act, isa, nthreads);
}

double bd_popcount_peak(int32_t isa, double seconds)
{
    if (bd_check_isa(isa) != BD_OK) return 0.0;
    if (!isfinite(seconds) || seconds <= 0.0) return 0.0;
    if (seconds > 60.0) seconds = 60.0;
    return bd_kernels[isa].peak(seconds);
}
