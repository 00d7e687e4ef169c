/*
 * The vectorised per-(pixel, group) epilogue of the AVX2 / AVX-512 kernels (the LUT kernel and the
 * popcount drivers of conv_driver.inc): bit for bit bd_epilogue of output_transform.h per output, 8
 * lanes / output channels per instruction.  Include only from files compiled for AVX2 (or a
 * superset), after <immintrin.h>.
 *
 * Lane-major inputs, built once per call by the kernel: lane L = co·K + j over all output
 * channels; lane_ts [KH·KW][LS] tap sums, lane_sv [LS] their sum over all taps, coeffs [LS], all
 * int32 / float and zero-padded to LS = Cout·K + 8 entries (vector reads past the last lane).
 */
#ifndef BDECOMP_EPILOGUE_AVX2_H
#define BDECOMP_EPILOGUE_AVX2_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bdecomp.h"

/* The channel order of the 8 outputs an epilogue block computes: K = 4 → (0,2,4,6,1,3,5,7),
 * K = 2 → (0,1,4,5,2,3,6,7) (in-lane transposes of the P vectors), else 0..7. */
static inline int32_t bd_block_channel(int32_t K, int i)
{
    static const int8_t k4[8] = {0, 2, 4, 6, 1, 3, 5, 7}, k2[8] = {0, 1, 4, 5, 2, 3, 6, 7};
    return K == 4 ? k4[i] : K == 2 ? k2[i] : i;
}

/* bias in the order the epilogue reads it, once per call: within each group, every full block
 * of 8 channels in bd_block_channel order, the rest as is (a plain load instead of a gather per
 * block: gathers are slow on AMD). `out` holds G·coutg floats. */
static inline void bd_block_bias(const float *bias, int64_t G, int64_t coutg, int32_t K, float *out)
{
    for (int64_t g = 0; g < G; ++g)
        for (int64_t i0 = 0; i0 < coutg; i0 += 8)
            for (int64_t i = 0; i < 8 && i0 + i < coutg; ++i)
                out[g * coutg + i0 + i] =
                    bias[g * coutg + i0 + (i0 + 8 <= coutg ? bd_block_channel(K, (int)i) : i)];
}

/* The lane-major inputs above, built once per call by both drivers (conv_driver.inc, the LUT
 * kernel): ts [T][LS] tap sums, sv [LS] their sum over the taps, c [LS] coefficients (zero-padded
 * to LS = Cout·K + 8), bias in bd_block_bias order (NULL without bias).  basis_major (the LUT
 * kernel): lane g·coutg·K + j·coutg + i for channel i of group g instead (the K lanes of a
 * channel coutg apart, so that 8 channels' basis j are one vector), bias in channel order.
 * with_tap_sums = 0 (zero point 0 or sign mode: bd_epilogue_int_avx2 reads no tap sums): ts is one
 * row and ts, sv stay zero (building them was ~10 % of a small layer's time). */
typedef struct {
    int32_t *ts, *sv;
    float *c, *bias;
    int64_t stride; /* LS */
} bd_epilogue_tables;

static inline void bd_epilogue_tables_free(bd_epilogue_tables *e)
{
    free(e->ts); free(e->sv); free(e->c); free(e->bias);
}

/* BD_OK, or BD_ENOMEM with nothing left allocated */
static inline int bd_epilogue_tables_make(bd_epilogue_tables *e, const int32_t *tap_sums,
                                          const float *coeffs, const float *bias, int64_t cout,
                                          int64_t groups, int32_t K, int64_t T, int basis_major,
                                          int with_tap_sums)
{
    const int64_t coutg = cout / groups;
    const int64_t LS = cout * K + 8;
    if (!with_tap_sums) T = 0;
    e->stride = LS;
    e->ts = (int32_t *)calloc((size_t)((T > 0 ? T : 1) * LS), sizeof(int32_t));
    e->sv = (int32_t *)calloc((size_t)LS, sizeof(int32_t));
    e->c = (float *)calloc((size_t)LS, sizeof(float));
    e->bias = bias ? (float *)malloc((size_t)cout * sizeof(float)) : NULL;
    if (!e->ts || !e->sv || !e->c || (bias && !e->bias)) {
        bd_epilogue_tables_free(e);
        return BD_ENOMEM;
    }
    for (int64_t co = 0; co < cout; ++co)
        for (int32_t j = 0; j < K; ++j) {
            const int64_t L = basis_major ? (co - co % coutg) * K + j * coutg + co % coutg : co * K + j;
            e->c[L] = coeffs[co * K + j];
            for (int64_t t = 0; t < T; ++t) {
                const int32_t v = tap_sums[(co * T + t) * K + j];
                e->ts[t * LS + L] = v;
                e->sv[L] += v;
            }
        }
    if (bias && basis_major)
        memcpy(e->bias, bias, (size_t)cout * sizeof(float));
    else if (bias)
        bd_block_bias(bias, groups, coutg, K, e->bias);
    return BD_OK;
}

