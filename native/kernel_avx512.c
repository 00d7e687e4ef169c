/*
 * AVX-512 kernels (AVX-512F + VL + VPOPCNTDQ), chosen at run time by select_kernel.c.
 *
 *   conv_kp8_avx512  4 < k ≤ 8: broadcast one activation word, AND (XOR) it with the 8 basis
 *                    words of that (tap, word) in one __m512i, vpopcntq, add into int64 lanes.
 *   conv_kp4_avx512  k ≤ 4: the same with one __m256i (vpopcntq ymm, AVX-512VL).
 *   block_avx512     BD_INNER_PB of conv_driver.inc: PB output pixels at once (PB = 4 for Q ≤ 4,
 *                    else 2: ≤ 16 accumulators; 2 also for the rest of a row), one zmm of weights per (tap, word) — 8 lanes of
 *                    one channel (k > 4) or 4 lanes of two channels (k ≤ 4) — ANDed with the
 *                    broadcast activation words of every pixel and bit plane.  Weights are read
 *                    once per block instead of once per pixel (conv10 of SqueezeNet: 256 KiB of
 *                    weights per pixel, from L2), and k ≤ 4 uses full 512-bit registers.
 *
 * Structure is that of kernel_avx2.c (same pixel loop conv_driver.inc, same lane order); only
 * the counting differs: vpopcntq gives 64-bit counts directly, so there are no byte counters to
 * flush.  Compiled for AVX-512 via the pragma below (not -march=native); nothing here may be
 * called unless bd_isa_supported(BD_ISA_AVX512).
 */
#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vpopcntdq,popcnt")
#include <immintrin.h>

/* kp = 8, one register for lanes 0–7: lane j = Σ_b 2^b Σ popcount(wt[j] OP q_b) */
static inline __attribute__((always_inline)) __m512i
lanes8_avx512(const uint64_t *a, int64_t a_sy, int64_t a_sx, const uint64_t *wt, int64_t w_sy,
              int64_t w_sx, int64_t ny, int64_t nx, int64_t wpg, const int Q, const int SIGN)
{
    const __m512i zero = _mm512_setzero_si512();
    __m512i acc[8];
#pragma GCC unroll 8
    for (int b = 0; b < Q; ++b) acc[b] = zero;
    for (int64_t y = 0; y < ny; ++y)
        for (int64_t x = 0; x < nx; ++x) {
            const uint64_t *at = a + y * a_sy + x * a_sx;
            const uint64_t *wq = wt + y * w_sy + x * w_sx;
            for (int64_t w = 0; w < wpg; ++w) {
                const __m512i m = _mm512_loadu_si512((const void *)(wq + w * 8));
#pragma GCC unroll 8
                for (int b = 0; b < Q; ++b) {
                    const __m512i q = _mm512_set1_epi64((long long)at[b * wpg + w]);
                    const __m512i v = SIGN ? _mm512_xor_si512(m, q) : _mm512_and_si512(m, q);
                    acc[b] = _mm512_add_epi64(acc[b], _mm512_popcnt_epi64(v));
                }
            }
        }
    __m512i total = zero;
#pragma GCC unroll 8
    for (int b = 0; b < Q; ++b) total = _mm512_add_epi64(total, _mm512_slli_epi64(acc[b], b));
    return total;
}

/* kp = 4, one 256-bit register for lanes 0–3 */
static inline __attribute__((always_inline)) __m256i
lanes4_avx512(const uint64_t *a, int64_t a_sy, int64_t a_sx, const uint64_t *wt, int64_t w_sy,
              int64_t w_sx, int64_t ny, int64_t nx, int64_t wpg, const int Q, const int SIGN)
{
    const __m256i zero = _mm256_setzero_si256();
    __m256i acc[8];
#pragma GCC unroll 8
    for (int b = 0; b < Q; ++b) acc[b] = zero;
    for (int64_t y = 0; y < ny; ++y)
        for (int64_t x = 0; x < nx; ++x) {
            const uint64_t *at = a + y * a_sy + x * a_sx;
            const uint64_t *wq = wt + y * w_sy + x * w_sx;
            for (int64_t w = 0; w < wpg; ++w) {
                const __m256i m = _mm256_loadu_si256((const __m256i *)(wq + w * 4));
#pragma GCC unroll 8
                for (int b = 0; b < Q; ++b) {
                    const __m256i q = _mm256_set1_epi64x((long long)at[b * wpg + w]);
                    const __m256i v = SIGN ? _mm256_xor_si256(m, q) : _mm256_and_si256(m, q);
                    acc[b] = _mm256_add_epi64(acc[b], _mm256_popcnt_epi64(v));
                }
            }
        }
    __m256i total = zero;
#pragma GCC unroll 8
    for (int b = 0; b < Q; ++b) total = _mm256_add_epi64(total, _mm256_slli_epi64(acc[b], b));
    return total;
}

