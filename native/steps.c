/* Chains of quantize + pack and convolution steps in one call (bd_run_steps, see bdecomp.h).
 *
 * Each step calls the public entry point of its op, so validation, kernel selection and results
 * are exactly those of the one-by-one calls; this file only resolves buffer references and
 * checks that what a step reads and writes of the arena lies inside it. */
#include <stddef.h>
#include <stdint.h>

#include "bdecomp.h"
#include "kernels.h"

/* The address of reference `ref` for `bytes` bytes, or NULL if it is out of range. */
static void *resolve(int64_t ref, int64_t bytes, uint8_t *arena, int64_t arena_bytes,
                     void *const *external, int64_t nexternal)
{
    if (bytes < 0) return NULL;
    if (ref < 0) {
        if (ref == BD_NO_BUFFER || -1 - ref >= nexternal) return NULL;
        return external[-1 - ref];
    }
    if (!arena || ref > arena_bytes || bytes > arena_bytes - ref) return NULL;
    return arena + ref;
}

static int run_quantize_pack(const bd_step *s, uint8_t *arena, int64_t arena_bytes,
                             void *const *external, int64_t nexternal)
{
    if (s->groups <= 0 || s->channels <= 0 || s->channels % s->groups != 0) return BD_EINVAL;
    const int64_t wpg = (s->channels / s->groups + 63) / 64;
    const int64_t xf[4] = {s->outer, s->channels, s->inner, 4};
    const int64_t af[6] = {s->outer, s->inner, s->groups, s->bits, wpg, 8};
    void *x = resolve(s->src, bd_checked_prod(xf, 4), arena, arena_bytes, external, nexternal);
    void *act = resolve(s->dst, bd_checked_prod(af, 6), arena, arena_bytes, external, nexternal);
    if (!x || !act) return BD_EINVAL;
    return bd_quantize_pack((const float *)x, s->outer, s->channels, s->inner, s->groups, s->scale,
                            s->channel_scales, s->zero_point, s->bits, s->sign, (uint64_t *)act,
                            s->isa, s->nthreads);
}

static int run_conv(const bd_step *s, uint8_t *arena, int64_t arena_bytes, void *const *external,
                    int64_t nexternal)
{
    if (!s->params) return BD_EINVAL;
    bd_conv_params p = *s->params;
    const int64_t words = bd_act_words(&p);
    if (words <= 0) return BD_EINVAL;
    const int64_t af[2] = {words, 8};
    const int64_t of[5] = {p.n, p.cout, p.oh, p.ow, 4};
    const int64_t out_bytes = bd_checked_prod(of, 5);
    void *act = resolve(s->src, bd_checked_prod(af, 2), arena, arena_bytes, external, nexternal);
    void *out = resolve(s->dst, out_bytes, arena, arena_bytes, external, nexternal);
    if (!act || !out) return BD_EINVAL;
    if (s->residual != BD_NO_BUFFER) {
        p.residual = resolve(s->residual, out_bytes, arena, arena_bytes, external, nexternal);
        if (!p.residual) return BD_EINVAL;
    }
    if (s->op == BD_STEP_CONV_LUT64)
        return bd_conv_lut64(&p, (const uint64_t *)act, (const uint8_t *)s->weights, s->tap_sums,
                             s->coeffs, s->bias, (float *)out, NULL, s->isa, s->nthreads);
    if (s->op == BD_STEP_CONV_LUT)
        return bd_conv_lut(&p, (const uint64_t *)act, (const uint8_t *)s->weights, s->tap_sums,
                           s->coeffs, s->bias, (float *)out, NULL, s->isa, s->nthreads);
    return bd_conv(&p, (const uint64_t *)act, (const uint64_t *)s->weights, s->tap_sums, s->coeffs,
                   s->bias, (float *)out, NULL, s->isa, s->nthreads);
}

int bd_run_steps(const bd_step *steps, int64_t nsteps, uint8_t *arena, int64_t arena_bytes,
                 void *const *external, int64_t nexternal, int64_t *failed)
{
    if (failed) *failed = -1;
    if (!steps || nsteps < 0 || arena_bytes < 0 || nexternal < 0 || (nexternal > 0 && !external))
        return BD_EINVAL;
    for (int64_t i = 0; i < nsteps; ++i) {
        const bd_step *s = &steps[i];
        int rc;
        switch (s->op) {
        case BD_STEP_QUANTIZE_PACK:
            rc = run_quantize_pack(s, arena, arena_bytes, external, nexternal);
            break;
        case BD_STEP_CONV:
        case BD_STEP_CONV_LUT:
        case BD_STEP_CONV_LUT64:
            rc = run_conv(s, arena, arena_bytes, external, nexternal);
            break;
        default:
            rc = BD_EINVAL;
        }
        if (rc != BD_OK) {
            if (failed) *failed = i;
            return rc;
        }
    }
    return BD_OK;
}
