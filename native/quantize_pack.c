/*
 * bd_quantize_pack: float activations → Q bit planes in the "NHWC bits" layout of bdecomp.h.
 *
 *   q = clamp(rint(x / s) + z, 0, 2^Q − 1)   (round half to even, NaN → z)   or   q = [x ≥ 0]
 *
 * Work is split into blocks of consecutive pixels; the words of a block are a contiguous range
 * of `act` (pixel-major layout), so a thread owns every word it writes.  Inside a block the input
 * is read one channel row at a time (contiguous floats), which is the cache-friendly order for
 * channel-first input; channel-last input (inner = 1) is read pixel by pixel instead.
 */
#include <math.h>
#include <string.h>

#include "bdecomp.h"

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

int bd_quantize_pack(const float *x, int64_t outer, int64_t channels, int64_t inner,
                     int64_t groups, float scale, int32_t zero_point, int32_t bits,
                     int32_t sign, uint64_t *act, int32_t nthreads)
{
    if (!x || !act) return BD_EINVAL;
    if (outer <= 0 || channels <= 0 || inner <= 0 || groups <= 0) return BD_EINVAL;
    if (channels % groups != 0) return BD_EINVAL;
    if (bits < 1 || bits > 8 || (sign != 0 && sign != 1)) return BD_EINVAL;
    if (sign && bits != 1) return BD_EINVAL;
    if (!sign) {
        if (!(isfinite(scale) && scale > 0.0f)) return BD_EINVAL;
        if (zero_point < 0 || zero_point > (1 << bits) - 1) return BD_EINVAL;
    }
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
                    for (int64_t i = 0; i < nc; ++i) {
                        const uint32_t q = (uint32_t)code_of(xp[c0 + i], scale, zero_point, qmax, sign);
                        for (int32_t b = 0; b < Q; ++b) planes[b] |= (uint64_t)((q >> b) & 1u) << i;
                    }
                    for (int32_t b = 0; b < Q; ++b) ap[(g * Q + b) * wpg + w] = planes[b];
                }
        }
        return BD_OK;
    }

    /* channel-first: blocks of PB pixels of one `outer` index; ≤ ~32 KiB of output per block */
    int64_t pb = 4096 / wpp;
    if (pb < 16) pb = 16;
    if (pb > 1024) pb = 1024;
    if (pb > inner) pb = inner;
    const int64_t blocks_per_outer = (inner + pb - 1) / pb;
    const int64_t blocks = outer * blocks_per_outer;

#pragma omp parallel num_threads(nthreads)
    {
        int32_t codes[1024];
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; ++blk) {
            const int64_t o = blk / blocks_per_outer;
            const int64_t i0 = (blk % blocks_per_outer) * pb;
            const int64_t ni = (inner - i0) < pb ? (inner - i0) : pb;
            uint64_t *ab = act + (o * inner + i0) * wpp; /* this block's words, contiguous */
            memset(ab, 0, (size_t)(ni * wpp) * sizeof(uint64_t));
            for (int64_t c = 0; c < channels; ++c) {
                const float *row = x + (o * channels + c) * inner + i0;
                const int64_t g = c / cg, cc = c % cg;
                const int64_t w = cc / 64;
                const int bit = (int)(cc % 64);
                for (int64_t i = 0; i < ni; ++i) codes[i] = code_of(row[i], scale, zero_point, qmax, sign);
                uint64_t *aw = ab + g * Q * wpg + w; /* plane 0 of word w of group g, pixel i0 */
                for (int32_t b = 0; b < Q; ++b)
                    for (int64_t i = 0; i < ni; ++i)
                        aw[i * wpp + b * wpg] |= (uint64_t)(((uint32_t)codes[i] >> b) & 1u) << bit;
            }
        }
    }
    return BD_OK;
}
