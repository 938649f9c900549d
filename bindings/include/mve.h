/* minicpmv-edge native core: public C API for apps (Swift, Kotlin/JNI, C++) and the Python runtime.
 *
 * The MiniCPM-V resampler: one cross-attention of `query_num` learned queries over one slice's ViT patch
 * features, producing `query_num` x `embed_dim` embeddings for the LLM. The weights come from a file written
 * by `minicpmv_edge.export.resampler_weights` (format: runtime/resampler.py, README "Native resampler
 * kernels").
 *
 *     mve_resampler_options o;
 *     mve_resampler_default_options(&o);
 *     o.n_threads = 4;
 *     mve_resampler *r = NULL;
 *     if (mve_resampler_load_file("resampler.mvr", &o, &r) != MVE_OK) { puts(mve_last_error()); ... }
 *     float *out = malloc(sizeof(float) * 64 * embed_dim);           // caller owns every output buffer
 *     mve_resampler_run(r, features, h, w, out);                      // features: [h*w, kv_dim] float32
 *     mve_resampler_free(r);
 *
 * Conventions: every function returns an mve_status; on failure `mve_last_error()` (per thread) says what was
 * wrong, naming the argument or the file field. Nothing here aborts or prints. All matrices are row-major
 * float32. A handle may be used by one thread at a time (it owns scratch buffers and a thread pool); separate
 * handles are independent. */
#ifndef MVE_H
#define MVE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(MVE_BUILD_SHARED)
#define MVE_API __declspec(dllexport)
#elif defined(__GNUC__)
#define MVE_API __attribute__((visibility("default")))
#else
#define MVE_API
#endif

/* Bumped whenever a public signature or struct changes. */
#define MVE_ABI_VERSION 2

/* Bit flags returned by mve_cpu_features(). */
enum {
    MVE_CPU_AVX2 = 1u << 0,
    MVE_CPU_FMA = 1u << 1,
    MVE_CPU_F16C = 1u << 2,
    MVE_CPU_NEON = 1u << 3,
    MVE_CPU_FP16_ARITH = 1u << 4,
};

typedef enum mve_status {
    MVE_OK = 0,
    MVE_ERR_INVALID_ARGUMENT = -1, /* null pointer, grid out of range, bad option value */
    MVE_ERR_IO = -2,               /* the weights file cannot be opened, read or mapped */
    MVE_ERR_FORMAT = -3,           /* not a resampler weights file, unknown version, truncated, inconsistent */
    MVE_ERR_MISMATCH = -4,         /* the file's dimensions differ from what the caller said to expect */
    MVE_ERR_NONFINITE = -5,        /* NaN or infinity in the input features or in the weights */
    MVE_ERR_NOMEM = -6,            /* an allocation failed */
    MVE_ERR_UNSUPPORTED = -7,      /* the requested kernel variant is not built in or this CPU lacks it */
} mve_status;

/* Load-time folding (README "Native resampler kernels"): the queries are constants, so their projections
 * can be folded into the weights once. All three give the same result up to float rounding. */
enum {
    MVE_FOLD_NONE = 0,  /* the plain math, every projection at run time (the reference plan) */
    MVE_FOLD_QUERY = 1, /* fold scale * (LN_q(query) Wq^T + bq)_h Wk_h per head; values via (P v) Wv_h^T */
    MVE_FOLD_FULL = 2,  /* also fold LN_kv's gain and kv_proj into the key and value paths (default) */
};

/* Largest grid side and patch count one call accepts (HF grids are at most 70 x 70 = 4900 per slice; a
 * temporal group of 6 such frames is 29400). */
#define MVE_MAX_GRID_SIDE 1024
#define MVE_MAX_PATCHES 65536
#define MVE_MAX_THREADS 64

/* What a weights file's header may say, from the model facts (minicpmv_edge/facts.py) with headroom: the
 * resampler's width is the LLM's hidden size (3584 / 2560 / 4096 in 2.6 / 4.0 / 4.5), its input the ViT width
 * (1152), 64 queries, heads of 128. The 2D position term splits the width into x and y halves of sin and cos,
 * so embed_dim is a multiple of 4. num_heads x query_num bounds the attention rows every call computes. */
