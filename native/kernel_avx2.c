/*
 * AVX2 kernels (x86-64 with AVX2 + POPCNT), chosen at run time by select_kernel.c.
 *
 *   conv_kp4_avx2   one output channel, 4 weight lanes (k ≤ 4) in one __m256i: broadcast one
 *                   activation word, AND (XOR) it with the 4 basis words of that (tap, word),
 *                   count bits per byte with the vpshufb nibble table, accumulate bytes for up
 *                   to 31 steps, then widen with vpsadbw into 4 × int64.
 *   conv_kp8_avx2   k > 4: the same over lanes 0–3 and 4–7.
 *   Bit planes 2p and 2p+1 share a byte counter (second nibble table with doubled counts).
 *   For Q ≤ 4 two 4-lane sets (two output channels for kp 4, the two halves of one channel for
 *   kp 8) share each activation broadcast (sets_avx2 with NS = 2); for larger Q their counters
 *   would not fit the 16 ymm registers, so the sets are done one after the other.
 *
 * The pixel loop is conv_driver.inc (shared with the AVX-512 file).  The whole file is compiled
 * for AVX2 via the pragma below; nothing here may be called unless bd_isa_supported(AVX2).
 */
#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)

#pragma GCC target("avx2,popcnt")
#include <immintrin.h>

