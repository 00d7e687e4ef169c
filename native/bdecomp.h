/*
 * bdecomp native kernels: quantize + bit-pack, binary convolution / gemm with AND (XOR) + popcount.
 *
 * The maths (../shared/DESIGN.md §2).  For one output channel with k binary bases m_j ∈ {−1,+1}^D
 * and scales c_j, activation codes q ∈ [0, 2^Q−1] with step s and zero point z:
 *
 *   A_j = Σ_{valid taps} m_j · (q − z)                    (integer, exact)
 *       = Σ_b 2^b (2 P_jb − N_b) − z · Sv_j
 *   y   = clamp(s · Σ_j c_j A_j + bias, act_min, act_max)
 *
 * P_jb = popcount(m_j⁺ AND q_b), N_b = popcount(q_b), Sv_j = Σ_{valid taps} Σ_c m_j[c, tap].
 * "Valid taps" are the kernel positions that fall inside the input image: padding is the code z,
 * whose contribution m·(z − z) is exactly zero, so padded taps are skipped (the zero-padding
 * correction is just Sv_j restricted to valid taps).
 *
 * Sign mode (sign = 1, Q = 1, the XOR form): the activation is x̂ = (s/2)(2q − 1), q = [x ≥ 0];
 *   A_j = Σ_{valid taps} m_j · (2q − 1) = Dv − 2 popcount(m_j⁺ XOR q)   (Dv = valid channels·taps)
 *   y   = clamp((s/2) · Σ_j c_j A_j + bias, act_min, act_max)
 *
 * ---------------------------------------------------------------------------------------------
 * Bit layouts
 *
 * Activations ("NHWC bits", produced by bd_quantize_pack): the input has G groups of Cg = C/G
 * channels; each group's channels start on a fresh 64-bit word, wpg = ceil(Cg/64) words.
 *   word index  ((p·G + g)·Q + b)·wpg + w        p = pixel = (n·H + y)·W + x
 *   bit i of that word = bit b of the code of channel g·Cg + 64·w + i;  bits ≥ Cg are zero.
 *   (sign mode: Q = 1 and the bit is [x ≥ 0].)
 *
 * Basis bits as stored in the .onnx file (input of bd_pack_weights): uint8 [Cout][k][ceil(D/8)],
 *   D = Cg·KH·KW, element d = (c·KH + ky)·KW + kx (ONNX weight order), bit d%8 (LSB first) of
 *   byte d/8, 1 ⇔ +1.  Bits ≥ D are zero.
 *
 * Packed weights (output of bd_pack_weights, the order the kernels read them):
 *   KP = k rounded up to 4 (k ≤ 4) or 8 (k > 4); lanes j ≥ k are zero words.
 *   word index  ((co·KH·KW + t)·wpg + w)·KP + j      t = ky·KW + kx
 *   bit i = [m_j[c = 64·w + i, ky, kx] = +1]  (channels inside the group of co).
 * Tap sums: int32 [Cout][KH·KW][k], tap_sums[co][t][j] = Σ_c m_j[c, t] (±1 sum over Cg channels).
 *
 * Integer accumulators (optional output, for tests): int32 [N][OH][OW][Cout][k] = A_j above.
 * Float output: float [N][Cout][OH][OW] (NCHW, what onnxruntime consumes).
 *
 * A gemm (Gemm / MatMul with constant weights) is a 1×1 convolution on an H = W = 1 image with
 * one "image" per row of the input.
 *
 * ---------------------------------------------------------------------------------------------
 * Conventions: no globals beyond the dispatch table in select_kernel.c; every size is explicit;
 * functions validate their parameters and return BD_OK or a negative status, never abort.
 * Threads: OpenMP, `nthreads` per call (≤ 0 means 1), parallel over output rows.
 *
 * Additions to the original contract (implementation notes):
 *  - bd_conv: `bias` may be NULL (no bias).  act_min ≤ act_max, neither NaN.
 *  - Depth limit: D = Cg·KH·KW ≤ BD_MAX_DEPTH so that |A_j| ≤ 255·D fits an int32 exactly.
 *  - Every buffer size (bd_act_words etc.) must fit an int64 (≤ BD_MAX_WORDS); larger → BD_EINVAL.
 *  - bd_pack_weights reads only c, groups, cout, kh, kw and k of `p` (the image size may be
 *    unknown when the weights are packed); basis bits ≥ D are ignored.
 *  - The float epilogue is computed in float, in this order, identically on every ISA:
 *      acc = 0; for j: acc += c_j·(float)A_j;  y = acc·s_eff + bias;  [y = y + residual];
 *      y = min(max(y, act_min), act_max)
 *    with s_eff = s (s/2 in sign mode), so all ISAs give bit-identical float outputs.
 *  - bd_popcount_peak returns 0 for an unsupported isa (or seconds ≤ 0 / not finite).
 *  - nthreads > BD_MAX_THREADS is clamped.  bd_conv may return BD_ENOMEM (small per-call and
 *    per-thread scratch buffers) and BD_EUNSUPPORTED (isa not runnable here).
 *  - coeffs and bias must be finite (BD_EINVAL otherwise).
 */
