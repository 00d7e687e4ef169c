/*
 * Lookup-table kernel family with 64-entry tables (AVX-512 VBMI vpermb); chosen per layer
 * (bd_conv_lut64), where it is faster than the 16-entry tables of kernel_lut_avx2.c.
 *
 * The same arithmetic as kernel_lut_avx2.c (read its header first), with groups of 6 input
 * channels instead of quads: per input pixel and group of channels 6s … 6s + 5 of a 64-channel
 * word (s < 10; s = 10 holds channels 60 … 63),
 *
 *   T[idx] = Σ_{i<6, bit i of idx set} q_i          (≤ 6·31 = 186 at Q ≤ 5: one byte; Q > 5: two sets)
 *
 * a 64-byte table that fills one zmm register, and each (channel, basis) lane indexes it with the
 * 6 weight bits of that (tap, group): one vpermb does 64 lanes × 6 channels where vpshufb does 32
 * × 4 (Intel Xeon with AVX-512: 2.2x the lane-channel rate of the 256-bit vpshufb loop in a
 * micro-benchmark; whole layers 1.03–1.5x on 128–512-channel 3×3 layers, the flushes every two
 * lookups and the tables taking the rest).  Tables are 64 bytes per 6 channels (16 per 4 there),
 * so small layers, whose tables cost more than their lookups, stay on the other family: the
 * runtime times both.  The driver (tables over widened rows, passes, epilogue) is
 * lut_driver.inc, shared with kernel_lut_avx2.c; this file has the tables, passes and layouts.
 *
 * Counters: bytes for F = ⌊255 / (6·qmax)⌋ steps (qmax of the largest table set: 2 at Q = 4, 1 at
 * Q = 5), then even / odd 16-bit counters, then int32 lane sums: the lane sums S_j of the other
 * kernels, the same epilogue, the same bits.
 *
 * Layouts (internal):
 *   groups  per conv group: 11 per 64-channel word (the last word: ⌈r / 6⌉ for r ≤ 60 channels
 *           left), u = 11·w + s;  bd_lut64_ng
 *   tables  uint8 [pixel][G][set][ng][64], over input rows widened by the left and right padding
 *           (the padding columns hold the tables of codes z, as in kernel_lut_avx2.c)
 *   weights uint8 [G][npass][KH·KW][ng][4 blocks][64 bytes], one 6-bit index per byte; lane L of
 *           a group (basis-major, L < Cout/G·k) is block L/64 % 4 of pass L/256, byte 2s (s < 32)
 *           or 2(s − 32) + 1 (s ≥ 32) for s = L % 64 (the order the even / odd 16-bit counters come
 *           out in).  Missing lanes and channels ≥ Cg are zero bits.
 */
#include "kernels.h"

#include <string.h>

/* The layout (and the passes' shape) and its helpers: plain C, built on every platform, where
 * select_kernel.c sizes and packs the weights with them. */
#define LUT_BLOCKS 4  /* 64-lane blocks per pass */
#define LUT_MAX_PX 4  /* output pixels per pass (sharing the weight loads) */
#define LUT_MAX_ACC 8 /* NP·R: byte counters, their 16-bit pairs, R weights and a table fit 32 zmm */
#define LUT_MAX_SETS 2
#define L64_SLOTS 11  /* groups per 64-channel word */

static inline int64_t l64_lane_byte(int64_t s) { return s < 32 ? 2 * s : 2 * (s - 32) + 1; }

static inline int64_t l64_slots(int64_t channels) { return channels > 60 ? L64_SLOTS : (channels + 5) / 6; }

int64_t bd_lut64_ng(const bd_geom *gm) { return (gm->wpg - 1) * L64_SLOTS + l64_slots(gm->cg - 64 * (gm->wpg - 1)); }

int64_t bd_lut64_npass(const bd_conv_params *p, const bd_geom *gm)
{
    return (gm->coutg * p->k + 64 * LUT_BLOCKS - 1) / (64 * LUT_BLOCKS);
}

