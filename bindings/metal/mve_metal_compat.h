/* Just enough of the Metal Shading Language for resampler.metal to compile as C++ (g++ -std=c++17
 * -Wno-attributes), so its arithmetic runs on the CPU in the tests (bindings/tests/metal_emu.cpp): address
 * space qualifiers vanish, [[buffer(i)]] / [[thread_position_in_grid]] become ignored attributes, `half` is an
 * IEEE binary16 value widened exactly, `uint3` a plain struct. Nothing here is used on Apple. */
#ifndef MVE_METAL_COMPAT_H
#define MVE_METAL_COMPAT_H
#if defined(__METAL_VERSION__)
#error "mve_metal_compat.h is for compiling the Metal kernels as C++ only"
#endif

#include <cmath>
#include <cstdint>
#include <cstring>

#define kernel
#define device
#define constant const
#define thread

typedef unsigned int uint;

struct uint3 {
    uint x, y, z;
};

/* IEEE binary16 storage with an exact conversion to float (what Metal does when reading a half). */
struct half {
    uint16_t bits;
    operator float() const {
        uint32_t sign = (uint32_t)(bits & 0x8000u) << 16, exp = (bits >> 10) & 0x1fu, man = bits & 0x3ffu, u;
        if (exp == 0x1f) u = sign | 0x7f800000u | (man << 13);
        else if (exp == 0) {
            float v = (float)man * (1.0f / 16777216.0f);
            return sign ? -v : v;
        } else u = sign | ((exp + 112u) << 23) | (man << 13);
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
};
static_assert(sizeof(half) == 2, "half must be 2 bytes");

using std::exp;
using std::fma;
using std::max;
using std::sqrt;
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }

#endif /* MVE_METAL_COMPAT_H */
