/*
 * Two small units shared by every kernel (static inline, so each ISA file compiles its own copy):
 *
 *  1. the zero-padding correction: which kernel taps fall inside the image (a contiguous range
 *     per axis), and Sv_j = Σ_{valid taps} tap_sums[co][t][j];
 *  2. the float epilogue  y = clamp(s_eff · Σ_j c_j A_j + bias [+ residual], act_min, act_max),
 *     computed in float in a fixed order so that every ISA produces bit-identical outputs (see
 *     bdecomp.h).
 */
#ifndef BDECOMP_OUTPUT_TRANSFORM_H
#define BDECOMP_OUTPUT_TRANSFORM_H

#include <stdint.h>

/* Taps ky ∈ [*lo, *hi) of a kernel of size `ksize` whose input coordinate
 * i = o·stride − pad + ky·dil lies in [0, in).  The set is contiguous because i grows with ky.
 * *lo == *hi when no tap is valid. */
static inline void bd_valid_range(int64_t o, int64_t stride, int64_t pad, int64_t dil,
                                  int64_t ksize, int64_t in, int64_t *lo, int64_t *hi)
{
    const int64_t base = o * stride - pad; /* input coordinate of tap 0 */
    int64_t l, h; /* first tap with i ≥ 0; one past the last tap with i < in */
    if (dil == 1) { /* no integer division: it is called per output pixel */
        l = base >= 0 ? 0 : -base;
        h = base > in - 1 ? 0 : in - base;
    } else {
        l = base >= 0 ? 0 : (-base + dil - 1) / dil;
        h = base > in - 1 ? 0 : (in - 1 - base) / dil + 1;
    }
    if (h > ksize) h = ksize;
    if (l > h) l = h;
    *lo = l;
    *hi = h;
}

/* sv[j] = Σ_{ky∈[ky0,ky1), kx∈[kx0,kx1)} ts_co[(ky·kw + kx)·k + j]   (ts_co = tap sums of one co) */
static inline void bd_tap_sum_valid(const int32_t *ts_co, int64_t kw, int32_t k, int64_t ky0,
                                    int64_t ky1, int64_t kx0, int64_t kx1, int64_t *sv)
{
    for (int32_t j = 0; j < k; ++j) sv[j] = 0;
    for (int64_t ky = ky0; ky < ky1; ++ky)
        for (int64_t kx = kx0; kx < kx1; ++kx) {
            const int32_t *t = ts_co + (ky * kw + kx) * k;
            for (int32_t j = 0; j < k; ++j) sv[j] += t[j];
        }
}

/* N of one (input pixel, group) = Σ_b 2^b popcount(bit plane b) — the activations' own
 * contribution to A_j = 2 S_j − N − z·Sv_j; `a`: its Q planes of wpg words (bdecomp.h layout). */
static inline int32_t bd_pixel_count(const uint64_t *a, int32_t Q, int64_t wpg)
{
    int32_t nsum = 0;
    if (wpg == 1) { /* ≤ 64 channels per group: one word per plane */
        for (int32_t b = 0; b < Q; ++b) nsum += (int32_t)__builtin_popcountll(a[b]) << b;
        return nsum;
    }
    for (int32_t b = 0; b < Q; ++b) {
        int32_t nb = 0;
        for (int64_t w = 0; w < wpg; ++w) nb += (int32_t)__builtin_popcountll(a[b * wpg + w]);
        nsum += nb << b;
    }
    return nsum;
}

/* bd_pixel_count of every (input pixel, group), once per input pixel instead of once per output
 * pixel and tap; pg = pixels · groups.  To be called by every thread of an OpenMP parallel region
 * (an omp for, ending in a barrier). */
static inline void bd_pixel_counts(const uint64_t *act, int64_t pg, int32_t Q, int64_t wpg, int32_t *npix)
{
#pragma omp for schedule(static)
    for (int64_t i = 0; i < pg; ++i) npix[i] = bd_pixel_count(act + i * Q * wpg, Q, wpg);
}

/* Σ of the per-pixel counts over ny × nx valid taps (np0: the first valid tap's count; sy / sx:
 * strides of the next tap row / column in counts).  ≤ 255·D: exact. */
static inline int64_t bd_tap_counts(const int32_t *np0, int64_t sy, int64_t sx, int64_t ny, int64_t nx)
{
    if (ny == 1 && nx == 1) return np0[0]; /* 1×1 convolutions, gemm */
    if (ny == 3 && nx == 3) { /* interior 3×3: nine independent loads (the loop was a dependent chain) */
        const int32_t *r0 = np0, *r1 = np0 + sy, *r2 = np0 + 2 * sy;
        return ((int64_t)r0[0] + r0[sx] + r0[2 * sx]) + ((int64_t)r1[0] + r1[sx] + r1[2 * sx]) +
               ((int64_t)r2[0] + r2[sx] + r2[2 * sx]);
    }
    int64_t N = 0;
    for (int64_t y = 0; y < ny; ++y)
        for (int64_t x = 0; x < nx; ++x) N += np0[y * sy + x * sx];
    return N;
}

/* y = clamp(s_eff · Σ_j c_j A_j + bias [+ *res], lo, hi), in float, fixed order; res: NULL or
 * this output's element of the fused residual. */
static inline float bd_epilogue(const int64_t *a, int32_t k, const float *c, float bias,
                                float scale_eff, const float *res, float lo, float hi)
{
    float acc = 0.0f;
    for (int32_t j = 0; j < k; ++j) acc += c[j] * (float)a[j];
    float y = acc * scale_eff + bias;
    if (res) y += *res;
    if (y < lo) y = lo;
    if (y > hi) y = hi;
    return y;
}

#endif /* BDECOMP_OUTPUT_TRANSFORM_H */
