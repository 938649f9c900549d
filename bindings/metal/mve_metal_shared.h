/* Shared by the Metal kernels (resampler.metal), the Objective-C host (mve_metal.m), the dispatch plan
 * (mve_metal_plan.c) and the CPU emulation the tests run (bindings/tests/metal_emu.cpp): kernel ids, buffer
 * ids, and the argument structs bound at [[buffer(0)]]. Element counts and strides are 32-bit (every tensor
 * here has < 2^32 elements); byte offsets of buffer bindings are 64-bit and live in the plan, not here. */
#ifndef MVE_METAL_SHARED_H
#define MVE_METAL_SHARED_H

#if defined(__METAL_VERSION__)
#include <metal_stdlib>
using namespace metal;
#else
#include <stdint.h>
#endif

/* Kernels (function names in resampler.metal: mve_k_<name>). */
enum {
    MVE_MK_GEMM_F32 = 0, /* C = A W^T, W float32 */
    MVE_MK_GEMM_F16,     /* C = A W^T, W half */
    MVE_MK_KV_STATS,     /* LN_kv statistics from x: mean = wbar . x, 1/std from ||R x|| */
    MVE_MK_LN_ROWS,      /* layer norm per row */
    MVE_MK_SOFTMAX_ROWS,
    MVE_MK_SCORES,       /* FULL-plan score epilogue: S[j][n] from S^T, LN stats, position and temporal terms */
    MVE_MK_SCALE_PROBS,  /* P' = P diag(rs), mvec = P' mu */
    MVE_MK_TRANSPOSE,
    MVE_MK_VALUE_EPI,    /* O += cb - mvec wg */
    MVE_MK_ADD_BIAS,
    MVE_MK_COUNT
};

/* Buffers a plan binds. Weights come from the CPU handle (after its load-time folding); inputs are filled by
 * the host per call; scratch is sized by the plan. */
enum {
    /* weights */
    MVE_MB_KVR = 0, MVE_MB_WBAR, MVE_MB_A, MVE_MB_B, MVE_MB_MT, MVE_MB_R, MVE_MB_WG, MVE_MB_CB, MVE_MB_POS, MVE_MB_WO, MVE_MB_BO,
    MVE_MB_LNP_W, MVE_MB_LNP_B, MVE_MB_PROJ,
    /* inputs */
    MVE_MB_X, MVE_MB_TVEC, MVE_MB_PATCH,
    /* scratch */
    MVE_MB_Z, MVE_MB_MU, MVE_MB_RS, MVE_MB_TF, MVE_MB_ST, MVE_MB_S, MVE_MB_MVEC, MVE_MB_XT, MVE_MB_U, MVE_MB_O,
    MVE_MB_O2,
    /* output */
    MVE_MB_OUT,
    MVE_MB_COUNT
};

/* C[b][m][n] = sum_k A[b*sA + m*lda + k] * W[b*sW + n*ldw + k]; grid (N, M, batch). */
typedef struct mve_mk_gemm_args {
    uint32_t M, N, K, batch;
    uint32_t lda, ldw, ldc;
    uint32_t sA, sW, sC;
} mve_mk_gemm_args;

/* mu[p] = wbar . x[p], rs[p] = 1 / sqrt(||y[p]||^2 / d + eps) with y = x R^T [n, c]; grid (n). */
typedef struct mve_mk_stats_args {
    uint32_t n, c, d;
    float eps;
} mve_mk_stats_args;

/* rows x d: out = (x - mean) * rstd * g + b (out may be x); grid (rows). */
typedef struct mve_mk_ln_args {
    uint32_t rows, d;
    float eps;
} mve_mk_ln_args;

/* rows x n, in place; grid (rows). */
typedef struct mve_mk_softmax_args {
    uint32_t rows, n;
} mve_mk_softmax_args;

/* S[j][p] = rs[p] (ST[p][j] - mu[p] r[j]) + Tx[j][x_p] + Ty[j][y_p] + (frame has t ? TF[f_p][j] : 0);
 * patch p = (x, y, frame, has_t) in PATCH; grid (n, hq). */
typedef struct mve_mk_scores_args {
    uint32_t n, hq, pos_rows;
} mve_mk_scores_args;

/* S[j][p] *= rs[p]; mvec[j] = sum_p S[j][p] mu[p]; grid (hq). */
typedef struct mve_mk_scale_args {
    uint32_t hq, n;
} mve_mk_scale_args;

/* dst[c][r] = src[r][c], src rows x cols; grid (cols, rows). */
typedef struct mve_mk_transpose_args {
    uint32_t rows, cols;
} mve_mk_transpose_args;

/* O[q][c] += cb[c] - mvec[(c / head_dim) * q_num + q] wg[c]; grid (d, q_num). */
typedef struct mve_mk_value_args {
    uint32_t q_num, d, head_dim;
} mve_mk_value_args;

/* X[r][c] += bias[c]; grid (d, rows). */
typedef struct mve_mk_bias_args {
    uint32_t rows, d;
} mve_mk_bias_args;

/* One patch of the call: coordinates, frame, whether the frame has a temporal term. */
typedef struct mve_mk_patch {
    int32_t x, y, frame, has_t;
} mve_mk_patch;

#endif /* MVE_METAL_SHARED_H */
