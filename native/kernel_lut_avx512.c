/*
 * The lookup-table kernel family built for AVX-512 machines: kernel_lut_avx2.c compiled with
 * AVX-512VL enabled (BD_LUT_AVX512VL), so that its 256-bit code has 32 vector registers instead of
 * AVX2's 16 — the passes keep their byte counters, weights and tables without spilling.  Same
 * instructions' results, same bits; chosen by bd_conv_lut for isa = BD_ISA_AVX512.
 */
#define BD_LUT_AVX512VL 1
#include "kernel_lut_avx2.c"
