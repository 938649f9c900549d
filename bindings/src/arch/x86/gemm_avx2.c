/* x86 AVX2 + FMA (+ F16C for float16 weights) tile kernels: C = A W^T over one tile (see internal.h).
 *
 * Register block: 4 rows of A x 3 rows of W = 12 accumulators of 8 lanes (A comes straight from memory as an
 * FMA operand, so 12 accumulators + 3 W vectors fit the 16 ymm registers). Rows past the tile edge point at
 * the last valid row and their results are dropped, so there is no separate scalar edge code for M and N; the
 * K tail (K % 8) is summed in scalar after the vector loop. Compiled with -mavx2 -mfma -mf16c (this file only). */
#include <immintrin.h>

#include "internal.h"

enum { MR = 4, NR = 3 };

/* [sum(a), sum(b), sum(c), sum(d)] */
static inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
    __m256 abcd = _mm256_hadd_ps(ab, cd);
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

static inline __m256 load_w_f32(const void *w, int k) { return _mm256_loadu_ps((const float *)w + k); }
static inline __m256 load_w_f16(const void *w, int k) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + k)));
}
static inline float w_f32(const void *w, int k) { return ((const float *)w)[k]; }
static inline float w_f16(const void *w, int k) { return _cvtsh_ss(((const uint16_t *)w)[k]); }

/* One body, instantiated per weight type. */
#define MVE_DEFINE_TILE(NAME, ESIZE, LOADW, WSCALAR)                                                              \
    void NAME(int M, int N, int K, const float *A, size_t lda, const void *W, size_t ldw, float *C, size_t ldc,    \
              int accumulate) {                                                                                   \
        const unsigned char *Wb = (const unsigned char *)W;                                                       \
        for (int m = 0; m < M; m += MR) {                                                                         \
            const float *a[MR];                                                                                   \
            for (int i = 0; i < MR; i++) a[i] = A + (size_t)(m + i < M ? m + i : M - 1) * lda;                    \
            for (int n = 0; n < N; n += NR) {                                                                     \
                const void *w[NR];                                                                                \
                for (int j = 0; j < NR; j++) w[j] = Wb + (size_t)(n + j < N ? n + j : N - 1) * ldw * (ESIZE);     \
                __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c10 = c00, c11 = c00, c12 = c00;          \
                __m256 c20 = c00, c21 = c00, c22 = c00, c30 = c00, c31 = c00, c32 = c00;                          \
                int k = 0;                                                                                        \
                for (; k + 8 <= K; k += 8) {                                                                      \
                    __m256 w0 = LOADW(w[0], k), w1 = LOADW(w[1], k), w2 = LOADW(w[2], k);                         \
                    __m256 x = _mm256_loadu_ps(a[0] + k);                                                         \
                    c00 = _mm256_fmadd_ps(x, w0, c00), c01 = _mm256_fmadd_ps(x, w1, c01);                         \
                    c02 = _mm256_fmadd_ps(x, w2, c02);                                                            \
                    x = _mm256_loadu_ps(a[1] + k);                                                                \
                    c10 = _mm256_fmadd_ps(x, w0, c10), c11 = _mm256_fmadd_ps(x, w1, c11);                         \
                    c12 = _mm256_fmadd_ps(x, w2, c12);                                                            \
                    x = _mm256_loadu_ps(a[2] + k);                                                                \
                    c20 = _mm256_fmadd_ps(x, w0, c20), c21 = _mm256_fmadd_ps(x, w1, c21);                         \
                    c22 = _mm256_fmadd_ps(x, w2, c22);                                                            \
                    x = _mm256_loadu_ps(a[3] + k);                                                                \
                    c30 = _mm256_fmadd_ps(x, w0, c30), c31 = _mm256_fmadd_ps(x, w1, c31);                         \
                    c32 = _mm256_fmadd_ps(x, w2, c32);                                                            \
                }                                                                                                 \
                float out[NR][MR]; /* out[j][i] = row i of A . row j of W */                                      \
                _mm_storeu_ps(out[0], hsum4(c00, c10, c20, c30));                                                 \
                _mm_storeu_ps(out[1], hsum4(c01, c11, c21, c31));                                                 \
                _mm_storeu_ps(out[2], hsum4(c02, c12, c22, c32));                                                 \
                for (; k < K; k++)                                                                                \
                    for (int j = 0; j < NR; j++) {                                                                \
                        float wv = WSCALAR(w[j], k);                                                              \
                        for (int i = 0; i < MR; i++) out[j][i] += a[i][k] * wv;                                   \
                    }                                                                                             \
                for (int i = 0; i < MR && m + i < M; i++)                                                         \
                    for (int j = 0; j < NR && n + j < N; j++) {                                                   \
                        float *c = C + (size_t)(m + i) * ldc + n + j;                                             \
                        *c = accumulate ? *c + out[j][i] : out[j][i];                                             \
                    }                                                                                             \
            }                                                                                                     \
        }                                                                                                         \
    }

MVE_DEFINE_TILE(mve_tile_f32_avx2, 4, load_w_f32, w_f32)
MVE_DEFINE_TILE(mve_tile_f16_avx2, 2, load_w_f16, w_f16)
