/*
 * bd_quantize_pack: float activations → Q bit planes in the "NHWC bits" layout of bdecomp.h.
 *
 *   q = clamp(rint(x / s) + z, 0, 2^Q − 1)   (round half to even, NaN → z)   or   q = [x ≥ 0]
 *
 * s is the per-tensor scale, or channel c's own scale when per-channel scales are given (the
 * same single float division either way).  A channel row of channel-first input has one scale,
 * so the vector code path takes it as a broadcast constant; channel-last input reads the scale
 * of each element's channel.
 *
 * Work is split into blocks of consecutive pixels; the words of a block are a contiguous range
 * of `act` (pixel-major layout), so a thread owns every word it writes.  Inside a block the input
 * is read one channel row at a time (contiguous floats), which is the cache-friendly order for
 * channel-first input; channel-last input (inner = 1) is read pixel by pixel instead.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bdecomp.h"
#include "kernels.h"

/* rint(t) for |t| ≤ 2^22 by the float magic number (exact, half to even in the default
 * rounding mode); t is clamped to ±1024 first, which cannot change the clamped code. */
static inline int32_t quant_code(float v, float scale, int32_t zp, int32_t qmax)
{
    float t = v / scale;
    if (t != t) return zp; /* NaN */
    if (t > 1024.0f) t = 1024.0f;
    if (t < -1024.0f) t = -1024.0f;
    const float magic = 12582912.0f; /* 1.5 · 2^23 */
    const float r = (t + magic) - magic;
    int32_t q = (int32_t)r + zp;
    if (q < 0) q = 0;
    if (q > qmax) q = qmax;
    return q;
}

static inline int32_t code_of(float v, float scale, int32_t zp, int32_t qmax, int sign)
{
    return sign ? (v >= 0.0f) : quant_code(v, scale, zp, qmax);
}

/* the Q plane words of ni pixels from their 64 code bytes each (codes[i·64 + c]) */
static void planes_scalar(const uint8_t *codes, int64_t ni, int32_t Q, uint64_t *aw, int64_t wpp,
                          int64_t wpg)
{
    for (int64_t i = 0; i < ni; ++i) {
        uint64_t pl[8] = {0};
        const uint8_t *ci = codes + i * 64;
        for (int c = 0; c < 64; ++c)
            for (int32_t b = 0; b < Q; ++b) pl[b] |= (uint64_t)((ci[c] >> b) & 1u) << c;
        for (int32_t b = 0; b < Q; ++b) aw[i * wpp + b * wpg] = pl[b];
    }
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
__attribute__((target("avx2"))) static void planes_avx2(const uint8_t *codes, int64_t ni, int32_t Q,
                                                        uint64_t *aw, int64_t wpp, int64_t wpg, int64_t nc)
{
    if (nc <= 32) { /* the upper 32 channels of the word are absent: their bits stay 0 */
        for (int64_t i = 0; i < ni; ++i) {
            const __m256i v0 = _mm256_load_si256((const __m256i *)(codes + i * 64));
            for (int32_t b = 0; b < Q; ++b)
                aw[i * wpp + b * wpg] = (uint32_t)_mm256_movemask_epi8(_mm256_sll_epi16(v0, _mm_cvtsi32_si128(7 - b)));
        }
        return;
    }
    for (int64_t i = 0; i < ni; ++i) {
        const __m256i v0 = _mm256_load_si256((const __m256i *)(codes + i * 64));
        const __m256i v1 = _mm256_load_si256((const __m256i *)(codes + i * 64 + 32));
        for (int32_t b = 0; b < Q; ++b) {
            /* bit b of every byte to its bit 7 (a 16-bit shift keeps each byte's bits in place) */
            const __m128i sh = _mm_cvtsi32_si128(7 - b);
            const uint32_t lo = (uint32_t)_mm256_movemask_epi8(_mm256_sll_epi16(v0, sh));
            const uint32_t hi = (uint32_t)_mm256_movemask_epi8(_mm256_sll_epi16(v1, sh));
            aw[i * wpp + b * wpg] = (uint64_t)lo | ((uint64_t)hi << 32);
        }
    }
}

/* the codes of 8 floats v with steps vs, exactly code_of lane by lane (the same float operations
 * in the same order) */
__attribute__((target("avx2"))) static inline __m256i code8_avx2(__m256 v, __m256 vs, __m256i vz, __m256i vq,
                                                                 int sign)
{
    if (sign) return _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GE_OQ)),
                                      _mm256_set1_epi32(1));
    __m256 t = _mm256_div_ps(v, vs);
    const __m256 nan = _mm256_cmp_ps(t, t, _CMP_UNORD_Q);
    t = _mm256_min_ps(t, _mm256_set1_ps(1024.0f)); /* NaN lanes are replaced below */
    t = _mm256_max_ps(t, _mm256_set1_ps(-1024.0f));
    const __m256 magic = _mm256_set1_ps(12582912.0f);
    const __m256 r = _mm256_sub_ps(_mm256_add_ps(t, magic), magic);
    __m256i q = _mm256_add_epi32(_mm256_cvttps_epi32(r), vz);
    q = _mm256_min_epi32(_mm256_max_epi32(q, _mm256_setzero_si256()), vq);
    return _mm256_blendv_epi8(q, vz, _mm256_castps_si256(nan));
}

