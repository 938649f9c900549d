// metal_emu: run the Metal kernels (bindings/metal/resampler.metal, compiled here as C++ behind
// mve_metal_compat.h) on the CPU, dispatch by dispatch and threadgroup by threadgroup, following exactly the plan
// the Objective-C host encodes (mve_metal_plan.c), and compare the result with the portable C library
// (generic kernels, MVE_FOLD_FULL) on the same weights.
//
//   g++ -std=c++17 -O2 -Wno-attributes -I bindings/include -I bindings/src -I bindings/metal
//       [-DMVE_METAL_SOURCE='"path/to/resampler.metal"'] bindings/tests/metal_emu.cpp bindings/metal/mve_metal_plan.c
//       libmve_static.a -lpthread -lm
//   metal_emu WEIGHTS [TOLERANCE]      exit 0 when every case is within TOLERANCE (default 2e-5), else 1
//
// The tests also compile a deliberately broken copy of the .metal file and expect this program to fail.
#ifndef MVE_METAL_SOURCE
#define MVE_METAL_SOURCE "../metal/resampler.metal"
#endif
#include MVE_METAL_SOURCE
#undef kernel
#undef device
#undef constant
#undef thread

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

extern "C" {
#include "mve_metal_plan.h"
}

namespace {

const uint32_t TG[3] = {8, 8, 1}; // threadgroup size the host uses for 2D/3D grids (1D: 64 x 1 x 1)

struct Buffers {
    std::vector<std::vector<unsigned char>> owned = std::vector<std::vector<unsigned char>>(MVE_MB_COUNT);
    unsigned char *ptr[MVE_MB_COUNT] = {};
};

template <class T> T *at(Buffers &b, const mve_metal_dispatch &d, int i) {
    return reinterpret_cast<T *>(b.ptr[d.bindings[i].buffer] + d.bindings[i].offset);
}

void run_thread(const mve_metal_dispatch &d, Buffers &b, uint3 gid) {
    switch (d.kernel) {
    case MVE_MK_GEMM_F32:
        mve_k_gemm_f32(d.args.gemm, at<const float>(b, d, 0), at<const float>(b, d, 1), at<float>(b, d, 2), gid);
        break;
    case MVE_MK_GEMM_F16:
        mve_k_gemm_f16(d.args.gemm, at<const float>(b, d, 0), at<const half>(b, d, 1), at<float>(b, d, 2), gid);
        break;
    case MVE_MK_KV_STATS:
        mve_k_kv_stats(d.args.stats, at<const float>(b, d, 0), at<const float>(b, d, 1), at<const float>(b, d, 2),
                       at<float>(b, d, 3), at<float>(b, d, 4), gid);
        break;
    case MVE_MK_LN_ROWS:
        mve_k_ln_rows(d.args.ln, at<const float>(b, d, 0), at<float>(b, d, 1), at<const float>(b, d, 2),
                      at<const float>(b, d, 3), gid);
        break;
    case MVE_MK_SOFTMAX_ROWS: mve_k_softmax_rows(d.args.softmax, at<float>(b, d, 0), gid); break;
    case MVE_MK_SCORES:
        mve_k_scores(d.args.scores, at<const float>(b, d, 0), at<const float>(b, d, 1), at<const float>(b, d, 2),
                     at<const float>(b, d, 3), at<const float>(b, d, 4), at<const float>(b, d, 5),
                     at<const mve_mk_patch>(b, d, 6), at<float>(b, d, 7), gid);
        break;
    case MVE_MK_SCALE_PROBS:
        mve_k_scale_probs(d.args.scale, at<float>(b, d, 0), at<const float>(b, d, 1), at<const float>(b, d, 2),
                          at<float>(b, d, 3), gid);
        break;
    case MVE_MK_TRANSPOSE: mve_k_transpose(d.args.transpose, at<const float>(b, d, 0), at<float>(b, d, 1), gid); break;
    case MVE_MK_VALUE_EPI:
        mve_k_value_epi(d.args.value, at<float>(b, d, 0), at<const float>(b, d, 1), at<const float>(b, d, 2),
                        at<const float>(b, d, 3), gid);
        break;
    case MVE_MK_ADD_BIAS: mve_k_add_bias(d.args.bias, at<float>(b, d, 0), at<const float>(b, d, 1), gid); break;
    default: std::fprintf(stderr, "unknown kernel %d\n", d.kernel); std::exit(2);
    }
}

// One dispatch: every threadgroup in turn, every thread of the group in a loop. Kernels never synchronise
// inside a threadgroup, so running threads one after another is a faithful schedule.
void run_dispatch(const mve_metal_dispatch &d, Buffers &b) {
    uint32_t tg[3] = {TG[0], TG[1], TG[2]};
    if (d.grid[1] == 1 && d.grid[2] == 1) tg[0] = 64, tg[1] = 1;
    uint32_t groups[3];
    for (int i = 0; i < 3; i++) groups[i] = (d.grid[i] + tg[i] - 1) / tg[i];
    for (uint32_t gz = 0; gz < groups[2]; gz++)
        for (uint32_t gy = 0; gy < groups[1]; gy++)
            for (uint32_t gx = 0; gx < groups[0]; gx++)
                for (uint32_t tz = 0; tz < tg[2]; tz++)
                    for (uint32_t ty = 0; ty < tg[1]; ty++)
                        for (uint32_t tx = 0; tx < tg[0]; tx++) {
                            uint3 gid = {gx * tg[0] + tx, gy * tg[1] + ty, gz * tg[2] + tz};
                            // dispatchThreads launches no thread outside the grid; the kernels check anyway
                            if (gid.x < d.grid[0] && gid.y < d.grid[1] && gid.z < d.grid[2]) run_thread(d, b, gid);
                        }
}

int emulate(mve_resampler *r, const float *x, int n_frames, const int32_t *grids, const int32_t *ids,
            float *out) {
    int max_side = 1;
    for (int i = 0; i < 2 * n_frames; i++) max_side = grids[i] > max_side ? grids[i] : max_side;
    mve_full_view v;
    if (mve_resampler_full_view(r, max_side, &v) != MVE_OK) return 1;
    mve_metal_plan plan;
    if (mve_metal_plan_build(&v, x, n_frames, grids, ids, &plan) != MVE_OK) return 1;
    Buffers b;
    for (int i = 0; i < MVE_MB_COUNT; i++) {
        if (plan.host[i]) {
            b.ptr[i] = (unsigned char *)plan.host[i];
        } else {
            b.owned[i].assign(plan.bytes[i] + 16, 0xA5); // poison: a kernel reading unwritten scratch shows up
            b.ptr[i] = b.owned[i].data();
        }
    }
    for (int i = 0; i < plan.n_dispatch; i++) run_dispatch(plan.dispatch[i], b);
    std::memcpy(out, b.ptr[MVE_MB_OUT], plan.bytes[MVE_MB_OUT]);
    mve_metal_plan_free(&plan);
    return 0;
}

unsigned long long lcg = 0x2545F4914F6CDD1Dull;
float rnd() { // deterministic values in about [-2, 2]
    lcg = lcg * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((lcg >> 40) & 0xffffff) / 16777216.0f * 4.0f - 2.0f;
}

} // namespace

