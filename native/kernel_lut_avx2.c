/*
 * Lookup-table kernel family (T-MAC style), AVX2 + POPCNT; chosen per layer (bd_conv_lut).
 *
 * Affine mode, Q ≤ 8.  Instead of one AND + popcount per weight bit, activation bit plane
 * and channel, the activation codes of every quad of channels (4u … 4u+3 of a group, at one input
 * pixel) are turned into a 16-entry table once per input pixel:
 *
 *   T[idx] = Σ_{i<4, bit i of idx set} q_{4u+i}         (≤ 4·(2^Q − 1) ≤ 252 at Q ≤ 6: one byte)
 *
 * (for Q > 6 two tables, of the codes' low and high nibbles, and S = S_low + 16·S_high: twice
 * the lookups of Q ≤ 6, against twice the AND + popcounts of Q = 4 at Q = 8)
 * and each basis j of each output channel indexes it with its 4 weight bits of that (tap, quad)
 * (a nibble): Σ_{d: m_jd = +1} q_d = Σ_{tap, quad} T[nibble].  One vpshufb does 32 such lookups
 * (32 (co, j) lanes against one broadcast table), independent of Q.  The lane sums are exactly
 * S_j = Σ_b 2^b P_jb of the popcount kernels, so the epilogue (A_j = 2 S_j − N − z·Sv_j, float
 * output) is the same code (output_transform.h) and results are bit-identical.
 *
 * Counters: bytes for F = ⌊255 / (4·qmax)⌋ steps (qmax of the largest table set: 4 at Q = 4, 2 at
 * Q = 5, 1 at Q = 6: one set, whose flushes cost Q = 5 1.2x and Q = 6 1.7x the time of Q = 4, where
 * two sets cost 1.75x), then split into even/odd 16-bit counters (≤ 256 flushes of ≤ 255 each),
 * then added to int32 lane sums.
 *
 * Layouts (internal; see bdecomp.h "LUT weights"):
 *   tables  uint8 [pixel][G][set][nq][16], nq = ceil(Cg/4), set < bd_lut_sets(Q, 4), built per
 *           call from the packed activations, over input rows widened by the left and right
 *           padding.  The padding columns hold the tables of codes z: output pixels near the left
 *           and right edges then share passes (and weight loads) with their neighbours, each
 *           pass running the hull of the pixels' valid column taps; the extra taps add z·(their
 *           +1 weights), which N and z·Sv over the same taps cancel exactly.
 *   weights uint8 [G][npass][KH·KW][nq][4 blocks][32 bytes], one nibble per byte; lane L of a group
 *           (L = j·Cout/G + co_local, basis-major, L < Cout/G·k) is block b = L/32 of pass L/128, byte lane
 *           l = 2s (s < 16) or 2(s − 16) + 1 (s ≥ 16) for s = L % 32 (the order the even/odd
 *           16-bit counters come out in).  Missing lanes and channels ≥ Cg are zero nibbles.
 *
 * AVX-512 machines run this same code (they all have AVX2): the family is ISA-independent above
 * the scalar reference.  The driver (tables over widened rows, passes over each output row, the
 * epilogue) is lut_driver.inc, shared with the 64-entry family of kernel_lut64_avx512.c.
 */
#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)

/* kernel_lut_avx512.c compiles this file again with BD_LUT_AVX512VL: the same 256-bit code with
 * AVX-512VL's 32 vector registers, where the passes' accumulators, weights and tables no longer
 * spill (AVX2 has 16) */
#ifdef BD_LUT_AVX512VL
#pragma GCC target("avx2,popcnt,avx512f,avx512vl,avx512bw")
#define BD_CONV_LUT_FN bd_conv_lut_avx512vl
#else
#pragma GCC target("avx2,popcnt")
#define BD_CONV_LUT_FN bd_conv_lut_avx2
#endif
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "output_transform.h"
#include "epilogue_avx2.h"