/* S[i·KP + j] for nco output channels (weights of channel i at wt + i·w_co) */
static inline __attribute__((always_inline)) void
channels_avx512(int64_t *S, int64_t nco, int64_t w_co, const uint64_t *a, int64_t a_sy,
                int64_t a_sx, const uint64_t *wt, int64_t w_sy, int64_t w_sx, int64_t ny,
                int64_t nx, int64_t wpg, const int Q, const int KP, const int SIGN)
{
    for (int64_t i = 0; i < nco; ++i) {
        const uint64_t *wi = wt + i * w_co;
        if (KP == 4) /* conv_kp4_avx512: lanes 0–3 in one 256-bit register */
            _mm256_storeu_si256((__m256i *)(S + i * KP),
                                lanes4_avx512(a, a_sy, a_sx, wi, w_sy, w_sx, ny, nx, wpg, Q, SIGN));
        else /* conv_kp8_avx512: lanes 0–7 in one 512-bit register */
            _mm512_storeu_si512((void *)(S + i * KP),
                                lanes8_avx512(a, a_sy, a_sx, wi, w_sy, w_sx, ny, nx, wpg, Q, SIGN));
    }
}

#define BD_CHANNELS_CASES(FN, KP)                                                                \
    if (sign) { FN(S, nco, w_co, a, a_sy, a_sx, wt, w_sy, w_sx, ny, nx, wpg, 1, KP, 1); return; } \
    switch (Q) {                                                                                 \
    case 1: FN(S, nco, w_co, a, a_sy, a_sx, wt, w_sy, w_sx, ny, nx, wpg, 1, KP, 0); return;      \
    case 2: FN(S, nco, w_co, a, a_sy, a_sx, wt, w_sy, w_sx, ny, nx, wpg, 2, KP, 0); return;      \
    case 3: FN(S, nco, w_co, a, a_sy, a_sx, wt, w_sy, w_sx, ny, nx, wpg, 3, KP, 0); return;      \
    case 4: FN(S, nco, w_co, a, a_sy, a_sx, wt, w_sy, w_sx, ny, nx, wpg, 4, KP, 0); return;      \
    case 5: FN(S, nco, w_co, a, a_sy, a_sx, wt, w_sy, w_sx, ny, nx, wpg, 5, KP, 0); return;      \
    case 6: FN(S, nco, w_co, a, a_sy, a_sx, wt, w_sy, w_sx, ny, nx, wpg, 6, KP, 0); return;      \
    case 7: FN(S, nco, w_co, a, a_sy, a_sx, wt, w_sy, w_sx, ny, nx, wpg, 7, KP, 0); return;      \
    default: FN(S, nco, w_co, a, a_sy, a_sx, wt, w_sy, w_sx, ny, nx, wpg, 8, KP, 0); return;     \
    }

/* k ≤ 4 */
static void conv_kp4_avx512(int64_t *S, int64_t nco, int64_t w_co, const uint64_t *a,
                            int64_t a_sy, int64_t a_sx, const uint64_t *wt, int64_t w_sy,
                            int64_t w_sx, int64_t ny, int64_t nx, int64_t wpg, int32_t Q, int sign)
{
    BD_CHANNELS_CASES(channels_avx512, 4)
}

/* 4 < k ≤ 8 */
static void conv_kp8_avx512(int64_t *S, int64_t nco, int64_t w_co, const uint64_t *a,
                            int64_t a_sy, int64_t a_sx, const uint64_t *wt, int64_t w_sy,
                            int64_t w_sx, int64_t ny, int64_t nx, int64_t wpg, int32_t Q, int sign)
{
    BD_CHANNELS_CASES(channels_avx512, 8)
}

static void inner_avx512(int64_t *S, int64_t nco, int64_t w_co, const uint64_t *a, int64_t a_sy,
                         int64_t a_sx, const uint64_t *wt, int64_t w_sy, int64_t w_sx, int64_t ny,
                         int64_t nx, int64_t wpg, int32_t Q, int32_t kp, int sign)
{
    if (kp == 4)
        conv_kp4_avx512(S, nco, w_co, a, a_sy, a_sx, wt, w_sy, w_sx, ny, nx, wpg, Q, sign);
    else
        conv_kp8_avx512(S, nco, w_co, a, a_sy, a_sx, wt, w_sy, w_sx, ny, nx, wpg, Q, sign);
}

/* ---- pixel blocks (BD_INNER_PB) -------------------------------------------------------------- */

#define BD_PB(Q) ((Q) <= 4 ? 4 : 2)