int main(int argc, char **argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: metal_emu WEIGHTS [TOLERANCE]\n");
        return 2;
    }
    double tol = argc > 2 ? std::atof(argv[2]) : 2e-5;
    mve_resampler_options o;
    mve_resampler_default_options(&o);
    o.kernel = "generic";
    o.fold = MVE_FOLD_FULL;
    mve_resampler *r = nullptr;
    if (mve_resampler_load_file(argv[1], &o, &r) != MVE_OK) {
        std::fprintf(stderr, "load: %s\n", mve_last_error());
        return 2;
    }
    mve_resampler_info info;
    mve_resampler_get_info(r, &info);
    struct Case {
        const char *name;
        std::vector<int32_t> grids, ids;
    } cases[] = {
        {"slice 12x20", {12, 20}, {-1}},
        {"slice 1x1", {1, 1}, {-1}},
        {"slice 7x9", {7, 9}, {-1}},
        {"3-frame temporal group", {6, 10, 6, 10, 5, 13}, {1, 4, 9}},
        {"still + frame", {4, 4, 3, 5}, {-1, 12}},
    };
    int failed = 0;
    for (const Case &c : cases) {
        int frames = (int)c.ids.size(), n = 0;
        for (int f = 0; f < frames; f++) n += c.grids[2 * f] * c.grids[2 * f + 1];
        std::vector<float> x((size_t)n * info.kv_dim), want((size_t)info.query_num * info.embed_dim), got(want.size());
        for (float &e : x) e = rnd();
        if (mve_resampler_run_temporal(r, x.data(), frames, c.grids.data(), c.ids.data(), want.data()) != MVE_OK ||
            emulate(r, x.data(), frames, c.grids.data(), c.ids.data(), got.data()) != 0) {
            std::fprintf(stderr, "%s: %s\n", c.name, mve_last_error());
            return 2;
        }
        double maxdiff = 0, maxref = 0;
        for (size_t i = 0; i < want.size(); i++) {
            double diff = std::fabs((double)got[i] - want[i]);
            maxdiff = std::isnan(diff) ? INFINITY : (diff > maxdiff ? diff : maxdiff);
            maxref = std::fabs((double)want[i]) > maxref ? std::fabs((double)want[i]) : maxref;
        }
        double err = maxdiff / maxref;
        std::printf("[metal-emu] %s: max rel err %.3g vs the C library (tolerance %.0e)\n", c.name, err, tol);
        failed += !(err <= tol);
    }
    mve_resampler_free(r);
    return failed ? 1 : 0;
}
