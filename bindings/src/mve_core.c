#include "mve.h"

int32_t mve_abi_version(void) { return MVE_ABI_VERSION; }

uint32_t mve_cpu_features(void) {
    uint32_t f = 0;
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) f |= MVE_CPU_AVX2;
    if (__builtin_cpu_supports("fma")) f |= MVE_CPU_FMA;
    /* gcc has no "f16c" name for __builtin_cpu_supports before 14; AVX2 CPUs all have F16C. */
    if (__builtin_cpu_supports("avx2")) f |= MVE_CPU_F16C;
#elif defined(__aarch64__)
    f |= MVE_CPU_NEON; /* NEON is mandatory on aarch64 */
#if defined(__ARM_FEATURE_FP16_VECTOR_ARITHMETIC)
    f |= MVE_CPU_FP16_ARITH;
#endif
#endif
    return f;
}
