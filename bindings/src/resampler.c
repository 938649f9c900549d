/* The MiniCPM-V resampler in portable C: load, fold, run (2D slice or temporal frame group), free.
 *
 * Math (shared/research/minicpmv-arch.md §4; export/reference.py `Resampler`), for one slice of h x w
 * patches, N = h*w, C = kv_dim, D = embed_dim, H heads of hd = D/H, Q queries:
 *
 *     z   = x Wkv^T                      [N, D]     (x = ViT features [N, C]; Wkv = identity when C == D)
 *     xl  = LN_kv(z)                     [N, D]
 *     k   = xl + pos2d(h, w) (+ t)       [N, D]     pos on the keys only; t = temporal sincos row of the frame
 *     Qp  = LN_q(query) Wq^T + bq        [Q, D]
 *     S_h = Qp_h (k Wk^T + bk)_h^T / sqrt(hd)       [Q, N] per head;  P_h = softmax over the N keys
 *     O_h = P_h (xl Wv^T + bv)_h         [Q, hd]
 *     y   = LN_post(O Wo^T + bo) proj    [Q, D]
 *
 * Three plans compute this (mve_resampler_options.fold); all give the same result up to float rounding:
 *
 *   MVE_FOLD_NONE   the lines above, in that order: the reference plan.
 *   MVE_FOLD_QUERY  Qp is constant, so per head A_h = Qp_h Wk_h / sqrt(hd) ([Q, D]) is folded at load and
 *                   S_h = A_h k^T (bk only adds a per-row constant, which softmax removes). Values: since P's rows
 *                   sum to 1, P_h (xl Wv_h^T + bv_h) = (P_h xl) Wv_h^T + bv_h, so the N x D x D value
 *                   projection becomes (H*Q) x N x D + Q x D x D. With H*Q = D/2 both halve.
 *   MVE_FOLD_FULL   also pushes LN_kv and kv_proj through: with mu_n, s_n = mean, 1/std of z_n,
 *                     A_h . xl_n = s_n (B_h x_n - mu_n r_h) + const_h,   B = (A .* g) Wkv [H*Q, C], r = rowsum(A .* g)
 *                     P_h xl Wv_h^T = (P'_h x) MT_h^T - (P'_h mu) wg_h + (Wv b)_h,   P' = P diag(s),
 *                     MT = Wv diag(g) Wkv [D, C], wg = Wv g
 *                   so attention runs in the C-wide ViT space, and z itself is never formed: mu_n = wbar . x_n
 *                   (wbar = column means of Wkv) and D var_n = ||z_n - mu_n||^2 = ||R x_n||^2 with the [C, C]
 *                   factor R (R^T R = Wc^T Wc) the export derives in float64 (KV_NORM_R). The 2D position term is separable,
 *                   A_h . pos(x, y) = Tx_h[x] + Ty_h[y], and is cached per coordinate.
 *
 * FLOPs per slice at D = 4096, C = 1152, N = 1024 (bench/bench_resampler.py prints them): NONE 85.9 G,
 * QUERY 50.5 G, FULL 17.3 G. Load-time folding costs 4QD^2 (QUERY) + 2(HQ)DC + 2D^2C (FULL) once. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#if !defined(_WIN32)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

struct mve_resampler {
    mve_weights w;
    const mve_kernels *kernels;
    mve_pool *pool;
    mve_gemm_ctx g;
    int fold;

    /* where the weights live */
    void *map;        /* mmap'ed file, or malloc'ed copy where mmap is unavailable (owned) */
    size_t map_size;
    int map_is_mmap;

    /* folded weights (owned; matrices in the file's dtype) */
    void *a_fold;     /* [H*Q, D]  row h*Q+q: Qp_h[q] Wk_h / sqrt(hd)                       (QUERY, FULL) */
    void *b_fold;     /* [H*Q, C]  (A .* g_kv) Wkv                                              (FULL) */
    void *mt_fold;    /* [D, C]    Wv diag(g_kv) Wkv                                            (FULL) */
    float *r_fold;    /* [H*Q]     rowsum(A .* g_kv)                                            (FULL) */
    float *wg;        /* [D]       Wv g_kv                                                      (FULL) */
    float *cb;        /* [D]       Wv b_kv + bv                                                 (FULL) */
    float *wbar;      /* [C]       column means of Wkv: mu_n = wbar . x_n                         (FULL) */

    /* caches, grown on demand to the largest grid side seen */
    float *sincos;    /* [sincos_rows, D/2]  sincos_1d(D/2, c) for coordinate c */
    int sincos_rows;
    float *pos_tab;   /* FULL: [2][H*Q][pos_rows]  Tx (x half of A) and Ty (y half) per coordinate */
    int pos_rows;

    /* scratch for one call, grown on demand */
    void *scratch_raw;
    float *scratch;
    size_t scratch_cap; /* floats */
};

/* ============================================================================================ helpers */

static void *alloc_aligned(size_t bytes, void **raw) {
    *raw = bytes <= SIZE_MAX - 64 ? malloc(bytes + 64) : NULL;
    if (!*raw) return NULL;
    return (void *)(((uintptr_t)*raw + 63) & ~(uintptr_t)63);
}

/* Grow the per-call scratch to at least `floats` floats (contents are not kept); 0 if allocation fails. */
static int ensure_scratch(mve_resampler *r, size_t floats) {
    if (floats <= r->scratch_cap) return 1;
    if (floats > SIZE_MAX / sizeof(float)) return 0;
    void *raw;
    float *p = (float *)alloc_aligned(floats * sizeof(float), &raw);
    if (!p) return 0;
    free(r->scratch_raw);
    r->scratch_raw = raw, r->scratch = p, r->scratch_cap = floats;
    return 1;
}

