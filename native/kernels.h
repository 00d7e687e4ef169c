/*
 * Internal declarations shared by the kernel files (not part of the public contract in bdecomp.h).
 *
 * Every kernel receives parameters that select_kernel.c has already validated, plus the derived
 * geometry below, so kernels never re-check sizes.
 */
#ifndef BDECOMP_KERNELS_H
#define BDECOMP_KERNELS_H

#include <stdint.h>
#include "bdecomp.h"

typedef struct {
    int64_t cg;        /* input channels per group  (C / G)     */
    int64_t coutg;     /* output channels per group (Cout / G)  */
    int64_t wpg;       /* 64-bit words per group: ceil(Cg / 64) */
    int64_t taps;      /* KH·KW                                 */
    int64_t depth;     /* D = Cg·KH·KW                          */
    int32_t kp;        /* weight lanes: 4 (k ≤ 4) or 8          */
} bd_geom;

/* Derived geometry; 0 on success, BD_EINVAL if the weight-related fields are invalid. */
int bd_geom_weights(const bd_conv_params *p, bd_geom *gm);
/* f[0]·f[1]·…·f[count−1], or −1 on a negative factor, an int64 overflow or a product > BD_MAX_WORDS */
int64_t bd_checked_prod(const int64_t *f, int count);

typedef int (*bd_conv_fn)(const bd_conv_params *p, const bd_geom *gm, const uint64_t *act,
                          const uint64_t *wpacked, const int32_t *tap_sums, const float *coeffs,
                          const float *bias, float *out, int32_t *acc, int32_t nthreads);
typedef double (*bd_peak_fn)(double seconds);

/* reference.c — see reference.h. */

/* kernel_avx2.c / kernel_avx512.c (x86-64 only; compiled with per-file target pragmas). */
int bd_conv_avx2(const bd_conv_params *p, const bd_geom *gm, const uint64_t *act,
                 const uint64_t *wpacked, const int32_t *tap_sums, const float *coeffs,
                 const float *bias, float *out, int32_t *acc, int32_t nthreads);
double bd_peak_avx2(double seconds);
int bd_conv_avx512(const bd_conv_params *p, const bd_geom *gm, const uint64_t *act,
                   const uint64_t *wpacked, const int32_t *tap_sums, const float *coeffs,
                   const float *bias, float *out, int32_t *acc, int32_t nthreads);
double bd_peak_avx512(double seconds);

/* kernel_lut_avx2.c — the lookup-table family (affine, Q ≤ 8); layouts described there. */
int64_t bd_lut_nq(const bd_geom *gm);
int64_t bd_lut_npass(const bd_conv_params *p, const bd_geom *gm);
void bd_lut_pack_weights(const bd_conv_params *p, const bd_geom *gm, const uint64_t *wpacked,
                         uint8_t *wl);
int bd_conv_lut_avx2(const bd_conv_params *p, const bd_geom *gm, const uint64_t *act,
                     const uint8_t *wl, const int32_t *tap_sums, const float *coeffs,
                     const float *bias, float *out, int32_t *acc, int32_t nthreads);
int bd_conv_lut_avx512vl(const bd_conv_params *p, const bd_geom *gm, const uint64_t *act,
                         const uint8_t *wl, const int32_t *tap_sums, const float *coeffs,
                         const float *bias, float *out, int32_t *acc, int32_t nthreads);  /* kernel_lut_avx512.c */

/* The table sets of a lookup-table family whose tables sum gch channels' Q-bit codes: one while
 * an entry fits a byte, gch·(2^Q − 1) ≤ 255 (Q ≤ 6 for quads, Q ≤ 5 for 6-channel groups), else
 * two, the codes' low nibbles (planes 0…3) and the planes above (S = S_0 + 16 S_1).  Set `set`
 * holds planes [*b0, *b1); *qmax is the largest code of the largest set (for the byte counters). */
static inline int bd_lut_sets(int32_t Q, int gch) { return gch * ((1 << Q) - 1) <= 255 ? 1 : 2; }
static inline void bd_lut_set_planes(int32_t Q, int nsets, int set, int32_t *b0, int32_t *b1)
{
    *b0 = nsets == 1 ? 0 : 4 * set;
    *b1 = nsets == 1 || set == 1 ? Q : 4;
}
static inline int32_t bd_lut_qmax(int32_t Q, int nsets) { return nsets == 1 ? (1 << Q) - 1 : 15; }

/* kernel_lut64_avx512.c — the lookup-table family with 64-entry tables (AVX-512 VBMI). */
int64_t bd_lut64_ng(const bd_geom *gm);
int64_t bd_lut64_npass(const bd_conv_params *p, const bd_geom *gm);
void bd_lut64_pack_weights(const bd_conv_params *p, const bd_geom *gm, const uint64_t *wpacked,
                           uint8_t *wl);
int bd_conv_lut64_avx512(const bd_conv_params *p, const bd_geom *gm, const uint64_t *act,
                         const uint8_t *wl, const int32_t *tap_sums, const float *coeffs,
                         const float *bias, float *out, int32_t *acc, int32_t nthreads);

/* quantize_pack.c: im2col + quantize + pack (parameters validated by bd_im2col_quantize_pack), the
 * check of optional per-channel scales (BD_OK if NULL or all n finite and > 0, else BD_EINVAL) and
 * the BDECOMP_MIN_PARALLEL_WORK override of the single-thread thresholds. */
int bd_im2col_pack_impl(const float *x, const bd_conv_params *p, const float *channel_scales,
                        uint64_t *act, int32_t isa, int32_t nthreads);
int bd_check_channel_scales(const float *channel_scales, int64_t n);
/* select_kernel.c: BD_OK if `isa` is a known ISA this CPU runs, BD_EINVAL if unknown, else
 * BD_EUNSUPPORTED (the check of every entry point taking an isa). */
int bd_check_isa(int32_t isa);
int64_t bd_min_parallel_work(int64_t dflt);

/* depthwise.c: the depthwise kernel (parameters validated by bd_conv_depthwise). */
int bd_depthwise_impl(const bd_conv_params *p, const uint8_t *codes, const int8_t *basis_pm,
                      const float *coeffs, const float *bias, float *out, int32_t *acc,
                      int32_t nthreads);

/* Monotonic wall clock in seconds (for bd_popcount_peak). */
double bd_now_seconds(void);

#endif /* BDECOMP_KERNELS_H */