#define LUT_BLOCKS 4 /* 32-lane blocks per pass (accumulators in registers) */
#define LUT_MAX_PX 4     /* output pixels per pass (sharing the weight loads) */
#ifdef BD_LUT_AVX512VL
#define LUT_MAX_ACC 16   /* byte counters in registers per pass: pixels · blocks (32 registers) */
#define LUT_REGS 32
#else
#define LUT_MAX_ACC 8    /* byte counters in registers per pass: pixels · blocks (AVX2's 16) */
#define LUT_REGS 16
#endif
#define LUT_MAX_SETS 2   /* table sets: all the planes, or for Q > 6 the codes' low and high nibbles */

static inline int64_t lut_lane_byte(int64_t s) { return s < 16 ? 2 * s : 2 * (s - 16) + 1; }

#ifndef BD_LUT_AVX512VL /* the layout helpers: once, in the AVX2 build */
int64_t bd_lut_nq(const bd_geom *gm) { return (gm->cg + 3) / 4; }

int64_t bd_lut_npass(const bd_conv_params *p, const bd_geom *gm)
{
    const int64_t lanes = gm->coutg * p->k;
    return (lanes + 32 * LUT_BLOCKS - 1) / (32 * LUT_BLOCKS);
}

/* weight bytes: G·npass·taps·nq·128 (overflow-checked by the caller) */
void bd_lut_pack_weights(const bd_conv_params *p, const bd_geom *gm, const uint64_t *wpacked,
                         uint8_t *wl)
{
    const int64_t G = p->groups, K = p->k, KP = gm->kp, T = gm->taps, WPG = gm->wpg;
    const int64_t nq = bd_lut_nq(gm), npass = bd_lut_npass(p, gm), lanes = gm->coutg * K;
    memset(wl, 0, (size_t)(G * npass * T * nq * 128));
    for (int64_t g = 0; g < G; ++g)
        for (int64_t L = 0; L < lanes; ++L) {
            const int64_t co = g * gm->coutg + L % gm->coutg, j = L / gm->coutg; /* basis-major */
            const int64_t ps = L / 128, blk = (L % 128) / 32, l = lut_lane_byte(L % 32);
            for (int64_t t = 0; t < T; ++t)
                for (int64_t u = 0; u < nq; ++u) {
                    const int64_t c0 = 4 * u;
                    const uint64_t m = wpacked[((co * T + t) * WPG + c0 / 64) * KP + j];
                    const uint8_t nib = (uint8_t)((m >> (c0 % 64)) & 15u);
                    wl[((((g * npass + ps) * T + t) * nq + u) * LUT_BLOCKS + blk) * 32 + l] = nib;
                }
        }
}
#endif

/* Byte j of the result: 0xFF if bit j of m is set, else 0 */
static inline __attribute__((always_inline)) __m256i expand_bits32(uint32_t m)
{
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i x = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)m), spread), bit);
    return _mm256_cmpeq_epi8(x, bit);
}

/* The 16-byte tables of every (pixel, group, quad) from the packed bit planes: for Q ≤ 6 one set
 * from every plane, T[idx] = Σ_{i ∈ idx} q_{4u+i}; for Q > 6 set 0 from planes 0…3,
 * T[idx] = Σ_{i ∈ idx} (q_{4u+i} mod 16), and set 1 from the planes above,
 * T[idx] = Σ_{i ∈ idx} ⌊q_{4u+i} / 16⌋ (so a code's lane sum is S_0 + 16 S_1).  Per (pixel,
 * group, set) and 64 channels: the set's codes as bytes (bit planes spread to bytes, in
 * registers), then for 4 quads at once T = A[idx & 3] + B[idx >> 2] by two vpshufb, with
 * A = (0, c0, c1, c0 + c1) and B = (0, c2, c3, c2 + c3) built from the codes by three more.
 * Channels ≥ Cg have code 0 (the packed planes are zero there).  Layout tab[pixel][G][set][nq][16]
 * of the input rows widened by the left / right zero padding (WP = PL + W + PR pixels per row):
 * the padding columns hold pad_tab, the tables of a pixel whose codes are all the zero point.
 * npad [pixel][G] in the same widened layout: bd_pixel_count, Cg·z in the padding. */
