/* Internal declarations shared by the C sources of libmve (not installed). */
#ifndef MVE_INTERNAL_H
#define MVE_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "mve.h"

/* ------------------------------------------------------------------------------------------------
 * Errors: set a per-thread message and return the status. */
mve_status mve_fail(mve_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
void mve_clear_error(void);

/* ------------------------------------------------------------------------------------------------
 * Half precision (IEEE binary16) <-> float, portable bit manipulation. */
float mve_f16_to_f32(uint16_t h);
uint16_t mve_f32_to_f16(float f); /* round to nearest even; overflow -> inf */

/* ------------------------------------------------------------------------------------------------
 * Weight element type of a matrix operand. Activations are always float32. */
typedef enum { MVE_F32 = 0, MVE_F16 = 1 } mve_dtype;

static inline size_t mve_dtype_size(mve_dtype t) { return t == MVE_F16 ? 2 : 4; }

/* ------------------------------------------------------------------------------------------------
 * Kernel variants. Only the GEMM tile is architecture specific: everything else (layer norm, softmax, the
 * sincos terms) is O(rows x width) and stays in portable C.
 *
 * A tile function computes, for m in [0, M), n in [0, N):
 *     C[m*ldc + n] = (accumulate ? C[m*ldc + n] : 0) + sum_{k<K} A[m*lda + k] * W[n*ldw + k]
 * i.e. C = A W^T with A [M, K] float32 and W [N, K] float32 or float16 (the "x W^T" layout of a torch Linear
 * weight, so every output is a dot product of two contiguous rows). Strides are in elements. */
typedef void (*mve_tile_fn)(int M, int N, int K, const float *A, size_t lda, const void *W, size_t ldw,
                            float *C, size_t ldc, int accumulate);

typedef struct mve_kernels {
    const char *name;
    mve_tile_fn tile_f32; /* W float32 */
    mve_tile_fn tile_f16; /* W float16, widened to float32 on load; float32 accumulation */
} mve_kernels;

/* Every variant defines the same two entry points (name suffix = variant). */
void mve_tile_f32_generic(int M, int N, int K, const float *A, size_t lda, const void *W, size_t ldw, float *C,
                          size_t ldc, int accumulate);
void mve_tile_f16_generic(int M, int N, int K, const float *A, size_t lda, const void *W, size_t ldw, float *C,
                          size_t ldc, int accumulate);
#if defined(MVE_HAVE_AVX2)
void mve_tile_f32_avx2(int M, int N, int K, const float *A, size_t lda, const void *W, size_t ldw, float *C,
                       size_t ldc, int accumulate);
void mve_tile_f16_avx2(int M, int N, int K, const float *A, size_t lda, const void *W, size_t ldw, float *C,
                       size_t ldc, int accumulate);
#endif
#if defined(MVE_HAVE_NEON)
void mve_tile_f32_neon(int M, int N, int K, const float *A, size_t lda, const void *W, size_t ldw, float *C,
                       size_t ldc, int accumulate);
void mve_tile_f16_neon(int M, int N, int K, const float *A, size_t lda, const void *W, size_t ldw, float *C,
                       size_t ldc, int accumulate);
#endif

/* The dispatch table (dispatch.c): resolve a variant name ("auto"/NULL, "generic", "avx2", "neon"). Returns
 * NULL and sets the error message when the name is unknown, not built, or unsupported by this CPU. */
const mve_kernels *mve_kernels_resolve(const char *name);

/* ------------------------------------------------------------------------------------------------
 * Thread pool (pool.c): n_threads - 1 workers plus the calling thread. run() calls fn(ctx, task) for task in
 * [0, n_tasks) spread over the threads and returns when all are done. Not reentrant. */
typedef struct mve_pool mve_pool;
mve_pool *mve_pool_create(int n_threads);
void mve_pool_destroy(mve_pool *pool);
int mve_pool_threads(const mve_pool *pool);
void mve_pool_run(mve_pool *pool, int n_tasks, void (*fn)(void *ctx, int task), void *ctx);

/* ------------------------------------------------------------------------------------------------
 * Blocked, threaded GEMM driver (gemm.c) over a variant's tile function, with an optional batch:
 *     for b < batch: C_b = A_b W_b^T   (A_b = A + b*sA, W_b = W + b*sW elements, C_b = C + b*sC)
 * C is overwritten. */
typedef struct mve_gemm_ctx {
    const mve_kernels *kernels;
    mve_pool *pool; /* may be NULL: single-threaded */
} mve_gemm_ctx;

void mve_gemm_nt(const mve_gemm_ctx *ctx, int batch, int M, int N, int K, const float *A, size_t lda, size_t sA,
                 const void *W, mve_dtype wtype, size_t ldw, size_t sW, float *C, size_t ldc, size_t sC);

/* ------------------------------------------------------------------------------------------------
 * Weights file (weights.c). Layout documented in runtime/resampler.py and the README. */
#define MVE_FILE_MAGIC "MVERSMPL"
#define MVE_FILE_VERSION 1
#define MVE_FILE_HEADER_BYTES 64
#define MVE_FILE_ENTRY_BYTES 32
#define MVE_FILE_ALIGN 64

/* Tensor ids, in file order. Matrices are [rows=out, cols=in] (torch Linear layout); PROJ_T is `proj`
 * transposed so that y = x @ proj is x PROJ_T^T like every other matrix. */
typedef enum {
    MVE_T_QUERY = 0,  /* [Q, D]   f32 */
    MVE_T_LN_Q_W,     /* [D]      f32 */
    MVE_T_LN_Q_B,     /* [D]      f32 */
    MVE_T_KV_PROJ,    /* [D, C]   dtype; absent (0 x 0) when C == D (identity in the HF code) */
    MVE_T_LN_KV_W,    /* [D]      f32 */
    MVE_T_LN_KV_B,    /* [D]      f32 */
    MVE_T_WQ,         /* [D, D]   dtype: in_proj_weight rows [0, D) */
    MVE_T_WK,         /* [D, D]   dtype: rows [D, 2D) */
    MVE_T_WV,         /* [D, D]   dtype: rows [2D, 3D) */
    MVE_T_BQ,         /* [D]      f32 */
    MVE_T_BK,         /* [D]      f32 */
    MVE_T_BV,         /* [D]      f32 */
    MVE_T_WO,         /* [D, D]   dtype: out_proj.weight */
    MVE_T_BO,         /* [D]      f32 */
    MVE_T_LN_POST_W,  /* [D]      f32 */
    MVE_T_LN_POST_B,  /* [D]      f32 */
    MVE_T_PROJ_T,     /* [D, D]   dtype: proj transposed */
    MVE_T_KV_NORM_R,  /* [C, C]   f32: R^T R = Wc^T Wc, Wc = kv_proj - column means: ||z - mean z|| = ||R x|| */
    MVE_T_COUNT
} mve_tensor_id;

typedef struct mve_weights {
    int32_t dtype; /* mve_dtype of the matrices; vectors and the query are always float32 */
    int32_t embed_dim, kv_dim, query_num, num_heads, head_dim;
    float ln_eps;
    const void *t[MVE_T_COUNT]; /* pointers into the file bytes (NULL for an absent KV_PROJ) */
} mve_weights;

/* Parse and validate file bytes (every field, offset and size; all weights finite). */
mve_status mve_weights_parse(const void *data, size_t size, const char *origin, mve_weights *w);

/* ------------------------------------------------------------------------------------------------
 * The fully folded weights of a handle loaded with MVE_FOLD_FULL, for other back ends (the Metal host and its
 * CPU emulation reuse the CPU library's load-time folding). Grows the position tables to cover max_side. */
typedef struct mve_full_view {
    const mve_weights *w;
    const void *a_fold;  /* [H*Q, D] weight dtype */
    const void *b_fold;  /* [H*Q, C] weight dtype */
    const void *mt_fold; /* [D, C]   weight dtype */
    const float *r_fold; /* [H*Q] */
    const float *wg;     /* [D] */
    const float *cb;     /* [D] */
    const float *wbar;   /* [C] column means of kv_proj */
    const float *pos_tab; /* [2][H*Q][pos_rows]: Tx then Ty */
    int pos_rows;
} mve_full_view;

mve_status mve_resampler_full_view(mve_resampler *r, int max_side, mve_full_view *v);

/* sincos_1d(E, pos) as the plans compute it (float32, numpy's operation order): out[E]. */
void mve_sincos_1d(int E, float pos, float *out);

#endif /* MVE_INTERNAL_H */