/* The integer part of the epilogue of one (pixel, group), 8 lanes per instruction:
 *   lane L = i·K + j (i = channel of the group):  A_L = 2 S_L − N − z·Sv_L (sign mode: Dv − 2 S_L)
 *   in int32 (A fits an int32 by the depth limit; the wrapping intermediate 2 S_L cannot change
 *   it), Sv_L from the per-call lane-major tap sums (all taps for interior pixels, else the valid
 *   ones).  s32 [lanes + 8] lane sums in; A [lanes + 8] out (lanes ≥ `lanes`: unused values);
 *   acc_g: NULL, or where the integer accumulators of this (pixel, group) go. */
static inline __attribute__((always_inline)) void
bd_epilogue_int_avx2(const int32_t *s32, int64_t lanes, int sign, int64_t Dv, int64_t N, int64_t z,
                     int interior, const int32_t *lane_sv, const int32_t *lane_ts, int64_t lt_stride,
                     int64_t kw, int64_t ky0, int64_t ky1, int64_t kx0, int64_t kx1, int32_t *A,
                     int32_t *acc_g)
{
    const __m256i vN = _mm256_set1_epi32((int32_t)N), vz = _mm256_set1_epi32((int32_t)z),
                  vD = _mm256_set1_epi32((int32_t)Dv);
    for (int64_t L = 0; L < lanes; L += 8) {
        const __m256i S = _mm256_loadu_si256((const __m256i *)(s32 + L));
        __m256i sv, a;
        if (sign || z == 0) { /* z·Sv = 0: the inputs after a ReLU (z = 0) need no tap sums */
            sv = _mm256_setzero_si256();
        } else if (interior) {
            sv = _mm256_loadu_si256((const __m256i *)(lane_sv + L));
        } else {
            sv = _mm256_setzero_si256();
            for (int64_t ky = ky0; ky < ky1; ++ky)
                for (int64_t kx = kx0; kx < kx1; ++kx)
                    sv = _mm256_add_epi32(sv, _mm256_loadu_si256(
                        (const __m256i *)(lane_ts + (ky * kw + kx) * lt_stride + L)));
        }
        if (sign)
            a = _mm256_sub_epi32(vD, _mm256_add_epi32(S, S));
        else
            a = _mm256_sub_epi32(_mm256_sub_epi32(_mm256_add_epi32(S, S), vN), _mm256_mullo_epi32(vz, sv));
        _mm256_storeu_si256((__m256i *)(A + L), a);
        if (acc_g) {
            if (L + 8 <= lanes) {
                _mm256_storeu_si256((__m256i *)(acc_g + L), a);
            } else {
                for (int64_t i = 0; i < lanes - L; ++i) acc_g[L + i] = A[L + i];
            }
        }
    }
}

/* r[i] (row i, 8 floats) → r[j] = column j: a plain 8×8 transpose */
static inline __attribute__((always_inline)) void bd_transpose8_ps(__m256 r[8])
{
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int j = 0; j < 4; ++j) {
        r[j] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x20);
        r[j + 4] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x31);
    }
}

/* y_i = ((0 + P_{iK}) + P_{iK+1}) + … for the 8 output channels whose lanes start at Pi, in
 * bd_block_channel(K, ·) order (a load for K = 1, in-lane transposes for K = 2 and 4, an 8×8
 * transpose otherwise: it replaced K gathers for K = 3, 5, 6, 7, 3–9 % faster layers at those K on
 * Zen 4, where gathers are slow). Reads Pi[0 … 7K + 7]. */
