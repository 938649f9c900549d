/* mve_fuzz: bad input to the public C API must produce an error code and a message, never a crash. Built with
 * -fsanitize=address,undefined by tests/test_kernels_arch.py, which fails on any sanitizer report.
 *
 *   mve_fuzz WEIGHTS [SEED]     WEIGHTS: a valid (small) resampler weights file
 *
 * Covers: NULL pointers everywhere, bad options, zero / negative / oversized grids and frame counts, temporal
 * ids out of range, NaN and infinity in the features, misaligned and truncated buffers, every byte of the
 * header and tensor table overwritten with several values, and random corruption of the tensor data. Loads that
 * still succeed after a mutation (e.g. a changed layer_norm_eps) must run. Prints a summary; exit 1 if a call
 * that must fail succeeded or a status had no message. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "mve.h"

static int failures = 0, checks = 0;

#define EXPECT(cond, what)                                                                                        \
    do {                                                                                                          \
        checks++;                                                                                                 \
        if (!(cond)) {                                                                                            \
            failures++;                                                                                           \
            fprintf(stderr, "FAIL %s:%d: %s (last error: %s)\n", __FILE__, __LINE__, what, mve_last_error());   \
        }                                                                                                         \
    } while (0)

/* a status that is an error and comes with a message */
static void expect_error(mve_status st, mve_status want, const char *what) {
    EXPECT(st == want, what);
    EXPECT(st == MVE_OK || mve_last_error()[0] != '\0', "error without a message");
}

static unsigned long long rng_state = 88172645463325252ull;
static unsigned rnd(void) {
    rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
    return (unsigned)(rng_state >> 11);
}