/* Round a float count up to a 64-byte boundary so every carved piece stays aligned. */
static size_t pad16(size_t n) { return (n + 15) & ~(size_t)15; }

static float weight_at(const void *m, int dtype, size_t i) {
    return dtype == MVE_F16 ? mve_f16_to_f32(((const uint16_t *)m)[i]) : ((const float *)m)[i];
}

/* A float32 matrix converted to `dtype` in a new buffer (caller frees). */
static void *store_as(const float *src, size_t n, int dtype) {
    if (dtype == MVE_F32) {
        float *dst = (float *)malloc(n * sizeof(float));
        if (dst) memcpy(dst, src, n * sizeof(float));
        return dst;
    }
    uint16_t *dst = (uint16_t *)malloc(n * sizeof(uint16_t));
    if (dst)
        for (size_t i = 0; i < n; i++) dst[i] = mve_f32_to_f16(src[i]);
    return dst;
}

/* dst[c, r] = src[r, c] for r < rows, c < cols (src row stride lds, dst row stride ldd), widening float16. */
static void transpose(const void *src, int dtype, size_t lds, int rows, int cols, float *dst, size_t ldd) {
    enum { T = 32 };
    for (int r0 = 0; r0 < rows; r0 += T)
        for (int c0 = 0; c0 < cols; c0 += T)
            for (int r = r0; r < rows && r < r0 + T; r++)
                for (int c = c0; c < cols && c < c0 + T; c++)
                    dst[(size_t)c * ldd + r] = weight_at(src, dtype, (size_t)r * lds + c);
}

/* out[i] = LN(x[i]) = (x - mean) / sqrt(var + eps) * g + b, per row of width d (biased variance, like torch).
 * out may alias x. Optionally returns each row's mean and 1/std. */
static void layer_norm_rows(const float *x, int rows, int d, const float *g, const float *b, float eps, float *out,
                            float *mean_out, float *rstd_out) {
    for (int i = 0; i < rows; i++) {
        const float *xi = x + (size_t)i * d;
        double s = 0.0;
        for (int c = 0; c < d; c++) s += xi[c];
        double mean = s / d, v = 0.0;
        for (int c = 0; c < d; c++) v += ((double)xi[c] - mean) * ((double)xi[c] - mean);
        float rstd = (float)(1.0 / sqrt(v / d + (double)eps));
        float fmean = (float)mean;
        if (mean_out) mean_out[i] = fmean;
        if (rstd_out) rstd_out[i] = rstd;
        if (out) {
            float *oi = out + (size_t)i * d;
            for (int c = 0; c < d; c++) oi[c] = (xi[c] - fmean) * rstd * g[c] + b[c];
        }
    }
}

/* Each row of x [rows, n] becomes softmax(x) in place. */
static void softmax_rows(float *x, int rows, int n) {
    for (int i = 0; i < rows; i++) {
        float *xi = x + (size_t)i * n;
        float mx = xi[0];
        for (int j = 1; j < n; j++) mx = xi[j] > mx ? xi[j] : mx;
        double sum = 0.0;
        for (int j = 0; j < n; j++) {
            xi[j] = expf(xi[j] - mx);
            sum += xi[j];
        }
        float inv = (float)(1.0 / sum);
        for (int j = 0; j < n; j++) xi[j] *= inv;
    }
}

static void add_bias_rows(float *x, int rows, int d, size_t ld, const float *bias) {
    for (int i = 0; i < rows; i++)
        for (int c = 0; c < d; c++) x[(size_t)i * ld + c] += bias[c];
}

/* sincos_1d(E, pos) = [sin(pos w_k), cos(pos w_k)] for k < E/2, w_k = 10000^(-k/(E/2)), evaluated in float32
 * the way the HF code's numpy does it (export/reference.py `_sincos_1d`), so the tables agree to the last bit
 * or two. */
void mve_sincos_1d(int E, float pos, float *out) {
    int half = E / 2;
    for (int k = 0; k < half; k++) {
        float omega = 1.0f / powf(10000.0f, (float)k / (float)half);
        float arg = pos * omega;
        out[k] = (float)sin((double)arg);
        out[half + k] = (float)cos((double)arg);
    }
}

/* ============================================================================================ caches */

/* sincos table for coordinates [0, rows): the x half and the y half of pos2d use the same 1D table. */
static int ensure_sincos(mve_resampler *r, int rows) {
    if (rows <= r->sincos_rows) return 1;
    int half = r->w.embed_dim / 2;
    /* Never realloc to 0 bytes: that frees the table and returns NULL, and keeping the old pointer after it
     * was a double free. The parser guarantees embed_dim >= 4; this check keeps the invariant local. On a
     * failed realloc the old table is still valid and still owned. */
    if (half < 1 || rows < 1) return 0;
    float *t = (float *)realloc(r->sincos, (size_t)rows * (size_t)half * sizeof(float));
    if (!t) return 0;
    for (int c = r->sincos_rows; c < rows; c++) mve_sincos_1d(half, (float)c, t + (size_t)c * half);
    r->sincos = t, r->sincos_rows = rows;
    return 1;
}

