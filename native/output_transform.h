/*
 * Two small units shared by every kernel (static inline, so each ISA file compiles its own copy):
 *
 *  1. the zero-padding correction: which kernel taps fall inside the image (a contiguous range
 *     per axis), and Sv_j = Σ_{valid taps} tap_sums[co][t][j];
 *  2. the float epilogue  y = clamp(s_eff · Σ_j c_j A_j + bias, act_min, act_max), computed in
 *     float in a fixed order so that every ISA produces bit-identical outputs (see bdecomp.h).
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
    const int64_t base = o * stride - pad;               /* input coordinate of tap 0 */
    int64_t l = base >= 0 ? 0 : (-base + dil - 1) / dil; /* first tap with i ≥ 0 */
    int64_t h;                                           /* one past the last tap with i < in */
    if (base > in - 1)
        h = 0;
    else
        h = (in - 1 - base) / dil + 1;
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

/* y = clamp(s_eff · Σ_j c_j A_j + bias, lo, hi), in float, fixed order. */
static inline float bd_epilogue(const int64_t *a, int32_t k, const float *c, float bias,
                                float scale_eff, float lo, float hi)
{
    float acc = 0.0f;
    for (int32_t j = 0; j < k; ++j) acc += c[j] * (float)a[j];
    float y = acc * scale_eff + bias;
    if (y < lo) y = lo;
    if (y > hi) y = hi;
    return y;
}

/* ---- the per-(pixel, group) epilogue shared by the SIMD drivers (conv_driver.inc, the LUT
 * kernel): A_j from the lane sums S, then the float epilogue. */

/* Everything the epilogue of one (pixel, group) needs. */
typedef struct {
    const int64_t *S;          /* [coutg][kp] from BD_INNER */
    int64_t kp, coutg, co0;
    int sign;
    int64_t Dv, N, z;
    const int64_t *sv_all;     /* [cout][k] Sv of interior pixels */
    int interior;
    const int32_t *tap_sums;
    int64_t kh, kw, ky0, ky1, kx0, kx1;
    const float *coeffs, *bias;
    float scale_eff, lo, hi;
    float *out;                /* output of channel co0 at this pixel */
    int64_t out_stride;        /* OH·OW: next channel */
    int32_t *acc;              /* accumulators of channel co0 at this pixel, or NULL */
} bd_group_ctx;

/* A_j = 2 S_j − N − z·Sv_j (or Dv − 2 S_j) and y for the channels of one group at one pixel */
static inline __attribute__((always_inline)) void bd_group_outputs(const bd_group_ctx *c,
                                                                   const int K)
{
    for (int64_t i = 0; i < c->coutg; ++i) {
        const int64_t co = c->co0 + i;
        const int64_t *Si = c->S + i * c->kp;
        int64_t A[8], sv_buf[8];
        if (c->sign) {
            for (int j = 0; j < K; ++j) A[j] = c->Dv - 2 * Si[j];
        } else {
            const int64_t *sv = c->sv_all + co * K;
            if (!c->interior) {
                bd_tap_sum_valid(c->tap_sums + co * c->kh * c->kw * K, c->kw, K, c->ky0, c->ky1,
                                 c->kx0, c->kx1, sv_buf);
                sv = sv_buf;
            }
            for (int j = 0; j < K; ++j) A[j] = 2 * Si[j] - c->N - c->z * sv[j];
        }
        if (c->acc)
            for (int j = 0; j < K; ++j) c->acc[i * K + j] = (int32_t)A[j];
        c->out[i * c->out_stride] = bd_epilogue(A, K, c->coeffs + co * K,
                                                c->bias ? c->bias[co] : 0.0f, c->scale_eff,
                                                c->lo, c->hi);
    }
}

#endif /* BDECOMP_OUTPUT_TRANSFORM_H */
