/* Dispatch list of the MVE_FOLD_FULL resampler plan for Metal; see mve_metal_plan.h and the plan's math in
 * bindings/src/resampler.c (run_full). */
#include "mve_metal_plan.h"

#include <stdlib.h>
#include <string.h>

static mve_metal_dispatch *add(mve_metal_plan *p, int kernel, const char *label, uint32_t gx, uint32_t gy,
                               uint32_t gz) {
    mve_metal_dispatch *d = &p->dispatch[p->n_dispatch++];
    memset(d, 0, sizeof *d);
    d->kernel = kernel, d->label = label;
    d->grid[0] = gx, d->grid[1] = gy, d->grid[2] = gz;
    return d;
}

static void bind(mve_metal_dispatch *d, int buffer, uint64_t offset) {
    d->bindings[d->n_bindings].buffer = buffer;
    d->bindings[d->n_bindings].offset = offset;
    d->n_bindings++;
}

/* C[b] = A[b] W[b]^T as one dispatch */
static void gemm(mve_metal_plan *p, const char *label, int wtype, uint32_t batch, uint32_t M, uint32_t N,
                 uint32_t K, int a_buf, uint64_t a_off, uint32_t lda, uint32_t sA, int w_buf, uint64_t w_off,
                 uint32_t ldw, uint32_t sW, int c_buf, uint64_t c_off, uint32_t ldc, uint32_t sC) {
    mve_metal_dispatch *d = add(p, wtype == MVE_F16 ? MVE_MK_GEMM_F16 : MVE_MK_GEMM_F32, label, N, M, batch);
    mve_mk_gemm_args a = {M, N, K, batch, lda, ldw, ldc, sA, sW, sC};
    d->args.gemm = a, d->args_size = sizeof a;
    bind(d, a_buf, a_off), bind(d, w_buf, w_off), bind(d, c_buf, c_off);
}

