/* Objective-C host of the Metal resampler (Apple only). UNTESTED ON REAL HARDWARE: see mve_metal.h.
 *
 * It encodes, in one compute command encoder, the dispatch list mve_metal_plan.c builds (the same list the
 * tests run through the C++ emulation of resampler.metal): arguments with setBytes at index 0, buffers at 1.. in
 * the plan's order, grids with dispatchThreads. Weights (the CPU handle's folded tensors and raw matrices) are
 * copied into shared-storage buffers once, and again only if the CPU handle's position tables grow. Built with
 * -fobjc-arc. */
#import <Foundation/Foundation.h>
#import <Metal/Metal.h>

#include <string.h>

#include "mve_metal.h"
#include "mve_metal_plan.h"

static NSString *const kernel_names[MVE_MK_COUNT] = {
    @"mve_k_gemm_f32", @"mve_k_gemm_f16", @"mve_k_kv_stats", @"mve_k_ln_rows", @"mve_k_softmax_rows", @"mve_k_scores",
    @"mve_k_scale_probs", @"mve_k_transpose", @"mve_k_value_epi", @"mve_k_add_bias"};

@interface MVEMetalResampler : NSObject
@property(nonatomic) mve_resampler *cpu;
@property(nonatomic, strong) id<MTLDevice> device;
@property(nonatomic, strong) id<MTLCommandQueue> queue;
@property(nonatomic, strong) NSMutableArray<id<MTLComputePipelineState>> *pipelines;
@property(nonatomic, strong) NSMutableDictionary<NSNumber *, id<MTLBuffer>> *weights; /* MVE_MB_* -> buffer */
@end

@implementation MVEMetalResampler {
  @public
    const void *weight_src[MVE_MB_COUNT]; /* host pointer each cached weight buffer was copied from */
    uint64_t weight_bytes[MVE_MB_COUNT];
}
@end

static int is_weight(int b) { return b <= MVE_MB_PROJ; }

mve_status mve_metal_resampler_create(mve_resampler *cpu, const char *metallib_path, mve_metal_resampler **out) {
    if (!out) return mve_fail(MVE_ERR_INVALID_ARGUMENT, "out is NULL");
    *out = NULL;
    if (!cpu || !metallib_path) return mve_fail(MVE_ERR_INVALID_ARGUMENT, "cpu handle or metallib path is NULL");
    mve_full_view v;
    mve_status st = mve_resampler_full_view(cpu, 1, &v);
    if (st != MVE_OK) return st;
    @autoreleasepool {
        MVEMetalResampler *m = [MVEMetalResampler new];
        m.cpu = cpu;
        m.device = MTLCreateSystemDefaultDevice();
        if (!m.device) return mve_fail(MVE_ERR_UNSUPPORTED, "no Metal device");
        NSError *err = nil;
        NSURL *url = [NSURL fileURLWithPath:[NSString stringWithUTF8String:metallib_path]];
        id<MTLLibrary> lib = [m.device newLibraryWithURL:url error:&err];
        if (!lib)
            return mve_fail(MVE_ERR_IO, "%s: cannot load the Metal library (%s)", metallib_path,
                            err.localizedDescription.UTF8String);
        m.pipelines = [NSMutableArray arrayWithCapacity:MVE_MK_COUNT];
        for (int k = 0; k < MVE_MK_COUNT; k++) {
            id<MTLFunction> fn = [lib newFunctionWithName:kernel_names[k]];
            id<MTLComputePipelineState> ps = fn ? [m.device newComputePipelineStateWithFunction:fn error:&err] : nil;
            if (!ps)
                return mve_fail(MVE_ERR_FORMAT, "%s: kernel %s missing or not compilable (%s)", metallib_path,
                                kernel_names[k].UTF8String, err ? err.localizedDescription.UTF8String : "");
            [m.pipelines addObject:ps];
        }
        m.queue = [m.device newCommandQueue];
        m.weights = [NSMutableDictionary dictionary];
        *out = (__bridge_retained mve_metal_resampler *)m;
    }
    return MVE_OK;
}

void mve_metal_resampler_free(mve_metal_resampler *h) {
    if (!h) return;
    MVEMetalResampler *m = (__bridge_transfer MVEMetalResampler *)h;
    m = nil; /* released here */
}

