/* Kernel variant table and the one place the variant is chosen.
 *
 * "auto" is decided once per process: the MVE_KERNEL environment variable if it is set (so tests and bench/
 * can pin a variant without code changes), else the best variant this CPU runs. A handle may also name a
 * variant explicitly (mve_resampler_options.kernel); the tests use that to run every variant side by side. */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static const mve_kernels kernels_generic = {"generic", mve_tile_f32_generic, mve_tile_f16_generic};
#if defined(MVE_HAVE_AVX2)
static const mve_kernels kernels_avx2 = {"avx2", mve_tile_f32_avx2, mve_tile_f16_avx2};
#endif
#if defined(MVE_HAVE_NEON)
static const mve_kernels kernels_neon = {"neon", mve_tile_f32_neon, mve_tile_f16_neon};
#endif

/* Best first. */
static const mve_kernels *const variants[] = {
#if defined(MVE_HAVE_AVX2)
    &kernels_avx2,
#endif
#if defined(MVE_HAVE_NEON)
    &kernels_neon,
#endif
    &kernels_generic,
};
#define N_VARIANTS (sizeof variants / sizeof variants[0])

static int cpu_runs(const mve_kernels *k) {
    uint32_t f = mve_cpu_features();
    if (strcmp(k->name, "avx2") == 0) {
        uint32_t need = MVE_CPU_AVX2 | MVE_CPU_FMA | MVE_CPU_F16C;
        return (f & need) == need;
    }
    if (strcmp(k->name, "neon") == 0) return (f & MVE_CPU_NEON) != 0;
    return 1;
}

static const mve_kernels *find(const char *name) {
    for (size_t i = 0; i < N_VARIANTS; i++)
        if (strcmp(variants[i]->name, name) == 0) return cpu_runs(variants[i]) ? variants[i] : NULL;
    return NULL;
}

static const mve_kernels *best(void) {
    for (size_t i = 0; i < N_VARIANTS; i++)
        if (cpu_runs(variants[i])) return variants[i];
    return &kernels_generic;
}

/* Decided on first use. Two threads racing through the first use compute the same answer; the atomics only
 * make publishing it well defined. */
static _Atomic(const mve_kernels *) auto_choice;
static atomic_int auto_resolved;

static const mve_kernels *resolve_auto(void) {
    if (!atomic_load(&auto_resolved)) {
        const char *env = getenv("MVE_KERNEL");
        atomic_store(&auto_choice, (env && *env && strcmp(env, "auto") != 0) ? find(env) : best());
        atomic_store(&auto_resolved, 1);
    }
    return atomic_load(&auto_choice);
}

const mve_kernels *mve_kernels_resolve(const char *name) {
    if (name == NULL || *name == '\0' || strcmp(name, "auto") == 0) {
        const mve_kernels *k = resolve_auto();
        if (!k)
            mve_fail(MVE_ERR_UNSUPPORTED, "MVE_KERNEL=%s: no such kernel variant in this build, or this CPU "
                     "cannot run it (try generic)", getenv("MVE_KERNEL"));
        return k;
    }
    const mve_kernels *k = find(name);
    if (!k) {
        int known = !strcmp(name, "generic") || !strcmp(name, "avx2") || !strcmp(name, "neon");
        mve_fail(MVE_ERR_UNSUPPORTED, known ? "kernel variant '%s' is not built into this library or this CPU "
                                              "cannot run it"
                                            : "unknown kernel variant '%s' (expected auto, generic, avx2, neon)",
                 name);
    }
    return k;
}

int32_t mve_kernel_available(const char *name) { return name != NULL && find(name) != NULL; }

const char *mve_kernel_auto(void) {
    const mve_kernels *k = resolve_auto();
    return k ? k->name : NULL;
}
