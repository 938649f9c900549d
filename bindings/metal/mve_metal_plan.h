/* The dispatch list of one resampler call on Metal (the MVE_FOLD_FULL plan), built once in portable C and
 * executed by two consumers: the Objective-C host (mve_metal.m) encodes it into a command buffer, and the
 * tests' CPU emulation (bindings/tests/metal_emu.cpp) runs each dispatch's threads in a loop. Sharing the list
 * means the emulation checks the host's exact sequence of kernels, arguments and bindings. Internal. */
#ifndef MVE_METAL_PLAN_H
#define MVE_METAL_PLAN_H

#include "../src/internal.h"
#include "mve_metal_shared.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MVE_METAL_MAX_DISPATCH 32
#define MVE_METAL_MAX_BINDINGS 8

typedef struct mve_metal_binding {
    int32_t buffer;  /* MVE_MB_* */
    uint64_t offset; /* bytes */
} mve_metal_binding;

typedef struct mve_metal_dispatch {
    int32_t kernel; /* MVE_MK_* */
    const char *label;
    uint32_t grid[3]; /* threads */
    int32_t n_bindings; /* bound at [[buffer(1)]], [[buffer(2)]], ... in order */
    mve_metal_binding bindings[MVE_METAL_MAX_BINDINGS];
    uint32_t args_size; /* bound at [[buffer(0)]] */
    union {
        mve_mk_gemm_args gemm;
        mve_mk_stats_args stats;
        mve_mk_ln_args ln;
        mve_mk_softmax_args softmax;
        mve_mk_scores_args scores;
        mve_mk_scale_args scale;
        mve_mk_transpose_args transpose;
        mve_mk_value_args value;
        mve_mk_bias_args bias;
    } args;
} mve_metal_dispatch;

typedef struct mve_metal_plan {
    int n_dispatch;
    mve_metal_dispatch dispatch[MVE_METAL_MAX_DISPATCH];
    /* every buffer: where its bytes are (weights and inputs) or how many bytes it needs (scratch, output) */
    const void *host[MVE_MB_COUNT]; /* weights: the CPU handle's memory; inputs: owned by the plan; else NULL */
    uint64_t bytes[MVE_MB_COUNT];
    float *tvec;                /* [n_frames, D] temporal sincos rows (owned) */
    mve_mk_patch *patch;        /* [N] (owned) */
} mve_metal_plan;

/* Build the plan of one call (features [N, C] at `features`). The view comes from mve_resampler_full_view
 * with max_side covering every grid. Validates like mve_resampler_run_temporal. */
mve_status mve_metal_plan_build(const mve_full_view *v, const float *features, int32_t n_frames,
                                const int32_t *grids, const int32_t *temporal_ids, mve_metal_plan *plan);
void mve_metal_plan_free(mve_metal_plan *plan);

#ifdef __cplusplus
}
#endif

#endif /* MVE_METAL_PLAN_H */
