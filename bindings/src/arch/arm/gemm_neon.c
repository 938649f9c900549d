/* AArch64 NEON tile kernels: C = A W^T over one tile (see internal.h), float32 accumulation; float16 weights
 * are widened with vcvt_f32_f16 (baseline AArch64, no FP16 arithmetic needed).
 *
 * Register block: 4 rows of A x 4 rows of W = 16 accumulators of 4 lanes (of the 32 q registers). Rows past
 * the tile edge point at the last valid row and their results are dropped; the K tail (K % 4) is summed in
 * scalar after the vector loop. */
#include <arm_neon.h>

#include "internal.h"

enum { MR = 4, NR = 4 };

static inline float32x4_t load_w_f32(const void *w, int k) { return vld1q_f32((const float *)w + k); }
static inline float32x4_t load_w_f16(const void *w, int k) {
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)w + k)));
}
static inline float w_f32(const void *w, int k) { return ((const float *)w)[k]; }
static inline float w_f16(const void *w, int k) { return mve_f16_to_f32(((const uint16_t *)w)[k]); }

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
                float32x4_t acc[MR][NR];                                                                          \
                for (int i = 0; i < MR; i++)                                                                      \
                    for (int j = 0; j < NR; j++) acc[i][j] = vdupq_n_f32(0.0f);                                   \
                int k = 0;                                                                                        \
                for (; k + 4 <= K; k += 4) {                                                                      \
                    float32x4_t w0 = LOADW(w[0], k), w1 = LOADW(w[1], k), w2 = LOADW(w[2], k);                    \
                    float32x4_t w3 = LOADW(w[3], k);                                                              \
                    for (int i = 0; i < MR; i++) {                                                                \
                        float32x4_t x = vld1q_f32(a[i] + k);                                                      \
                        acc[i][0] = vfmaq_f32(acc[i][0], x, w0), acc[i][1] = vfmaq_f32(acc[i][1], x, w1);         \
                        acc[i][2] = vfmaq_f32(acc[i][2], x, w2), acc[i][3] = vfmaq_f32(acc[i][3], x, w3);         \
                    }                                                                                             \
                }                                                                                                 \
                float out[MR][NR];                                                                                \
                for (int i = 0; i < MR; i++)                                                                      \
                    for (int j = 0; j < NR; j++) out[i][j] = vaddvq_f32(acc[i][j]);                               \
                for (; k < K; k++)                                                                                \
                    for (int j = 0; j < NR; j++) {                                                                \
                        float wv = WSCALAR(w[j], k);                                                              \
                        for (int i = 0; i < MR; i++) out[i][j] += a[i][k] * wv;                                   \
                    }                                                                                             \
                for (int i = 0; i < MR && m + i < M; i++)                                                         \
                    for (int j = 0; j < NR && n + j < N; j++) {                                                   \
                        float *c = C + (size_t)(m + i) * ldc + n + j;                                             \
                        *c = accumulate ? *c + out[i][j] : out[i][j];                                             \
                    }                                                                                             \
            }                                                                                                     \
        }                                                                                                         \
    }

MVE_DEFINE_TILE(mve_tile_f32_neon, 4, load_w_f32, w_f32)
MVE_DEFINE_TILE(mve_tile_f16_neon, 2, load_w_f16, w_f16)
