/*
 * The data-aware fit's coordinate sweep over the rows of the basis codes (conversion time, not
 * inference): decomposer/decompose.py `_codes_data_aware` keeps the GEMMs between blocks in
 * numpy and calls this for the rows d of one block, where each row is a dependent step.
 *
 * For row d and every output channel r, with v = M c the current values (V[d][r] = b·c_r of the
 * code at (r, d)) and U = Ĝ V:
 *   target = ((T[d][r] − U[d][r]) + Ĝ_dd · V[d][r]) / Ĝ_dd      (the 1-D minimiser)
 *   i      = #{ j : mids[r][j] < target }                         (mids non-decreasing)
 *   code   = vorder[r][i],  v_new = vals[r][code],  δ_r = v_new − V[d][r]
 * then, if any δ_r ≠ 0 (NaN counts):  U[e][r] += Ĝ[e][d] · δ_r  for e in the block, V[d][r] = v_new
 * and codes[r][d] = code for every r.  Rows with Ĝ_dd ≤ 0 are skipped.  These are numpy's
 * element-wise double operations in the same order (built with -ffp-contract=off), so the result
 * is bit-identical to the numpy loop it replaces (tests/test_decompose.py keeps that loop as the
 * reference); the binary search gives the count because mids are sorted.
 *
 * Layouts (row-major, double unless noted): G [depth][depth], T, U, V [depth][rows],
 * codes uint8 [rows][depth], vals [rows][nvals], mids [rows][nvals − 1], vorder int64 [rows][nvals].
 */
#include <stdlib.h>

#include "bdecomp.h"

int bd_codes_sweep(int64_t depth, int64_t rows, int64_t b0, int64_t b1, int32_t nvals,
                   const double *G, const double *T, double *U, double *V, uint8_t *codes,
                   const double *vals, const double *mids, const int64_t *vorder)
{
    if (depth <= 0 || rows <= 0 || b0 < 0 || b1 <= b0 || b1 > depth || nvals < 2 || nvals > 256 ||
        !G || !T || !U || !V || !codes || !vals || !mids || !vorder)
        return BD_EINVAL;
    for (int64_t i = 0; i < rows * nvals; i++)
        if (vorder[i] < 0 || vorder[i] >= nvals)
            return BD_EINVAL;
    double *nv = malloc((size_t)rows * sizeof *nv), *delta = malloc((size_t)rows * sizeof *delta);
    uint8_t *nc = malloc((size_t)rows);
    if (!nv || !delta || !nc) {
        free(nv), free(delta), free(nc);
        return BD_ENOMEM;
    }
    for (int64_t d = b0; d < b1; d++) {
        const double gdd = G[d * depth + d];
        if (gdd <= 0)
            continue;
        const double *t_d = T + d * rows, *u_d = U + d * rows;
        double *v_d = V + d * rows;
        int any = 0;
        for (int64_t r = 0; r < rows; r++) {
            const double target = ((t_d[r] - u_d[r]) + gdd * v_d[r]) / gdd;
            const double *m = mids + r * (nvals - 1);
            int64_t lo = 0, hi = nvals - 1;
            while (lo < hi) {
                const int64_t mid = (lo + hi) / 2;
                if (m[mid] < target)
                    lo = mid + 1;
                else
                    hi = mid;
            }
            const int64_t code = vorder[r * nvals + lo];
            nc[r] = (uint8_t)code;
            nv[r] = vals[r * nvals + code];
            delta[r] = nv[r] - v_d[r];
            any |= delta[r] != 0;
        }
        if (!any)
            continue;
        for (int64_t e = b0; e < b1; e++) {
            const double g = G[e * depth + d];
            double *u_e = U + e * rows;
            for (int64_t r = 0; r < rows; r++)
                u_e[r] += g * delta[r];
        }
        for (int64_t r = 0; r < rows; r++) {
            v_d[r] = nv[r];
            codes[r * depth + d] = nc[r];
        }
    }
    free(nv), free(delta), free(nc);
    return BD_OK;
}