#define MVE_MAX_EMBED_DIM 8192
#define MVE_MAX_KV_DIM 4096
#define MVE_MAX_QUERY_NUM 256
#define MVE_MAX_HEADS 64
#define MVE_MAX_ATTENTION_ROWS 4096

typedef struct mve_resampler_options {
    int32_t n_threads;        /* worker count including the caller, 1..MVE_MAX_THREADS (0 means 1) */
    int32_t fold;             /* MVE_FOLD_*; the default is MVE_FOLD_FULL */
    const char *kernel;       /* NULL or "auto": the MVE_KERNEL environment variable if set, else the best
                                 variant for this CPU; or "generic", "avx2", "neon" */
    int32_t expect_embed_dim; /* if > 0, loading fails with MVE_ERR_MISMATCH unless the file has this width */
    int32_t expect_kv_dim;    /* likewise for the ViT feature width */
} mve_resampler_options;

typedef struct mve_resampler_info {
    int32_t embed_dim;    /* D: output width (= the LLM hidden size) */
    int32_t kv_dim;       /* C: input width (= the ViT hidden size) */
    int32_t query_num;    /* Q: output rows per slice or frame group */
    int32_t num_heads;    /* D / 128 */
    int32_t weight_dtype; /* 0 = float32, 1 = float16 */
    int32_t fold;         /* MVE_FOLD_* in use */
    int32_t n_threads;
    const char *kernel;   /* "generic", "avx2", "neon" (static string) */
} mve_resampler_info;

typedef struct mve_resampler mve_resampler;

MVE_API int32_t mve_abi_version(void);
MVE_API uint32_t mve_cpu_features(void);

/* The message of the last failed call on this thread ("" if none). */
MVE_API const char *mve_last_error(void);
MVE_API const char *mve_status_string(mve_status status);

/* Kernel variants: 1 if `name` is built into this library and this CPU can run it, else 0. */
MVE_API int32_t mve_kernel_available(const char *name);
/* The variant "auto" picks on this machine (honours MVE_KERNEL), or NULL if MVE_KERNEL names one that is not
 * available. */
MVE_API const char *mve_kernel_auto(void);

MVE_API void mve_resampler_default_options(mve_resampler_options *opts);

/* Load a weights file. The file is memory-mapped (POSIX) and stays mapped until mve_resampler_free.
 * opts may be NULL (defaults). On success *out is a new handle; on failure *out is NULL. */
MVE_API mve_status mve_resampler_load_file(const char *path, const mve_resampler_options *opts,
                                           mve_resampler **out);
/* Same from bytes in memory, without copying: `data` (4-byte aligned) must stay valid and unchanged until
 * mve_resampler_free. */
MVE_API mve_status mve_resampler_load_memory(const void *data, size_t size, const mve_resampler_options *opts,
                                             mve_resampler **out);
MVE_API void mve_resampler_free(mve_resampler *r);
MVE_API mve_status mve_resampler_get_info(const mve_resampler *r, mve_resampler_info *info);

/* One slice: features [h*w, kv_dim] (row-major, patch index = y*w + x) -> out [query_num, embed_dim]. */
MVE_API mve_status mve_resampler_run(mve_resampler *r, const float *features, int32_t h, int32_t w, float *out);

/* One temporal frame group (MiniCPM-V 4.5 video): n_frames slices whose features are concatenated in
 * `features` ([sum h_i*w_i, kv_dim]), grids[2*i] = h_i, grids[2*i+1] = w_i, temporal_ids[i] = the frame's
 * time in ticks (>= 0) or -1 for none. The queries attend over all frames' patches at once -> out
 * [query_num, embed_dim]. A one-frame group with id -1 is exactly mve_resampler_run. */
MVE_API mve_status mve_resampler_run_temporal(mve_resampler *r, const float *features, int32_t n_frames,
                                              const int32_t *grids, const int32_t *temporal_ids, float *out);

#ifdef __cplusplus
}
#endif

#endif /* MVE_H */
