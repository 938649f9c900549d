/* C = A W^T: the generic (portable C) tile kernels, and the blocked, threaded driver every variant shares.
 *
 * The driver cuts C into MB x NB tiles (one pool task each) and walks K in KB-long blocks, so a task's slices
 * of A and W (MB*KB + NB*KB floats, 256 KB) stay in L2 while the tile kernel reuses them. Only the tile kernel
 * differs between variants (arch/x86, arch/arm); its edges (M, N, K not multiples of the register block) are the
 * tile kernel's own business. */
#include "internal.h"

enum { MB = 64, NB = 64, KB = 512 };

/* ------------------------------------------------------------------------------------------------ generic */

/* Eight partial sums, like an 8-lane SIMD kernel: compilers vectorize this without -ffast-math, and the
 * rounding behaves like the SIMD variants (a long serial sum would be the odd one out). */
static float dot_f32(const float *a, const float *w, int K) {
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int k = 0;
    for (; k + 8 <= K; k += 8)
        for (int l = 0; l < 8; l++) s[l] += a[k + l] * w[k + l];
    float tail = 0.0f;
    for (; k < K; k++) tail += a[k] * w[k];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + tail;
}

static float dot_f16(const float *a, const uint16_t *w, int K) {
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int k = 0;
    for (; k + 8 <= K; k += 8)
        for (int l = 0; l < 8; l++) s[l] += a[k + l] * mve_f16_to_f32(w[k + l]);
    float tail = 0.0f;
    for (; k < K; k++) tail += a[k] * mve_f16_to_f32(w[k]);
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + tail;
}

void mve_tile_f32_generic(int M, int N, int K, const float *A, size_t lda, const void *W, size_t ldw, float *C,
                          size_t ldc, int accumulate) {
    const float *Wf = (const float *)W;
    for (int m = 0; m < M; m++)          /* C[m, n] = A[m, :] . W[n, :] */
        for (int n = 0; n < N; n++) {
            float v = dot_f32(A + (size_t)m * lda, Wf + (size_t)n * ldw, K);
            C[(size_t)m * ldc + n] = accumulate ? C[(size_t)m * ldc + n] + v : v;
        }
}

void mve_tile_f16_generic(int M, int N, int K, const float *A, size_t lda, const void *W, size_t ldw, float *C,
                          size_t ldc, int accumulate) {
    const uint16_t *Wh = (const uint16_t *)W;
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            float v = dot_f16(A + (size_t)m * lda, Wh + (size_t)n * ldw, K);
            C[(size_t)m * ldc + n] = accumulate ? C[(size_t)m * ldc + n] + v : v;
        }
}

/* ------------------------------------------------------------------------------------------------ driver */

typedef struct {
    mve_tile_fn tile;
    int M, N, K, m_tiles, n_tiles;
    const float *A;
    size_t lda, sA;
    const unsigned char *W; /* bytes, so float16 and float32 share the pointer arithmetic */
    size_t esize, ldw, sW;
    float *C;
    size_t ldc, sC;
} gemm_job;

static void gemm_task(void *arg, int task) {
    const gemm_job *j = (const gemm_job *)arg;
    int per_batch = j->m_tiles * j->n_tiles;
    int b = task / per_batch, t = task % per_batch;
    int m0 = (t / j->n_tiles) * MB, n0 = (t % j->n_tiles) * NB;
    int mb = j->M - m0 < MB ? j->M - m0 : MB;
    int nb = j->N - n0 < NB ? j->N - n0 : NB;
    const float *A = j->A + (size_t)b * j->sA + (size_t)m0 * j->lda;
    const unsigned char *W = j->W + ((size_t)b * j->sW + (size_t)n0 * j->ldw) * j->esize;
    float *C = j->C + (size_t)b * j->sC + (size_t)m0 * j->ldc + n0;
    if (j->K == 0) { /* an empty sum */
        for (int m = 0; m < mb; m++)
            for (int n = 0; n < nb; n++) C[(size_t)m * j->ldc + n] = 0.0f;
        return;
    }
    for (int k0 = 0; k0 < j->K; k0 += KB) {
        int kb = j->K - k0 < KB ? j->K - k0 : KB;
        j->tile(mb, nb, kb, A + k0, j->lda, W + (size_t)k0 * j->esize, j->ldw, C, j->ldc, k0 > 0);
    }
}

void mve_gemm_nt(const mve_gemm_ctx *ctx, int batch, int M, int N, int K, const float *A, size_t lda, size_t sA,
                 const void *W, mve_dtype wtype, size_t ldw, size_t sW, float *C, size_t ldc, size_t sC) {
    if (batch <= 0 || M <= 0 || N <= 0) return;
    gemm_job j;
    j.tile = wtype == MVE_F16 ? ctx->kernels->tile_f16 : ctx->kernels->tile_f32;
    j.M = M, j.N = N, j.K = K;
    j.m_tiles = (M + MB - 1) / MB, j.n_tiles = (N + NB - 1) / NB;
    j.A = A, j.lda = lda, j.sA = sA;
    j.W = (const unsigned char *)W, j.esize = mve_dtype_size(wtype), j.ldw = ldw, j.sW = sW;
    j.C = C, j.ldc = ldc, j.sC = sC;
    mve_pool_run(ctx->pool, batch * j.m_tiles * j.n_tiles, gemm_task, &j);
}