mve_status mve_metal_plan_build(const mve_full_view *v, const float *features, int32_t n_frames,
                                const int32_t *grids, const int32_t *ids, mve_metal_plan *p) {
    if (!v || !p || !features || !grids || !ids)
        return mve_fail(MVE_ERR_INVALID_ARGUMENT, "NULL argument to the Metal plan");
    memset(p, 0, sizeof *p);
    const mve_weights *w = v->w;
    uint32_t d = (uint32_t)w->embed_dim, c = (uint32_t)w->kv_dim, q = (uint32_t)w->query_num;
    uint32_t heads = (uint32_t)w->num_heads, hd = (uint32_t)w->head_dim, hq = heads * q;
    int wt = w->dtype;
    size_t es = mve_dtype_size((mve_dtype)wt);
    if (n_frames < 1 || n_frames > MVE_MAX_PATCHES)
        return mve_fail(MVE_ERR_INVALID_ARGUMENT, "n_frames %d out of range", n_frames);
    uint32_t n = 0;
    for (int f = 0; f < n_frames; f++) {
        int32_t h = grids[2 * f], wd = grids[2 * f + 1];
        if (h < 1 || wd < 1 || h > v->pos_rows || wd > v->pos_rows || ids[f] < -1 || ids[f] >= (1 << 24))
            return mve_fail(MVE_ERR_INVALID_ARGUMENT, "frame %d: grid %d x %d or temporal id %d out of range", f,
                            h, wd, ids[f]);
        n += (uint32_t)(h * wd);
        if (n > MVE_MAX_PATCHES) return mve_fail(MVE_ERR_INVALID_ARGUMENT, "more than %d patches", MVE_MAX_PATCHES);
    }
    p->tvec = (float *)calloc((size_t)n_frames * d, sizeof(float));
    p->patch = (mve_mk_patch *)malloc((size_t)n * sizeof(mve_mk_patch));
    if (!p->tvec || !p->patch) {
        mve_metal_plan_free(p);
        return mve_fail(MVE_ERR_NOMEM, "out of memory for the Metal plan");
    }
    uint32_t row = 0;
    for (int f = 0; f < n_frames; f++) {
        if (ids[f] >= 0) mve_sincos_1d((int)d, (float)ids[f], p->tvec + (size_t)f * d);
        for (int y = 0; y < grids[2 * f]; y++)
            for (int x = 0; x < grids[2 * f + 1]; x++, row++) {
                mve_mk_patch pp = {x, y, f, ids[f] >= 0};
                p->patch[row] = pp;
            }
    }

    /* buffers */
    const void **host = p->host;
    uint64_t *bytes = p->bytes;
    host[MVE_MB_KVR] = w->t[MVE_T_KV_NORM_R], bytes[MVE_MB_KVR] = (uint64_t)c * c * 4;
    host[MVE_MB_WBAR] = v->wbar, bytes[MVE_MB_WBAR] = (uint64_t)c * 4;
    host[MVE_MB_A] = v->a_fold, bytes[MVE_MB_A] = (uint64_t)hq * d * es;
    host[MVE_MB_B] = v->b_fold, bytes[MVE_MB_B] = (uint64_t)hq * c * es;
    host[MVE_MB_MT] = v->mt_fold, bytes[MVE_MB_MT] = (uint64_t)d * c * es;
    host[MVE_MB_R] = v->r_fold, bytes[MVE_MB_R] = (uint64_t)hq * 4;
    host[MVE_MB_WG] = v->wg, bytes[MVE_MB_WG] = (uint64_t)d * 4;
    host[MVE_MB_CB] = v->cb, bytes[MVE_MB_CB] = (uint64_t)d * 4;
    host[MVE_MB_POS] = v->pos_tab, bytes[MVE_MB_POS] = (uint64_t)2 * hq * v->pos_rows * 4;
    host[MVE_MB_WO] = w->t[MVE_T_WO], bytes[MVE_MB_WO] = (uint64_t)d * d * es;
    host[MVE_MB_BO] = w->t[MVE_T_BO], bytes[MVE_MB_BO] = (uint64_t)d * 4;
    host[MVE_MB_LNP_W] = w->t[MVE_T_LN_POST_W], bytes[MVE_MB_LNP_W] = (uint64_t)d * 4;
    host[MVE_MB_LNP_B] = w->t[MVE_T_LN_POST_B], bytes[MVE_MB_LNP_B] = (uint64_t)d * 4;
    host[MVE_MB_PROJ] = w->t[MVE_T_PROJ_T], bytes[MVE_MB_PROJ] = (uint64_t)d * d * es;
    host[MVE_MB_X] = features, bytes[MVE_MB_X] = (uint64_t)n * c * 4;
    host[MVE_MB_TVEC] = p->tvec, bytes[MVE_MB_TVEC] = (uint64_t)n_frames * d * 4;
    host[MVE_MB_PATCH] = p->patch, bytes[MVE_MB_PATCH] = (uint64_t)n * sizeof(mve_mk_patch);
    bytes[MVE_MB_Z] = (uint64_t)n * c * 4;
    bytes[MVE_MB_MU] = bytes[MVE_MB_RS] = (uint64_t)n * 4;
    bytes[MVE_MB_TF] = (uint64_t)n_frames * hq * 4;
    bytes[MVE_MB_ST] = bytes[MVE_MB_S] = (uint64_t)n * hq * 4;
    bytes[MVE_MB_MVEC] = (uint64_t)hq * 4;
    bytes[MVE_MB_XT] = (uint64_t)c * n * 4;
    bytes[MVE_MB_U] = (uint64_t)hq * c * 4;
    bytes[MVE_MB_O] = bytes[MVE_MB_O2] = bytes[MVE_MB_OUT] = (uint64_t)q * d * 4;

    /* 1. LN_kv statistics of z = x Wkv^T without z: Y = x R^T [N, C], mu = wbar . x, rs from ||Y||^2 */
    gemm(p, "Y = x R^T", MVE_F32, 1, n, c, c, MVE_MB_X, 0, c, 0, MVE_MB_KVR, 0, c, 0, MVE_MB_Z, 0, c, 0);
    mve_metal_dispatch *k = add(p, MVE_MK_KV_STATS, "LN_kv statistics", n, 1, 1);
    mve_mk_stats_args sta = {n, c, d, w->ln_eps};
    k->args.stats = sta, k->args_size = sizeof sta;
    bind(k, MVE_MB_X, 0), bind(k, MVE_MB_Z, 0), bind(k, MVE_MB_WBAR, 0), bind(k, MVE_MB_MU, 0), bind(k, MVE_MB_RS, 0);
    /* 2. temporal terms: TF [F, HQ] = TVEC [F, D] . A^T (rows of frames without an id are unused) */
    gemm(p, "temporal A t", wt, 1, (uint32_t)n_frames, hq, d, MVE_MB_TVEC, 0, d, 0, MVE_MB_A, 0, d, 0, MVE_MB_TF,
         0, hq, 0);
    /* 3. S^T [N, HQ] = x B^T, then the score epilogue into S [HQ, N] */
    gemm(p, "S^T = x B^T", wt, 1, n, hq, c, MVE_MB_X, 0, c, 0, MVE_MB_B, 0, c, 0, MVE_MB_ST, 0, hq, 0);
    k = add(p, MVE_MK_SCORES, "scores", n, hq, 1);
    mve_mk_scores_args sa = {n, hq, (uint32_t)v->pos_rows};
    k->args.scores = sa, k->args_size = sizeof sa;
    bind(k, MVE_MB_ST, 0), bind(k, MVE_MB_MU, 0), bind(k, MVE_MB_RS, 0), bind(k, MVE_MB_R, 0),
        bind(k, MVE_MB_POS, 0), bind(k, MVE_MB_TF, 0), bind(k, MVE_MB_PATCH, 0), bind(k, MVE_MB_S, 0);
    /* 4. softmax over the keys; P' = P diag(rs), mvec = P' mu */
    k = add(p, MVE_MK_SOFTMAX_ROWS, "softmax", hq, 1, 1);
    mve_mk_softmax_args sm = {hq, n};
    k->args.softmax = sm, k->args_size = sizeof sm;
    bind(k, MVE_MB_S, 0);
    k = add(p, MVE_MK_SCALE_PROBS, "P' and mvec", hq, 1, 1);
    mve_mk_scale_args sc = {hq, n};
    k->args.scale = sc, k->args_size = sizeof sc;
    bind(k, MVE_MB_S, 0), bind(k, MVE_MB_RS, 0), bind(k, MVE_MB_MU, 0), bind(k, MVE_MB_MVEC, 0);
    /* 5. U [HQ, C] = P' x = P' (x^T)^T */
    k = add(p, MVE_MK_TRANSPOSE, "x^T", c, n, 1);
    mve_mk_transpose_args ta = {n, c};
    k->args.transpose = ta, k->args_size = sizeof ta;
    bind(k, MVE_MB_X, 0), bind(k, MVE_MB_XT, 0);
    gemm(p, "U = P' x", MVE_F32, 1, hq, c, n, MVE_MB_S, 0, n, 0, MVE_MB_XT, 0, n, 0, MVE_MB_U, 0, c, 0);
    /* 6. O_h [Q, hd] = U_h MT_h^T - mvec_h wg_h + cb_h, heads batched, written into columns h*hd of O [Q, D] */
    gemm(p, "O_h = U_h MT_h^T", wt, heads, q, hd, c, MVE_MB_U, 0, c, q * c, MVE_MB_MT, 0, c, hd * c, MVE_MB_O, 0,
         d, hd);
    k = add(p, MVE_MK_VALUE_EPI, "O += cb - mvec wg", d, q, 1);
    mve_mk_value_args va = {q, d, hd};
    k->args.value = va, k->args_size = sizeof va;
    bind(k, MVE_MB_O, 0), bind(k, MVE_MB_MVEC, 0), bind(k, MVE_MB_WG, 0), bind(k, MVE_MB_CB, 0);
    /* 7. out = LN_post(O Wo^T + bo) proj */
    gemm(p, "O Wo^T", wt, 1, q, d, d, MVE_MB_O, 0, d, 0, MVE_MB_WO, 0, d, 0, MVE_MB_O2, 0, d, 0);
    k = add(p, MVE_MK_ADD_BIAS, "+ bo", d, q, 1);
    mve_mk_bias_args ba = {q, d};
    k->args.bias = ba, k->args_size = sizeof ba;
    bind(k, MVE_MB_O2, 0), bind(k, MVE_MB_BO, 0);
    k = add(p, MVE_MK_LN_ROWS, "LN_post", q, 1, 1);
    mve_mk_ln_args lnp = {q, d, w->ln_eps};
    k->args.ln = lnp, k->args_size = sizeof lnp;
    bind(k, MVE_MB_O2, 0), bind(k, MVE_MB_O2, 0), bind(k, MVE_MB_LNP_W, 0), bind(k, MVE_MB_LNP_B, 0);
    gemm(p, "out = LN . proj", wt, 1, q, d, d, MVE_MB_O2, 0, d, 0, MVE_MB_PROJ, 0, d, 0, MVE_MB_OUT, 0, d, 0);
    return MVE_OK;
}

void mve_metal_plan_free(mve_metal_plan *p) {
    if (!p) return;
    free(p->tvec);
    free(p->patch);
    p->tvec = NULL, p->patch = NULL;
}
