/*
 * Depthwise convolution (groups = C = Cout, one input channel per output channel) computed
 * directly from activation codes.  With D = KH·KW (9 for 3×3) per output, bit planes would leave
 * every 64-bit word almost empty: the popcount and LUT kernels ran MobileNet's depthwise layers at
 * ~1 Gbit-op/s, 0.5% of the peak.  Here each tap is a few integer adds per output pixel:
 *
 *   A_j(pixel) = Σ_{valid taps t} m_j[t] · (q_t − z)         (exactly the A_j of bdecomp.h)
 *   y          = clamp(s · Σ_j c_j A_j + bias)                (bd_epilogue's float operations)
 *
 * so integer accumulators and float outputs are bit-identical to bd_conv / bd_conv_lut.  Taps in
 * the zero padding are skipped (their code is z: contribution 0).  Plain C: the inner loops run
 * along an output row (contiguous for stride 1) and the compiler vectorises them; the float
 * epilogue is element-wise, so vectorising it cannot change its per-element order.
 *
 * Layouts: codes uint8 [N][C][H][W] (bd_quantize_codes); basis int8 ±1 [C][k][KH·KW] (tap
 * t = ky·KW + kx); output float [N][C][OH][OW]; acc (optional) int32 [N][OH][OW][C][k].
 */
#include <stdlib.h>

#include "kernels.h"
#include "output_transform.h" /* bd_valid_range */

int bd_depthwise_impl(const bd_conv_params *p, const uint8_t *codes, const int8_t *basis_pm,
                      const float *coeffs, const float *bias, float *out, int32_t *acc,
                      int32_t nthreads)
{
    const int64_t N = p->n, C = p->c, H = p->h, W = p->w, OH = p->oh, OW = p->ow;
    const int64_t KH = p->kh, KW = p->kw, T = KH * KW;
    const int32_t K = p->k, z = p->zero_point;
    /* geometry in locals: with -fno-strict-aliasing the compiler would reload p-> fields after
     * every store to the accumulators */
    const int64_t SH = p->stride_h, SW = p->stride_w, DH = p->dil_h, DW = p->dil_w;
    const int64_t PT = p->pad_top, PL = p->pad_left;
    const float scale = p->scale, lo = p->act_min, hi = p->act_max;
    if (nthreads <= 0) nthreads = 1;
    if (nthreads > BD_MAX_THREADS) nthreads = BD_MAX_THREADS;
    if (N * C * OH * OW * T * K < bd_min_parallel_work(1 << 16) && nthreads > 1) nthreads = 1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        int32_t *A = (int32_t *)malloc((size_t)(K * OW) * sizeof(int32_t)); /* [k][ox] of one row */
        if (!A) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t nc = 0; nc < N * C; ++nc) {
            if (!A) continue;
            const int64_t n = nc / C, c = nc % C;
            const uint8_t *plane = codes + nc * H * W;
            const int8_t *m = basis_pm + c * K * T;
            const float *cf = coeffs + c * K;
            const float b = bias ? bias[c] : 0.0f;
            for (int64_t oy = 0; oy < OH; ++oy) {
                for (int64_t i = 0; i < K * OW; ++i) A[i] = 0;
                for (int64_t ky = 0; ky < KH; ++ky) {
                    const int64_t iy = oy * SH - PT + ky * DH;
                    if (iy < 0 || iy >= H) continue;
                    const uint8_t *row = plane + iy * W;
                    for (int64_t kx = 0; kx < KW; ++kx) {
                        int64_t ox0, ox1; /* output columns whose tap kx lies inside the row */
                        bd_valid_range(kx * DW - PL, 1, 0, SW, OW, W, &ox0, &ox1);
                        const int64_t off = kx * DW - PL;
                        for (int32_t j = 0; j < K; ++j) {
                            int32_t *Aj = A + j * OW;
                            const int plus = m[j * T + ky * KW + kx] > 0; /* m = ±1: add or subtract */
                            if (SW == 1) { /* contiguous: vectorised */
                                const uint8_t *r = row + off;
                                if (plus)
                                    for (int64_t ox = ox0; ox < ox1; ++ox) Aj[ox] += (int32_t)r[ox] - z;
                                else
                                    for (int64_t ox = ox0; ox < ox1; ++ox) Aj[ox] -= (int32_t)r[ox] - z;
                            } else if (plus) {
                                for (int64_t ox = ox0; ox < ox1; ++ox) Aj[ox] += (int32_t)row[ox * SW + off] - z;
                            } else {
                                for (int64_t ox = ox0; ox < ox1; ++ox) Aj[ox] -= (int32_t)row[ox * SW + off] - z;
                            }
                        }
                    }
                }
                /* bd_epilogue, a row at a time: per element the same float operations in the same
                 * order (acc = 0; acc += c_j·A_j for j = 0..k−1; y = acc·s + bias [+ r]; clamp) */
                float *o = out + (nc * OH + oy) * OW;
                const float *res = p->residual ? p->residual + (nc * OH + oy) * OW : NULL;
                for (int64_t ox = 0; ox < OW; ++ox) o[ox] = 0.0f;
                for (int32_t j = 0; j < K; ++j) {
                    const float cj = cf[j];
                    const int32_t *Aj = A + j * OW;
                    for (int64_t ox = 0; ox < OW; ++ox) o[ox] += cj * (float)Aj[ox];
                }
                for (int64_t ox = 0; ox < OW; ++ox) {
                    float y = o[ox] * scale + b;
                    if (res) y += res[ox];
                    if (y < lo) y = lo;
                    if (y > hi) y = hi;
                    o[ox] = y;
                }
                if (acc)
                    for (int64_t ox = 0; ox < OW; ++ox) {
                        int32_t *ap = acc + (((n * OH + oy) * OW + ox) * C + c) * K;
                        for (int32_t j = 0; j < K; ++j) ap[j] = A[j * OW + ox];
                    }
            }
        }
        free(A);
    }
    return failed ? BD_ENOMEM : BD_OK;
}
