/*
 * Scalar reference kernel: the formula of bdecomp.h written out literally, one popcount at a time.
 * Portable C (no intrinsics), used as the "scalar" ISA and as the thing the SIMD kernels are
 * tested against (through the numpy reference in runtime/reference.py).
 *
 *   A_j = Σ_b 2^b (2 P_jb − N_b) − z · Sv_j          (affine)
 *   A_j = Dv − 2 popcount(m_j⁺ XOR q)                 (sign mode)
 */
#include <stddef.h>

#include "reference.h"

#include "kernels.h"
#include "output_transform.h"

static inline int64_t popcount64(uint64_t x) { return (int64_t)__builtin_popcountll(x); }

int bd_conv_reference(const bd_conv_params *p, const bd_geom *gm, const uint64_t *act,
                      const uint64_t *wpacked, const int32_t *tap_sums, const float *coeffs,
                      const float *bias, float *out, int32_t *acc, int32_t nthreads)
{
    const int64_t H = p->h, W = p->w, G = p->groups, OH = p->oh, OW = p->ow;
    const int64_t KH = p->kh, KW = p->kw, COUT = p->cout;
    const int64_t Q = p->bits, K = p->k, KP = gm->kp, WPG = gm->wpg, CG = gm->cg;
    const int64_t COUTG = gm->coutg;
    const int64_t z = p->zero_point;
    const int sign = p->sign != 0;
    const float scale_eff = sign ? p->scale * 0.5f : p->scale;
    const int64_t rows = p->n * OH;
    if (nthreads <= 0) nthreads = 1;

#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = r / OH, oy = r % OH;
        int64_t ky0, ky1;
        bd_valid_range(oy, p->stride_h, p->pad_top, p->dil_h, KH, H, &ky0, &ky1);
        for (int64_t ox = 0; ox < OW; ++ox) {
            int64_t kx0, kx1;
            bd_valid_range(ox, p->stride_w, p->pad_left, p->dil_w, KW, W, &kx0, &kx1);
            const int64_t ntaps = (ky1 - ky0) * (kx1 - kx0);
            for (int64_t g = 0; g < G; ++g) {
                /* N_b: ones of bit plane b over the valid taps of this group (shared by all co). */
                int64_t N[8] = {0};
                for (int64_t ky = ky0; ky < ky1; ++ky)
                    for (int64_t kx = kx0; kx < kx1; ++kx) {
                        const int64_t iy = oy * p->stride_h - p->pad_top + ky * p->dil_h;
                        const int64_t ix = ox * p->stride_w - p->pad_left + kx * p->dil_w;
                        const uint64_t *a = act + ((((n * H + iy) * W + ix) * G + g) * Q) * WPG;
                        for (int64_t b = 0; b < Q; ++b)
                            for (int64_t w = 0; w < WPG; ++w) N[b] += popcount64(a[b * WPG + w]);
                    }
                const int64_t Dv = ntaps * CG;

                for (int64_t co = g * COUTG; co < (g + 1) * COUTG; ++co) {
                    int64_t A[8] = {0};
                    int64_t sv[8];
                    bd_tap_sum_valid(tap_sums + co * KH * KW * K, KW, (int32_t)K, ky0, ky1, kx0,
                                     kx1, sv);
                    for (int64_t j = 0; j < K; ++j) {
                        int64_t P[8] = {0}; /* P_jb (affine) or popcount(m XOR q) (sign, b = 0) */
                        for (int64_t ky = ky0; ky < ky1; ++ky)
                            for (int64_t kx = kx0; kx < kx1; ++kx) {
                                const int64_t iy = oy * p->stride_h - p->pad_top + ky * p->dil_h;
                                const int64_t ix = ox * p->stride_w - p->pad_left + kx * p->dil_w;
                                const uint64_t *a =
                                    act + ((((n * H + iy) * W + ix) * G + g) * Q) * WPG;
                                const int64_t t = ky * KW + kx;
                                for (int64_t w = 0; w < WPG; ++w) {
                                    const uint64_t m = wpacked[((co * KH * KW + t) * WPG + w) * KP + j];
                                    for (int64_t b = 0; b < Q; ++b) {
                                        const uint64_t q = a[b * WPG + w];
                                        P[b] += sign ? popcount64(m ^ q) : popcount64(m & q);
                                    }
                                }
                            }
                        if (sign) {
                            A[j] = Dv - 2 * P[0];
                        } else {
                            int64_t s = 0;
                            for (int64_t b = 0; b < Q; ++b) s += ((int64_t)1 << b) * (2 * P[b] - N[b]);
                            A[j] = s - z * sv[j];
                        }
                    }
                    const int64_t pix = (n * OH + oy) * OW + ox;
                    if (acc)
                        for (int64_t j = 0; j < K; ++j) acc[(pix * COUT + co) * K + j] = (int32_t)A[j];
                    const int64_t o = ((n * COUT + co) * OH + oy) * OW + ox;
                    out[o] = bd_epilogue(A, (int32_t)K, coeffs + co * K, bias ? bias[co] : 0.0f,
                                         scale_eff, p->residual ? p->residual + o : NULL,
                                         p->act_min, p->act_max);
                }
            }
        }
    }
    return BD_OK;
}

/* Peak of the portable path: one 64-bit AND + popcount per pair, 4 independent chains. */
double bd_peak_scalar(double seconds)
{
    uint64_t a[64], m[64];
    uint64_t seed = 0x9E3779B97F4A7C15ull;
    for (int i = 0; i < 64; ++i) {
        seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
        a[i] = seed;
        seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
        m[i] = seed;
    }
    volatile uint64_t sink = 0;
    uint64_t pairs = 0;
    const double t0 = bd_now_seconds();
    double t1 = t0;
    do {
        uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (int rep = 0; rep < 256; ++rep) {
            for (int i = 0; i < 64; i += 4) {
                s0 += (uint64_t)__builtin_popcountll(a[i] & m[i]);
                s1 += (uint64_t)__builtin_popcountll(a[i + 1] & m[i + 1]);
                s2 += (uint64_t)__builtin_popcountll(a[i + 2] & m[i + 2]);
                s3 += (uint64_t)__builtin_popcountll(a[i + 3] & m[i + 3]);
            }
            /* make each repetition depend on the previous one so it cannot be hoisted */
            a[rep & 63] ^= s0 & 1;
        }
        sink = sink + s0 + s1 + s2 + s3;
        pairs += 256 * 64;
        t1 = bd_now_seconds();
    } while (t1 - t0 < seconds);
    (void)sink;
    return 64.0 * (double)pairs / (t1 - t0);
}
