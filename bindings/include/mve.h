/* minicpmv-edge native core: public C API for apps (Swift, Kotlin/JNI, C++) and the Python runtime.
 *
 * The resampler kernels land in their own change; for now the library reports its ABI version and
 * the CPU features the dispatcher will use. Callers own every output buffer. */
#ifndef MVE_H
#define MVE_H

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
#define MVE_ABI_VERSION 1

/* Bit flags returned by mve_cpu_features(). */
enum {
    MVE_CPU_AVX2 = 1u << 0,
    MVE_CPU_FMA = 1u << 1,
    MVE_CPU_F16C = 1u << 2,
    MVE_CPU_NEON = 1u << 3,
    MVE_CPU_FP16_ARITH = 1u << 4,
};

MVE_API int32_t mve_abi_version(void);
MVE_API uint32_t mve_cpu_features(void);

#ifdef __cplusplus
}
#endif

#endif /* MVE_H */