/* codes of n floats, exactly code_of */
__attribute__((target("avx2"))) static void codes_avx2(const float *row, int64_t n, float scale,
                                                       int32_t zp, int32_t qmax, int sign,
                                                       int32_t *out)
{
    int64_t i = 0;
    const __m256 vs = _mm256_set1_ps(scale);
    const __m256i vz = _mm256_set1_epi32(zp), vq = _mm256_set1_epi32(qmax);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_si256((__m256i *)(out + i), code8_avx2(_mm256_loadu_ps(row + i), vs, vz, vq, sign));
    for (; i < n; ++i) out[i] = code_of(row[i], scale, zp, qmax, sign);
}

/* One pixel's word of channel-last input: the codes of its nc ≤ 64 contiguous channels (steps
 * cs[i], or `scale` if cs is NULL), then their Q plane words aw[b·wpg]. */
__attribute__((target("avx2"))) static void pixel_word_avx2(const float *x, int64_t nc, const float *cs, float scale,
                                                            int32_t zp, int32_t qmax, int sign, int32_t Q,
                                                            uint64_t *aw, int64_t wpg)
{
    uint8_t codes[64] __attribute__((aligned(32)));
    const __m256i vz = _mm256_set1_epi32(zp), vq = _mm256_set1_epi32(qmax);
    int64_t i = 0;
    for (; i + 8 <= nc; i += 8) {
        const __m256 vs = cs ? _mm256_loadu_ps(cs + i) : _mm256_set1_ps(scale);
        const __m256i q = code8_avx2(_mm256_loadu_ps(x + i), vs, vz, vq, sign); /* 8 codes ≤ 255 */
        const __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
        _mm_storel_epi64((__m128i *)(codes + i), _mm_packus_epi16(w16, w16));
    }
    for (; i < nc; ++i) codes[i] = (uint8_t)code_of(x[i], cs ? cs[i] : scale, zp, qmax, sign);
    for (; i < 64; ++i) codes[i] = 0;
    planes_avx2(codes, 1, Q, aw, 0, wpg, nc);
}

/* codes[i·64 + c0 + r] = rows[r][i] for 8 rows (channels c0 … c0 + 7) of n int32 codes ≤ 255:
 * 8×8 transposes and a narrowing to bytes instead of 8·n scattered byte stores. */
__attribute__((target("avx2"))) static void scatter8_avx2(const int32_t *rows, int64_t stride, int64_t n,
                                                          uint8_t *codes, int64_t c0)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i r[8], t[8], u[8];
        for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_si256((const __m256i *)(rows + k * stride + i));
        for (int k = 0; k < 8; k += 2) {
            t[k] = _mm256_unpacklo_epi32(r[k], r[k + 1]);
            t[k + 1] = _mm256_unpackhi_epi32(r[k], r[k + 1]);
        }
        for (int k = 0; k < 8; k += 4) {
            u[k] = _mm256_unpacklo_epi64(t[k], t[k + 2]);
            u[k + 1] = _mm256_unpackhi_epi64(t[k], t[k + 2]);
            u[k + 2] = _mm256_unpacklo_epi64(t[k + 1], t[k + 3]);
            u[k + 3] = _mm256_unpackhi_epi64(t[k + 1], t[k + 3]);
        }
        /* pixel j's 8 codes: u[j] low half (j < 4, with u[j + 4] high half), as in a float 8×8 */
        for (int j = 0; j < 4; ++j) {
            const __m256i a = _mm256_permute2x128_si256(u[j], u[j + 4], 0x20); /* pixel i + j */
            const __m256i b = _mm256_permute2x128_si256(u[j], u[j + 4], 0x31); /* pixel i + j + 4 */
            const __m256i w16 = _mm256_packus_epi32(a, b);          /* lanes: a0-3 b0-3 | a4-7 b4-7 */
            const __m128i lo = _mm256_castsi256_si128(w16), hi = _mm256_extracti128_si256(w16, 1);
            const __m128i b8 = _mm_packus_epi16(_mm_unpacklo_epi64(lo, hi), _mm_unpackhi_epi64(lo, hi));
            _mm_storel_epi64((__m128i *)(codes + (i + j) * 64 + c0), b8);
            _mm_storel_epi64((__m128i *)(codes + (i + j + 4) * 64 + c0), _mm_unpackhi_epi64(b8, b8));
        }
    }
    for (; i < n; ++i)
        for (int k = 0; k < 8; ++k) codes[i * 64 + c0 + k] = (uint8_t)rows[k * stride + i];
}
#endif

