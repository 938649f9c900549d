/* mve_fuzz: bad input to the public C API must produce an error code and a message, never a crash. Built with
 * -fsanitize=address,undefined by tests/test_kernels_arch.py, which fails on any sanitizer report.
 *
 *   mve_fuzz WEIGHTS [SEED] [--seconds S] [CRAFTED.mvr ...]     WEIGHTS: a valid (small) resampler weights file
 *
 * Covers: NULL pointers everywhere, bad options, zero / negative / oversized grids and frame counts, temporal
 * ids out of range, NaN and infinity in the features, misaligned and truncated buffers, every byte of the
 * header and tensor table overwritten with several values, and random corruption of the tensor data. Loads that
 * still succeed after a mutation (e.g. a changed layer_norm_eps) must run. Prints a summary; exit 1 if a call
 * that must fail succeeded or a status had no message.
 *
 * CRAFTED files (bindings/tests/corpus/: files that once crashed the library) are loaded from disk with every
 * fold and run at a small grid, then a large one, then a temporal group: the sequence that grows the position
 * caches. With --seconds, a random phase then runs for that long: it writes valid files of random small shapes
 * (embed_dim down to 4, one head, one query, kv_dim == embed_dim or not), loads them with a random fold and
 * thread count, runs random grid sequences, and does the same with mutated copies (header fields and table
 * entries overwritten with boundary values, random bytes). Every case must load and run, or fail with a
 * message; the number of cases executed is printed. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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


/* ---------------------------------------------------------------------------------------------- grid runs */

/* Run one grid (h x w, or a temporal group of `frames` such frames) on fresh random features; the status. */
static mve_status run_grid(mve_resampler *r, int h, int w, int frames) {
    mve_resampler_info info;
    mve_resampler_get_info(r, &info);
    size_t n = (size_t)h * w * frames;
    float *x = malloc(n * (size_t)info.kv_dim * sizeof(float));
    float *out = malloc((size_t)info.query_num * info.embed_dim * sizeof(float));
    int32_t grids[2 * 8], ids[8];
    for (size_t i = 0; i < n * (size_t)info.kv_dim; i++) x[i] = (float)(rnd() % 2001) * 1e-3f - 1.0f;
    for (int f = 0; f < frames; f++) grids[2 * f] = h, grids[2 * f + 1] = w, ids[f] = f == 1 ? -1 : 3 * f;
    mve_status st = frames == 1 ? mve_resampler_run(r, x, h, w, out)
                                : mve_resampler_run_temporal(r, x, frames, grids, ids, out);
    free(x), free(out);
    return st;
}

/* Small, then large, then small again, then a temporal group: grows every cache, then reuses it. */
static void run_growing(mve_resampler *r, const char *what) {
    static const int seq[][3] = {{1, 1, 1}, {80, 80, 1}, {2, 3, 1}, {7, 5, 3}};
    for (size_t i = 0; i < sizeof seq / sizeof seq[0]; i++) {
        mve_status st = run_grid(r, seq[i][0], seq[i][1], seq[i][2]);
        EXPECT(st == MVE_OK, what);
    }
}

/* Crafted files from disk: each must load and run the growing sequence, or be refused with a message. */
static int run_crafted(const char *path) {
    int loaded = 0;
    for (int fold = 0; fold <= 2; fold++) {
        mve_resampler_options o;
        mve_resampler_default_options(&o);
        o.fold = fold;
        mve_resampler *r = NULL;
        mve_status st = mve_resampler_load_file(path, &o, &r);
        if (st != MVE_OK) {
            EXPECT(r == NULL && mve_last_error()[0] != '\0', "a refused crafted file has a message");
            continue;
        }
        loaded++;
        run_growing(r, "a crafted file that loads also runs");
        mve_resampler_free(r);
    }
    printf("mve_fuzz: crafted %s: %s\n", path, loaded ? "loaded and ran" : mve_last_error());
    return loaded;
}

/* ---------------------------------------------------------------------------------------------- random phase */

