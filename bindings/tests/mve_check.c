/* mve_check: run the resampler from the command line on raw float32 files. The tests drive it natively and,
 * cross-compiled, under qemu-aarch64 (tests/test_kernels_arch.py), and compare its output with torch.
 *
 *   mve_check --info
 *   mve_check WEIGHTS FEATURES OUT KERNEL FOLD THREADS GRIDS [IDS]
 *     FEATURES  raw float32 [sum h*w, kv_dim]        OUT  raw float32 [query_num, embed_dim] (written)
 *     KERNEL    auto | generic | avx2 | neon          FOLD 0 | 1 | 2      THREADS >= 1
 *     GRIDS     h,w[,h,w...] one pair per frame      IDS  temporal ids t[,t...] (default -1 for every frame)
 * Exit status: 0 ok, 1 usage or i/o problem, 2 the library returned an error (message on stderr). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mve.h"

#define MAX_FRAMES 64

static int parse_list(const char *s, int32_t *out, int max) {
    int n = 0;
    while (*s && n < max) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s) return -1;
        out[n++] = (int32_t)v;
        s = *end == ',' ? end + 1 : end;
    }
    return *s ? -1 : n;
}

static void *read_all(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *buf = malloc(n > 0 ? (size_t)n : 1);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *size = (size_t)n;
    return buf;
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "--info") == 0) {
        uint32_t f = mve_cpu_features();
        printf("abi %d features%s%s%s%s auto %s available", mve_abi_version(), f & MVE_CPU_AVX2 ? " avx2" : "",
               f & MVE_CPU_FMA ? " fma" : "", f & MVE_CPU_NEON ? " neon" : "",
               f & MVE_CPU_FP16_ARITH ? " fp16" : "", mve_kernel_auto() ? mve_kernel_auto() : "(none)");
        const char *names[] = {"generic", "avx2", "neon"};
        for (int i = 0; i < 3; i++)
            if (mve_kernel_available(names[i])) printf(" %s", names[i]);
        printf("\n");
        return 0;
    }
    if (argc < 8 || argc > 9) {
        fprintf(stderr, "usage: mve_check --info | WEIGHTS FEATURES OUT KERNEL FOLD THREADS GRIDS [IDS]\n");
        return 1;
    }
    int32_t grids[2 * MAX_FRAMES], ids[MAX_FRAMES];
    int ng = parse_list(argv[7], grids, 2 * MAX_FRAMES);
    if (ng <= 0 || ng % 2) {
        fprintf(stderr, "GRIDS must be h,w pairs: %s\n", argv[7]);
        return 1;
    }
    int frames = ng / 2;
    if (argc == 9) {
        if (parse_list(argv[8], ids, MAX_FRAMES) != frames) {
            fprintf(stderr, "IDS must name one id per frame: %s\n", argv[8]);
            return 1;
        }
    } else {
        for (int i = 0; i < frames; i++) ids[i] = -1;
    }
    mve_resampler_options o;
    mve_resampler_default_options(&o);
    o.kernel = argv[4];
    o.fold = atoi(argv[5]);
    o.n_threads = atoi(argv[6]);
    mve_resampler *r = NULL;
    if (mve_resampler_load_file(argv[1], &o, &r) != MVE_OK) {
        fprintf(stderr, "load: %s\n", mve_last_error());
        return 2;
    }
    mve_resampler_info info;
    mve_resampler_get_info(r, &info);
    size_t nbytes = 0, want = 0;
    for (int i = 0; i < frames; i++) want += (size_t)grids[2 * i] * grids[2 * i + 1];
    want *= (size_t)info.kv_dim * sizeof(float);
    float *x = (float *)read_all(argv[2], &nbytes);
    if (!x || nbytes != want) {
        fprintf(stderr, "%s: expected %zu bytes of float32 features, got %zu\n", argv[2], want, nbytes);
        mve_resampler_free(r);
        return 1;
    }
    size_t out_n = (size_t)info.query_num * info.embed_dim;
    float *out = (float *)malloc(out_n * sizeof(float));
    int rc = 0;
    if (mve_resampler_run_temporal(r, x, frames, grids, ids, out) != MVE_OK) {
        fprintf(stderr, "run: %s\n", mve_last_error());
        rc = 2;
    } else {
        FILE *f = fopen(argv[3], "wb");
        if (!f || fwrite(out, sizeof(float), out_n, f) != out_n) rc = 1;
        if (f) fclose(f);
        printf("kernel %s fold %d threads %d: %d frame(s) -> %d x %d\n", info.kernel, info.fold, info.n_threads,
               frames, info.query_num, info.embed_dim);
    }
    free(out);
    free(x);
    mve_resampler_free(r);
    return rc;
}