static __attribute__((noinline)) void build_tables(const uint64_t *act, int64_t rows, int64_t W, int64_t PL,
                                                   int64_t WP, int64_t G, int32_t Q, int64_t wpg, int64_t nq,
                                                   const uint8_t *pad_tab, int32_t pad_n, uint8_t *tab,
                                                   int32_t *npad)
{
    const int nsets = bd_lut_sets(Q, 4);
    const int64_t tpix = G * nsets * nq * 16;
    /* from 16 codes broadcast to both 128-bit lanes, lane 0 builds (A, B) of the first 2 quads
     * and lane 1 of the last 2: (0, c0, c1, c0+c1, 0, c2, c3, c2+c3, 0, c4, …) */
    const __m256i pick = _mm256_setr_epi8(-1, 0, 1, -1, -1, 2, 3, -1, -1, 4, 5, -1, -1, 6, 7, -1,
                                          -1, 8, 9, -1, -1, 10, 11, -1, -1, 12, 13, -1, -1, 14, 15, -1);
    const __m256i first = _mm256_setr_epi8(-1, -1, -1, 0, -1, -1, -1, 2, -1, -1, -1, 4, -1, -1, -1, 6,
                                           -1, -1, -1, 8, -1, -1, -1, 10, -1, -1, -1, 12, -1, -1, -1, 14);
    const __m256i second = _mm256_setr_epi8(-1, -1, -1, 1, -1, -1, -1, 3, -1, -1, -1, 5, -1, -1, -1, 7,
                                            -1, -1, -1, 9, -1, -1, -1, 11, -1, -1, -1, 13, -1, -1, -1, 15);
    /* T[idx] = X[idx & 3] + X[4 + (idx >> 2)] for the quad whose X starts at byte 0 (even) or 8 (odd) */
    const __m256i lo_even = _mm256_setr_epi8(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3,
                                             0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
    const __m256i hi_even = _mm256_setr_epi8(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7,
                                             4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7);
    const __m256i eight = _mm256_set1_epi8(8);
    const __m256i lo_odd = _mm256_add_epi8(lo_even, eight), hi_odd = _mm256_add_epi8(hi_even, eight);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
        uint8_t *trow = tab + row * WP * tpix;
        int32_t *nrow = npad + row * WP * G;
        for (int64_t x = 0; x < WP; ++x) /* the padding columns */
            if (x < PL || x >= PL + W) {
                memcpy(trow + x * tpix, pad_tab, (size_t)tpix);
                for (int64_t g = 0; g < G; ++g) nrow[x * G + g] = pad_n;
            }
        for (int64_t pg = 0; pg < W * G; ++pg) {
            const uint64_t *a = act + (row * W * G + pg) * Q * wpg;
            nrow[PL * G + pg] = bd_pixel_count(a, Q, wpg);
            for (int set = 0; set < nsets; ++set) {
                int32_t b0, b1;
                bd_lut_set_planes(Q, nsets, set, &b0, &b1);
                uint8_t *out = trow + (PL * G + pg) * nsets * nq * 16 + set * nq * 16;
                for (int64_t w = 0; w < wpg; ++w) {
                    __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256(); /* channels 0–31, 32–63 */
                    const int upper = 16 * w + 8 < nq; /* channels 32–63 of this word exist */
                    for (int32_t b = b0; b < b1; ++b) {
                        const uint64_t m = a[b * wpg + w];
                        const __m256i v = _mm256_set1_epi8((char)(1 << (b - b0)));
                        lo = _mm256_or_si256(lo, _mm256_and_si256(expand_bits32((uint32_t)m), v));
                        if (upper) hi = _mm256_or_si256(hi, _mm256_and_si256(expand_bits32((uint32_t)(m >> 32)), v));
                    }
                    for (int64_t ch = 0; ch < 4 && 16 * w + 4 * ch < nq; ++ch) { /* quads 16w + 4ch … + 3 */
                        /* (immediates must be literal: -O1 builds do not fold a computed one) */
                        const __m256i src = ch < 2 ? lo : hi;
                        const __m256i c = ch % 2 ? _mm256_permute2x128_si256(src, src, 0x11)
                                                 : _mm256_permute2x128_si256(src, src, 0x00);
                        const __m256i X = _mm256_add_epi8(_mm256_shuffle_epi8(c, pick),
                                                          _mm256_add_epi8(_mm256_shuffle_epi8(c, first),
                                                                          _mm256_shuffle_epi8(c, second)));
                        const __m256i te = _mm256_add_epi8(_mm256_shuffle_epi8(X, lo_even),
                                                           _mm256_shuffle_epi8(X, hi_even));
                        const __m256i to = _mm256_add_epi8(_mm256_shuffle_epi8(X, lo_odd),
                                                           _mm256_shuffle_epi8(X, hi_odd));
                        /* te: the 1st (lane 0) and 3rd (lane 1) quads; to: the 2nd and 4th */
                        const __m256i t01 = _mm256_permute2x128_si256(te, to, 0x20);
                        const __m256i t23 = _mm256_permute2x128_si256(te, to, 0x31);
                        const int64_t u = 16 * w + 4 * ch, left = nq - u;
                        uint8_t *o = out + 16 * u;
                        if (left >= 4) {
                            _mm256_storeu_si256((__m256i *)o, t01);
                            _mm256_storeu_si256((__m256i *)(o + 32), t23);
                        } else {
                            _mm_storeu_si128((__m128i *)o, _mm256_castsi256_si128(t01));
                            if (left > 1) _mm_storeu_si128((__m128i *)(o + 16), _mm256_extracti128_si256(t01, 1));
                            if (left > 2) _mm_storeu_si128((__m128i *)(o + 32), _mm256_castsi256_si128(t23));
                        }
                    }
                }
            }
        }
    }
}