/* One zmm of lanes for PB pixels: S[p·s_px + j] (j < 8) += Σ_b 2^b Σ popcount(m_j OP q_b(p)).
 * m: 8 words per (tap, word) at w0 (KP = 8), or 4 words at w0 and 4 at w1 (KP = 4: two channels,
 * lanes 0–3 channel i, 4–7 channel i + 1, which are adjacent in S). */
static inline __attribute__((always_inline)) void
block_lanes_avx512(int64_t *S, int64_t s_px, const uint64_t *a, int64_t a_px, int64_t a_sy,
                   int64_t a_sx, const uint64_t *w0, const uint64_t *w1, int64_t w_sy, int64_t w_sx,
                   int64_t ny, int64_t nx, int64_t wpg, const int Q, const int PB, const int KP,
                   const int SIGN)
{
    const __m512i zero = _mm512_setzero_si512();
    __m512i acc[4][8];
#pragma GCC unroll 4
    for (int p = 0; p < PB; ++p)
#pragma GCC unroll 8
        for (int b = 0; b < Q; ++b) acc[p][b] = zero;
    for (int64_t y = 0; y < ny; ++y)
        for (int64_t x = 0; x < nx; ++x) {
            const uint64_t *at = a + y * a_sy + x * a_sx;
            const int64_t wo = y * w_sy + x * w_sx;
            for (int64_t w = 0; w < wpg; ++w) {
                const __m512i m =
                    KP == 8 ? _mm512_loadu_si512((const void *)(w0 + wo + w * 8))
                            : _mm512_inserti64x4(
                                  _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(w0 + wo + w * 4))),
                                  _mm256_loadu_si256((const __m256i *)(w1 + wo + w * 4)), 1);
#pragma GCC unroll 4
                for (int p = 0; p < PB; ++p)
#pragma GCC unroll 8
                    for (int b = 0; b < Q; ++b) {
                        const __m512i q = _mm512_set1_epi64((long long)at[p * a_px + b * wpg + w]);
                        const __m512i v = SIGN ? _mm512_xor_si512(m, q) : _mm512_and_si512(m, q);
                        acc[p][b] = _mm512_add_epi64(acc[p][b], _mm512_popcnt_epi64(v));
                    }
            }
        }
#pragma GCC unroll 4
    for (int p = 0; p < PB; ++p) {
        __m512i total = zero;
#pragma GCC unroll 8
        for (int b = 0; b < Q; ++b) total = _mm512_add_epi64(total, _mm512_slli_epi64(acc[p][b], b));
        _mm512_storeu_si512((void *)(S + p * s_px), total);
    }
}

/* BD_INNER_PB for nco channels: pairs of channels (KP = 4) or single channels (KP = 8) per zmm;
 * an odd last channel of KP = 4 pixel by pixel with the 256-bit lanes. */
static inline __attribute__((always_inline)) void
block_channels_avx512(int64_t *S, int64_t s_px, int64_t nco, int64_t w_co, const uint64_t *a,
                      int64_t a_px, int64_t a_sy, int64_t a_sx, const uint64_t *wt, int64_t w_sy,
                      int64_t w_sx, int64_t ny, int64_t nx, int64_t wpg, const int Q, const int KP,
                      const int SIGN, const int PB)
{
    const int64_t step = KP == 4 ? 2 : 1;
    int64_t i = 0;
    for (; i + step <= nco; i += step)
        block_lanes_avx512(S + i * KP, s_px, a, a_px, a_sy, a_sx, wt + i * w_co, wt + (i + 1) * w_co,
                           w_sy, w_sx, ny, nx, wpg, Q, PB, KP, SIGN);
    for (; i < nco; ++i)
        for (int p = 0; p < PB; ++p)
            _mm256_storeu_si256((__m256i *)(S + p * s_px + i * KP),
                                lanes4_avx512(a + p * a_px, a_sy, a_sx, wt + i * w_co, w_sy, w_sx,
                                              ny, nx, wpg, Q, SIGN));
}

#define BD_BLOCK_ARGS S, s_px, nco, w_co, a, a_px, a_sy, a_sx, wt, w_sy, w_sx, ny, nx, wpg
#define BD_BLOCK_CASES(KP, PB)                                                                     \
    if (sign) { block_channels_avx512(BD_BLOCK_ARGS, 1, KP, 1, PB); return; }                      \
    switch (Q) {                                                                                   \
    case 1: block_channels_avx512(BD_BLOCK_ARGS, 1, KP, 0, PB); return;                            \
    case 2: block_channels_avx512(BD_BLOCK_ARGS, 2, KP, 0, PB); return;                            \
    case 3: block_channels_avx512(BD_BLOCK_ARGS, 3, KP, 0, PB); return;                            \
    case 4: block_channels_avx512(BD_BLOCK_ARGS, 4, KP, 0, PB); return;                            \
    case 5: block_channels_avx512(BD_BLOCK_ARGS, 5, KP, 0, PB); return;                            \
    case 6: block_channels_avx512(BD_BLOCK_ARGS, 6, KP, 0, PB); return;                            \
    case 7: block_channels_avx512(BD_BLOCK_ARGS, 7, KP, 0, PB); return;                            \
    default: block_channels_avx512(BD_BLOCK_ARGS, 8, KP, 0, PB); return;                           \
    }