/* FULL: Tx[j][c] = A[j, :D/2] . sincos(c), Ty[j][c] = A[j, D/2:] . sincos(c), for c < rows. */
static int ensure_pos_tables(mve_resampler *r, int rows) {
    if (rows <= r->pos_rows) return 1;
    if (rows < 70) rows = 70; /* the HF cache size; covers every standard slice */
    if (!ensure_sincos(r, rows)) return 0;
    int d = r->w.embed_dim, half = d / 2, hq = r->w.num_heads * r->w.query_num;
    float *tab = (float *)malloc((size_t)2 * hq * rows * sizeof(float));
    float *tmp = (float *)malloc((size_t)rows * hq * sizeof(float));
    if (!tab || !tmp) {
        free(tab), free(tmp);
        return 0;
    }
    size_t es = mve_dtype_size((mve_dtype)r->w.dtype);
    for (int axis = 0; axis < 2; axis++) {
        /* tmp [rows, HQ] = sincos [rows, D/2] . A[:, axis half]^T */
        const unsigned char *a_half = (const unsigned char *)r->a_fold + (size_t)axis * half * es;
        mve_gemm_nt(&r->g, 1, rows, hq, half, r->sincos, half, 0, a_half, (mve_dtype)r->w.dtype, d, 0, tmp, hq, 0);
        transpose(tmp, MVE_F32, hq, rows, hq, tab + (size_t)axis * hq * rows, rows);
    }
    free(tmp);
    free(r->pos_tab);
    r->pos_tab = tab, r->pos_rows = rows;
    return 1;
}

/* ============================================================================================ folding */

/* QUERY (and FULL): a_fold = per head scale * Qp_h Wk_h. */
static mve_status fold_query(mve_resampler *r) {
    const mve_weights *w = &r->w;
    int d = w->embed_dim, q = w->query_num, heads = w->num_heads, hd = w->head_dim, hq = heads * q;
    float *qn = (float *)malloc((size_t)q * d * sizeof(float));   /* LN_q(query), then Qp */
    float *qp = (float *)malloc((size_t)q * d * sizeof(float));
    float *wkt = (float *)malloc((size_t)d * d * sizeof(float));  /* Wk^T */
    float *af = (float *)malloc((size_t)hq * d * sizeof(float));
    mve_status st = MVE_OK;
    if (!qn || !qp || !wkt || !af) {
        st = mve_fail(MVE_ERR_NOMEM, "out of memory folding the queries (%d x %d)", hq, d);
        goto done;
    }
    layer_norm_rows((const float *)w->t[MVE_T_QUERY], q, d, (const float *)w->t[MVE_T_LN_Q_W],
                    (const float *)w->t[MVE_T_LN_Q_B], w->ln_eps, qn, NULL, NULL);
    /* Qp [Q, D] = LN_q(query) Wq^T + bq */
    mve_gemm_nt(&r->g, 1, q, d, d, qn, d, 0, w->t[MVE_T_WQ], (mve_dtype)w->dtype, d, 0, qp, d, 0);
    add_bias_rows(qp, q, d, d, (const float *)w->t[MVE_T_BQ]);
    /* A_h [Q, D] = Qp_h [Q, hd] . Wk_h [hd, D]: contract over hd, so W = Wk^T rows (ldw D) at column h*hd */
    transpose(w->t[MVE_T_WK], w->dtype, d, d, d, wkt, d);
    mve_gemm_nt(&r->g, heads, q, d, hd, qp, d, hd, wkt, MVE_F32, d, hd, af, d, (size_t)q * d);
    float scale = 1.0f / sqrtf((float)hd);
    for (size_t i = 0; i < (size_t)hq * d; i++) af[i] *= scale;
    if (r->fold == MVE_FOLD_FULL) {
        /* FULL needs A in float32 for its own folds; keep it until fold_kv is done. */
        r->a_fold = af;
        af = NULL;
    } else {
        r->a_fold = store_as(af, (size_t)hq * d, w->dtype);
        if (!r->a_fold) st = mve_fail(MVE_ERR_NOMEM, "out of memory storing the folded queries");
    }
done:
    free(qn), free(qp), free(wkt), free(af);
    return st;
}

