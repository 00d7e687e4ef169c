/* Scalar reference kernel (reference.c): the "scalar" ISA, portable C, obviously-correct loops. */
#ifndef BDECOMP_REFERENCE_H
#define BDECOMP_REFERENCE_H

#include "kernels.h"

/* Binary convolution by the literal formula of bdecomp.h; parameters already validated. */
int bd_conv_reference(const bd_conv_params *p, const bd_geom *gm, const uint64_t *act,
                      const uint64_t *wpacked, const int32_t *tap_sums, const float *coeffs,
                      const float *bias, float *out, int32_t *acc, int32_t nthreads);

/* AND + popcount throughput of portable C (bit-ops/s). */
double bd_peak_scalar(double seconds);

#endif /* BDECOMP_REFERENCE_H */