/* weight bytes: G·npass·taps·ng·256 (overflow-checked by the caller) */
void bd_lut64_pack_weights(const bd_conv_params *p, const bd_geom *gm, const uint64_t *wpacked, uint8_t *wl)
{
    const int64_t G = p->groups, K = p->k, KP = gm->kp, T = gm->taps, WPG = gm->wpg;
    const int64_t ng = bd_lut64_ng(gm), npass = bd_lut64_npass(p, gm), lanes = gm->coutg * K;
    memset(wl, 0, (size_t)(G * npass * T * ng * 64 * LUT_BLOCKS));
    for (int64_t g = 0; g < G; ++g)
        for (int64_t L = 0; L < lanes; ++L) {
            const int64_t co = g * gm->coutg + L % gm->coutg, j = L / gm->coutg; /* basis-major */
            const int64_t ps = L / (64 * LUT_BLOCKS), blk = (L % (64 * LUT_BLOCKS)) / 64, l = l64_lane_byte(L % 64);
            for (int64_t t = 0; t < T; ++t)
                for (int64_t u = 0; u < ng; ++u) {
                    const int64_t w = u / L64_SLOTS, s = u % L64_SLOTS;
                    const uint64_t m = wpacked[((co * T + t) * WPG + w) * KP + j];
                    wl[((((g * npass + ps) * T + t) * ng + u) * LUT_BLOCKS + blk) * 64 + l] = (uint8_t)((m >> (6 * s)) & 63u);
                }
        }
}

#if defined(__x86_64__) || defined(__i386__)

#pragma GCC target("avx2,popcnt,avx512f,avx512vl,avx512bw,avx512vbmi")
#include <immintrin.h>
#include <stdlib.h>

#include "output_transform.h"
#include "epilogue_avx2.h"

/* P[m][idx] = popcount(m & idx): the table of one bit plane's 6 bits m */
#define P1(m, i) (uint8_t)__builtin_popcount((unsigned)(m) & (unsigned)(i))
#define P4(m, i) P1(m, i), P1(m, i + 1), P1(m, i + 2), P1(m, i + 3)
#define P16(m, i) P4(m, i), P4(m, i + 4), P4(m, i + 8), P4(m, i + 12)
#define PROW(m) {P16(m, 0), P16(m, 16), P16(m, 32), P16(m, 48)}
#define PROW4(m) PROW(m), PROW(m + 1), PROW(m + 2), PROW(m + 3)
#define PROW16(m) PROW4(m), PROW4(m + 4), PROW4(m + 8), PROW4(m + 12)
static const uint8_t plane_tab[64][64] __attribute__((aligned(64))) = {PROW16(0), PROW16(16), PROW16(32), PROW16(48)};

/* The 64-byte tables of every (pixel, group, set, 6-channel group) from the packed bit planes:
 * T = Σ_b 2^(b − b0) · plane_tab[the 6 bits of plane b], b over the set's planes (Q ≤ 5: one set of
 * every plane; Q > 5: set 0 planes 0 … 3, set 1 the planes above, so a code's lane sum is
 * S_0 + 16 S_1; bd_lut_set_planes).  npad
 * [pixel][G] gets bd_pixel_count; the padding columns hold pad_tab and Cg·z (layout as in
 * kernel_lut_avx2.c's build_tables). */
static __attribute__((noinline)) void build_tables64(const uint64_t *act, int64_t rows, int64_t W, int64_t PL,
                                                     int64_t WP, int64_t G, int32_t Q, int64_t wpg, int64_t ng,
                                                     const uint8_t *pad_tab, int32_t pad_n, uint8_t *tab,
                                                     int32_t *npad)
{
    const int nsets = bd_lut_sets(Q, 6);
    const int64_t tpix = G * nsets * ng * 64;
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
        uint8_t *trow = tab + row * WP * tpix;
        int32_t *nrow = npad + row * WP * G;
        for (int64_t x = 0; x < WP; ++x)
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
                uint8_t *out = trow + (PL * G + pg) * nsets * ng * 64 + set * ng * 64;
                for (int64_t u = 0; u < ng; ++u) {
                    const int64_t w = u / L64_SLOTS, sh = 6 * (u % L64_SLOTS);
                    __m512i t = _mm512_load_si512((const void *)plane_tab[(a[(b1 - 1) * wpg + w] >> sh) & 63]);
                    for (int32_t b = b1 - 2; b >= b0; --b)
                        t = _mm512_add_epi8(_mm512_add_epi8(t, t),
                                            _mm512_load_si512((const void *)plane_tab[(a[b * wpg + w] >> sh) & 63]));
                    _mm512_storeu_si512((void *)(out + 64 * u), t);
                }
            }
        }
    }
}