/* FULL: b_fold, r_fold, mt_fold, wg, cb from the float32 A left in r->a_fold by fold_query. */
static mve_status fold_kv(mve_resampler *r) {
    const mve_weights *w = &r->w;
    int d = w->embed_dim, c = w->kv_dim, hq = w->num_heads * w->query_num;
    const float *g = (const float *)w->t[MVE_T_LN_KV_W], *b = (const float *)w->t[MVE_T_LN_KV_B];
    const float *bv = (const float *)w->t[MVE_T_BV];
    float *af = (float *)r->a_fold;
    float *ag = (float *)malloc((size_t)hq * d * sizeof(float));  /* A .* g */
    float *wvg = (float *)malloc((size_t)d * d * sizeof(float));  /* Wv diag(g) */
    float *wkvt = w->t[MVE_T_KV_PROJ] ? (float *)malloc((size_t)c * d * sizeof(float)) : NULL; /* Wkv^T [C, D] */
    float *bf = (float *)malloc((size_t)hq * c * sizeof(float));
    float *mt = (float *)malloc((size_t)d * c * sizeof(float));
    r->r_fold = (float *)malloc((size_t)hq * sizeof(float));
    r->wg = (float *)malloc((size_t)d * sizeof(float));
    r->cb = (float *)malloc((size_t)d * sizeof(float));
    r->wbar = (float *)malloc((size_t)c * sizeof(float));
    mve_status st = MVE_OK;
    if (!ag || !wvg || (w->t[MVE_T_KV_PROJ] && !wkvt) || !bf || !mt || !r->r_fold || !r->wg || !r->cb || !r->wbar) {
        st = mve_fail(MVE_ERR_NOMEM, "out of memory folding kv_proj (%d x %d)", d, c);
        goto done;
    }
    for (int j = 0; j < hq; j++) {
        double s = 0.0;
        for (int i = 0; i < d; i++) {
            ag[(size_t)j * d + i] = af[(size_t)j * d + i] * g[i];
            s += ag[(size_t)j * d + i];
        }
        r->r_fold[j] = (float)s;
    }
    for (int o = 0; o < d; o++) {
        double sg = 0.0, sb = 0.0;
        for (int i = 0; i < d; i++) {
            float v = weight_at(w->t[MVE_T_WV], w->dtype, (size_t)o * d + i);
            wvg[(size_t)o * d + i] = v * g[i];
            sg += (double)v * g[i];
            sb += (double)v * b[i];
        }
        r->wg[o] = (float)sg;
        r->cb[o] = (float)(sb + bv[o]);
    }
    /* wbar = column means of Wkv, so that mean(z_n) = wbar . x_n (the identity's are all 1/D) */
    for (int k = 0; k < c; k++) {
        double s = 0.0;
        for (int o = 0; o < d; o++)
            s += w->t[MVE_T_KV_PROJ] ? weight_at(w->t[MVE_T_KV_PROJ], w->dtype, (size_t)o * c + k) : (o == k);
        r->wbar[k] = (float)(s / d);
    }
    if (wkvt) {
        transpose(w->t[MVE_T_KV_PROJ], w->dtype, c, d, c, wkvt, d);
        /* B [HQ, C] = (A .* g) [HQ, D] . Wkv [D, C];  MT [D, C] = (Wv diag g) [D, D] . Wkv [D, C] */
        mve_gemm_nt(&r->g, 1, hq, c, d, ag, d, 0, wkvt, MVE_F32, d, 0, bf, c, 0);
        mve_gemm_nt(&r->g, 1, d, c, d, wvg, d, 0, wkvt, MVE_F32, d, 0, mt, c, 0);
    } else { /* kv_proj is the identity */
        memcpy(bf, ag, (size_t)hq * d * sizeof(float));
        memcpy(mt, wvg, (size_t)d * d * sizeof(float));
    }
    r->b_fold = store_as(bf, (size_t)hq * c, w->dtype);
    r->mt_fold = store_as(mt, (size_t)d * c, w->dtype);
    r->a_fold = store_as(af, (size_t)hq * d, w->dtype); /* the float32 A is freed below */
    if (!r->b_fold || !r->mt_fold || !r->a_fold) st = mve_fail(MVE_ERR_NOMEM, "out of memory storing folds");
done:
    if (r->a_fold == af) r->a_fold = NULL;
    free(af), free(ag), free(wvg), free(wkvt), free(bf), free(mt);
    return st;
}

/* ============================================================================================ plans */

/* Input of one call: all frames' patches concatenated. */
typedef struct {
    const float *x;       /* [N, C] */
    int n_frames;
    const int32_t *grids; /* h, w per frame */
    const int32_t *ids;   /* temporal id per frame, -1 = none */
    int n;                /* total patches */
    int max_side;
} call_input;

/* k [N, D] = xl + pos2d (+ temporal row), frame by frame. */
/* trow is scratch for one temporal row [D]. */
static void add_positions(mve_resampler *r, const call_input *in, const float *xl, float *k, float *trow) {
    int d = r->w.embed_dim, half = d / 2;
    size_t row = 0;
    for (int f = 0; f < in->n_frames; f++) {
        int h = in->grids[2 * f], wd = in->grids[2 * f + 1];
        if (in->ids[f] >= 0) mve_sincos_1d(d, (float)in->ids[f], trow);
        for (int y = 0; y < h; y++)
            for (int x = 0; x < wd; x++, row++) {
                const float *src = xl + row * d, *px = r->sincos + (size_t)x * half, *py = r->sincos + (size_t)y * half;
                float *dst = k + row * d;
                for (int c = 0; c < half; c++) dst[c] = src[c] + px[c];          /* x (width) coordinate first */
                for (int c = 0; c < half; c++) dst[half + c] = src[half + c] + py[c];
                if (in->ids[f] >= 0)
                    for (int c = 0; c < d; c++) dst[c] += trow[c];
            }
    }
}

/* Shared tail: out [Q, D] = LN_post(O Wo^T + bo) proj. o2 is scratch [Q, D]. */
static void finish(mve_resampler *r, const float *o, float *o2, float *out) {
    const mve_weights *w = &r->w;
    int d = w->embed_dim, q = w->query_num;
    mve_gemm_nt(&r->g, 1, q, d, d, o, d, 0, w->t[MVE_T_WO], (mve_dtype)w->dtype, d, 0, o2, d, 0);
    add_bias_rows(o2, q, d, d, (const float *)w->t[MVE_T_BO]);
    layer_norm_rows(o2, q, d, (const float *)w->t[MVE_T_LN_POST_W], (const float *)w->t[MVE_T_LN_POST_B], w->ln_eps,
                    o2, NULL, NULL);
    mve_gemm_nt(&r->g, 1, q, d, d, o2, d, 0, w->t[MVE_T_PROJ_T], (mve_dtype)w->dtype, d, 0, out, d, 0);
}

/* xl [N, D] = LN_kv(x Wkv^T). */
static void project_kv(mve_resampler *r, const float *x, int n, float *xl) {
    const mve_weights *w = &r->w;
    int d = w->embed_dim, c = w->kv_dim;
    if (w->t[MVE_T_KV_PROJ])
        mve_gemm_nt(&r->g, 1, n, d, c, x, c, 0, w->t[MVE_T_KV_PROJ], (mve_dtype)w->dtype, c, 0, xl, d, 0);
    else
        memcpy(xl, x, (size_t)n * d * sizeof(float));
    layer_norm_rows(xl, n, d, (const float *)w->t[MVE_T_LN_KV_W], (const float *)w->t[MVE_T_LN_KV_B], w->ln_eps,
                    xl, NULL, NULL);
}

