/*
 * Lookup-table kernel family with 64-entry tables (AVX-512 VBMI vpermb); chosen per layer
 * (bd_conv_lut64), where it is faster than the 16-entry tables of kernel_lut_avx2.c.
 *
 * The same arithmetic as kernel_lut_avx2.c (read its header first), with groups of 6 input
 * channels instead of quads: per input pixel and group of channels 6s … 6s + 5 of a 64-channel
 * word (s < 10; s = 10 holds channels 60 … 63),
 *
 *   T[idx] = Σ_{i<6, bit i of idx set} q_i          (≤ 6·15 = 90: one byte; Q > 4: two sets)
 *
 * a 64-byte table that fills one zmm register, and each (channel, basis) lane indexes it with the
 * 6 weight bits of that (tap, group): one vpermb does 64 lanes × 6 channels where vpshufb does 32
 * × 4 (Intel Xeon with AVX-512: 2.2x the lane-channel rate of the 256-bit vpshufb loop in a
 * micro-benchmark).  Tables are 64 bytes per 6 channels (16 per 4 there), so small layers, whose
 * tables cost more than their lookups, stay on the other family: the runtime times both.
 *
 * Counters: bytes for F = ⌊255 / (6·min(qmax, 15))⌋ steps (2 at Q = 4), then even / odd 16-bit
 * counters, then int32 lane sums: the lane sums S_j of the other kernels, the same epilogue, the
 * same bits.
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

#if defined(__x86_64__) || defined(__i386__)

#pragma GCC target("avx2,popcnt,avx512f,avx512vl,avx512bw,avx512vbmi")
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "output_transform.h"
#include "epilogue_avx2.h"

#define L64_BLOCKS 4  /* 64-lane blocks per pass */
#define L64_MAX_PX 4  /* output pixels per pass (sharing the weight loads) */
#define L64_MAX_ACC 8 /* NP·R: byte counters, their 16-bit pairs, R weights and a table fit 32 zmm */
#define L64_MAX_SETS 2
#define L64_SLOTS 11  /* groups per 64-channel word */

static inline int64_t l64_lane_byte(int64_t s) { return s < 32 ? 2 * s : 2 * (s - 32) + 1; }

static inline int64_t l64_slots(int64_t channels) { return channels > 60 ? L64_SLOTS : (channels + 5) / 6; }

int64_t bd_lut64_ng(const bd_geom *gm) { return (gm->wpg - 1) * L64_SLOTS + l64_slots(gm->cg - 64 * (gm->wpg - 1)); }

int64_t bd_lut64_npass(const bd_conv_params *p, const bd_geom *gm)
{
    return (gm->coutg * p->k + 64 * L64_BLOCKS - 1) / (64 * L64_BLOCKS);
}

/* weight bytes: G·npass·taps·ng·256 (overflow-checked by the caller) */
void bd_lut64_pack_weights(const bd_conv_params *p, const bd_geom *gm, const uint64_t *wpacked, uint8_t *wl)
{
    const int64_t G = p->groups, K = p->k, KP = gm->kp, T = gm->taps, WPG = gm->wpg;
    const int64_t ng = bd_lut64_ng(gm), npass = bd_lut64_npass(p, gm), lanes = gm->coutg * K;
    memset(wl, 0, (size_t)(G * npass * T * ng * 64 * L64_BLOCKS));
    for (int64_t g = 0; g < G; ++g)
        for (int64_t L = 0; L < lanes; ++L) {
            const int64_t co = g * gm->coutg + L % gm->coutg, j = L / gm->coutg; /* basis-major */
            const int64_t ps = L / (64 * L64_BLOCKS), blk = (L % (64 * L64_BLOCKS)) / 64, l = l64_lane_byte(L % 64);
            for (int64_t t = 0; t < T; ++t)
                for (int64_t u = 0; u < ng; ++u) {
                    const int64_t w = u / L64_SLOTS, s = u % L64_SLOTS;
                    const uint64_t m = wpacked[((co * T + t) * WPG + w) * KP + j];
                    wl[((((g * npass + ps) * T + t) * ng + u) * L64_BLOCKS + blk) * 64 + l] = (uint8_t)((m >> (6 * s)) & 63u);
                }
        }
}

