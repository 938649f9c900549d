/* minicpmv-edge Metal back end (Apple only; built when CMake's MVE_METAL is ON, the default on Apple).
 *
 * UNTESTED ON REAL HARDWARE: no Metal device runs in this project's CI. The kernels' arithmetic is checked on
 * every CI run by compiling bindings/metal/resampler.metal as C++ and running the host's exact dispatch list on
 * the CPU (tests/test_kernels_metal.py); this host file has not been compiled or run yet.
 *
 *     mve_resampler *cpu;                       // loaded with fold = MVE_FOLD_FULL (it does the folding)
 *     mve_metal_resampler *gpu;
 *     mve_metal_resampler_create(cpu, "path/to/mve.metallib", &gpu);
 *     mve_metal_resampler_run(gpu, features, h, w, out);
 *     mve_metal_resampler_free(gpu);            // before mve_resampler_free(cpu)
 */
#ifndef MVE_METAL_H
#define MVE_METAL_H

#include "mve.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mve_metal_resampler mve_metal_resampler;

/* `cpu` must be loaded with MVE_FOLD_FULL and outlive the Metal handle; `metallib_path` is the mve.metallib
 * CMake builds next to the library. */
MVE_API mve_status mve_metal_resampler_create(mve_resampler *cpu, const char *metallib_path,
                                              mve_metal_resampler **out);
MVE_API mve_status mve_metal_resampler_run(mve_metal_resampler *m, const float *features, int32_t h, int32_t w,
                                           float *out);
MVE_API mve_status mve_metal_resampler_run_temporal(mve_metal_resampler *m, const float *features,
                                                    int32_t n_frames, const int32_t *grids,
                                                    const int32_t *temporal_ids, float *out);
MVE_API void mve_metal_resampler_free(mve_metal_resampler *m);

#ifdef __cplusplus
}
#endif

#endif /* MVE_METAL_H */