/* MVE_FOLD_NONE: the reference plan. */
static mve_status run_none(mve_resampler *r, const call_input *in, float *out) {
    const mve_weights *w = &r->w;
    int n = in->n, d = w->embed_dim, q = w->query_num, heads = w->num_heads, hd = w->head_dim;
    mve_dtype wt = (mve_dtype)w->dtype;
    size_t nd = pad16((size_t)n * d), qd = pad16((size_t)q * d), hqn = pad16((size_t)heads * q * n);
    if (!ensure_scratch(r, 4 * nd + 3 * qd + hqn + pad16((size_t)d)))
        return mve_fail(MVE_ERR_NOMEM, "out of memory for %d patches", n);
    float *xl = r->scratch, *k = xl + nd, *kk = k + nd, *v = kk + nd; /* v, then reused for V^T */
    float *qp = v + nd, *o = qp + qd, *o2 = o + qd, *s = o2 + qd, *trow = s + hqn;

    project_kv(r, in->x, n, xl);                                             /* xl [N, D] */
    add_positions(r, in, xl, k, trow);                                       /* k  [N, D] */
    layer_norm_rows((const float *)w->t[MVE_T_QUERY], q, d, (const float *)w->t[MVE_T_LN_Q_W],
                    (const float *)w->t[MVE_T_LN_Q_B], w->ln_eps, o, NULL, NULL);   /* LN_q(query) [Q, D] in o */
    mve_gemm_nt(&r->g, 1, q, d, d, o, d, 0, w->t[MVE_T_WQ], wt, d, 0, qp, d, 0);     /* Qp [Q, D] */
    add_bias_rows(qp, q, d, d, (const float *)w->t[MVE_T_BQ]);
    mve_gemm_nt(&r->g, 1, n, d, d, k, d, 0, w->t[MVE_T_WK], wt, d, 0, kk, d, 0);     /* K [N, D] */
    add_bias_rows(kk, n, d, d, (const float *)w->t[MVE_T_BK]);
    mve_gemm_nt(&r->g, 1, n, d, d, xl, d, 0, w->t[MVE_T_WV], wt, d, 0, k, d, 0);     /* V [N, D] (into k) */
    add_bias_rows(k, n, d, d, (const float *)w->t[MVE_T_BV]);
    transpose(k, MVE_F32, d, n, d, v, n);                                    /* V^T [D, N] */
    /* S_h [Q, N] = Qp_h [Q, hd] . K_h [N, hd]^T, then scale and softmax over the keys */
    mve_gemm_nt(&r->g, heads, q, n, hd, qp, d, hd, kk, MVE_F32, d, hd, s, n, (size_t)q * n);
    float scale = 1.0f / sqrtf((float)hd);
    for (size_t i = 0; i < (size_t)heads * q * n; i++) s[i] *= scale;
    softmax_rows(s, heads * q, n);
    /* O_h [Q, hd] = P_h [Q, N] . V_h = P_h . (V^T rows h*hd..)^T, written into columns h*hd.. of O [Q, D] */
    mve_gemm_nt(&r->g, heads, q, hd, n, s, n, (size_t)q * n, v, MVE_F32, n, (size_t)hd * n, o, d, hd);
    finish(r, o, o2, out);
    return MVE_OK;
}

/* MVE_FOLD_QUERY. */
static mve_status run_query(mve_resampler *r, const call_input *in, float *out) {
    const mve_weights *w = &r->w;
    int n = in->n, d = w->embed_dim, q = w->query_num, heads = w->num_heads, hd = w->head_dim, hq = heads * q;
    mve_dtype wt = (mve_dtype)w->dtype;
    size_t nd = pad16((size_t)n * d), qd = pad16((size_t)q * d), hqn = pad16((size_t)hq * n);
    size_t hqd = pad16((size_t)hq * d);
    if (!ensure_scratch(r, 3 * nd + 2 * qd + 2 * hqn + hqd + pad16((size_t)d)))
        return mve_fail(MVE_ERR_NOMEM, "out of memory for %d patches", n);
    float *xl = r->scratch, *k = xl + nd, *xlt = k + nd, *o = xlt + nd, *o2 = o + qd;
    float *st = o2 + qd, *s = st + hqn, *y = s + hqn, *trow = y + hqd;

    project_kv(r, in->x, n, xl);                                             /* xl [N, D] */
    add_positions(r, in, xl, k, trow);                                       /* k  [N, D] */
    /* S^T [N, HQ] = k . A^T  (A is the weight operand so it may stay float16), then S = softmax rows of S */
    mve_gemm_nt(&r->g, 1, n, hq, d, k, d, 0, r->a_fold, wt, d, 0, st, hq, 0);
    transpose(st, MVE_F32, hq, n, hq, s, n);
    softmax_rows(s, hq, n);
    /* Y [HQ, D] = P [HQ, N] . xl [N, D] = P . (xl^T)^T */
    transpose(xl, MVE_F32, d, n, d, xlt, n);
    mve_gemm_nt(&r->g, 1, hq, d, n, s, n, 0, xlt, MVE_F32, n, 0, y, d, 0);
    /* O_h [Q, hd] = Y_h [Q, D] . Wv_h [hd, D]^T + bv_h */
    mve_gemm_nt(&r->g, heads, q, hd, d, y, d, (size_t)q * d, w->t[MVE_T_WV], wt, d, (size_t)hd * d, o, d, hd);
    add_bias_rows(o, q, d, d, (const float *)w->t[MVE_T_BV]);
    finish(r, o, o2, out);
    return MVE_OK;
}

