/*
 * AVX2 kernels (x86-64 with AVX2 + POPCNT), chosen at run time by select_kernel.c.
 *
 *   conv_kp4_avx2   one output channel, 4 weight lanes (k ≤ 4) in one __m256i: broadcast one
 *                   activation word, AND (XOR) it with the 4 basis words of that (tap, word),
 *                   count bits per byte with the vpshufb nibble table, accumulate bytes for up
 *                   to 31 steps, then widen with vpsadbw into 4 × int64.
 *   conv_kp8_avx2   k > 4: the same over lanes 0–3 and 4–7.
 *   For Q ≤ 4 two such 4-lane sets (two output channels for kp 4, the two halves of one channel
 *   for kp 8) share each activation broadcast (lanes4x2_avx2); for Q > 4 the 2·Q byte counters
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

/* Four lanes starting at wt (lane stride 1, (tap, word) stride `ls` words):
 *   lane j = Σ_b 2^b Σ popcount(wt[j] OP q_b).   Q, ls and SIGN are compile-time constants
 *   after inlining into the switch below. */
static inline __attribute__((always_inline)) __m256i
lanes4_avx2(const uint64_t *a, int64_t a_sy, int64_t a_sx, const uint64_t *wt, int64_t w_sy,
            int64_t w_sx, int64_t ny, int64_t nx, int64_t wpg, const int Q, const int ls,
            const int SIGN)
{
    const __m256i lut = nibble_lut(), low = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
    __m256i acc[8], cnt[8];
#pragma GCC unroll 8
    for (int b = 0; b < Q; ++b) acc[b] = cnt[b] = zero;
    int steps = 0; /* byte counters hold ≤ 8 per step: flush before 32 steps */
    for (int64_t y = 0; y < ny; ++y)
        for (int64_t x = 0; x < nx; ++x) {
            const uint64_t *at = a + y * a_sy + x * a_sx;
            const uint64_t *wq = wt + y * w_sy + x * w_sx;
            for (int64_t w = 0; w < wpg; ++w) {
                const __m256i m = _mm256_loadu_si256((const __m256i *)(wq + w * ls));
#pragma GCC unroll 8
                for (int b = 0; b < Q; ++b) {
                    const __m256i q = _mm256_set1_epi64x((long long)at[b * wpg + w]);
                    const __m256i v = SIGN ? _mm256_xor_si256(m, q) : _mm256_and_si256(m, q);
                    cnt[b] = _mm256_add_epi8(cnt[b], pc8_avx2(v, lut, low));
                }
                if (++steps == 31) {
#pragma GCC unroll 8
                    for (int b = 0; b < Q; ++b) {
                        acc[b] = _mm256_add_epi64(acc[b], _mm256_sad_epu8(cnt[b], zero));
                        cnt[b] = zero;
                    }
                    steps = 0;
                }
            }
        }
    __m256i total = zero;
#pragma GCC unroll 8
    for (int b = 0; b < Q; ++b) {
        acc[b] = _mm256_add_epi64(acc[b], _mm256_sad_epu8(cnt[b], zero));
        total = _mm256_add_epi64(total, _mm256_slli_epi64(acc[b], b));
    }
    return total;
}

/* Two independent sets of 4 lanes (at wa and wb, same layout) against the same activations:
 * each broadcast activation word feeds two ANDs.  Used for two output channels (kp = 4) or the
 * two halves of one channel (kp = 8).  Needs 2·Q byte counters: only for Q ≤ 4. */