/* A valid weights file of the given shape with random weights, in a buffer of exactly its size. */
static unsigned char *synth_file(int dtype, int d, int c, int q, int heads, float eps, size_t *size_out) {
    uint32_t rows[MVE_T_COUNT], cols[MVE_T_COUNT], tdt[MVE_T_COUNT];
    uint64_t off[MVE_T_COUNT], nb[MVE_T_COUNT];
    uint64_t at = MVE_FILE_HEADER_BYTES + (uint64_t)MVE_T_COUNT * MVE_FILE_ENTRY_BYTES;
    for (int i = 0; i < MVE_T_COUNT; i++) {
        int matrix = i == MVE_T_KV_PROJ || i == MVE_T_WQ || i == MVE_T_WK || i == MVE_T_WV || i == MVE_T_WO ||
                     i == MVE_T_PROJ_T;
        rows[i] = 1, cols[i] = (uint32_t)d, tdt[i] = matrix ? (uint32_t)dtype : 0;
        if (i == MVE_T_QUERY) rows[i] = (uint32_t)q;
        if (matrix) rows[i] = (uint32_t)d;
        if (i == MVE_T_KV_PROJ) rows[i] = c == d ? 0 : (uint32_t)d, cols[i] = c == d ? 0 : (uint32_t)c;
        if (i == MVE_T_KV_NORM_R) rows[i] = cols[i] = (uint32_t)c;
        at = (at + MVE_FILE_ALIGN - 1) / MVE_FILE_ALIGN * MVE_FILE_ALIGN;
        off[i] = at, nb[i] = (uint64_t)rows[i] * cols[i] * (tdt[i] ? 2 : 4);
        at += nb[i];
    }
    size_t size = (size_t)at;
    unsigned char *p = calloc(size, 1);
    uint32_t h32[8] = {MVE_FILE_VERSION, (uint32_t)dtype, (uint32_t)d, (uint32_t)c, (uint32_t)q, (uint32_t)heads};
    memcpy(p, MVE_FILE_MAGIC, 8);
    memcpy(p + 8, h32, 24);
    memcpy(p + 32, &eps, 4);
    uint32_t nt = MVE_T_COUNT;
    uint64_t fs = size;
    memcpy(p + 36, &nt, 4), memcpy(p + 40, &fs, 8);
    for (int i = 0; i < MVE_T_COUNT; i++) {
        unsigned char *e = p + MVE_FILE_HEADER_BYTES + (size_t)i * MVE_FILE_ENTRY_BYTES;
        uint32_t e32[4] = {(uint32_t)i, tdt[i], rows[i], cols[i]};
        memcpy(e, e32, 16), memcpy(e + 16, &off[i], 8), memcpy(e + 24, &nb[i], 8);
        size_t n = (size_t)rows[i] * cols[i];
        int gain = i == MVE_T_LN_Q_W || i == MVE_T_LN_KV_W || i == MVE_T_LN_POST_W;
        for (size_t k = 0; k < n; k++) {
            float v = gain ? 1.0f : ((float)(rnd() % 2001) * 1e-3f - 1.0f) * 0.2f;
            if (tdt[i]) {
                uint16_t hv = mve_f32_to_f16(v);
                memcpy(p + off[i] + 2 * k, &hv, 2);
            } else {
                memcpy(p + off[i] + 4 * k, &v, 4);
            }
        }
    }
    *size_out = size;
    return p;
}

/* Boundary values for a mutated 32-bit field. */
static uint32_t boundary_value(uint32_t old) {
    static const uint32_t v[] = {0, 1, 2, 3, 4, 5, 63, 64, 65, 255, 256, 1023, 1024, 4096, 4097, 8192, 8196,
                                 65535, 65536, 0x7fffffffu, 0x80000000u, 0xfffffffeu, 0xffffffffu};
    unsigned k = rnd() % (sizeof v / sizeof v[0] + 4);
    if (k < sizeof v / sizeof v[0]) return v[k];
    return k % 2 ? old + 1 + (rnd() % 4) : old - 1 - (rnd() % 4);
}

static int info_small(mve_resampler *r) {
    mve_resampler_info info;
    mve_resampler_get_info(r, &info);
    return (size_t)info.embed_dim * info.kv_dim <= 64 * 64;
}