/* MVE_FOLD_FULL. */
static mve_status run_full(mve_resampler *r, const call_input *in, float *out) {
    enum { ZROWS = 256 }; /* R x is only needed for its row norms: compute it in blocks */
    const mve_weights *w = &r->w;
    int n = in->n, d = w->embed_dim, c = w->kv_dim, q = w->query_num, heads = w->num_heads, hd = w->head_dim;
    int hq = heads * q;
    mve_dtype wt = (mve_dtype)w->dtype;
    size_t hqn = pad16((size_t)hq * n), qd = pad16((size_t)q * d), cn = pad16((size_t)c * n);
    size_t zb = pad16((size_t)(n < ZROWS ? n : ZROWS) * c), hqc = pad16((size_t)hq * c);
    size_t tf = pad16((size_t)in->n_frames * hq);
    if (!ensure_scratch(r, 2 * hqn + 2 * qd + cn + zb + hqc + tf + 2 * pad16((size_t)n) + pad16((size_t)d)))
        return mve_fail(MVE_ERR_NOMEM, "out of memory for %d patches", n);
    float *st = r->scratch, *s = st + hqn, *o = s + hqn, *o2 = o + qd, *xt = o2 + qd, *z = xt + cn;
    float *u = z + zb, *tfr = u + hqc, *mu = tfr + tf, *rs = mu + pad16((size_t)n), *trow = rs + pad16((size_t)n);

    /* LN_kv statistics of z = x Wkv^T without forming z: mu_n = wbar . x_n, var_n = ||R x_n||^2 / D */
    const float *kv_r = (const float *)w->t[MVE_T_KV_NORM_R];
    for (int r0 = 0; r0 < n; r0 += ZROWS) {
        int rows = n - r0 < ZROWS ? n - r0 : ZROWS;
        const float *xr = in->x + (size_t)r0 * c;
        mve_gemm_nt(&r->g, 1, rows, c, c, xr, c, 0, kv_r, MVE_F32, c, 0, z, c, 0);   /* R x_n per row [rows, C] */
        for (int i = 0; i < rows; i++) {
            double m = 0.0, ss = 0.0;
            for (int k = 0; k < c; k++) {
                m += (double)r->wbar[k] * xr[(size_t)i * c + k];
                ss += (double)z[(size_t)i * c + k] * z[(size_t)i * c + k];
            }
            mu[r0 + i] = (float)m;
            rs[r0 + i] = (float)(1.0 / sqrt(ss / d + (double)w->ln_eps));
        }
    }
    /* temporal term per frame: tf_f [HQ] = A . sincos_1d(D, id_f) */
    for (int f = 0; f < in->n_frames; f++)
        if (in->ids[f] >= 0) {
            mve_sincos_1d(d, (float)in->ids[f], trow);
            mve_gemm_nt(&r->g, 1, 1, hq, d, trow, d, 0, r->a_fold, wt, d, 0, tfr + (size_t)f * hq, hq, 0);
        }
    /* S^T [N, HQ] = x [N, C] . B [HQ, C]^T */
    mve_gemm_nt(&r->g, 1, n, hq, c, in->x, c, 0, r->b_fold, wt, c, 0, st, hq, 0);
    /* S [HQ, N] = rs_n (S^T - mu_n r) + Tx[x_n] + Ty[y_n] + tf_frame(n): transposes S^T in blocks of JB rows of
     * S so that both sides stay in L1 */
    enum { JB = 64 };
    int pr = r->pos_rows;
    const float *tx = r->pos_tab, *ty = r->pos_tab + (size_t)hq * pr;
    for (int j0 = 0; j0 < hq; j0 += JB) {
        int j1 = j0 + JB < hq ? j0 + JB : hq;
        int row = 0;
        for (int f = 0; f < in->n_frames; f++) {
            int h = in->grids[2 * f], wd = in->grids[2 * f + 1];
            const float *tff = in->ids[f] >= 0 ? tfr + (size_t)f * hq : NULL;
            for (int yy = 0; yy < h; yy++)
                for (int xx = 0; xx < wd; xx++, row++) {
                    const float *str = st + (size_t)row * hq;
                    float rsn = rs[row], mun = mu[row];
                    for (int j = j0; j < j1; j++)
                        s[(size_t)j * n + row] = rsn * (str[j] - mun * r->r_fold[j]) + tx[(size_t)j * pr + xx] +
                                                 ty[(size_t)j * pr + yy] + (tff ? tff[j] : 0.0f);
                }
        }
    }
    softmax_rows(s, hq, n);
    /* P' = P diag(rs); mvec[j] = P'_j . mu (kept in st, which is free now) */
    float *mvec = st;
    for (int j = 0; j < hq; j++) {
        float *sj = s + (size_t)j * n;
        double acc = 0.0;
        for (int p = 0; p < n; p++) {
            sj[p] *= rs[p];
            acc += (double)sj[p] * mu[p];
        }
        mvec[j] = (float)acc;
    }
    /* U [HQ, C] = P' [HQ, N] . x [N, C] = P' . (x^T)^T */
    transpose(in->x, MVE_F32, c, n, c, xt, n);
    mve_gemm_nt(&r->g, 1, hq, c, n, s, n, 0, xt, MVE_F32, n, 0, u, c, 0);
    /* O_h [Q, hd] = U_h [Q, C] . MT_h [hd, C]^T - mvec_h wg_h + cb_h */
    mve_gemm_nt(&r->g, heads, q, hd, c, u, c, (size_t)q * c, r->mt_fold, wt, c, (size_t)hd * c, o, d, hd);
    for (int h = 0; h < heads; h++)
        for (int qi = 0; qi < q; qi++) {
            float mj = mvec[h * q + qi];
            float *oq = o + (size_t)qi * d + (size_t)h * hd;
            for (int t = 0; t < hd; t++) oq[t] += r->cb[h * hd + t] - mj * r->wg[h * hd + t];
        }
    finish(r, o, o2, out);
    return MVE_OK;
}

/* ============================================================================================ API */