#ifndef BDECOMP_H
#define BDECOMP_H

#include <stdint.h>

enum bd_isa { BD_ISA_SCALAR = 0, BD_ISA_AVX2 = 1, BD_ISA_AVX512 = 2 };
enum bd_status { BD_OK = 0, BD_EINVAL = -1, BD_EUNSUPPORTED = -2, BD_ENOMEM = -3 };

#define BD_MAX_DEPTH 8388607LL         /* 2^31 / 256 − 1: int32 accumulators stay exact */
#define BD_MAX_WORDS (1LL << 56)       /* buffer sizes in 64-bit words (overflow guard) */
#define BD_MAX_THREADS 1024            /* nthreads above this are clamped */

typedef struct {
    int64_t n, h, w, c;          /* input batch, height, width, channels */
    int64_t groups;              /* C and Cout are multiples of groups */
    int64_t cout;                /* output channels */
    int64_t kh, kw;              /* kernel */
    int64_t stride_h, stride_w;
    int64_t pad_top, pad_left, pad_bottom, pad_right;
    int64_t dil_h, dil_w;
    int64_t oh, ow;              /* output size; must equal the usual formula */
    int32_t bits;                /* Q, 1..8 */
    int32_t k;                   /* bases, 1..8 */
    int32_t sign;                /* 1: XOR form (bits must be 1, zero_point ignored) */
    int32_t zero_point;          /* 0..2^Q−1 */
    float scale;                 /* activation step s > 0 */
    float act_min, act_max;      /* output clamp; −INFINITY / INFINITY for none */
    const float *residual;       /* NULL, or float [N][Cout][OH][OW] added before the clamp (a
                                    residual Add fused into the layer; read only by bd_conv,
                                    bd_conv_lut and bd_conv_depthwise) */
} bd_conv_params;

/* 1 if this build and this CPU can run `isa`. */
int bd_isa_supported(int32_t isa);

/* Words per group and sizes of the buffers below (0 on invalid parameters). */
int64_t bd_act_words(const bd_conv_params *p);          /* n·h·w·G·Q·wpg            */
int64_t bd_weight_words(const bd_conv_params *p);       /* Cout·KH·KW·wpg·KP        */
int64_t bd_tap_sum_count(const bd_conv_params *p);      /* Cout·KH·KW·k             */

/* Quantize x (element (o, c, i) at x[(o·channels + c)·inner + i], pixel p = o·inner + i) into
 * the activation bit planes above: q = clamp(nearbyint(x / s_c) + zero_point, 0, 2^bits − 1)
 * (round half to even, as onnxruntime's QuantizeLinear; NaN → zero_point), or q = [x ≥ 0] in
 * sign mode.  `act` must hold outer·inner·groups·bits·wpg words.
 * Per-channel scales: s_c = scale for every channel if channel_scales is NULL (per-tensor), else
 * s_c = channel_scales[c] (`channels` floats, each finite and > 0, else BD_EINVAL); the quotient
 * is the same single float division x / s_c (onnxruntime's Div by a [1, C, 1, 1] scale, bit for
 * bit).  `scale` is then unused but must still be finite and > 0.  The zero point is shared by
 * all channels.  Sign mode uses no scale: channel_scales is ignored (not read) there.
 * isa: BD_ISA_SCALAR forces the scalar loops, AVX2 or AVX512 the AVX2 code (the same codes, bit for
 * bit); BD_EUNSUPPORTED if this CPU cannot run it.  The same for bd_quantize_codes and
 * bd_im2col_quantize_pack. */
int bd_quantize_pack(const float *x, int64_t outer, int64_t channels, int64_t inner,
                     int64_t groups, float scale, const float *channel_scales, int32_t zero_point,
                     int32_t bits, int32_t sign, uint64_t *act, int32_t isa, int32_t nthreads);

/* Reorder file-layout basis bits into the kernel layout and compute the tap sums. */
int bd_pack_weights(const bd_conv_params *p, const uint8_t *basis, int64_t basis_bytes,
                    uint64_t *wpacked, int32_t *tap_sums);