int bd_check_channel_scales(const float *channel_scales, int64_t n)
{
    if (!channel_scales) return BD_OK;
    for (int64_t c = 0; c < n; ++c)
        if (!(isfinite(channel_scales[c]) && channel_scales[c] > 0.0f)) return BD_EINVAL;
    return BD_OK;
}

int bd_quantize_pack(const float *x, int64_t outer, int64_t channels, int64_t inner,
                     int64_t groups, float scale, const float *channel_scales, int32_t zero_point,
                     int32_t bits, int32_t sign, uint64_t *act, int32_t isa, int32_t nthreads)
{
    if (!x || !act) return BD_EINVAL;
    if (outer <= 0 || channels <= 0 || inner <= 0 || groups <= 0) return BD_EINVAL;
    if (channels % groups != 0) return BD_EINVAL;
    if (bits < 1 || bits > 8 || (sign != 0 && sign != 1)) return BD_EINVAL;
    if (sign && bits != 1) return BD_EINVAL;
    if (!sign) {
        if (!(isfinite(scale) && scale > 0.0f)) return BD_EINVAL;
        if (zero_point < 0 || zero_point > (1 << bits) - 1) return BD_EINVAL;
        if (bd_check_channel_scales(channel_scales, channels) != BD_OK) return BD_EINVAL;
    } else {
        channel_scales = NULL; /* sign mode uses no scale */
    }
    const float *const cs = channel_scales; /* NULL: `scale` for every channel */
    const int64_t cg = channels / groups;
    const int64_t wpg = (cg + 63) / 64;
    int64_t pixels, wpp, total;
    if (__builtin_mul_overflow(outer, inner, &pixels)) return BD_EINVAL;
    if (__builtin_mul_overflow(groups * (int64_t)bits, wpg, &wpp)) return BD_EINVAL;
    if (__builtin_mul_overflow(pixels, wpp, &total) || total > BD_MAX_WORDS) return BD_EINVAL;
    if (pixels > BD_MAX_WORDS / channels) return BD_EINVAL; /* x index fits */

    const int32_t Q = bits, qmax = (1 << bits) - 1;
    if (nthreads <= 0) nthreads = 1;
    if (nthreads > BD_MAX_THREADS) nthreads = BD_MAX_THREADS;
    /* below 8192 inputs (~3 µs on one core) a second thread saves less than it costs; above,
     * ResNet-56 at 2 threads (every input under the old 32768-word bar): 2.0 → 1.8 ms */
    if (pixels * channels < bd_min_parallel_work(8192) && nthreads > 1) nthreads = 1;

    const int isa_rc = bd_check_isa(isa);
    if (isa_rc != BD_OK) return isa_rc;
    const int avx2 = isa >= BD_ISA_AVX2; /* AVX-512 machines run the AVX2 code here */
    (void)avx2; /* (unused where the x86 paths are compiled out) */
    if (inner == 1) {
        /* channel-last: one pixel's channels are contiguous */
#pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int64_t p = 0; p < pixels; ++p) {
            const float *xp = x + p * channels;
            uint64_t *ap = act + p * wpp;
            for (int64_t g = 0; g < groups; ++g)
                for (int64_t w = 0; w < wpg; ++w) {
                    uint64_t planes[8] = {0};
                    const int64_t c0 = g * cg + w * 64;
                    const int64_t nc = (cg - w * 64) < 64 ? (cg - w * 64) : 64;
#if defined(__x86_64__) || defined(__i386__)
                    if (avx2) { /* 8 channels per vector: 10x the scalar loop (ConvNeXt's 3136×96 MatMul input) */
                        pixel_word_avx2(xp + c0, nc, cs ? cs + c0 : NULL, scale, zero_point, qmax, sign, Q,
                                        ap + g * Q * wpg + w, wpg);
                        continue;
                    }
#endif
                    for (int64_t i = 0; i < nc; ++i) {
                        const float s = cs ? cs[c0 + i] : scale;
                        const uint32_t q = (uint32_t)code_of(xp[c0 + i], s, zero_point, qmax, sign);
                        for (int32_t b = 0; b < Q; ++b) planes[b] |= (uint64_t)((q >> b) & 1u) << i;
                    }
                    for (int32_t b = 0; b < Q; ++b) ap[(g * Q + b) * wpg + w] = planes[b];
                }
        }
        return BD_OK;
    }

    /* channel-first: blocks of ≤ 256 pixels of one `outer` index.  Per block, group and 64-channel
     * word: the codes are written pixel-major into a small byte buffer (one channel row of
     * contiguous floats at a time, the cache-friendly order for channel-first input), then each
     * pixel's Q plane words are taken from its 64 code bytes at once (vpmovmskb on AVX2). */
    int64_t pb = 256;
    if (pb > inner) pb = inner;
    if (nthreads > 1 && outer * ((inner + pb - 1) / pb) < 2 * nthreads) {
        /* too few blocks to share (ResNet-56's 16×16 and 8×8 inputs are one block each): one or
         * two per thread, whole cache lines of the input rows (16 floats) where the size allows */
        pb = (inner + 2 * nthreads - 1) / (2 * nthreads);
        pb = pb < 16 ? (inner < 16 ? inner : 16) : (pb + 15) / 16 * 16;
    }
    const int64_t blocks_per_outer = (inner + pb - 1) / pb;
    const int64_t blocks = outer * blocks_per_outer;