/* per-byte popcount of 32 bytes (each result byte ≤ 8) */
static inline __m256i pc8_avx2(__m256i x, __m256i lut, __m256i low)
{
    const __m256i lo = _mm256_and_si256(x, low);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
    return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

static inline __m256i nibble_lut(void)
{
    return _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                            0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
}

/* the same table doubled: counts of an odd bit plane, weighted 2 relative to the even one */
static inline __m256i nibble_lut2(void)
{
    return _mm256_setr_epi8(0, 2, 2, 4, 2, 4, 4, 6, 2, 4, 4, 6, 4, 6, 6, 8,
                            0, 2, 2, 4, 2, 4, 4, 6, 2, 4, 4, 6, 4, 6, 6, 8);
}

/* NS independent sets of 4 lanes (set s at ws[s], lane stride 1, (tap, word) stride `ls` words)
 * against the same activations, so each broadcast activation word feeds NS ANDs:
 *   res[s] lane j = Σ_b 2^b Σ popcount(ws[s][j] OP q_b).
 * Bit planes 2p and 2p+1 share one byte counter (the odd plane counted with the doubled table):
 * ≤ 8 + 16 = 24 per byte and step, so counters are widened (vpsadbw) every 10 steps (every 31
 * when Q = 1).  Q, NS, ls and SIGN are compile-time constants after inlining. */
static inline __attribute__((always_inline)) void
sets_avx2(__m256i *res, const int NS, const uint64_t *const *ws, const uint64_t *a, int64_t a_sy,
          int64_t a_sx, int64_t w_sy, int64_t w_sx, int64_t ny, int64_t nx, int64_t wpg,
          const int Q, const int ls, const int SIGN)
{
    const __m256i lut = nibble_lut(), lut2 = nibble_lut2(), low = _mm256_set1_epi8(0x0f);
    const __m256i zero = _mm256_setzero_si256();
    const int NC = (Q + 1) / 2;           /* counters per set */
    const int LIMIT = Q == 1 ? 31 : 10;   /* steps before a byte counter could overflow */
    __m256i tot[2], cnt[2][4];
#pragma GCC unroll 2
    for (int s = 0; s < NS; ++s) {
        tot[s] = zero;
#pragma GCC unroll 4
        for (int c = 0; c < NC; ++c) cnt[s][c] = zero;
    }
    int steps = 0;
    for (int64_t y = 0; y < ny; ++y)
        for (int64_t x = 0; x < nx; ++x) {
            const uint64_t *at = a + y * a_sy + x * a_sx;
            const int64_t wo = y * w_sy + x * w_sx;
            for (int64_t w = 0; w < wpg; ++w) {
                __m256i m[2];
#pragma GCC unroll 2
                for (int s = 0; s < NS; ++s)
                    m[s] = _mm256_loadu_si256((const __m256i *)(ws[s] + wo + w * ls));
#pragma GCC unroll 8
                for (int b = 0; b < Q; ++b) {
                    const __m256i q = _mm256_set1_epi64x((long long)at[b * wpg + w]);
#pragma GCC unroll 2
                    for (int s = 0; s < NS; ++s) {
                        const __m256i v = SIGN ? _mm256_xor_si256(m[s], q) : _mm256_and_si256(m[s], q);
                        cnt[s][b >> 1] =
                            _mm256_add_epi8(cnt[s][b >> 1], pc8_avx2(v, (b & 1) ? lut2 : lut, low));
                    }
                }
                if (++steps == LIMIT) {
#pragma GCC unroll 2
                    for (int s = 0; s < NS; ++s)
#pragma GCC unroll 4
                        for (int c = 0; c < NC; ++c) {
                            tot[s] = _mm256_add_epi64(
                                tot[s], _mm256_slli_epi64(_mm256_sad_epu8(cnt[s][c], zero), 2 * c));
                            cnt[s][c] = zero;
                        }
                    steps = 0;
                }
            }
        }
#pragma GCC unroll 2
    for (int s = 0; s < NS; ++s) {
#pragma GCC unroll 4
        for (int c = 0; c < NC; ++c)
            tot[s] = _mm256_add_epi64(tot[s],
                                      _mm256_slli_epi64(_mm256_sad_epu8(cnt[s][c], zero), 2 * c));
        res[s] = tot[s];
    }
}

/* S[i·KP + j] for nco output channels (weights of channel i at wt + i·w_co) */
static inline __attribute__((always_inline)) void
channels_avx2(int64_t *S, int64_t nco, int64_t w_co, const uint64_t *a, int64_t a_sy,
              int64_t a_sx, const uint64_t *wt, int64_t w_sy, int64_t w_sx, int64_t ny,
              int64_t nx, int64_t wpg, const int Q, const int KP, const int SIGN)
{
    int64_t i = 0;
    if (Q <= 4) { /* two 4-lane sets share the activation broadcasts */
        for (; i + (KP == 4 ? 2 : 1) <= nco; i += (KP == 4 ? 2 : 1)) {
            /* kp 4: channels i and i+1; kp 8: lanes 0–3 and 4–7 of channel i */
            const uint64_t *ws[2] = {wt + i * w_co, KP == 4 ? wt + (i + 1) * w_co : wt + i * w_co + 4};
            __m256i r[2];
            sets_avx2(r, 2, ws, a, a_sy, a_sx, w_sy, w_sx, ny, nx, wpg, Q, KP, SIGN);
            _mm256_storeu_si256((__m256i *)(S + i * KP), r[0]);
            _mm256_storeu_si256((__m256i *)(S + i * KP + 4), r[1]);
        }
    }
    for (; i < nco; ++i) {
        /* one set at a time: lanes 0–3 (kp 4), or lanes 0–3 then 4–7 (kp 8) */
        for (int h = 0; h < KP / 4; ++h) {
            const uint64_t *ws[1] = {wt + i * w_co + 4 * h};
            __m256i r[1];
            sets_avx2(r, 1, ws, a, a_sy, a_sx, w_sy, w_sx, ny, nx, wpg, Q, KP, SIGN);
            _mm256_storeu_si256((__m256i *)(S + i * KP + 4 * h), r[0]);
        }
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
static void conv_kp4_avx2(int64_t *S, int64_t nco, int64_t w_co, const uint64_t *a, int64_t a_sy,
                          int64_t a_sx, const uint64_t *wt, int64_t w_sy, int64_t w_sx, int64_t ny,
                          int64_t nx, int64_t wpg, int32_t Q, int sign)
{
    BD_CHANNELS_CASES(channels_avx2, 4)
}

/* 4 < k ≤ 8 */
static void conv_kp8_avx2(int64_t *S, int64_t nco, int64_t w_co, const uint64_t *a, int64_t a_sy,
                          int64_t a_sx, const uint64_t *wt, int64_t w_sy, int64_t w_sx, int64_t ny,
                          int64_t nx, int64_t wpg, int32_t Q, int sign)
{
    BD_CHANNELS_CASES(channels_avx2, 8)
}

static void inner_avx2(int64_t *S, int64_t nco, int64_t w_co, const uint64_t *a, int64_t a_sy,
                       int64_t a_sx, const uint64_t *wt, int64_t w_sy, int64_t w_sx, int64_t ny,
                       int64_t nx, int64_t wpg, int32_t Q, int32_t kp, int sign)
{
    if (kp == 4)
        conv_kp4_avx2(S, nco, w_co, a, a_sy, a_sx, wt, w_sy, w_sx, ny, nx, wpg, Q, sign);
    else
        conv_kp8_avx2(S, nco, w_co, a, a_sy, a_sx, wt, w_sy, w_sx, ny, nx, wpg, Q, sign);
}

#define BD_DRIVER_NAME bd_conv_avx2
#define BD_INNER inner_avx2
#include "conv_driver.inc"
#undef BD_DRIVER_NAME
#undef BD_INNER

/* The kernel's inner step in a loop: broadcast one activation word, AND with 4 registers of 4
 * basis words, nibble popcount, byte accumulate; 4 independent chains. */
double bd_peak_avx2(double seconds)
{
    uint64_t a[16], mw[16];
    uint64_t seed = 0x9E3779B97F4A7C15ull;
    for (int i = 0; i < 16; ++i) {
        seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
        a[i] = seed;
        seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
        mw[i] = seed;
    }
    const __m256i lut = nibble_lut(), low = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
    __m256i m0 = _mm256_loadu_si256((const __m256i *)(mw + 0));
    __m256i m1 = _mm256_loadu_si256((const __m256i *)(mw + 4));
    __m256i m2 = _mm256_loadu_si256((const __m256i *)(mw + 8));
    __m256i m3 = _mm256_loadu_si256((const __m256i *)(mw + 12));
    __m256i total = zero;
    uint64_t pairs = 0;
    const double t0 = bd_now_seconds();
    double t1 = t0;
    do {
        for (int rep = 0; rep < 256; ++rep) {
            /* opaque to the optimiser: each repetition must really be computed */
            __asm__ __volatile__("" : "+x"(m0), "+x"(m1), "+x"(m2), "+x"(m3));
            __m256i c0 = zero, c1 = zero, c2 = zero, c3 = zero;
            for (int i = 0; i < 16; ++i) { /* 16 steps < 32: byte counters cannot overflow */
                const __m256i q = _mm256_set1_epi64x((long long)a[i]);
                c0 = _mm256_add_epi8(c0, pc8_avx2(_mm256_and_si256(m0, q), lut, low));
                c1 = _mm256_add_epi8(c1, pc8_avx2(_mm256_and_si256(m1, q), lut, low));
                c2 = _mm256_add_epi8(c2, pc8_avx2(_mm256_and_si256(m2, q), lut, low));
                c3 = _mm256_add_epi8(c3, pc8_avx2(_mm256_and_si256(m3, q), lut, low));
            }
            total = _mm256_add_epi64(total, _mm256_sad_epu8(c0, zero));
            total = _mm256_add_epi64(total, _mm256_sad_epu8(c1, zero));
            total = _mm256_add_epi64(total, _mm256_sad_epu8(c2, zero));
            total = _mm256_add_epi64(total, _mm256_sad_epu8(c3, zero));
        }
        pairs += 256ull * 16 * 4 * 4;
        t1 = bd_now_seconds();
    } while (t1 - t0 < seconds);
    volatile int64_t sink = _mm256_extract_epi64(total, 0) + _mm256_extract_epi64(total, 3);
    (void)sink;
    return 64.0 * (double)pairs / (t1 - t0);
}

#else /* not x86: never selected (bd_isa_supported says no) */

int bd_conv_avx2(const bd_conv_params *p, const bd_geom *gm, const uint64_t *act,
                 const uint64_t *wpacked, const int32_t *tap_sums, const float *coeffs,
                 const float *bias, float *out, int32_t *acc, int32_t nthreads)
{
    (void)p; (void)gm; (void)act; (void)wpacked; (void)tap_sums; (void)coeffs; (void)bias;
    (void)out; (void)acc; (void)nthreads;
    return BD_EUNSUPPORTED;
}
double bd_peak_avx2(double seconds) { (void)seconds; return 0.0; }

#endif