/* Binary convolution.  `acc` may be NULL. */
int bd_conv(const bd_conv_params *p, const uint64_t *act, const uint64_t *wpacked,
            const int32_t *tap_sums, const float *coeffs, const float *bias, float *out,
            int32_t *acc, int32_t isa, int32_t nthreads);

/* Lookup-table kernel family (T-MAC style, affine mode, Q ≤ 8; kernel_lut_avx2.c):
 * same integer accumulators and float outputs as bd_conv, bit for bit.
 *   LUT weights: uint8 [G][npass][KH·KW][ceil(Cg/4)][4][32], npass = ceil(Cout/G·k / 128), one
 *   weight nibble (4 channels of one tap, one basis, one output channel) per byte; the lane order
 *   inside is documented in kernel_lut_avx2.c.  Built from the packed weights above.
 * bd_lut_supported: 1 if bd_conv_lut can run these parameters on `isa` here (AVX2 or AVX-512
 * machine, sign = 0, bits ≤ 8); the scalar ISA has no LUT kernel (use bd_conv). */
int64_t bd_lut_weight_bytes(const bd_conv_params *p);
int bd_pack_weights_lut(const bd_conv_params *p, const uint64_t *wpacked, uint8_t *wlut);
int bd_lut_supported(const bd_conv_params *p, int32_t isa);
int bd_conv_lut(const bd_conv_params *p, const uint64_t *act, const uint8_t *wlut,
                const int32_t *tap_sums, const float *coeffs, const float *bias, float *out,
                int32_t *acc, int32_t isa, int32_t nthreads);

/* Lookup-table kernel family with 64-entry tables (AVX-512 VBMI vpermb; kernel_lut64_avx512.c):
 * the same integer accumulators and float outputs, bit for bit; groups of 6 input channels
 * instead of 4 and 64 lanes per lookup instead of 32.
 *   LUT64 weights: uint8 [G][npass][KH·KW][ng][4][64], npass = ceil(Cout/G·k / 256), ng = 11 per
 *   64-channel word (fewer in a last, partial word), one 6-bit index per byte; the lane order is
 *   documented in kernel_lut64_avx512.c.  Built from the packed weights above.
 * bd_lut64_supported: 1 if bd_conv_lut64 can run these parameters on `isa` here (isa AVX-512 on
 * a CPU with AVX-512 VBMI, sign = 0, bits ≤ 8). */
int64_t bd_lut64_weight_bytes(const bd_conv_params *p);
int bd_pack_weights_lut64(const bd_conv_params *p, const uint64_t *wpacked, uint8_t *wlut);
int bd_lut64_supported(const bd_conv_params *p, int32_t isa);
int bd_conv_lut64(const bd_conv_params *p, const uint64_t *act, const uint8_t *wlut,
                  const int32_t *tap_sums, const float *coeffs, const float *bias, float *out,
                  int32_t *acc, int32_t isa, int32_t nthreads);

/* Packed patches of a groups = 1 convolution (im2col fused with quantize + pack): the activations
 * of the equivalent 1×1 convolution on an n·oh·ow-pixel image of D = C·KH·KW channels, i.e.
 * word index (pix·Q + b)·ceil(D/64) + w, pix = (n·OH + oy)·OW + ox, bit i = bit b of the code of
 * patch element d = 64·w + i = (c·KH + ky)·KW + kx of x [N][C][H][W] (float, NCHW), taps outside
 * the image having the code of 0.0 (= zero_point: zero padding stays exact).  Uses n, c, h, w,
 * kernel, strides, pads, dilations, oh, ow, bits, sign, zero_point and scale of `p` (validated as
 * for bd_conv; k and cout must be valid but are unused).  bd_im2col_words: the size of `act`
 * (0 if p is invalid or groups ≠ 1).  Bit for bit bd_quantize_pack of the im2col of x.
 * channel_scales: NULL (every channel uses p->scale) or p->c floats, each finite and > 0 (else
 * BD_EINVAL): channel c of x is quantized with channel_scales[c] exactly as in bd_quantize_pack,
 * i.e. patch element d uses the scale of its channel d / (KH·KW); p->scale is then unused for
 * quantization but still validated.  Padded taps keep the code of 0.0 = zero_point whatever the
 * scales.  Sign mode ignores channel_scales (not read). */
int64_t bd_im2col_words(const bd_conv_params *p);
int bd_im2col_quantize_pack(const float *x, const bd_conv_params *p, const float *channel_scales,
                            uint64_t *act, int32_t isa, int32_t nthreads);