static inline __attribute__((always_inline)) __m256 bd_sum8_avx2(const float *Pi, int32_t K)
{
    __m256 y = _mm256_setzero_ps();
    if (K == 1) {
        y = _mm256_add_ps(y, _mm256_loadu_ps(Pi));
    } else if (K == 4) {
        const __m256 v0 = _mm256_loadu_ps(Pi), v1 = _mm256_loadu_ps(Pi + 8),
                     v2 = _mm256_loadu_ps(Pi + 16), v3 = _mm256_loadu_ps(Pi + 24);
        const __m256 t0 = _mm256_unpacklo_ps(v0, v1), t1 = _mm256_unpackhi_ps(v0, v1),
                     t2 = _mm256_unpacklo_ps(v2, v3), t3 = _mm256_unpackhi_ps(v2, v3);
        y = _mm256_add_ps(y, _mm256_shuffle_ps(t0, t2, 0x44));
        y = _mm256_add_ps(y, _mm256_shuffle_ps(t0, t2, 0xEE));
        y = _mm256_add_ps(y, _mm256_shuffle_ps(t1, t3, 0x44));
        y = _mm256_add_ps(y, _mm256_shuffle_ps(t1, t3, 0xEE));
    } else if (K == 2) {
        const __m256 v0 = _mm256_loadu_ps(Pi), v1 = _mm256_loadu_ps(Pi + 8);
        y = _mm256_add_ps(y, _mm256_shuffle_ps(v0, v1, 0x88));
        y = _mm256_add_ps(y, _mm256_shuffle_ps(v0, v1, 0xDD));
    } else if (K == 3) { /* column j = P_{3i+j}: from the 24 lanes in 3 vectors, 3 lane permutes
                          * and 2 blends per column instead of an 8×8 transpose (ResNet-56
                          * `--budget 12`, mostly k = 3 and 4: 3.26 → 3.22 ms end to end) */
        const __m256 v0 = _mm256_loadu_ps(Pi), v1 = _mm256_loadu_ps(Pi + 8), v2 = _mm256_loadu_ps(Pi + 16);
        const __m256i a0 = _mm256_setr_epi32(0, 3, 6, 0, 0, 0, 0, 0), b0 = _mm256_setr_epi32(0, 0, 0, 1, 4, 7, 0, 0),
                      c0 = _mm256_setr_epi32(0, 0, 0, 0, 0, 0, 2, 5);
        const __m256i a1 = _mm256_setr_epi32(1, 4, 7, 0, 0, 0, 0, 0), b1 = _mm256_setr_epi32(0, 0, 0, 2, 5, 0, 0, 0),
                      c1 = _mm256_setr_epi32(0, 0, 0, 0, 0, 0, 3, 6);
        const __m256i a2 = _mm256_setr_epi32(2, 5, 0, 0, 0, 0, 0, 0), b2 = _mm256_setr_epi32(0, 0, 0, 3, 6, 0, 0, 0),
                      c2 = _mm256_setr_epi32(0, 0, 0, 0, 0, 1, 4, 7);
        y = _mm256_add_ps(y, _mm256_blend_ps(_mm256_blend_ps(_mm256_permutevar8x32_ps(v0, a0),
                                                             _mm256_permutevar8x32_ps(v1, b0), 0x38),
                                             _mm256_permutevar8x32_ps(v2, c0), 0xC0));
        y = _mm256_add_ps(y, _mm256_blend_ps(_mm256_blend_ps(_mm256_permutevar8x32_ps(v0, a1),
                                                             _mm256_permutevar8x32_ps(v1, b1), 0x18),
                                             _mm256_permutevar8x32_ps(v2, c1), 0xE0));
        y = _mm256_add_ps(y, _mm256_blend_ps(_mm256_blend_ps(_mm256_permutevar8x32_ps(v0, a2),
                                                             _mm256_permutevar8x32_ps(v1, b2), 0x1C),
                                             _mm256_permutevar8x32_ps(v2, c2), 0xE0));
    } else { /* 8×8 transpose of the rows Pi + i·K (channel i's K lanes, then the next channel's,
              * read but unused): column j = P_{iK+j} of the 8 channels, in channel order */
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(Pi + (int64_t)K * i);
        bd_transpose8_ps(r);
        for (int32_t j = 0; j < K; ++j) y = _mm256_add_ps(y, r[j]);
    }
    return y;
}

/* The float part of the epilogue of one (pixel, group), 8 output channels per instruction; bit
 * for bit bd_epilogue (output_transform.h) per output: P_L = c_L · (float)A_L;
 * y_i = ((0 + P_{iK}) + P_{iK+1}) + … (the scalar order), then y·s + bias (bias_blk: NULL, or
 * this group's bias in bd_block_bias order), + the residual (res_g: NULL, or the fused residual
 * at channel 0 of the group at this pixel, channel stride out_stride), and the clamp written as
 * max(lo, y), min(hi, y) (= the scalar comparisons, NaN included).  A [lanes + 8] from
 * bd_epilogue_int_avx2; P [lanes + 8] scratch.  For rows of pixels bd_epilogue_block_avx2 is
 * faster (contiguous stores); this is for lone pixels. */