static inline __attribute__((always_inline)) void
lanes4x2_avx2(__m256i *ra, __m256i *rb, const uint64_t *a, int64_t a_sy, int64_t a_sx,
              const uint64_t *wa, const uint64_t *wb, int64_t w_sy, int64_t w_sx, int64_t ny,
              int64_t nx, int64_t wpg, const int Q, const int ls, const int SIGN)
{
    const __m256i lut = nibble_lut(), low = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
    __m256i acc_a[4], cnt_a[4], acc_b[4], cnt_b[4];
#pragma GCC unroll 4
    for (int b = 0; b < Q; ++b) acc_a[b] = cnt_a[b] = acc_b[b] = cnt_b[b] = zero;
    int steps = 0;
    for (int64_t y = 0; y < ny; ++y)
        for (int64_t x = 0; x < nx; ++x) {
            const uint64_t *at = a + y * a_sy + x * a_sx;
            const int64_t wo = y * w_sy + x * w_sx;
            for (int64_t w = 0; w < wpg; ++w) {
                const __m256i ma = _mm256_loadu_si256((const __m256i *)(wa + wo + w * ls));
                const __m256i mb = _mm256_loadu_si256((const __m256i *)(wb + wo + w * ls));
#pragma GCC unroll 4
                for (int b = 0; b < Q; ++b) {
                    const __m256i q = _mm256_set1_epi64x((long long)at[b * wpg + w]);
                    const __m256i va = SIGN ? _mm256_xor_si256(ma, q) : _mm256_and_si256(ma, q);
                    const __m256i vb = SIGN ? _mm256_xor_si256(mb, q) : _mm256_and_si256(mb, q);
                    cnt_a[b] = _mm256_add_epi8(cnt_a[b], pc8_avx2(va, lut, low));
                    cnt_b[b] = _mm256_add_epi8(cnt_b[b], pc8_avx2(vb, lut, low));
                }
                if (++steps == 31) {
#pragma GCC unroll 4
                    for (int b = 0; b < Q; ++b) {
                        acc_a[b] = _mm256_add_epi64(acc_a[b], _mm256_sad_epu8(cnt_a[b], zero));
                        acc_b[b] = _mm256_add_epi64(acc_b[b], _mm256_sad_epu8(cnt_b[b], zero));
                        cnt_a[b] = cnt_b[b] = zero;
                    }
                    steps = 0;
                }
            }
        }
    __m256i ta = zero, tb = zero;
#pragma GCC unroll 4
    for (int b = 0; b < Q; ++b) {
        acc_a[b] = _mm256_add_epi64(acc_a[b], _mm256_sad_epu8(cnt_a[b], zero));
        acc_b[b] = _mm256_add_epi64(acc_b[b], _mm256_sad_epu8(cnt_b[b], zero));
        ta = _mm256_add_epi64(ta, _mm256_slli_epi64(acc_a[b], b));
        tb = _mm256_add_epi64(tb, _mm256_slli_epi64(acc_b[b], b));
    }
    *ra = ta;
    *rb = tb;
}

/* S[i·KP + j] for nco output channels (weights of channel i at wt + i·w_co) */
static inline __attribute__((always_inline)) void
channels_avx2(int64_t *S, int64_t nco, int64_t w_co, const uint64_t *a, int64_t a_sy,
              int64_t a_sx, const uint64_t *wt, int64_t w_sy, int64_t w_sx, int64_t ny,
              int64_t nx, int64_t wpg, const int Q, const int KP, const int SIGN)
{
    int64_t i = 0;
    if (Q <= 4) { /* pairs of 4-lane sets share the activation broadcasts */
        if (KP == 4) {
            for (; i + 2 <= nco; i += 2) {
                __m256i r0, r1;
                lanes4x2_avx2(&r0, &r1, a, a_sy, a_sx, wt + i * w_co, wt + (i + 1) * w_co, w_sy,
                              w_sx, ny, nx, wpg, Q, KP, SIGN);
                _mm256_storeu_si256((__m256i *)(S + i * KP), r0);
                _mm256_storeu_si256((__m256i *)(S + (i + 1) * KP), r1);
            }
        } else {
            for (; i < nco; ++i) {
                __m256i r0, r1;
                lanes4x2_avx2(&r0, &r1, a, a_sy, a_sx, wt + i * w_co, wt + i * w_co + 4, w_sy, w_sx,
                              ny, nx, wpg, Q, KP, SIGN);
                _mm256_storeu_si256((__m256i *)(S + i * KP), r0);
                _mm256_storeu_si256((__m256i *)(S + i * KP + 4), r1);
            }
        }
    }
    for (; i < nco; ++i) {
        const uint64_t *wi = wt + i * w_co;
        /* KP = 4: lanes 0–3 in one register; KP = 8: two passes over lanes 0–3 and 4–7 */
        for (int h = 0; h < KP / 4; ++h)
            _mm256_storeu_si256((__m256i *)(S + i * KP + 4 * h),
                                lanes4_avx2(a, a_sy, a_sx, wi + 4 * h, w_sy, w_sx, ny, nx, wpg, Q,
                                            KP, SIGN));
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
