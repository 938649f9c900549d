/* Library-wide pieces: ABI version, CPU feature probe, error messages, float16 conversion. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

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
    f |= MVE_CPU_NEON; /* NEON (with float16 <-> float32 conversion) is mandatory on aarch64 */
#if defined(__ARM_FEATURE_FP16_VECTOR_ARITHMETIC)
    f |= MVE_CPU_FP16_ARITH;
#endif
#endif
    return f;
}

/* ---------------------------------------------------------------------------------------------- errors */

static _Thread_local char last_error[512];

mve_status mve_fail(mve_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return status;
}

void mve_clear_error(void) { last_error[0] = '\0'; }

const char *mve_last_error(void) { return last_error; }

const char *mve_status_string(mve_status status) {
    switch (status) {
    case MVE_OK: return "ok";
    case MVE_ERR_INVALID_ARGUMENT: return "invalid argument";
    case MVE_ERR_IO: return "i/o error";
    case MVE_ERR_FORMAT: return "bad weights file";
    case MVE_ERR_MISMATCH: return "weights do not match what the caller expects";
    case MVE_ERR_NONFINITE: return "non-finite value";
    case MVE_ERR_NOMEM: return "out of memory";
    case MVE_ERR_UNSUPPORTED: return "unsupported kernel variant";
    }
    return "unknown status";
}

/* ---------------------------------------------------------------------------------------------- float16 */

static float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint32_t bits_from_f32(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

float mve_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1f) return f32_from_bits(sign | 0x7f800000u | (man << 13)); /* inf / nan */
    if (exp == 0) {
        /* zero or subnormal: man * 2^-24 */
        float v = (float)man * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    return f32_from_bits(sign | ((exp + 112u) << 23) | (man << 13));
}

uint16_t mve_f32_to_f16(float f) {
    uint32_t u = bits_from_f32(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0)); /* inf / nan */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds above 65504 -> inf */
    if (a < 0x38800000u) {                                  /* below 2^-14: subnormal or zero */
        float v = f32_from_bits(a) * 16777216.0f;           /* exact scaling; value in units of 2^-24 */
        uint32_t m = (uint32_t)v;
        float rem = v - (float)m;
        if (rem > 0.5f || (rem == 0.5f && (m & 1u))) m++;
        return (uint16_t)(sign | m);
    }
    uint32_t rounded = a + 0x0fffu + ((a >> 13) & 1u); /* round to nearest even at bit 13 */
    return (uint16_t)(sign | ((rounded - 0x38000000u) >> 13));
}