#pragma omp parallel num_threads(nthreads)
    {
        uint8_t codes[256 * 64] __attribute__((aligned(32)));
        int32_t tmp[8 * 256]; /* int32 codes of up to 8 channel rows */
        (void)tmp; /* (used by the x86 paths only) */
        int64_t zero_from = 64; /* bytes [zero_from, 64) of every pixel's row of `codes` are 0 */
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; ++blk) {
            const int64_t o = blk / blocks_per_outer;
            const int64_t i0 = (blk % blocks_per_outer) * pb;
            const int64_t ni = (inner - i0) < pb ? (inner - i0) : pb;
            uint64_t *ab = act + (o * inner + i0) * wpp; /* this block's words, contiguous */
            for (int64_t g = 0; g < groups; ++g)
                for (int64_t w = 0; w < wpg; ++w) {
                    const int64_t c0 = g * cg + w * 64;
                    const int64_t nc = (cg - w * 64) < 64 ? (cg - w * 64) : 64;
                    if (nc < zero_from) { /* channels ≥ nc must read as code 0 (once per call when wpg = 1) */
                        memset(codes, 0, sizeof codes);
                        zero_from = 0;
                    }
                    if (nc > zero_from) zero_from = nc;
                    int64_t cc = 0;
#if defined(__x86_64__) || defined(__i386__)
                    if (avx2) /* 8 channel rows at a time, stored into the pixel-major bytes by transposes */
                        for (; cc + 8 <= nc; cc += 8) {
                            for (int r = 0; r < 8; ++r) {
                                const float *row = x + (o * channels + c0 + cc + r) * inner + i0;
                                codes_avx2(row, ni, cs ? cs[c0 + cc + r] : scale, zero_point, qmax, sign,
                                           tmp + r * pb);
                            }
                            scatter8_avx2(tmp, pb, ni, codes, cc);
                        }
#endif
                    for (; cc < nc; ++cc) {
                        const float *row = x + (o * channels + c0 + cc) * inner + i0;
                        const float s = cs ? cs[c0 + cc] : scale; /* one scale per channel row */
#if defined(__x86_64__) || defined(__i386__)
                        if (avx2) {
                            codes_avx2(row, ni, s, zero_point, qmax, sign, tmp);
                            for (int64_t i = 0; i < ni; ++i) codes[i * 64 + cc] = (uint8_t)tmp[i];
                            continue;
                        }
#endif
                        for (int64_t i = 0; i < ni; ++i)
                            codes[i * 64 + cc] = (uint8_t)code_of(row[i], s, zero_point, qmax, sign);
                    }
                    uint64_t *aw = ab + g * Q * wpg + w; /* plane 0 of word w of group g, pixel i0 */
#if defined(__x86_64__) || defined(__i386__)
                    if (avx2) {
                        planes_avx2(codes, ni, Q, aw, wpp, wpg, nc);
                        continue;
                    }
#endif
                    planes_scalar(codes, ni, Q, aw, wpp, wpg);
                }
        }
    }
    return BD_OK;
}