/* P[m][idx] = popcount(m & idx): the table of one bit plane's 6 bits m */
#define P1(m, i) (uint8_t)__builtin_popcount((unsigned)(m) & (unsigned)(i))
#define P4(m, i) P1(m, i), P1(m, i + 1), P1(m, i + 2), P1(m, i + 3)
#define P16(m, i) P4(m, i), P4(m, i + 4), P4(m, i + 8), P4(m, i + 12)
#define PROW(m) {P16(m, 0), P16(m, 16), P16(m, 32), P16(m, 48)}
#define PROW4(m) PROW(m), PROW(m + 1), PROW(m + 2), PROW(m + 3)
#define PROW16(m) PROW4(m), PROW4(m + 4), PROW4(m + 8), PROW4(m + 12)
static const uint8_t plane_tab[64][64] __attribute__((aligned(64))) = {PROW16(0), PROW16(16), PROW16(32), PROW16(48)};

/* The 64-byte tables of every (pixel, group, set, 6-channel group) from the packed bit planes:
 * T = Σ_b 2^(b − b0) · plane_tab[the 6 bits of plane b], b over the set's planes (set 0: planes
 * 0 … min(Q, 4) − 1, set 1: the planes above, so a code's lane sum is S_0 + 16 S_1).  npad
 * [pixel][G] gets bd_pixel_count; the padding columns hold pad_tab and Cg·z (layout as in
 * kernel_lut_avx2.c's build_tables). */
