// The MiniCPM-V resampler's fully folded plan (bindings/src/resampler.c, MVE_FOLD_FULL) as Metal compute
// kernels. The host (mve_metal.m) encodes the dispatch list that mve_metal_plan.c builds; the tests compile this
// very file as C++ behind mve_metal_compat.h and run the same list thread by thread on the CPU
// (bindings/tests/metal_emu.cpp), so the arithmetic below is checked on every CI run even though no Metal
// device runs it there.
//
// Version 1 favours plain, checkable code over speed: one thread per output element or per row, no
// threadgroup memory, float32 accumulation (half weights widen on load). Every kernel bounds-checks its
// thread position, so any grid rounding by the host is safe.
#if !defined(__METAL_VERSION__)
#include "mve_metal_compat.h"
#endif
#include "mve_metal_shared.h"

// C = A W^T (float32 W); grid (N, M, batch)
kernel void mve_k_gemm_f32(constant mve_mk_gemm_args &a [[buffer(0)]],
                           device const float *A [[buffer(1)]],
                           device const float *W [[buffer(2)]],
                           device float *C [[buffer(3)]],
                           uint3 gid [[thread_position_in_grid]]) {
    if (gid.x >= a.N || gid.y >= a.M || gid.z >= a.batch) return;
    device const float *ar = A + gid.z * a.sA + gid.y * a.lda;
    device const float *wr = W + gid.z * a.sW + gid.x * a.ldw;
    float acc = 0.0f;
    for (uint k = 0; k < a.K; k++) acc = fma(ar[k], wr[k], acc);
    C[gid.z * a.sC + gid.y * a.ldc + gid.x] = acc;
}

// C = A W^T (half W, float32 accumulation); grid (N, M, batch)
kernel void mve_k_gemm_f16(constant mve_mk_gemm_args &a [[buffer(0)]],
                           device const float *A [[buffer(1)]],
                           device const half *W [[buffer(2)]],
                           device float *C [[buffer(3)]],
                           uint3 gid [[thread_position_in_grid]]) {
    if (gid.x >= a.N || gid.y >= a.M || gid.z >= a.batch) return;
    device const float *ar = A + gid.z * a.sA + gid.y * a.lda;
    device const half *wr = W + gid.z * a.sW + gid.x * a.ldw;
    float acc = 0.0f;
    for (uint k = 0; k < a.K; k++) acc = fma(ar[k], float(wr[k]), acc);
    C[gid.z * a.sC + gid.y * a.ldc + gid.x] = acc;
}

// LN_kv statistics without forming z = x Wkv^T: mu = wbar . x_p, rs = 1/sqrt(||(x R^T)_p||^2 / d + eps); grid (n)
kernel void mve_k_kv_stats(constant mve_mk_stats_args &a [[buffer(0)]],
                           device const float *x [[buffer(1)]],
                           device const float *y [[buffer(2)]],
                           device const float *wbar [[buffer(3)]],
                           device float *mu [[buffer(4)]],
                           device float *rs [[buffer(5)]],
                           uint3 gid [[thread_position_in_grid]]) {
    if (gid.x >= a.n) return;
    device const float *xr = x + gid.x * a.c;
    device const float *yr = y + gid.x * a.c;
    float m = 0.0f, ss = 0.0f;
    for (uint k = 0; k < a.c; k++) {
        m = fma(wbar[k], xr[k], m);
        ss = fma(yr[k], yr[k], ss);
    }
    mu[gid.x] = m;
    rs[gid.x] = rsqrt(ss / float(a.d) + a.eps);
}

// out = (x - mean) * rstd * g + b per row (biased variance, like torch); grid (rows)
kernel void mve_k_ln_rows(constant mve_mk_ln_args &a [[buffer(0)]],
                          device const float *x [[buffer(1)]],
                          device float *out [[buffer(2)]],
                          device const float *g [[buffer(3)]],
                          device const float *b [[buffer(4)]],
                          uint3 gid [[thread_position_in_grid]]) {
    if (gid.x >= a.rows) return;
    device const float *xr = x + gid.x * a.d;
    float s = 0.0f;
    for (uint c = 0; c < a.d; c++) s += xr[c];
    float mean = s / float(a.d), v = 0.0f;
    for (uint c = 0; c < a.d; c++) v += (xr[c] - mean) * (xr[c] - mean);
    float rstd = rsqrt(v / float(a.d) + a.eps);
    device float *orow = out + gid.x * a.d;
    for (uint c = 0; c < a.d; c++) orow[c] = (xr[c] - mean) * rstd * g[c] + b[c];
}