static inline __attribute__((always_inline)) void
bd_epilogue_pixel_avx2(const int32_t *A, int64_t lanes, int32_t K, int64_t coutg,
                       const float *coeffs_g, const float *bias_blk, float scale, float lo,
                       float hi, float *out_g, int64_t out_stride, float *P, const float *res_g)
{
    for (int64_t L = 0; L < lanes; L += 8) /* lanes ≥ `lanes` read zero-padded coefficients */
        _mm256_storeu_ps(P + L, _mm256_mul_ps(_mm256_loadu_ps(coeffs_g + L),
                                              _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(A + L)))));
    const __m256 vs = _mm256_set1_ps(scale), vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
    int64_t i0 = 0;
    /* channel order of the lanes of y (bd_block_channel) */
    int32_t ch[8];
    for (int i = 0; i < 8; ++i) ch[i] = bd_block_channel(K, i);
    for (; i0 + 8 <= coutg; i0 += 8) {
        __m256 y = bd_sum8_avx2(P + i0 * K, K);
        y = _mm256_mul_ps(y, vs);
        y = _mm256_add_ps(y, bias_blk ? _mm256_loadu_ps(bias_blk + i0) : _mm256_setzero_ps());
        if (res_g) {
            float r[8];
            for (int i = 0; i < 8; ++i) r[i] = res_g[(i0 + ch[i]) * out_stride];
            y = _mm256_add_ps(y, _mm256_loadu_ps(r));
        }
        y = _mm256_min_ps(vhi, _mm256_max_ps(vlo, y));
        float t[8];
        _mm256_storeu_ps(t, y);
        for (int i = 0; i < 8; ++i) out_g[(i0 + ch[i]) * out_stride] = t[i];
    }
    for (; i0 < coutg; ++i0) { /* the same float operations, one channel */
        float acc = 0.0f;
        for (int32_t j = 0; j < K; ++j) acc += P[i0 * K + j];
        float y = acc * scale + (bias_blk ? bias_blk[i0] : 0.0f);
        if (res_g) y += res_g[i0 * out_stride];
        if (y < lo) y = lo;
        if (y > hi) y = hi;
        out_g[i0 * out_stride] = y;
    }
}

#define BD_EPI_BLOCK 8 /* output pixels per bd_epilogue_block_avx2 call (at most) */

/* One output channel's npx (1…8) consecutive pixels y, + the residual (res: NULL, or the
 * channel's first pixel), clamped as max(lo, ·) then min(hi, ·), stored to o[0 … npx − 1]. */
static inline __attribute__((always_inline)) void bd_store_channel8(float *o, const float *res, __m256 y, int npx,
                                                                    __m256 vlo, __m256 vhi)
{
    if (npx == BD_EPI_BLOCK) { /* plain loads and stores: masked ones are slow on AMD */
        if (res) y = _mm256_add_ps(y, _mm256_loadu_ps(res));
        _mm256_storeu_ps(o, _mm256_min_ps(vhi, _mm256_max_ps(vlo, y)));
        return;
    }
    float t[8] = {0};
    if (res) {
        for (int p = 0; p < npx; ++p) t[p] = res[p];
        y = _mm256_add_ps(y, _mm256_loadu_ps(t));
    }
    _mm256_storeu_ps(t, _mm256_min_ps(vhi, _mm256_max_ps(vlo, y)));
    for (int p = 0; p < npx; ++p) o[p] = t[p];
}

/* Whether the epilogue runs on blocks of pixels (bd_epilogue_block_avx2): while a block's
 * accumulators and products (2 · 8 · (Cout·K + 8) · 4 bytes) stay well inside L1; beyond, pixel by
 * pixel (1×1 32→128 at K = 4: blocks were 12–16 % slower; 512→1000: 6–12 %; AVX-512 Zen 4). */
static inline int bd_epilogue_blocks(int64_t cout, int32_t K)
{
    /* every K since its lane sums are transposes (K = 3, 5, 6, 7 were gathers): 1×1 64→16 K = 5
     * Q = 8 12 % faster, 3×3 16→16 K = 5 25 %, 3×3 16→64 K = 3 13 %, 1×1 128→32 K = 6 8 % */
    return cout * K <= 256;
}