/* blocks of 4 pixels (Q ≤ 4: 16 accumulators) or 2 (any Q; also the rest of a row) */
static void inner_pb_avx512(int64_t *S, int64_t s_px, int64_t nco, int64_t w_co, const uint64_t *a,
                            int64_t a_px, int64_t a_sy, int64_t a_sx, const uint64_t *wt,
                            int64_t w_sy, int64_t w_sx, int64_t ny, int64_t nx, int64_t wpg,
                            int32_t Q, int32_t kp, int sign, int32_t pb)
{
    const int four = pb == 4 && Q <= 4;
    if (kp == 4) {
        if (four) { BD_BLOCK_CASES(4, 4) } else { BD_BLOCK_CASES(4, 2) }
    } else {
        if (four) { BD_BLOCK_CASES(8, 4) } else { BD_BLOCK_CASES(8, 2) }
    }
}

#define BD_DRIVER_NAME bd_conv_avx512
#define BD_INNER_PB inner_pb_avx512
#define BD_INNER inner_avx512
#include "conv_driver.inc"
#undef BD_DRIVER_NAME
#undef BD_INNER
#undef BD_INNER_PB
#undef BD_PB
#undef BD_BLOCK_ARGS
#undef BD_BLOCK_CASES

/* The kp8 inner step in a loop: broadcast one activation word, AND with 4 registers of 8 basis
 * words, vpopcntq, add; 4 independent chains. */
double bd_peak_avx512(double seconds)
{
    uint64_t a[16], mw[32];
    uint64_t seed = 0x9E3779B97F4A7C15ull;
    for (int i = 0; i < 32; ++i) {
        seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
        mw[i] = seed;
        if (i < 16) a[i] = seed * 0x2545F4914F6CDD1Dull;
    }
    const __m512i zero = _mm512_setzero_si512();
    __m512i m0 = _mm512_loadu_si512((const void *)(mw + 0));
    __m512i m1 = _mm512_loadu_si512((const void *)(mw + 8));
    __m512i m2 = _mm512_loadu_si512((const void *)(mw + 16));
    __m512i m3 = _mm512_loadu_si512((const void *)(mw + 24));
    __m512i total = zero;
    uint64_t pairs = 0;
    const double t0 = bd_now_seconds();
    double t1 = t0;
    do {
        for (int rep = 0; rep < 256; ++rep) {
            /* opaque to the optimiser: each repetition must really be computed */
            __asm__ __volatile__("" : "+v"(m0), "+v"(m1), "+v"(m2), "+v"(m3));
            __m512i c0 = zero, c1 = zero, c2 = zero, c3 = zero;
            for (int i = 0; i < 16; ++i) {
                const __m512i q = _mm512_set1_epi64((long long)a[i]);
                c0 = _mm512_add_epi64(c0, _mm512_popcnt_epi64(_mm512_and_si512(m0, q)));
                c1 = _mm512_add_epi64(c1, _mm512_popcnt_epi64(_mm512_and_si512(m1, q)));
                c2 = _mm512_add_epi64(c2, _mm512_popcnt_epi64(_mm512_and_si512(m2, q)));
                c3 = _mm512_add_epi64(c3, _mm512_popcnt_epi64(_mm512_and_si512(m3, q)));
            }
            total = _mm512_add_epi64(total, _mm512_add_epi64(_mm512_add_epi64(c0, c1),
                                                             _mm512_add_epi64(c2, c3)));
        }
        pairs += 256ull * 16 * 4 * 8;
        t1 = bd_now_seconds();
    } while (t1 - t0 < seconds);
    volatile int64_t sink = _mm512_reduce_add_epi64(total);
    (void)sink;
    return 64.0 * (double)pairs / (t1 - t0);
}

#else /* not x86: never selected (bd_isa_supported says no) */

int bd_conv_avx512(const bd_conv_params *p, const bd_geom *gm, const uint64_t *act,
                   const uint64_t *wpacked, const int32_t *tap_sums, const float *coeffs,
                   const float *bias, float *out, int32_t *acc, int32_t nthreads)
{
    (void)p; (void)gm; (void)act; (void)wpacked; (void)tap_sums; (void)coeffs; (void)bias;
    (void)out; (void)acc; (void)nthreads;
    return BD_EUNSUPPORTED;
}
double bd_peak_avx512(double seconds) { (void)seconds; return 0.0; }

#endif