static mve_status check_input(mve_resampler *r, const float *features, int32_t n_frames, const int32_t *grids,
                              const int32_t *ids, float *out, call_input *in) {
    if (!r) return mve_fail(MVE_ERR_INVALID_ARGUMENT, "resampler handle is NULL");
    if (!features) return mve_fail(MVE_ERR_INVALID_ARGUMENT, "features is NULL");
    if (!out) return mve_fail(MVE_ERR_INVALID_ARGUMENT, "out is NULL");
    if (!grids || !ids) return mve_fail(MVE_ERR_INVALID_ARGUMENT, "grids or temporal_ids is NULL");
    if (n_frames < 1 || n_frames > MVE_MAX_PATCHES)
        return mve_fail(MVE_ERR_INVALID_ARGUMENT, "n_frames %d out of range [1, %d]", n_frames, MVE_MAX_PATCHES);
    int64_t total = 0;
    int max_side = 1;
    for (int f = 0; f < n_frames; f++) {
        int32_t h = grids[2 * f], w = grids[2 * f + 1];
        if (h < 1 || w < 1 || h > MVE_MAX_GRID_SIDE || w > MVE_MAX_GRID_SIDE)
            return mve_fail(MVE_ERR_INVALID_ARGUMENT, "frame %d: grid %d x %d out of range [1, %d]", f, h, w,
                            MVE_MAX_GRID_SIDE);
        if (ids[f] < -1 || ids[f] >= (1 << 24))
            return mve_fail(MVE_ERR_INVALID_ARGUMENT, "frame %d: temporal id %d out of range [-1, 2^24)", f, ids[f]);
        total += (int64_t)h * w;
        if (total > MVE_MAX_PATCHES)
            return mve_fail(MVE_ERR_INVALID_ARGUMENT, "more than %d patches in one call", MVE_MAX_PATCHES);
        max_side = h > max_side ? h : max_side;
        max_side = w > max_side ? w : max_side;
    }
    size_t count = (size_t)total * (size_t)r->w.kv_dim;
    for (size_t i = 0; i < count; i++)
        if (!isfinite(features[i]))
            return mve_fail(MVE_ERR_NONFINITE, "features: NaN or infinity at patch %zu, channel %zu",
                            i / (size_t)r->w.kv_dim, i % (size_t)r->w.kv_dim);
    in->x = features, in->n_frames = n_frames, in->grids = grids, in->ids = ids;
    in->n = (int)total, in->max_side = max_side;
    return MVE_OK;
}

static mve_status run(mve_resampler *r, const call_input *in, float *out) {
    int ok = r->fold == MVE_FOLD_FULL ? ensure_pos_tables(r, in->max_side) : ensure_sincos(r, in->max_side);
    if (!ok) return mve_fail(MVE_ERR_NOMEM, "out of memory for the position tables");
    if (r->fold == MVE_FOLD_FULL) return run_full(r, in, out);
    if (r->fold == MVE_FOLD_QUERY) return run_query(r, in, out);
    return run_none(r, in, out);
}

mve_status mve_resampler_run(mve_resampler *r, const float *features, int32_t h, int32_t w, float *out) {
    int32_t grid[2] = {h, w}, id = -1;
    call_input in;
    mve_status st = check_input(r, features, 1, grid, &id, out, &in);
    return st != MVE_OK ? st : run(r, &in, out);
}

mve_status mve_resampler_run_temporal(mve_resampler *r, const float *features, int32_t n_frames,
                                      const int32_t *grids, const int32_t *temporal_ids, float *out) {
    call_input in;
    mve_status st = check_input(r, features, n_frames, grids, temporal_ids, out, &in);
    return st != MVE_OK ? st : run(r, &in, out);
}

void mve_resampler_default_options(mve_resampler_options *o) {
    if (!o) return;
    memset(o, 0, sizeof *o);
    o->n_threads = 1;
    o->fold = MVE_FOLD_FULL;
}

void mve_resampler_free(mve_resampler *r) {
    if (!r) return;
    mve_pool_destroy(r->pool);
#if !defined(_WIN32)
    if (r->map && r->map_is_mmap) munmap(r->map, r->map_size);
    else
#endif
        free(r->map);
    free(r->a_fold), free(r->b_fold), free(r->mt_fold), free(r->r_fold), free(r->wg), free(r->cb), free(r->wbar);
    free(r->sincos), free(r->pos_tab), free(r->scratch_raw);
    free(r);
}

static mve_status init(mve_resampler *r, const void *data, size_t size, const char *origin,
                       const mve_resampler_options *opts) {
    mve_resampler_options o;
    if (opts) o = *opts;
    else mve_resampler_default_options(&o);
    if (o.n_threads == 0) o.n_threads = 1;
    if (o.n_threads < 1 || o.n_threads > MVE_MAX_THREADS)
        return mve_fail(MVE_ERR_INVALID_ARGUMENT, "n_threads %d out of range [1, %d]", o.n_threads, MVE_MAX_THREADS);
    if (o.fold < MVE_FOLD_NONE || o.fold > MVE_FOLD_FULL)
        return mve_fail(MVE_ERR_INVALID_ARGUMENT, "fold %d is not one of 0 (none), 1 (query), 2 (full)", o.fold);
    mve_status st = mve_weights_parse(data, size, origin, &r->w);
    if (st != MVE_OK) return st;
    if (o.expect_embed_dim > 0 && o.expect_embed_dim != r->w.embed_dim)
        return mve_fail(MVE_ERR_MISMATCH, "%s: embed_dim is %d but the caller expects %d (weights of another "
                        "model?)", origin, r->w.embed_dim, o.expect_embed_dim);
    if (o.expect_kv_dim > 0 && o.expect_kv_dim != r->w.kv_dim)
        return mve_fail(MVE_ERR_MISMATCH, "%s: kv_dim is %d but the caller expects %d (weights of another model?)",
                        origin, r->w.kv_dim, o.expect_kv_dim);
    r->kernels = mve_kernels_resolve(o.kernel);
    if (!r->kernels) return MVE_ERR_UNSUPPORTED;
    r->pool = mve_pool_create(o.n_threads);
    if (!r->pool) return mve_fail(MVE_ERR_NOMEM, "cannot create a pool of %d threads", o.n_threads);
    r->g.kernels = r->kernels, r->g.pool = r->pool;
    r->fold = o.fold;
    if (r->fold >= MVE_FOLD_QUERY && (st = fold_query(r)) != MVE_OK) return st;
    if (r->fold == MVE_FOLD_FULL && (st = fold_kv(r)) != MVE_OK) return st;
    return MVE_OK;
}