static int run_small(mve_resampler *r, int kv) {
    float *x = calloc((size_t)4 * kv, sizeof(float));
    mve_resampler_info info;
    mve_resampler_get_info(r, &info);
    float *out = malloc((size_t)info.query_num * info.embed_dim * sizeof(float));
    for (int i = 0; i < 4 * kv; i++) x[i] = (float)((i * 37) % 11) * 0.1f - 0.5f;
    mve_status st = mve_resampler_run(r, x, 2, 2, out);
    free(x), free(out);
    return st;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: mve_fuzz WEIGHTS [SEED]\n");
        return 2;
    }
    if (argc > 2) rng_state ^= strtoull(argv[2], NULL, 10) * 0x9E3779B97F4A7C15ull;
    FILE *f = fopen(argv[1], "rb");
    if (!f) return 2;
    fseek(f, 0, SEEK_END);
    size_t size = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *good = aligned_alloc(64, (size + 63) / 64 * 64 + 64);
    if (fread(good, 1, size, f) != size) return 2;
    fclose(f);
    /* mutations go into a buffer of exactly `size` bytes, so AddressSanitizer sees any read past the end */
    unsigned char *buf = malloc(size), *shifted = malloc(size + 1);

    mve_resampler *r = NULL;
    mve_status st = mve_resampler_load_memory(good, size, NULL, &r);
    EXPECT(st == MVE_OK && r, "the valid file loads");
    if (!r) return 1;
    mve_resampler_info info;
    mve_resampler_get_info(r, &info);
    int kv = info.kv_dim, n_out = info.query_num * info.embed_dim;
    float *x = calloc((size_t)8 * 8 * kv, sizeof(float)), *out = malloc((size_t)n_out * sizeof(float));
    int32_t grids[4] = {2, 2, 2, 2}, ids[2] = {-1, 3};

    /* ---- NULL pointers */
    mve_resampler *r2 = (mve_resampler *)0x1;
    expect_error(mve_resampler_load_memory(NULL, size, NULL, &r2), MVE_ERR_INVALID_ARGUMENT, "load_memory NULL data");
    EXPECT(r2 == NULL, "*out cleared on failure");
    expect_error(mve_resampler_load_memory(good, size, NULL, NULL), MVE_ERR_INVALID_ARGUMENT, "load_memory NULL out");
    expect_error(mve_resampler_load_file(NULL, NULL, &r2), MVE_ERR_INVALID_ARGUMENT, "load_file NULL path");
    expect_error(mve_resampler_load_file(argv[1], NULL, NULL), MVE_ERR_INVALID_ARGUMENT, "load_file NULL out");
    expect_error(mve_resampler_load_file("/nonexistent/x.mvr", NULL, &r2), MVE_ERR_IO, "load_file missing");
    expect_error(mve_resampler_load_file("/", NULL, &r2), MVE_ERR_IO, "load_file directory");
    expect_error(mve_resampler_run(NULL, x, 2, 2, out), MVE_ERR_INVALID_ARGUMENT, "run NULL handle");
    expect_error(mve_resampler_run(r, NULL, 2, 2, out), MVE_ERR_INVALID_ARGUMENT, "run NULL features");
    expect_error(mve_resampler_run(r, x, 2, 2, NULL), MVE_ERR_INVALID_ARGUMENT, "run NULL out");
    expect_error(mve_resampler_run_temporal(r, x, 2, NULL, ids, out), MVE_ERR_INVALID_ARGUMENT, "NULL grids");
    expect_error(mve_resampler_run_temporal(r, x, 2, grids, NULL, out), MVE_ERR_INVALID_ARGUMENT, "NULL ids");
    expect_error(mve_resampler_get_info(NULL, &info), MVE_ERR_INVALID_ARGUMENT, "get_info NULL handle");
    expect_error(mve_resampler_get_info(r, NULL), MVE_ERR_INVALID_ARGUMENT, "get_info NULL info");
    mve_resampler_free(NULL);
    mve_resampler_default_options(NULL);
    EXPECT(mve_kernel_available(NULL) == 0, "kernel_available(NULL)");
    EXPECT(strlen(mve_status_string((mve_status)12345)) > 0, "status string of an unknown code");

    /* ---- grids, frame counts, ids */
    int bad_grids[][2] = {{0, 2}, {2, 0}, {-1, 2}, {2, -5}, {MVE_MAX_GRID_SIDE + 1, 1}, {1, 1 << 30},
                          {MVE_MAX_GRID_SIDE, MVE_MAX_GRID_SIDE}};
    for (size_t i = 0; i < sizeof bad_grids / sizeof bad_grids[0]; i++)
        expect_error(mve_resampler_run(r, x, bad_grids[i][0], bad_grids[i][1], out), MVE_ERR_INVALID_ARGUMENT,
                     "bad grid");
    expect_error(mve_resampler_run_temporal(r, x, 0, grids, ids, out), MVE_ERR_INVALID_ARGUMENT, "0 frames");
    expect_error(mve_resampler_run_temporal(r, x, -3, grids, ids, out), MVE_ERR_INVALID_ARGUMENT, "-3 frames");
    int32_t bad_ids[][2] = {{-2, 0}, {0, 1 << 24}, {-2147483647 - 1, 0}};
    for (size_t i = 0; i < 3; i++)
        expect_error(mve_resampler_run_temporal(r, x, 2, grids, bad_ids[i], out), MVE_ERR_INVALID_ARGUMENT,
                     "bad temporal id");
    int32_t many[2 * 40];
    int32_t many_ids[40];
    for (int i = 0; i < 40; i++) many[2 * i] = 64, many[2 * i + 1] = 64, many_ids[i] = i;
    expect_error(mve_resampler_run_temporal(r, x, 40, many, many_ids, out), MVE_ERR_INVALID_ARGUMENT,
                 "too many patches in a group");
    EXPECT(mve_resampler_run_temporal(r, x, 2, grids, ids, out) == MVE_OK, "a valid 2-frame group runs");
    EXPECT(mve_resampler_run(r, x, 1, 1, out) == MVE_OK, "a 1x1 grid runs");

    /* ---- non-finite features */
    float specials[] = {NAN, INFINITY, -INFINITY};
    for (int i = 0; i < 3; i++) {
        int at = (int)(rnd() % (unsigned)(4 * kv));
        x[at] = specials[i];
        expect_error(mve_resampler_run(r, x, 2, 2, out), MVE_ERR_NONFINITE, "non-finite feature");
        x[at] = 0.0f;
    }
    EXPECT(mve_resampler_run(r, x, 2, 2, out) == MVE_OK, "runs again after errors");
    for (int i = 0; i < n_out; i++)
        if (!isfinite(out[i])) {
            EXPECT(0, "finite output for finite input");
            break;
        }

    /* ---- options */
    mve_resampler_options o;
    mve_resampler_default_options(&o);
    o.n_threads = -1;
    expect_error(mve_resampler_load_memory(good, size, &o, &r2), MVE_ERR_INVALID_ARGUMENT, "n_threads -1");
    o.n_threads = MVE_MAX_THREADS + 1;
    expect_error(mve_resampler_load_memory(good, size, &o, &r2), MVE_ERR_INVALID_ARGUMENT, "n_threads too many");
    mve_resampler_default_options(&o);
    o.fold = 3;
    expect_error(mve_resampler_load_memory(good, size, &o, &r2), MVE_ERR_INVALID_ARGUMENT, "fold 3");
    mve_resampler_default_options(&o);
    o.kernel = "bogus";
    expect_error(mve_resampler_load_memory(good, size, &o, &r2), MVE_ERR_UNSUPPORTED, "kernel bogus");
    mve_resampler_default_options(&o);
    o.expect_embed_dim = info.embed_dim + 128;
    expect_error(mve_resampler_load_memory(good, size, &o, &r2), MVE_ERR_MISMATCH, "expect_embed_dim");
    mve_resampler_default_options(&o);
    o.expect_kv_dim = info.kv_dim + 1;
    expect_error(mve_resampler_load_memory(good, size, &o, &r2), MVE_ERR_MISMATCH, "expect_kv_dim");
    mve_resampler_default_options(&o);
    o.n_threads = 3;
    for (int fold = 0; fold <= 2; fold++) {
        o.fold = fold;
        st = mve_resampler_load_memory(good, size, &o, &r2);
        EXPECT(st == MVE_OK, "3 threads, every fold");
        if (st == MVE_OK) {
            EXPECT(run_small(r2, kv) == MVE_OK, "runs with 3 threads");
            mve_resampler_free(r2);
        }
    }

    /* ---- misaligned and truncated buffers */
    memcpy(shifted + 1, good, size);
    expect_error(mve_resampler_load_memory(shifted + 1, size, NULL, &r2), MVE_ERR_INVALID_ARGUMENT,
                 "misaligned data");
    int truncated_ok = 0;
    for (size_t len = 0; len < size; len += (len < 1024 ? 1 : 1 + rnd() % 4096)) {
        unsigned char *t = malloc(len ? len : 1); /* exactly len bytes: reading past them is an ASan error */
        memcpy(t, good, len);
        st = mve_resampler_load_memory(t, len, NULL, &r2);
        if (st == MVE_OK) truncated_ok++, mve_resampler_free(r2);
        else EXPECT(mve_last_error()[0] != '\0', "truncation error has a message");
        free(t);
    }
    EXPECT(truncated_ok == 0, "every truncated file is rejected");

    /* ---- header and table mutations */
    size_t table_end = MVE_FILE_HEADER_BYTES + (size_t)MVE_T_COUNT * MVE_FILE_ENTRY_BYTES;
    int loaded = 0, rejected = 0;
    unsigned char values[] = {0x00, 0xff, 0x01, 0x80, 0x7f, 0x40};
    for (size_t at = 0; at < table_end; at++)
        for (size_t v = 0; v < sizeof values + 1; v++) {
            memcpy(buf, good, size);
            buf[at] = v < sizeof values ? values[v] : (unsigned char)(good[at] + 1);
            if (buf[at] == good[at]) continue;
            st = mve_resampler_load_memory(buf, size, NULL, &r2);
            if (st == MVE_OK) {
                loaded++;
                st = run_small(r2, kv);
                EXPECT(st == MVE_OK, "a mutated file that loads also runs");
                mve_resampler_free(r2);
            } else {
                rejected++;
                EXPECT(mve_last_error()[0] != '\0', "mutation error has a message");
            }
        }
    /* ---- random corruption anywhere (tensor data: NaN patterns must be caught, other values just run) */
    int data_loaded = 0, data_nonfinite = 0;
    for (int trial = 0; trial < 300; trial++) {
        memcpy(buf, good, size);
        int n = 1 + (int)(rnd() % 8);
        for (int i = 0; i < n; i++) buf[rnd() % size] = (unsigned char)rnd();
        if (trial % 3 == 0) { /* plant an f32 NaN or an f16 inf/NaN pattern in the data */
            size_t at = table_end + 64 + (rnd() % (size - table_end - 64)) / 4 * 4;
            buf[at + 1] = 0xff, buf[at + 2] = 0xff, buf[at + 3] = 0x7f;
        }
        st = mve_resampler_load_memory(buf, size, NULL, &r2);
        if (st == MVE_OK) {
            data_loaded++;
            EXPECT(run_small(r2, kv) == MVE_OK, "a corrupted file that loads also runs");
            mve_resampler_free(r2);
        } else {
            data_nonfinite += st == MVE_ERR_NONFINITE;
            EXPECT(mve_last_error()[0] != '\0', "corruption error has a message");
        }
    }

    mve_resampler_free(r);
    free(x), free(out), free(buf), free(shifted), free(good);
    printf("mve_fuzz: %d checks, %d failures; header/table mutations: %d rejected, %d loaded and ran; "
           "random corruption: %d loaded and ran, %d rejected as non-finite\n",
           checks, failures, rejected, loaded, data_loaded, data_nonfinite);
    return failures ? 1 : 0;
}