// in place, per row; grid (rows)
kernel void mve_k_softmax_rows(constant mve_mk_softmax_args &a [[buffer(0)]],
                               device float *x [[buffer(1)]],
                               uint3 gid [[thread_position_in_grid]]) {
    if (gid.x >= a.rows) return;
    device float *xr = x + gid.x * a.n;
    float mx = xr[0];
    for (uint j = 1; j < a.n; j++) mx = max(mx, xr[j]);
    float sum = 0.0f;
    for (uint j = 0; j < a.n; j++) {
        xr[j] = exp(xr[j] - mx);
        sum += xr[j];
    }
    float inv = 1.0f / sum;
    for (uint j = 0; j < a.n; j++) xr[j] *= inv;
}

// S[j][p] = rs_p (S^T[p][j] - mu_p r_j) + Tx[j][x_p] + Ty[j][y_p] + TF[frame_p][j]; grid (n, hq)
kernel void mve_k_scores(constant mve_mk_scores_args &a [[buffer(0)]],
                         device const float *st [[buffer(1)]],
                         device const float *mu [[buffer(2)]],
                         device const float *rs [[buffer(3)]],
                         device const float *r [[buffer(4)]],
                         device const float *pos [[buffer(5)]],
                         device const float *tf [[buffer(6)]],
                         device const mve_mk_patch *patch [[buffer(7)]],
                         device float *s [[buffer(8)]],
                         uint3 gid [[thread_position_in_grid]]) {
    uint p = gid.x, j = gid.y;
    if (p >= a.n || j >= a.hq) return;
    mve_mk_patch pp = patch[p];
    float v = rs[p] * (st[p * a.hq + j] - mu[p] * r[j]);
    v += pos[j * a.pos_rows + uint(pp.x)] + pos[(a.hq + j) * a.pos_rows + uint(pp.y)];
    if (pp.has_t != 0) v += tf[uint(pp.frame) * a.hq + j];
    s[j * a.n + p] = v;
}

// P' = P diag(rs) in place and mvec[j] = P'_j . mu; grid (hq)
kernel void mve_k_scale_probs(constant mve_mk_scale_args &a [[buffer(0)]],
                              device float *s [[buffer(1)]],
                              device const float *rs [[buffer(2)]],
                              device const float *mu [[buffer(3)]],
                              device float *mvec [[buffer(4)]],
                              uint3 gid [[thread_position_in_grid]]) {
    if (gid.x >= a.hq) return;
    device float *sr = s + gid.x * a.n;
    float acc = 0.0f;
    for (uint p = 0; p < a.n; p++) {
        sr[p] *= rs[p];
        acc = fma(sr[p], mu[p], acc);
    }
    mvec[gid.x] = acc;
}

// dst [cols, rows] = src [rows, cols]^T; grid (cols, rows)
kernel void mve_k_transpose(constant mve_mk_transpose_args &a [[buffer(0)]],
                            device const float *src [[buffer(1)]],
                            device float *dst [[buffer(2)]],
                            uint3 gid [[thread_position_in_grid]]) {
    if (gid.x >= a.cols || gid.y >= a.rows) return;
    dst[gid.x * a.rows + gid.y] = src[gid.y * a.cols + gid.x];
}

// O[q][c] += cb[c] - mvec[head(c) * q_num + q] wg[c]; grid (d, q_num)
kernel void mve_k_value_epi(constant mve_mk_value_args &a [[buffer(0)]],
                            device float *o [[buffer(1)]],
                            device const float *mvec [[buffer(2)]],
                            device const float *wg [[buffer(3)]],
                            device const float *cb [[buffer(4)]],
                            uint3 gid [[thread_position_in_grid]]) {
    uint c = gid.x, q = gid.y;
    if (c >= a.d || q >= a.q_num) return;
    o[q * a.d + c] += cb[c] - mvec[(c / a.head_dim) * a.q_num + q] * wg[c];
}

// X[r][c] += bias[c]; grid (d, rows)
kernel void mve_k_add_bias(constant mve_mk_bias_args &a [[buffer(0)]],
                           device float *x [[buffer(1)]],
                           device const float *bias [[buffer(2)]],
                           uint3 gid [[thread_position_in_grid]]) {
    if (gid.x >= a.d || gid.y >= a.rows) return;
    x[gid.y * a.d + gid.x] += bias[gid.x];
}