mve_status mve_resampler_load_memory(const void *data, size_t size, const mve_resampler_options *opts,
                                     mve_resampler **out) {
    if (!out) return mve_fail(MVE_ERR_INVALID_ARGUMENT, "out is NULL");
    *out = NULL;
    if (!data) return mve_fail(MVE_ERR_INVALID_ARGUMENT, "data is NULL");
    mve_resampler *r = (mve_resampler *)calloc(1, sizeof *r);
    if (!r) return mve_fail(MVE_ERR_NOMEM, "out of memory");
    mve_status st = init(r, data, size, "<memory>", opts);
    if (st != MVE_OK) {
        mve_resampler_free(r);
        return st;
    }
    mve_clear_error();
    *out = r;
    return MVE_OK;
}

mve_status mve_resampler_load_file(const char *path, const mve_resampler_options *opts, mve_resampler **out) {
    if (!out) return mve_fail(MVE_ERR_INVALID_ARGUMENT, "out is NULL");
    *out = NULL;
    if (!path) return mve_fail(MVE_ERR_INVALID_ARGUMENT, "path is NULL");
    mve_resampler *r = (mve_resampler *)calloc(1, sizeof *r);
    if (!r) return mve_fail(MVE_ERR_NOMEM, "out of memory");
    mve_status st = MVE_OK;
#if !defined(_WIN32)
    /* O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer; only regular files pass. */
    int fd = open(path, O_RDONLY | O_NONBLOCK);
    struct stat sb;
    if (fd < 0 || fstat(fd, &sb) != 0) {
        st = mve_fail(MVE_ERR_IO, "%s: cannot open", path);
    } else if (!S_ISREG(sb.st_mode)) {
        st = mve_fail(MVE_ERR_IO, "%s: not a regular file", path);
    } else if (sb.st_size < MVE_FILE_HEADER_BYTES) {
        st = mve_fail(MVE_ERR_FORMAT, "%s: %lld bytes is too short for a resampler weights file", path,
                      (long long)sb.st_size);
    } else {
        void *m = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m == MAP_FAILED) st = mve_fail(MVE_ERR_IO, "%s: cannot memory-map", path);
        else r->map = m, r->map_size = (size_t)sb.st_size, r->map_is_mmap = 1;
    }
    if (fd >= 0) close(fd);
#else
    FILE *fp = fopen(path, "rb");
    if (!fp) st = mve_fail(MVE_ERR_IO, "%s: cannot open", path);
    else {
        fseek(fp, 0, SEEK_END);
        long n = ftell(fp);
        fseek(fp, 0, SEEK_SET);
        r->map = n > 0 ? malloc((size_t)n) : NULL;
        if (!r->map || fread(r->map, 1, (size_t)n, fp) != (size_t)n) st = mve_fail(MVE_ERR_IO, "%s: cannot read", path);
        r->map_size = (size_t)n;
        fclose(fp);
    }
#endif
    if (st == MVE_OK) st = init(r, r->map, r->map_size, path, opts);
    if (st != MVE_OK) {
        mve_resampler_free(r);
        return st;
    }
    mve_clear_error();
    *out = r;
    return MVE_OK;
}

mve_status mve_resampler_get_info(const mve_resampler *r, mve_resampler_info *info) {
    if (!r || !info) return mve_fail(MVE_ERR_INVALID_ARGUMENT, "resampler or info is NULL");
    info->embed_dim = r->w.embed_dim;
    info->kv_dim = r->w.kv_dim;
    info->query_num = r->w.query_num;
    info->num_heads = r->w.num_heads;
    info->weight_dtype = r->w.dtype;
    info->fold = r->fold;
    info->n_threads = mve_pool_threads(r->pool);
    info->kernel = r->kernels->name;
    return MVE_OK;
}

mve_status mve_resampler_full_view(mve_resampler *r, int max_side, mve_full_view *v) {
    if (!r || !v) return mve_fail(MVE_ERR_INVALID_ARGUMENT, "resampler or view is NULL");
    if (r->fold != MVE_FOLD_FULL)
        return mve_fail(MVE_ERR_INVALID_ARGUMENT, "the handle must be loaded with MVE_FOLD_FULL");
    if (max_side < 1 || max_side > MVE_MAX_GRID_SIDE)
        return mve_fail(MVE_ERR_INVALID_ARGUMENT, "max_side %d out of range [1, %d]", max_side, MVE_MAX_GRID_SIDE);
    if (!ensure_pos_tables(r, max_side)) return mve_fail(MVE_ERR_NOMEM, "out of memory for the position tables");
    v->w = &r->w;
    v->a_fold = r->a_fold, v->b_fold = r->b_fold, v->mt_fold = r->mt_fold;
    v->r_fold = r->r_fold, v->wg = r->wg, v->cb = r->cb, v->wbar = r->wbar;
    v->pos_tab = r->pos_tab, v->pos_rows = r->pos_rows;
    return MVE_OK;
}
