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
 * to LS = Cout·K + 8), bias in bd_block_bias order (NULL without bias). */
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
                                          int64_t groups, int32_t K, int64_t T)
{
    const int64_t LS = cout * K + 8;
    e->stride = LS;
    e->ts = (int32_t *)calloc((size_t)(T * LS), sizeof(int32_t));
    e->sv = (int32_t *)calloc((size_t)LS, sizeof(int32_t));
    e->c = (float *)calloc((size_t)LS, sizeof(float));
    e->bias = bias ? (float *)malloc((size_t)cout * sizeof(float)) : NULL;
    if (!e->ts || !e->sv || !e->c || (bias && !e->bias)) {
        bd_epilogue_tables_free(e);
        return BD_ENOMEM;
    }
    for (int64_t co = 0; co < cout; ++co)
        for (int64_t t = 0; t < T; ++t)
            for (int32_t j = 0; j < K; ++j) {
                const int32_t v = tap_sums[(co * T + t) * K + j];
                e->ts[t * LS + co * K + j] = v;
                e->sv[co * K + j] += v;
            }
    memcpy(e->c, coeffs, (size_t)(cout * K) * sizeof(float));
    if (bias) bd_block_bias(bias, groups, cout / groups, K, e->bias);
    return BD_OK;
}

/* The epilogue of one (pixel, group), 8 lanes / 8 output channels per instruction; bit for bit
 * bd_epilogue (output_transform.h) per output:
 *   lane L = i·K + j (i = channel of the group):  A_L = 2 S_L − N − z·Sv_L (sign mode: Dv − 2 S_L)
 *   in int32 (A fits an int32 by the depth limit; the wrapping intermediate 2 S_L cannot change
 *   it), Sv_L from the
 *   per-call lane-major tap sums (all taps for interior pixels, else the valid ones);
 *   P_L = c_L · (float)A_L;  y_i = ((0 + P_{iK}) + P_{iK+1}) + … (the scalar order), then
 *   y·s + bias (bias_blk: NULL, or this group's bias in bd_block_bias order), + the residual
 *   (res_g: NULL, or the fused residual at channel 0 of the group at
 *   this pixel, channel stride out_stride), and the clamp written as max(lo, y), min(hi, y)
 *   (= the scalar comparisons, NaN included).  s32 [lanes + 8] lane sums; P [lanes + 8] scratch. */
static inline __attribute__((always_inline)) void
bd_epilogue_lanes_avx2(const int32_t *s32, int64_t lanes, int32_t K, int64_t coutg, int sign,
                       int64_t Dv, int64_t N, int64_t z, int interior, const int32_t *lane_sv,
                       const int32_t *lane_ts, int64_t lt_stride, int64_t kw, int64_t ky0,
                       int64_t ky1, int64_t kx0, int64_t kx1, const float *coeffs_g,
                       const float *bias_blk, float scale, float lo, float hi, float *out_g,
                       int64_t out_stride, int32_t *acc_g, float *P, const float *res_g)
{
    const __m256i vN = _mm256_set1_epi32((int32_t)N), vz = _mm256_set1_epi32((int32_t)z),
                  vD = _mm256_set1_epi32((int32_t)Dv);
    for (int64_t L = 0; L < lanes; L += 8) {
        const __m256i S = _mm256_loadu_si256((const __m256i *)(s32 + L));
        __m256i sv, A;
        if (sign) {
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
            A = _mm256_sub_epi32(vD, _mm256_add_epi32(S, S));
        else
            A = _mm256_sub_epi32(_mm256_sub_epi32(_mm256_add_epi32(S, S), vN), _mm256_mullo_epi32(vz, sv));
        if (acc_g) {
            if (L + 8 <= lanes) {
                _mm256_storeu_si256((__m256i *)(acc_g + L), A);
            } else {
                int32_t tmp[8];
                _mm256_storeu_si256((__m256i *)tmp, A);
                for (int64_t i = 0; i < lanes - L; ++i) acc_g[L + i] = tmp[i];
            }
        }
        /* lanes ≥ `lanes` read zero-padded coefficients: P = 0 there, never used */
        _mm256_storeu_ps(P + L, _mm256_mul_ps(_mm256_loadu_ps(coeffs_g + L), _mm256_cvtepi32_ps(A)));
    }
    const __m256i step = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(K));
    const __m256 vs = _mm256_set1_ps(scale), vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
    int64_t i0 = 0;
    /* channel order of the lanes of y (bd_block_channel) */
    int32_t ch[8];
    for (int i = 0; i < 8; ++i) ch[i] = bd_block_channel(K, i);
    for (; i0 + 8 <= coutg; i0 += 8) {
        __m256 y = _mm256_setzero_ps();
        const float *Pi = P + i0 * K;
        if (K == 4) {
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
        } else if (K == 8) { /* 8×8 transpose: c_j = lane j of the 8 channels, in channel order */
            __m256 r[8], t[8], u[8];
            for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(Pi + 8 * i);
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
            for (int j = 0; j < 4; ++j) /* lanes j and j + 4, added in the scalar order 0..7 */
                y = _mm256_add_ps(y, _mm256_permute2f128_ps(u[j], u[j + 4], 0x20));
            for (int j = 0; j < 4; ++j)
                y = _mm256_add_ps(y, _mm256_permute2f128_ps(u[j], u[j + 4], 0x31));
        } else {
            for (int32_t j = 0; j < K; ++j)
                y = _mm256_add_ps(y, _mm256_i32gather_ps(Pi + j, step, 4));
        }
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

#endif /* BDECOMP_EPILOGUE_AVX2_H */