/* The float part of the epilogue of npx (2…8) consecutive output pixels of one row and group,
 * bit for bit bd_epilogue_pixel_avx2 on each: the same per-pixel sums over j (bd_sum8_avx2),
 * then an 8×8 transpose so that each output channel's 8 pixels are one contiguous store instead
 * of 8 scattered ones (and the residual one contiguous load).  A of pixel p at A + p·a_stride
 * ([lanes + 8] from bd_epilogue_int_avx2; all 8 rows readable, rows ≥ npx unused), bias_blk as
 * in bd_epilogue_pixel_avx2, out_g / res_g: channel 0 of the group at the first pixel (channel
 * stride out_stride, pixels contiguous), P scratch [8 · a_stride]. */
static inline __attribute__((always_inline)) void
bd_epilogue_block_avx2(const int32_t *A, int64_t a_stride, int npx, int64_t lanes, int32_t K,
                       int64_t coutg, const float *coeffs_g, const float *bias_blk, float scale,
                       float lo, float hi, float *out_g, int64_t out_stride, float *P,
                       const float *res_g)
{
    for (int p = 0; p < BD_EPI_BLOCK; ++p)
        for (int64_t L = 0; L < lanes; L += 8) /* lanes ≥ `lanes` read zero-padded coefficients */
            _mm256_storeu_ps(P + p * a_stride + L,
                             _mm256_mul_ps(_mm256_loadu_ps(coeffs_g + L), _mm256_cvtepi32_ps(_mm256_loadu_si256(
                                                 (const __m256i *)(A + p * a_stride + L)))));
    const __m256 vs = _mm256_set1_ps(scale), vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
    int64_t i0 = 0;
    for (; i0 + 8 <= coutg; i0 += 8) {
        __m256 r[8];
        for (int p = 0; p < BD_EPI_BLOCK; ++p) r[p] = _mm256_mul_ps(bd_sum8_avx2(P + p * a_stride + i0 * K, K), vs);
        bd_transpose8_ps(r); /* r[i] = channel i0 + bd_block_channel(K, i) over the 8 pixels */
        for (int i = 0; i < 8; ++i) {
            const int64_t co = i0 + bd_block_channel(K, i);
            __m256 y = _mm256_add_ps(r[i], _mm256_set1_ps(bias_blk ? bias_blk[i0 + i] : 0.0f));
            bd_store_channel8(out_g + co * out_stride, res_g ? res_g + co * out_stride : NULL, y, npx, vlo, vhi);
        }
    }
    for (; i0 < coutg; ++i0) /* the same float operations, one channel */
        for (int p = 0; p < npx; ++p) {
            float acc = 0.0f;
            for (int32_t j = 0; j < K; ++j) acc += P[p * a_stride + i0 * K + j];
            float y = acc * scale + (bias_blk ? bias_blk[i0] : 0.0f);
            if (res_g) y += res_g[i0 * out_stride + p];
            if (y < lo) y = lo;
            if (y > hi) y = hi;
            out_g[i0 * out_stride + p] = y;
        }
}

/* The float epilogue of npx (1…BD_EPI_BLOCK) consecutive output pixels of one row, every group,
 * from their integer accumulators (pixel p, group g at Ablk + p·a_stride + g·coutg·K, a_stride ≥
 * G·coutg·K + 8): bd_epilogue_block_avx2 for 2+ pixels if `blocks`, else pixel by pixel.
 * out0 / res0 (NULL: no residual): the output / residual at channel 0 of the first pixel,
 * channel stride `plane`; P scratch [BD_EPI_BLOCK · a_stride]. */
static inline void bd_epilogue_flush_avx2(const int32_t *Ablk, int64_t a_stride, int npx, int blocks,
                                          int64_t G, int64_t coutg, int32_t K,
                                          const bd_epilogue_tables *e, float scale, float lo, float hi,
                                          float *out0, int64_t plane, const float *res0, float *P)
{
    const int64_t lanes = coutg * K;
    for (int64_t g = 0; g < G; ++g) {
        const int64_t l0 = g * lanes, o0 = g * coutg * plane;
        const float *bias_blk = e->bias ? e->bias + g * coutg : NULL;
        if (blocks && npx > 1) {
            bd_epilogue_block_avx2(Ablk + l0, a_stride, npx, lanes, K, coutg, e->c + l0, bias_blk, scale,
                                   lo, hi, out0 + o0, plane, P, res0 ? res0 + o0 : NULL);
            continue;
        }
        for (int px = 0; px < npx; ++px)
            bd_epilogue_pixel_avx2(Ablk + px * a_stride + l0, lanes, K, coutg, e->c + l0, bias_blk, scale,
                                   lo, hi, out0 + o0 + px, plane, P, res0 ? res0 + o0 + px : NULL);
    }
}

