/* libFuzzer harness for the weights parser and the plans behind it (coverage-guided, unlike mve_fuzz.c's
 * scripted mutations). Built by tests/test_kernels_arch.py with clang -fsanitize=fuzzer,address,undefined and
 * run for a bounded time from the crafted corpus (bindings/tests/corpus/).
 *
 * Input: a weights file. Its last byte picks the fold plan; a file that loads is run at a 1x1 grid, then at
 * 80x80 (past the 70-row position cache), then as a 2-frame temporal group: the sequence that once double-freed
 * the position table. A file must load and run, or be refused with a message. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mve.h"

static void must(int cond, const char *what) {
    if (!cond) {
        fprintf(stderr, "mve_libfuzzer: %s (last error: %s)\n", what, mve_last_error());
        abort();
    }
}

static void run(mve_resampler *r, int h, int w, int frames) {
    mve_resampler_info info;
    mve_resampler_get_info(r, &info);
    size_t n = (size_t)h * w * frames * (size_t)info.kv_dim;
    float *x = malloc(n * sizeof(float)), *out = malloc((size_t)info.query_num * info.embed_dim * sizeof(float));
    for (size_t i = 0; i < n; i++) x[i] = (float)(i % 7) * 0.25f - 0.75f;
    int32_t grids[4] = {h, w, h, w}, ids[2] = {0, 5};
    mve_status st = frames == 1 ? mve_resampler_run(r, x, h, w, out)
                                : mve_resampler_run_temporal(r, x, frames, grids, ids, out);
    must(st == MVE_OK, "a file that loads must run");
    free(x), free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* a copy of exactly `size` bytes, 4-byte aligned as the loader requires: reads past it are ASan errors */
    void *buf = malloc(size ? size : 1);
    if (size) memcpy(buf, data, size);
    mve_resampler_options o;
    mve_resampler_default_options(&o);
    o.fold = size ? data[size - 1] % 3 : 2;
    mve_resampler *r = NULL;
    mve_status st = mve_resampler_load_memory(buf, size, &o, &r);
    if (st == MVE_OK) {
        mve_resampler_info info;
        mve_resampler_get_info(r, &info);
        run(r, 1, 1, 1);
        if ((size_t)info.kv_dim * info.embed_dim <= 1u << 12) run(r, 80, 80, 1); /* keep each input fast */
        run(r, 3, 2, 2);
        mve_resampler_free(r);
    } else {
        must(r == NULL && mve_last_error()[0] != '\0', "a refused file must come with a message");
    }
    free(buf);
    return 0;
}