static __attribute__((noinline)) void build_tables64(const uint64_t *act, int64_t rows, int64_t W, int64_t PL,
                                                     int64_t WP, int64_t G, int32_t Q, int64_t wpg, int64_t ng,
                                                     const uint8_t *pad_tab, int32_t pad_n, uint8_t *tab,
                                                     int32_t *npad)
{
    const int nsets = Q > 4 ? 2 : 1;
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
                const int32_t b0 = 4 * set, b1 = Q < b0 + 4 ? Q : b0 + 4;
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
    __m512i a[L64_MAX_PX][L64_BLOCKS], c16[L64_MAX_PX][L64_BLOCKS][2];
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
                for (int64_t u = u0; u < u1; ++u, tp += 64, wu += 64 * L64_BLOCKS) {
                    __m512i w[L64_BLOCKS];
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
        int32_t *s32, int64_t s32_px, const uint8_t *tp0, int64_t t_px, int64_t t_sy, int64_t t_sx, \
        const uint8_t *wp0, int64_t w_sy, int64_t w_sx, int64_t ny, int64_t nx, int64_t ng, int F)  \
    {                                                                                              \
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

typedef void (*lut64_pass_fn)(int32_t *, int64_t, const uint8_t *, int64_t, int64_t, int64_t, const uint8_t *,
                              int64_t, int64_t, int64_t, int64_t, int64_t, int);
static const lut64_pass_fn lut64_passes[3][L64_BLOCKS + 1] = {
    {lut64_pass1_1, lut64_pass1_1, lut64_pass2_1, lut64_pass3_1, lut64_pass4_1},
    {lut64_pass1_2, lut64_pass1_2, lut64_pass2_2, lut64_pass3_2, lut64_pass4_2},
    {lut64_pass1_4, lut64_pass1_4, lut64_pass2_4, lut64_pass3_4, lut64_pass4_4}};

int bd_conv_lut64_avx512(const bd_conv_params *p, const bd_geom *gm, const uint64_t *act, const uint8_t *wl,
                         const int32_t *tap_sums, const float *coeffs, const float *bias, float *out, int32_t *acc,
                         int32_t nthreads)
{
    const int64_t H = p->h, W = p->w, G = p->groups, OH = p->oh, OW = p->ow;
    const int64_t KH = p->kh, KW = p->kw, COUT = p->cout;
    const int32_t Q = p->bits, K = p->k;
    const int64_t COUTG = gm->coutg, T = gm->taps;
    const int64_t z = p->zero_point;
    const int64_t ng = bd_lut64_ng(gm), npass = bd_lut64_npass(p, gm), lanes = COUTG * K;
    const int64_t nblk = (lanes + 63) / 64, rmax = nblk < L64_BLOCKS ? nblk : L64_BLOCKS;
    const int nsets = Q > 4 ? L64_MAX_SETS : 1;
    const int F = 255 / (6 * ((1 << (Q < 4 ? Q : 4)) - 1));
    const int gemm = H == 1 && W == 1 && OH == 1 && OW == 1 && KH == 1 && KW == 1 && p->pad_top == 0 &&
                     p->pad_left == 0 && p->pad_bottom == 0 && p->pad_right == 0;
    const int64_t rows = gemm ? (p->n + BD_EPI_BLOCK - 1) / BD_EPI_BLOCK : p->n * OH;
    const int64_t PL = p->pad_left, WP = PL + W + p->pad_right;
    const int64_t tpix = G * nsets * ng * 64;
    const int64_t t_sy = p->dil_h * WP * tpix, t_sx = p->dil_w * tpix;
    const int64_t w_sx = ng * 64 * L64_BLOCKS, w_sy = KW * w_sx, w_pass = T * w_sx;
    const int64_t n_sy = p->dil_h * WP * G, n_sx = p->dil_w * G;
    const int npmax = rmax * 4 <= L64_MAX_ACC ? 4 : rmax * 2 <= L64_MAX_ACC ? 2 : 1;
    if (nthreads <= 0) nthreads = 1;

    uint8_t *tab = (uint8_t *)malloc((size_t)(p->n * H * WP * tpix));
    int32_t *npad = (int32_t *)malloc((size_t)(p->n * H * WP * G) * sizeof(int32_t));
    uint8_t *pad_tab = (uint8_t *)malloc((size_t)tpix);
    bd_epilogue_tables e;
    if (!tab || !npad || !pad_tab || bd_epilogue_tables_make(&e, tap_sums, coeffs, bias, COUT, G, K, T, 1, z != 0) != BD_OK) {
        free(tab); free(npad); free(pad_tab);
        return BD_ENOMEM;
    }
    /* a padding pixel's tables: every channel < Cg has the code z */
    memset(pad_tab, 0, (size_t)tpix);
    for (int64_t g = 0; g < G && z != 0; ++g)
        for (int set = 0; set < nsets; ++set)
            for (int64_t u = 0; u < ng; ++u) {
                const int64_t c0 = 64 * (u / L64_SLOTS) + 6 * (u % L64_SLOTS);
                for (int idx = 0; idx < 64; ++idx) {
                    int n_in = 0;
                    for (int i = 0; i < 6; ++i) n_in += (idx >> i & 1) && c0 + i < gm->cg && (6 * (u % L64_SLOTS) + i) < 64;
                    pad_tab[((g * nsets + set) * ng + u) * 64 + idx] = (uint8_t)(n_in * (set ? z >> 4 : z & 15));
                }
            }
    int failed = 0;

#pragma omp parallel num_threads(nthreads)
    {
        build_tables64(act, p->n * H, W, PL, WP, G, Q, gm->wpg, ng, pad_tab, (int32_t)(gm->cg * z), tab, npad);
        const int64_t s32_px = npass * 64 * L64_BLOCKS, s32_set = L64_MAX_PX * s32_px;
        int32_t *s32 = (int32_t *)aligned_alloc(64, (size_t)(L64_MAX_SETS * s32_set) * sizeof(int32_t));
        const int64_t a_stride = COUT * K + 8;
        int32_t *Ablk = (int32_t *)calloc((size_t)(BD_EPI_BLOCK * a_stride), sizeof(int32_t));
        if (!s32 || !Ablk) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
            if (!s32 || !Ablk) continue;
            const int64_t n = gemm ? r * BD_EPI_BLOCK : r / OH, oy = gemm ? 0 : r % OH;
            const int64_t row_px = gemm ? (p->n - n < BD_EPI_BLOCK ? p->n - n : BD_EPI_BLOCK) : OW;
            int64_t ky0, ky1;
            bd_valid_range(oy, p->stride_h, p->pad_top, p->dil_h, KH, H, &ky0, &ky1);
            const int64_t iy0 = oy * p->stride_h - p->pad_top + ky0 * p->dil_h, ny = ky1 - ky0;
            for (int64_t bx = 0; bx < row_px; bx += BD_EPI_BLOCK) {
                const int npx = (int)(row_px - bx < BD_EPI_BLOCK ? row_px - bx : BD_EPI_BLOCK);
                for (int b = 0; b < npx;) {
                    const int64_t ox = bx + b;
                    const int np = b + npmax <= npx ? npmax : npmax >= 2 && b + 2 <= npx ? 2 : 1;
                    int64_t kx0 = KW, kx1 = 0;
                    for (int i = 0; i < np; ++i) {
                        int64_t lo, hi;
                        bd_valid_range(gemm ? 0 : ox + i, p->stride_w, p->pad_left, p->dil_w, KW, W, &lo, &hi);
                        if (lo < hi) {
                            kx0 = lo < kx0 ? lo : kx0;
                            kx1 = hi > kx1 ? hi : kx1;
                        }
                    }
                    const int64_t nx = kx1 > kx0 ? kx1 - kx0 : 0;
                    const int any = ny > 0 && nx > 0;
                    const int interior = ny == KH && nx == KW;
                    const int64_t ipix_step = gemm ? 1 : p->stride_w;
                    const int64_t ipix = any ? (n * H + iy0) * WP + ox * ipix_step + kx0 * p->dil_w : 0;
                    for (int64_t g = 0; g < G; ++g) {
                        for (int set = 0; set < nsets; ++set) {
                            int32_t *s32s = s32 + set * s32_set;
                            if (!any) {
                                for (int i = 0; i < np; ++i)
                                    memset(s32s + i * s32_px, 0, (size_t)(nblk * 64) * sizeof(int32_t));
                                continue;
                            }
                            const uint8_t *tp0 = tab + ipix * tpix + (g * nsets + set) * ng * 64;
                            for (int64_t ps = 0; ps < npass; ++ps) {
                                const int64_t left = nblk - ps * L64_BLOCKS;
                                const int R = left < L64_BLOCKS ? (int)left : L64_BLOCKS;
                                const uint8_t *wp0 = wl + (g * npass + ps) * w_pass + ky0 * w_sy + kx0 * w_sx;
                                lut64_passes[np >> 1][R](s32s + ps * 64 * L64_BLOCKS, s32_px, tp0, ipix_step * tpix, t_sy,
                                                        t_sx, wp0, w_sy, w_sx, ny, nx, ng, F);
                            }
                        }
                        if (nsets > 1)
                            for (int i = 0; i < np; ++i)
                                for (int64_t L = 0; L < nblk * 64; ++L)
                                    s32[i * s32_px + L] += s32[s32_set + i * s32_px + L] << 4;
                        const int64_t l0 = g * lanes;
                        for (int i = 0; i < np; ++i) {
                            const int64_t N = any ? bd_tap_counts(npad + (ipix + i * ipix_step) * G + g, n_sy, n_sx, ny, nx) : 0;
                            int32_t *A = Ablk + (b + i) * a_stride + l0;
                            bd_epilogue_int_avx2(s32 + i * s32_px, lanes, 0, 0, N, z, interior, e.sv + l0, e.ts + l0,
                                                 e.stride, KW, ky0, ky1, kx0, kx0 + nx, A, NULL);
                            if (acc) {
                                int32_t *ag = acc + (((n * OH + oy) * OW + ox + i) * COUT + g * COUTG) * K;
                                for (int64_t co = 0; co < COUTG; ++co)
                                    for (int32_t j = 0; j < K; ++j) ag[co * K + j] = A[j * COUTG + co];
                            }
                        }
                    }
                    b += np;
                }
                const int64_t o0 = gemm ? (n + bx) * COUT : (n * COUT * OH + oy) * OW + bx;
                bd_epilogue_flush_bm_avx2(Ablk, a_stride, npx, G, COUTG, K, &e, p->scale, p->act_min, p->act_max,
                                          out + o0, gemm ? 1 : OH * OW, gemm ? COUT : 1,
                                          p->residual ? p->residual + o0 : NULL);
            }
        }
        free(s32);
        free(Ablk);
    }
    free(tab);
    free(npad);
    free(pad_tab);
    bd_epilogue_tables_free(&e);
    return failed ? BD_ENOMEM : BD_OK;
}

#else /* not x86 */

int64_t bd_lut64_ng(const bd_geom *gm) { return (gm->cg + 5) / 6; }
int64_t bd_lut64_npass(const bd_conv_params *p, const bd_geom *gm) { return (gm->coutg * p->k + 255) / 256; }
void bd_lut64_pack_weights(const bd_conv_params *p, const bd_geom *gm, const uint64_t *wpacked, uint8_t *wl)
{
    (void)p; (void)gm; (void)wpacked; (void)wl;
}
int bd_conv_lut64_avx512(const bd_conv_params *p, const bd_geom *gm, const uint64_t *act, const uint8_t *wl,
                         const int32_t *tap_sums, const float *coeffs, const float *bias, float *out, int32_t *acc,
                         int32_t nthreads)
{
    (void)p; (void)gm; (void)act; (void)wl; (void)tap_sums; (void)coeffs; (void)bias;
    (void)out; (void)acc; (void)nthreads;
    return BD_EUNSUPPORTED;
}

#endif