/* bd_quantize_codes: the codes themselves, uint8 in the layout of x (for the depthwise kernel),
 * by the same code_of / codes_avx2 arithmetic as the bit planes above. */
int bd_quantize_codes(const float *x, int64_t outer, int64_t channels, int64_t inner, float scale,
                      const float *channel_scales, int32_t zero_point, int32_t bits, uint8_t *codes,
                      int32_t isa, int32_t nthreads)
{
    if (!x || !codes || outer <= 0 || channels <= 0 || inner <= 0) return BD_EINVAL;
    if (bits < 1 || bits > 8 || zero_point < 0 || zero_point > (1 << bits) - 1) return BD_EINVAL;
    if (!(isfinite(scale) && scale > 0.0f)) return BD_EINVAL;
    if (bd_check_channel_scales(channel_scales, channels) != BD_OK) return BD_EINVAL;
    int64_t rows, total;
    if (__builtin_mul_overflow(outer, channels, &rows) || __builtin_mul_overflow(rows, inner, &total) ||
        total > BD_MAX_WORDS)
        return BD_EINVAL;
    const int32_t qmax = (1 << bits) - 1;
    if (nthreads <= 0) nthreads = 1;
    if (nthreads > BD_MAX_THREADS) nthreads = BD_MAX_THREADS;
    if (total < bd_min_parallel_work(1 << 18) && nthreads > 1) nthreads = 1;
    const int isa_rc = bd_check_isa(isa);
    if (isa_rc != BD_OK) return isa_rc;
#if defined(__x86_64__) || defined(__i386__)
    const int avx2 = isa >= BD_ISA_AVX2;
#endif
#pragma omp parallel num_threads(nthreads)
    {
        int32_t tmp[256];
        (void)tmp; /* (used by the x86 paths only) */
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
            const float s = channel_scales ? channel_scales[r % channels] : scale;
            for (int64_t i0 = 0; i0 < inner; i0 += 256) {
                const int64_t ni = (inner - i0) < 256 ? (inner - i0) : 256;
                const float *row = x + r * inner + i0;
                uint8_t *cr = codes + r * inner + i0;
#if defined(__x86_64__) || defined(__i386__)
                if (avx2) {
                    codes_avx2(row, ni, s, zero_point, qmax, 0, tmp);
                    for (int64_t i = 0; i < ni; ++i) cr[i] = (uint8_t)tmp[i];
                    continue;
                }
#endif
                for (int64_t i = 0; i < ni; ++i) cr[i] = (uint8_t)code_of(row[i], s, zero_point, qmax, 0);
            }
        }
    }
    return BD_OK;
}

/* ---------------------------------------------------------------------------------------------
 * bd_im2col_quantize_pack (validated by select_kernel.c): the packed patches of a 1×1-equivalent
 * convolution.  Pass 1 quantizes the whole input once into code bytes (the same code_of /
 * codes_avx2 arithmetic as bd_quantize_pack); pass 2 gathers each output pixel's D codes in the
 * (c, ky, kx) order of the basis bits into a 64-byte-aligned buffer (taps outside the image get
 * the code of 0.0, i.e. z: zero padding stays exact) and takes the Q plane words of every 64 codes
 * at once.  Bit for bit what quantize_pack(im2col(x)) gives.  With per-channel scales (already
 * checked, NULL in sign mode) pass 1 quantizes plane (n, c) with channel_scales[c]; the padding
 * code stays z (0 / s = 0 for every s > 0). */