/* The 16-bit counters of one block: c[0] += a8 taken as 16-bit words (even byte + 256·odd
 * byte), c[1] += the odd bytes.  The even lanes' sum is then c[0] − 256·c[1] mod 2^16, exact
 * while both sums stay below 2^16 (≤ 256 flushes of ≤ 255 each): one operation fewer than
 * masking the even bytes out at every flush. */
static inline __attribute__((always_inline)) void flush8(__m256i *c, __m256i a8)
{
    _mm256_store_si256(c, _mm256_add_epi16(_mm256_load_si256(c), a8));
    _mm256_store_si256(c + 1, _mm256_add_epi16(_mm256_load_si256(c + 1), _mm256_srli_epi16(a8, 8)));
}

/* s32[0..31] (+)= the lane sums of the 16-bit counters (even lanes → s 0..15, odd → 16..31),
 * which are zeroed; `add` = 0 stores instead of adding (a pass's first spill) */
static inline __attribute__((always_inline)) void spill16(int32_t *s32, __m256i *c, int add)
{
    __m256i *d = (__m256i *)s32;
    const __m256i o = _mm256_load_si256(c + 1), e = _mm256_sub_epi16(_mm256_load_si256(c), _mm256_slli_epi16(o, 8));
    const __m256i v[4] = {_mm256_cvtepu16_epi32(_mm256_castsi256_si128(e)),
                          _mm256_cvtepu16_epi32(_mm256_extracti128_si256(e, 1)),
                          _mm256_cvtepu16_epi32(_mm256_castsi256_si128(o)),
                          _mm256_cvtepu16_epi32(_mm256_extracti128_si256(o, 1))};
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i)
        _mm256_storeu_si256(d + i, add ? _mm256_add_epi32(_mm256_loadu_si256(d + i), v[i]) : v[i]);
    _mm256_store_si256(c, _mm256_setzero_si256());
    _mm256_store_si256(c + 1, _mm256_setzero_si256());
}