mve_status mve_metal_resampler_run_temporal(mve_metal_resampler *h, const float *features, int32_t n_frames,
                                            const int32_t *grids, const int32_t *temporal_ids, float *out) {
    if (!h || !features || !grids || !temporal_ids || !out)
        return mve_fail(MVE_ERR_INVALID_ARGUMENT, "NULL argument");
    MVEMetalResampler *m = (__bridge MVEMetalResampler *)h;
    int max_side = 1;
    for (int i = 0; i < 2 * n_frames && n_frames > 0 && n_frames <= MVE_MAX_PATCHES; i++)
        max_side = grids[i] > max_side ? grids[i] : max_side;
    if (max_side > MVE_MAX_GRID_SIDE) return mve_fail(MVE_ERR_INVALID_ARGUMENT, "grid side %d too large", max_side);
    mve_full_view v;
    mve_status st = mve_resampler_full_view(m.cpu, max_side, &v);
    if (st != MVE_OK) return st;
    mve_metal_plan plan;
    if ((st = mve_metal_plan_build(&v, features, n_frames, grids, temporal_ids, &plan)) != MVE_OK) return st;
    @autoreleasepool {
        id<MTLBuffer> buf[MVE_MB_COUNT];
        for (int b = 0; b < MVE_MB_COUNT; b++) {
            buf[b] = nil;
            uint64_t bytes = plan.bytes[b] ? plan.bytes[b] : 16; /* Metal refuses zero-length buffers */
            if (is_weight(b)) {
                id<MTLBuffer> cached = m.weights[@(b)];
                if (!cached || m->weight_src[b] != plan.host[b] || m->weight_bytes[b] != plan.bytes[b]) {
                    cached = plan.host[b] ? [m.device newBufferWithBytes:plan.host[b] length:bytes
                                                                 options:MTLResourceStorageModeShared]
                                          : [m.device newBufferWithLength:bytes options:MTLResourceStorageModeShared];
                    if (cached) m.weights[@(b)] = cached;
                    m->weight_src[b] = plan.host[b], m->weight_bytes[b] = plan.bytes[b];
                }
                buf[b] = cached;
            } else if (plan.host[b]) {
                buf[b] = [m.device newBufferWithBytes:plan.host[b] length:bytes options:MTLResourceStorageModeShared];
            } else {
                buf[b] = [m.device newBufferWithLength:bytes options:MTLResourceStorageModeShared];
            }
            if (!buf[b]) {
                mve_metal_plan_free(&plan);
                return mve_fail(MVE_ERR_NOMEM, "cannot allocate Metal buffer %d (%llu bytes)", b,
                                (unsigned long long)bytes);
            }
        }
        id<MTLCommandBuffer> cmd = [m.queue commandBuffer];
        id<MTLComputeCommandEncoder> enc = [cmd computeCommandEncoder]; /* serial: dispatches run in order */
        for (int i = 0; i < plan.n_dispatch; i++) {
            const mve_metal_dispatch *d = &plan.dispatch[i];
            id<MTLComputePipelineState> ps = m.pipelines[(NSUInteger)d->kernel];
            [enc setComputePipelineState:ps];
            [enc setBytes:&d->args length:d->args_size atIndex:0];
            for (int j = 0; j < d->n_bindings; j++)
                [enc setBuffer:buf[d->bindings[j].buffer] offset:d->bindings[j].offset atIndex:(NSUInteger)(j + 1)];
            MTLSize grid = MTLSizeMake(d->grid[0], d->grid[1], d->grid[2]);
            int one_d = d->grid[1] == 1 && d->grid[2] == 1;
            NSUInteger tw = one_d ? MIN((NSUInteger)64, ps.maxTotalThreadsPerThreadgroup) : 8;
            MTLSize tg = MTLSizeMake(tw, one_d ? 1 : 8, 1);
            [enc dispatchThreads:grid threadsPerThreadgroup:tg];
        }
        [enc endEncoding];
        [cmd commit];
        [cmd waitUntilCompleted];
        if (cmd.status != MTLCommandBufferStatusCompleted) {
            mve_metal_plan_free(&plan);
            return mve_fail(MVE_ERR_UNSUPPORTED, "Metal command buffer failed: %s",
                            cmd.error.localizedDescription.UTF8String);
        }
        memcpy(out, buf[MVE_MB_OUT].contents, plan.bytes[MVE_MB_OUT]);
    }
    mve_metal_plan_free(&plan);
    return MVE_OK;
}

mve_status mve_metal_resampler_run(mve_metal_resampler *m, const float *features, int32_t h, int32_t w,
                                   float *out) {
    int32_t grid[2] = {h, w}, id = -1;
    return mve_metal_resampler_run_temporal(m, features, 1, grid, &id, out);
}