int bd_im2col_pack_impl(const float *x, const bd_conv_params *p, const float *channel_scales,
                        uint64_t *act, int32_t isa, int32_t nthreads)
{
    const int64_t N = p->n, C = p->c, H = p->h, W = p->w, KH = p->kh, KW = p->kw;
    const int64_t OH = p->oh, OW = p->ow, D = C * KH * KW, wpg = (D + 63) / 64;
    const int32_t Q = p->bits, qmax = (1 << p->bits) - 1, zp = p->sign ? 0 : p->zero_point;
    const int sign = p->sign != 0;
    const float scale = p->scale;
    const int64_t wpp = Q * wpg, planes = N * C, hw = H * W, pixels = N * OH * OW;
    const uint8_t padc = (uint8_t)code_of(0.0f, scale, zp, qmax, sign);
    if (nthreads <= 0) nthreads = 1;
    if (nthreads > BD_MAX_THREADS) nthreads = BD_MAX_THREADS;
    if (pixels * wpp < bd_min_parallel_work(32768) && nthreads > 1) nthreads = 1;
    uint8_t *codes = (uint8_t *)malloc((size_t)(planes * hw));
    if (!codes) return BD_ENOMEM;
#if defined(__x86_64__) || defined(__i386__)
    const int avx2 = isa >= BD_ISA_AVX2; /* validated by bd_im2col_quantize_pack */
#endif
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        int32_t tmp[256];
        (void)tmp; /* (used by the x86 paths only) */
#pragma omp for schedule(static)
        for (int64_t pl = 0; pl < planes; ++pl)
            for (int64_t i0 = 0; i0 < hw; i0 += 256) {
                const int64_t ni = (hw - i0) < 256 ? (hw - i0) : 256;
                const float *row = x + pl * hw + i0;
                uint8_t *cr = codes + pl * hw + i0;
                const float s = channel_scales ? channel_scales[pl % C] : scale; /* plane = (n, c) */
#if defined(__x86_64__) || defined(__i386__)
                if (avx2) {
                    codes_avx2(row, ni, s, zp, qmax, sign, tmp);
                    for (int64_t i = 0; i < ni; ++i) cr[i] = (uint8_t)tmp[i];
                    continue;
                }
#endif
                for (int64_t i = 0; i < ni; ++i) cr[i] = (uint8_t)code_of(row[i], s, zp, qmax, sign);
            }
        /* implicit barrier: every code byte is written */
        uint8_t *buf = (uint8_t *)aligned_alloc(32, (size_t)(wpg * 64));
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        } else {
            memset(buf, 0, (size_t)(wpg * 64)); /* bits ≥ D stay zero */
        }
#pragma omp for schedule(static)
        for (int64_t pix = 0; pix < pixels; ++pix) {
            if (!buf) continue;
            const int64_t n = pix / (OH * OW), oy = (pix / OW) % OH, ox = pix % OW;
            const int64_t by = oy * p->stride_h - p->pad_top, bx = ox * p->stride_w - p->pad_left;
            uint8_t *d = buf;
            for (int64_t c = 0; c < C; ++c) {
                const uint8_t *cp = codes + (n * C + c) * hw;
                for (int64_t ky = 0; ky < KH; ++ky) {
                    const int64_t iy = by + ky * p->dil_h;
                    if (iy < 0 || iy >= H) {
                        memset(d, padc, (size_t)KW);
                        d += KW;
                        continue;
                    }
                    const uint8_t *rp = cp + iy * W;
                    for (int64_t kx = 0; kx < KW; ++kx) {
                        const int64_t ix = bx + kx * p->dil_w;
                        *d++ = (ix >= 0 && ix < W) ? rp[ix] : padc;
                    }
                }
            }
            uint64_t *aw = act + pix * wpp;
            for (int64_t w = 0; w < wpg; ++w) {
#if defined(__x86_64__) || defined(__i386__)
                if (avx2) {
                    planes_avx2(buf + 64 * w, 1, Q, aw + w, wpp, wpg, 64);
                    continue;
                }
#endif
                planes_scalar(buf + 64 * w, 1, Q, aw + w, wpp, wpg);
            }
        }
        free(buf);
    }
    free(codes);
    return failed ? BD_ENOMEM : BD_OK;
}

/* BDECOMP_MIN_PARALLEL_WORK (a non-negative integer) overrides the work below which a call runs
 * single-threaded (`dflt`, in each caller's own unit); 0 makes every call use its threads, which
 * tests use to exercise the multi-threaded code on small inputs.  Results never depend on it. */
int64_t bd_min_parallel_work(int64_t dflt)
{
    const char *s = getenv("BDECOMP_MIN_PARALLEL_WORK");
    if (!s || !*s) return dflt;
    char *end = NULL;
    const long long v = strtoll(s, &end, 10);
    if (end == s || *end != '\0' || v < 0) return dflt;
    return (int64_t)v;
}