/* Depthwise convolutions (groups = C = Cout, affine mode) straight from activation codes
 * (native/depthwise.c): bit planes of a single channel would leave each 64-bit word almost empty.
 *   bd_quantize_codes: codes uint8 in the layout of x (element (o, c, i) at (o·channels + c)·inner
 *     + i), the same codes bd_quantize_pack packs; channel_scales as there (NULL: `scale`).
 *   bd_conv_depthwise: codes uint8 [N][C][H][W], basis_pm int8 ±1 [C][k][KH·KW] (the file's basis
 *     bits unpacked, tap t = ky·KW + kx); same A_j, float outputs and acc layout as bd_conv, bit
 *     for bit.  Uses the geometry, bits, zero_point, scale, k and clamp of `p`. */
int bd_quantize_codes(const float *x, int64_t outer, int64_t channels, int64_t inner, float scale,
                      const float *channel_scales, int32_t zero_point, int32_t bits, uint8_t *codes,
                      int32_t isa, int32_t nthreads);
int bd_conv_depthwise(const bd_conv_params *p, const uint8_t *codes, const int8_t *basis_pm,
                      const float *coeffs, const float *bias, float *out, int32_t *acc,
                      int32_t nthreads);

/* A chain of steps in one call (native/steps.c): the runtime's runs of quantize + pack and
 * convolution steps between onnxruntime segments, which cost ~8 µs of Python per layer when
 * called one by one (ResNet-56: 10 % of its latency).  Every step calls the public function of
 * its op with the fields below, so it validates exactly as that function does.
 * Buffer references (src, dst, residual): ref ≥ 0 is the byte offset ref in `arena` (the extent a
 * step reads or writes must lie inside arena_bytes, else BD_EINVAL); ref < 0 is external[−1 − ref]
 * (−1 − ref < nexternal, the caller's arrays, their sizes the caller's responsibility);
 * residual = BD_NO_BUFFER: none.  A conv step's params are copied and their residual pointer set
 * from `residual`.  Steps run in order; the first failing step stops the chain: its status is
 * returned and its index stored in *failed (−1 when every step succeeded). */
enum bd_step_op { BD_STEP_QUANTIZE_PACK = 1, BD_STEP_CONV = 2, BD_STEP_CONV_LUT = 3, BD_STEP_CONV_LUT64 = 4 };
#define BD_NO_BUFFER INT64_MIN
typedef struct {
    int32_t op;
    int32_t nthreads;
    int64_t src, dst, residual;
    /* BD_STEP_QUANTIZE_PACK: x = src (float), act = dst */
    int64_t outer, channels, inner, groups;
    float scale;
    const float *channel_scales;
    int32_t zero_point, bits, sign;
    /* BD_STEP_CONV (bd_conv), BD_STEP_CONV_LUT (bd_conv_lut), BD_STEP_CONV_LUT64 (bd_conv_lut64):
     * act = src, out = dst */
    const bd_conv_params *params;
    const void *weights;
    const int32_t *tap_sums;
    const float *coeffs, *bias;
    int32_t isa; /* every op: the ISA of its public function */
} bd_step;
int bd_run_steps(const bd_step *steps, int64_t nsteps, uint8_t *arena, int64_t arena_bytes,
                 void *const *external, int64_t nexternal, int64_t *failed);

/* Threads: a call whose work is below a per-function threshold runs on one thread (a wake-up
 * costs more); BDECOMP_MIN_PARALLEL_WORK=<integer ≥ 0> in the environment overrides that
 * threshold (0: always use the requested threads, as the tests do).  Results never depend on it.
 * bd_conv_threads: the threads bd_conv / bd_conv_lut would use for `p` (0 if p is invalid). */
int32_t bd_conv_threads(const bd_conv_params *p, int32_t nthreads);

/* AND + popcount throughput of one thread on `isa`, in bit-operations per second, measured by a
 * tiny in-cache loop for about `seconds` (the machine's own peak for efficiency reports). */
double bd_popcount_peak(int32_t isa, double seconds);

/* Conversion, not inference: the rows [b0, b1) of one coordinate sweep of the data-aware fit
 * (decomposer/decompose.py _codes_data_aware), in place on U, V and codes; fit_codes.c documents
 * the arithmetic and the layouts. */
int bd_codes_sweep(int64_t depth, int64_t rows, int64_t b0, int64_t b1, int32_t nvals,
                   const double *G, const double *T, double *U, double *V, uint8_t *codes,
                   const double *vals, const double *mids, const int64_t *vorder);

#endif /* BDECOMP_H */