/* One pass: R blocks of 32 lanes over ny × nx taps, for NP (1, 2 or 4) output pixels whose
 * tables are t_px bytes apart (the pixels share every weight load); stores the lane sums of
 * pixel i to s32[i·s32_px + R·32] (block r, s = 0..31 in the order of lut_lane_byte).  The NP·R
 * byte counters live in registers (NP·R ≤ LUT_MAX_ACC, with R weights and the tables: ≤ 13 of
 * AVX2's 16 ymm, ≤ 24 of AVX-512VL's 32), the 16-bit counters (2·R per pixel) too when they fit
 * (a local array, else c16buf: spilled by the compiler they were 10 % slower at NP·R = 16); they
 * are updated once per chunk of ≤ F quads of one tap.  A chunk starts its byte counters
 * with its first lookup and has no branch inside, so the counters stay in fixed registers (a
 * flush test per step made the compiler rotate them through register moves). */
static inline __attribute__((always_inline)) void
lut_pass(int32_t *s32, int64_t s32_px, __m256i *c16buf, const uint8_t *tp0, int64_t t_px, int64_t t_sy,
         int64_t t_sx, const uint8_t *wp0, int64_t w_sy, int64_t w_sx, int64_t ny, int64_t nx, int64_t nq,
         const int R, const int NP, int F)
{
    __m256i a[LUT_MAX_PX][LUT_BLOCKS], local[2 * LUT_MAX_ACC];
    __m256i *c16 = 3 * NP * R + R + 2 <= LUT_REGS ? local : c16buf; /* counters, weights, table, mask */
#pragma GCC unroll 32
    for (int r = 0; r < 2 * NP * R; ++r) _mm256_store_si256(c16 + r, _mm256_setzero_si256());
    int flushes = 0, spilled = 0;
    for (int64_t y = 0; y < ny; ++y)
        for (int64_t x = 0; x < nx; ++x) {
            const uint8_t *tp = tp0 + y * t_sy + x * t_sx;
            const uint8_t *wu = wp0 + y * w_sy + x * w_sx;
            for (int64_t u0 = 0; u0 < nq; u0 += F) {
                const int64_t u1 = u0 + F < nq ? u0 + F : nq;
                for (int64_t u = u0; u < u1; ++u, tp += 16, wu += 32 * LUT_BLOCKS) {
                    __m256i w[LUT_BLOCKS];
#pragma GCC unroll 4
                    for (int r = 0; r < R; ++r) w[r] = _mm256_loadu_si256((const __m256i *)(wu + 32 * r));
#pragma GCC unroll 4
                    for (int i = 0; i < NP; ++i) {
                        const __m256i tab = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tp + i * t_px)));
#pragma GCC unroll 4
                        for (int r = 0; r < R; ++r) {
                            const __m256i v = _mm256_shuffle_epi8(tab, w[r]);
                            a[i][r] = u == u0 ? v : _mm256_add_epi8(a[i][r], v);
                        }
                    }
                }
#pragma GCC unroll 4
                for (int i = 0; i < NP; ++i)
#pragma GCC unroll 4
                    for (int r = 0; r < R; ++r) flush8(c16 + 2 * (i * R + r), a[i][r]);
                if (__builtin_expect(++flushes == 256, 0)) { /* 16-bit counters full (≤ 256 · 255) */
#pragma GCC unroll 4
                    for (int i = 0; i < NP; ++i)
#pragma GCC unroll 4
                        for (int r = 0; r < R; ++r) spill16(s32 + i * s32_px + 32 * r, c16 + 2 * (i * R + r), spilled);
                    flushes = 0;
                    spilled = 1;
                }
            }
        }
#pragma GCC unroll 4
    for (int i = 0; i < NP; ++i)
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) spill16(s32 + i * s32_px + 32 * r, c16 + 2 * (i * R + r), spilled);
}

#define LUT_PASS_FN(R, NP)                                                                        \
    static __attribute__((noinline)) void lut_pass##R##_##NP(                                     \
        int32_t *s32, int64_t s32_px, __m256i *c16buf, const uint8_t *tp0, int64_t t_px,          \
        int64_t t_sy, int64_t t_sx, const uint8_t *wp0, int64_t w_sy, int64_t w_sx, int64_t ny,   \
        int64_t nx, int64_t nq, int F)                                                            \
    {                                                                                             \
        lut_pass(s32, s32_px, c16buf, tp0, t_px, t_sy, t_sx, wp0, w_sy, w_sx, ny, nx, nq, R, NP, F); \
    }