/* The float epilogue of npx (1…BD_EPI_BLOCK) consecutive output pixels of one row, every group,
 * from basis-major integer accumulators (the LUT kernel: pixel p, group g at Ablk + p·a_stride +
 * g·coutg·K, lane j·coutg + i for channel i; a_stride ≥ G·coutg·K + 8, all BD_EPI_BLOCK rows
 * readable), bit for bit bd_epilogue per output: y = ((0 + c_0·A_0) + c_1·A_1) + …, for 8
 * channels per instruction straight from the accumulators (no products to reorder), · s + bias,
 * + residual, clamp.  Output (and residual) channel co of pixel p at out0 + co·ch_stride +
 * p·px_stride: px_stride = 1 (NCHW rows: an 8×8 transpose first, so each channel's pixels are
 * one contiguous store), or ch_stride = 1 (a gemm's rows, [N][Cout]: each pixel's 8 channels
 * stored as they are).  e: bd_epilogue_tables_make(basis_major = 1). */
static inline void bd_epilogue_flush_bm_avx2(const int32_t *Ablk, int64_t a_stride, int npx, int64_t G,
                                             int64_t coutg, int32_t K, const bd_epilogue_tables *e,
                                             float scale, float lo, float hi, float *out0, int64_t ch_stride,
                                             int64_t px_stride, const float *res0)
{
    const __m256 vs = _mm256_set1_ps(scale), vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
    const int64_t lanes = coutg * K;
    for (int64_t g = 0; g < G; ++g) {
        const int32_t *Ag = Ablk + g * lanes;
        const float *cg = e->c + g * lanes, *bg = e->bias ? e->bias + g * coutg : NULL;
        float *og = out0 + g * coutg * ch_stride;
        const float *rg = res0 ? res0 + g * coutg * ch_stride : NULL;
        int64_t i0 = 0;
        for (; i0 + 8 <= coutg; i0 += 8) {
            const __m256 vb = bg ? _mm256_loadu_ps(bg + i0) : _mm256_setzero_ps();
            __m256 r[BD_EPI_BLOCK];
            for (int p = 0; p < BD_EPI_BLOCK; ++p) r[p] = _mm256_setzero_ps();
            for (int32_t j = 0; j < K; ++j) { /* bases outside: 8 independent sums (latency-bound inside) */
                const __m256 c = _mm256_loadu_ps(cg + j * coutg + i0);
                for (int p = 0; p < BD_EPI_BLOCK; ++p)
                    r[p] = _mm256_add_ps(r[p], _mm256_mul_ps(c, _mm256_cvtepi32_ps(_mm256_loadu_si256(
                                                                   (const __m256i *)(Ag + p * a_stride + j * coutg + i0)))));
            }
            for (int p = 0; p < BD_EPI_BLOCK; ++p) r[p] = _mm256_add_ps(_mm256_mul_ps(r[p], vs), vb);
            if (px_stride == 1) {
                bd_transpose8_ps(r); /* r[i] = channel i0 + i over the 8 pixels */
                for (int i = 0; i < 8; ++i)
                    bd_store_channel8(og + (i0 + i) * ch_stride, rg ? rg + (i0 + i) * ch_stride : NULL, r[i], npx,
                                      vlo, vhi);
            } else {
                for (int p = 0; p < npx; ++p) {
                    __m256 y = r[p];
                    if (rg) y = _mm256_add_ps(y, _mm256_loadu_ps(rg + p * px_stride + i0));
                    _mm256_storeu_ps(og + p * px_stride + i0, _mm256_min_ps(vhi, _mm256_max_ps(vlo, y)));
                }
            }
        }
        for (; i0 < coutg; ++i0) /* the same float operations, one channel */
            for (int p = 0; p < npx; ++p) {
                float acc = 0.0f;
                for (int32_t j = 0; j < K; ++j) acc += cg[j * coutg + i0] * (float)Ag[p * a_stride + j * coutg + i0];
                float y = acc * scale + (bg ? bg[i0] : 0.0f);
                if (rg) y += rg[i0 * ch_stride + p * px_stride];
                if (y < lo) y = lo;
                if (y > hi) y = hi;
                og[i0 * ch_stride + p * px_stride] = y;
            }
    }
}

#endif /* BDECOMP_EPILOGUE_AVX2_H */