/* One random case: load a (possibly mutated) buffer with a random fold and threads, run a random sequence. */
static int random_case(const unsigned char *good, size_t size, int mutate) {
    unsigned char *buf = malloc(size);
    memcpy(buf, good, size);
    if (mutate) {
        size_t table_end = MVE_FILE_HEADER_BYTES + (size_t)MVE_T_COUNT * MVE_FILE_ENTRY_BYTES;
        int n = 1 + (int)(rnd() % 3);
        for (int i = 0; i < n; i++) {
            if (rnd() % 4 == 0) {
                buf[rnd() % size] = (unsigned char)rnd();
            } else { /* a 32-bit field of the header or the table */
                size_t at = 8 + (rnd() % ((table_end - 8) / 4)) * 4;
                uint32_t old;
                memcpy(&old, buf + at, 4);
                uint32_t v = boundary_value(old);
                memcpy(buf + at, &v, 4);
            }
        }
    }
    mve_resampler_options o;
    mve_resampler_default_options(&o);
    o.fold = (int)(rnd() % 3);
    o.n_threads = 1 + (int)(rnd() % 3);
    mve_resampler *r = NULL;
    mve_status st = mve_resampler_load_memory(buf, size, &o, &r);
    int loaded = st == MVE_OK;
    if (!loaded) {
        EXPECT(r == NULL && mve_last_error()[0] != '\0', "a refused random file has a message");
        EXPECT(mutate, "a valid random file loads");
    } else {
        int steps = 1 + (int)(rnd() % 3);
        for (int i = 0; i < steps; i++) {
            int big = info_small(r) && rnd() % 4 == 0; /* past the 70-row position cache, kept cheap */
            int h = big ? 40 + (int)(rnd() % 41) : 1 + (int)(rnd() % 6);
            int w = big ? 40 + (int)(rnd() % 41) : 1 + (int)(rnd() % 6);
            int frames = big ? 1 : 1 + (int)(rnd() % 3);
            EXPECT(run_grid(r, h, w, frames) == MVE_OK, "a random file that loads also runs");
        }
        mve_resampler_free(r);
    }
    free(buf);
    return loaded;
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Random shapes and mutations for `seconds`; prints how many cases ran. */
static void random_phase(double seconds) {
    long cases = 0, loaded = 0;
    double t_end = now_s() + seconds;
    while (now_s() < t_end) {
        int d = 4 * (1 + (int)(rnd() % (rnd() % 2 ? 4 : 64)));  /* often tiny: 4..16, else up to 256 */
        int c = rnd() % 3 == 0 ? d : 1 + (int)(rnd() % 96);
        int q = rnd() % 8 == 0 ? 64 : 1 + (int)(rnd() % 8);
        int heads = 1 + (int)(rnd() % 8);
        while (d % heads) heads--;
        float eps = rnd() % 2 ? 1e-6f : 1.0f;
        size_t size;
        unsigned char *good = synth_file((int)(rnd() % 2), d, c, q, heads, eps, &size);
        for (int m = 0; m < 4; m++, cases++) loaded += random_case(good, size, m > 0);
        free(good);
    }
    printf("mve_fuzz: random phase: %ld cases executed in %.0f s (%ld loaded and ran)\n", cases, seconds, loaded);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: mve_fuzz WEIGHTS [SEED] [--seconds S] [CRAFTED.mvr ...]\n");
        return 2;
    }
    int first_extra = 2;
    double seconds = 0.0;
    if (argc > 2 && argv[2][0] >= '0' && argv[2][0] <= '9')
        rng_state ^= strtoull(argv[2], NULL, 10) * 0x9E3779B97F4A7C15ull, first_extra = 3;
    if (argc > first_extra + 1 && strcmp(argv[first_extra], "--seconds") == 0)
        seconds = strtod(argv[first_extra + 1], NULL), first_extra += 2;
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
    for (int i = first_extra; i < argc; i++) run_crafted(argv[i]);
    if (seconds > 0) random_phase(seconds);
    printf("mve_fuzz: %d checks, %d failures; header/table mutations: %d rejected, %d loaded and ran; "
           "random corruption: %d loaded and ran, %d rejected as non-finite\n",
           checks, failures, rejected, loaded, data_loaded, data_nonfinite);
    return failures ? 1 : 0;
}