/* c[0] += a8 as 16-bit words, c[1] += the odd bytes (see kernel_lut_avx2.c flush8) */
static inline __attribute__((always_inline)) void flush64(__m512i *c, __m512i a8)
{
    c[0] = _mm512_add_epi16(c[0], a8);
    c[1] = _mm512_add_epi16(c[1], _mm512_srli_epi16(a8, 8));
}

/* s32[0..63] (+)= the lane sums of the 16-bit counters (even bytes → s 0..31, odd → 32..63),
 * which are zeroed; `add` = 0 stores instead of adding */
static inline __attribute__((always_inline)) void spill64(int32_t *s32, __m512i *c, int add)
{
    const __m512i o = c[1], e = _mm512_sub_epi16(c[0], _mm512_slli_epi16(o, 8));
    const __m512i v[4] = {_mm512_cvtepu16_epi32(_mm512_castsi512_si256(e)),
                          _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(e, 1)),
                          _mm512_cvtepu16_epi32(_mm512_castsi512_si256(o)),
                          _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(o, 1))};
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
        void *d = s32 + 16 * i;
        _mm512_storeu_si512(d, add ? _mm512_add_epi32(_mm512_loadu_si512(d), v[i]) : v[i]);
    }
    c[0] = _mm512_setzero_si512();
    c[1] = _mm512_setzero_si512();
}

/* One pass: R blocks of 64 lanes over ny × nx taps for NP output pixels whose tables are t_px
 * bytes apart (sharing every weight load); lane sums of pixel i to s32[i·s32_px + 64·r + s].
 * Byte counters restart with each chunk of ≤ F groups of one tap (see kernel_lut_avx2.c lut_pass). */
static inline __attribute__((always_inline)) void
lut64_pass(int32_t *s32, int64_t s32_px, const uint8_t *tp0, int64_t t_px, int64_t t_sy, int64_t t_sx,
           const uint8_t *wp0, int64_t w_sy, int64_t w_sx, int64_t ny, int64_t nx, int64_t ng, const int R,
           const int NP, int F)
{
    __m512i a[LUT_MAX_PX][LUT_BLOCKS], c16[LUT_MAX_PX][LUT_BLOCKS][2];
#pragma GCC unroll 4
    for (int i = 0; i < NP; ++i)
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) c16[i][r][0] = c16[i][r][1] = _mm512_setzero_si512();
    int flushes = 0, spilled = 0;
    for (int64_t y = 0; y < ny; ++y)
        for (int64_t x = 0; x < nx; ++x) {
            const uint8_t *tp = tp0 + y * t_sy + x * t_sx;
            const uint8_t *wu = wp0 + y * w_sy + x * w_sx;
            for (int64_t u0 = 0; u0 < ng; u0 += F) {
                const int64_t u1 = u0 + F < ng ? u0 + F : ng;
                for (int64_t u = u0; u < u1; ++u, tp += 64, wu += 64 * LUT_BLOCKS) {
                    __m512i w[LUT_BLOCKS];
#pragma GCC unroll 4
                    for (int r = 0; r < R; ++r) w[r] = _mm512_loadu_si512((const void *)(wu + 64 * r));
#pragma GCC unroll 4
                    for (int i = 0; i < NP; ++i) {
                        const __m512i tab = _mm512_loadu_si512((const void *)(tp + i * t_px));
#pragma GCC unroll 4
                        for (int r = 0; r < R; ++r) {
                            const __m512i v = _mm512_permutexvar_epi8(w[r], tab);
                            a[i][r] = u == u0 ? v : _mm512_add_epi8(a[i][r], v);
                        }
                    }
                }
#pragma GCC unroll 4
                for (int i = 0; i < NP; ++i)
#pragma GCC unroll 4
                    for (int r = 0; r < R; ++r) flush64(c16[i][r], a[i][r]);
                if (__builtin_expect(++flushes == 256, 0)) {
#pragma GCC unroll 4
                    for (int i = 0; i < NP; ++i)
#pragma GCC unroll 4
                        for (int r = 0; r < R; ++r) spill64(s32 + i * s32_px + 64 * r, c16[i][r], spilled);
                    flushes = 0;
                    spilled = 1;
                }
            }
        }