LUT_PASS_FN(1, 1)
LUT_PASS_FN(2, 1)
LUT_PASS_FN(3, 1)
LUT_PASS_FN(4, 1)
LUT_PASS_FN(1, 2)
LUT_PASS_FN(2, 2)
LUT_PASS_FN(3, 2)
LUT_PASS_FN(4, 2)
LUT_PASS_FN(1, 4)
LUT_PASS_FN(2, 4)
#if LUT_MAX_ACC >= 16
LUT_PASS_FN(3, 4)
LUT_PASS_FN(4, 4)
#define LUT_PASS3_4 lut_pass3_4
#define LUT_PASS4_4 lut_pass4_4
#else
#define LUT_PASS3_4 NULL
#define LUT_PASS4_4 NULL
#endif

typedef void (*lut_pass_fn)(int32_t *, int64_t, __m256i *, const uint8_t *, int64_t, int64_t, int64_t,
                            const uint8_t *, int64_t, int64_t, int64_t, int64_t, int64_t, int);
/* [1, 2 or 4 pixels][R]; NP·R ≤ LUT_MAX_ACC (4 pixels: R ≤ 2 on AVX2, any R with AVX-512VL) */
static const lut_pass_fn lut_passes[3][LUT_BLOCKS + 1] = {
    {lut_pass1_1, lut_pass1_1, lut_pass2_1, lut_pass3_1, lut_pass4_1},
    {lut_pass1_2, lut_pass1_2, lut_pass2_2, lut_pass3_2, lut_pass4_2},
    {lut_pass1_4, lut_pass1_4, lut_pass2_4, LUT_PASS3_4, LUT_PASS4_4}};

#define LUT_NG(gm) bd_lut_nq(gm)
#define LUT_NPASS(p, gm) bd_lut_npass(p, gm)
#define LUT_TB 16 /* bytes per table */
#define LUT_BL 32 /* lanes per block */
#define LUT_GCH 4 /* channels per table (a quad) */
#define LUT_GROUP_CH0(u) (4 * (u))
#define LUT_GROUP_N(u) 4
#define LUT_BUILD_TABLES build_tables
#define LUT_PASSES lut_passes
#include "lut_driver.inc"

#else /* not x86 */
#ifndef BD_LUT_AVX512VL

int64_t bd_lut_nq(const bd_geom *gm) { return (gm->cg + 3) / 4; }
int64_t bd_lut_npass(const bd_conv_params *p, const bd_geom *gm)
{
    return (gm->coutg * p->k + 127) / 128;
}
void bd_lut_pack_weights(const bd_conv_params *p, const bd_geom *gm, const uint64_t *wpacked,
                         uint8_t *wl)
{
    (void)p; (void)gm; (void)wpacked; (void)wl;
}
int bd_conv_lut_avx2(const bd_conv_params *p, const bd_geom *gm, const uint64_t *act,
                     const uint8_t *wl, const int32_t *tap_sums, const float *coeffs,
                     const float *bias, float *out, int32_t *acc, int32_t nthreads)
{
    (void)p; (void)gm; (void)act; (void)wl; (void)tap_sums; (void)coeffs; (void)bias;
    (void)out; (void)acc; (void)nthreads;
    return BD_EUNSUPPORTED;
}
int bd_conv_lut_avx512vl(const bd_conv_params *p, const bd_geom *gm, const uint64_t *act,
                         const uint8_t *wl, const int32_t *tap_sums, const float *coeffs,
                         const float *bias, float *out, int32_t *acc, int32_t nthreads)
{
    return bd_conv_lut_avx2(p, gm, act, wl, tap_sums, coeffs, bias, out, acc, nthreads);
}

#endif
#endif