#pragma GCC unroll 4
    for (int i = 0; i < NP; ++i)
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) spill64(s32 + i * s32_px + 64 * r, c16[i][r], spilled);
}

#define L64_PASS_FN(R, NP)                                                                         \
    static __attribute__((noinline)) void lut64_pass##R##_##NP(                                    \
        int32_t *s32, int64_t s32_px, __m256i *c16buf, const uint8_t *tp0, int64_t t_px, int64_t t_sy, \
        int64_t t_sx, const uint8_t *wp0, int64_t w_sy, int64_t w_sx, int64_t ny, int64_t nx, int64_t ng, \
        int F)                                                                                     \
    { /* (c16buf: the 16-entry family's spill room; these counters fit the registers) */         \
        (void)c16buf;                                                                              \
        lut64_pass(s32, s32_px, tp0, t_px, t_sy, t_sx, wp0, w_sy, w_sx, ny, nx, ng, R, NP, F);     \
    }
L64_PASS_FN(1, 1)
L64_PASS_FN(2, 1)
L64_PASS_FN(3, 1)
L64_PASS_FN(4, 1)
L64_PASS_FN(1, 2)
L64_PASS_FN(2, 2)
L64_PASS_FN(3, 2)
L64_PASS_FN(4, 2)
L64_PASS_FN(1, 4)
L64_PASS_FN(2, 4)
L64_PASS_FN(3, 4)
L64_PASS_FN(4, 4)

typedef void (*lut64_pass_fn)(int32_t *, int64_t, __m256i *, const uint8_t *, int64_t, int64_t, int64_t,
                              const uint8_t *, int64_t, int64_t, int64_t, int64_t, int64_t, int);
static const lut64_pass_fn lut64_passes[3][LUT_BLOCKS + 1] = {
    {lut64_pass1_1, lut64_pass1_1, lut64_pass2_1, lut64_pass3_1, lut64_pass4_1},
    {lut64_pass1_2, lut64_pass1_2, lut64_pass2_2, lut64_pass3_2, lut64_pass4_2},
    {lut64_pass1_4, lut64_pass1_4, lut64_pass2_4, lut64_pass3_4, lut64_pass4_4}};

#define BD_CONV_LUT_FN bd_conv_lut64_avx512
#define LUT_NG(gm) bd_lut64_ng(gm)
#define LUT_NPASS(p, gm) bd_lut64_npass(p, gm)
#define LUT_TB 64 /* bytes per table */
#define LUT_BL 64 /* lanes per block */
#define LUT_GCH 6 /* channels per table (at most) */
#define LUT_GROUP_CH0(u) (64 * ((u) / L64_SLOTS) + 6 * ((u) % L64_SLOTS))
#define LUT_GROUP_N(u) ((u) % L64_SLOTS == L64_SLOTS - 1 ? 4 : 6)
#define LUT_BUILD_TABLES build_tables64
#define LUT_PASSES lut64_passes
#include "lut_driver.inc"

#else /* not x86 */

int bd_conv_lut64_avx512(const bd_conv_params *p, const bd_geom *gm, const uint64_t *act, const uint8_t *wl,
                         const int32_t *tap_sums, const float *coeffs, const float *bias, float *out, int32_t *acc,
                         int32_t nthreads)
{
    (void)p; (void)gm; (void)act; (void)wl; (void)tap_sums; (void)coeffs; (void)bias;
    (void)out; (void)acc; (void)nthreads;
    return BD_EUNSUPPORTED;
}

#endif
