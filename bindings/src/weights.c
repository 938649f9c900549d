/* Parse and validate a resampler weights file (written by minicpmv_edge.export.resampler_weights).
 *
 * Layout (little-endian; README "Native resampler kernels"):
 *   header, 64 bytes:
 *     0  char[8] magic "MVERSMPL"     8  u32 version (1)      12 u32 dtype (0 f32, 1 f16) of the matrices
 *     16 u32 embed_dim D             20 u32 kv_dim C          24 u32 query_num Q        28 u32 num_heads
 *     32 f32 layer_norm_eps          36 u32 n_tensors (18)    40 u64 file size          48..63 zero
 *   tensor table, n_tensors x 32 bytes, in mve_tensor_id order:
 *     u32 id, u32 dtype, u32 rows, u32 cols, u64 offset (absolute, multiple of 64), u64 nbytes
 *   tensor data at those offsets, 64-byte aligned (so the file can be memory-mapped and read in place).
 * Every field is checked against the others and against the file size; a file that passes cannot make a
 * kernel read outside it. */
#include <math.h>
#include <string.h>

#include "internal.h"

static uint32_t rd32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t rd64(const unsigned char *p) { return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32; }

static const char *const tensor_names[MVE_T_COUNT] = {
    "query", "ln_q.weight", "ln_q.bias", "kv_proj.weight", "ln_kv.weight", "ln_kv.bias", "attn.wq", "attn.wk",
    "attn.wv", "attn.bq", "attn.bk", "attn.bv", "attn.out_proj.weight", "attn.out_proj.bias", "ln_post.weight",
    "ln_post.bias", "proj_t", "kv_norm_r"};

static int is_matrix(int id) {
    return id == MVE_T_KV_PROJ || id == MVE_T_WQ || id == MVE_T_WK || id == MVE_T_WV || id == MVE_T_WO ||
           id == MVE_T_PROJ_T;
}

static void expected_shape(int id, const mve_weights *w, uint32_t *rows, uint32_t *cols) {
    uint32_t d = (uint32_t)w->embed_dim, c = (uint32_t)w->kv_dim;
    switch (id) {
    case MVE_T_QUERY: *rows = (uint32_t)w->query_num, *cols = d; return;
    case MVE_T_KV_PROJ:
        if (c == d) *rows = 0, *cols = 0; /* identity: stored as an empty entry */
        else *rows = d, *cols = c;
        return;
    case MVE_T_WQ: case MVE_T_WK: case MVE_T_WV: case MVE_T_WO: case MVE_T_PROJ_T: *rows = d, *cols = d; return;
    case MVE_T_KV_NORM_R: *rows = c, *cols = c; return;
    default: *rows = 1, *cols = d; return; /* vectors */
    }
}

static int all_finite_f32(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

static int all_finite_f16(const uint16_t *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if ((x[i] & 0x7c00u) == 0x7c00u) return 0;
    return 1;
}

mve_status mve_weights_parse(const void *data, size_t size, const char *origin, mve_weights *w) {
    const unsigned char *p = (const unsigned char *)data;
    const uint32_t one = 1;
    if (*(const unsigned char *)&one != 1)
        return mve_fail(MVE_ERR_UNSUPPORTED, "%s: big-endian hosts are not supported", origin);
    if (size < MVE_FILE_HEADER_BYTES || memcmp(p, MVE_FILE_MAGIC, 8) != 0)
        return mve_fail(MVE_ERR_FORMAT, "%s: magic: not a resampler weights file ('%s' missing)", origin,
                        MVE_FILE_MAGIC);
    uint32_t version = rd32(p + 8);
    if (version != MVE_FILE_VERSION)
        return mve_fail(MVE_ERR_FORMAT, "%s: version is %u, this library reads version %d (re-export the weights)",
                        origin, version, MVE_FILE_VERSION);
    memset(w, 0, sizeof *w);
    uint32_t dtype = rd32(p + 12), d = rd32(p + 16), c = rd32(p + 20), q = rd32(p + 24), heads = rd32(p + 28);
    uint32_t eps_bits = rd32(p + 32), n_tensors = rd32(p + 36);
    uint64_t file_size = rd64(p + 40);
    float eps;
    memcpy(&eps, &eps_bits, 4);
    if (dtype > 1) return mve_fail(MVE_ERR_FORMAT, "%s: dtype is %u (expected 0 = f32 or 1 = f16)", origin, dtype);
    /* Bounds from the model facts (mve.h), checked before anything is sized from these numbers. */
    if (d < 4 || d > MVE_MAX_EMBED_DIM || d % 4 != 0)
        return mve_fail(MVE_ERR_FORMAT, "%s: embed_dim %u is not a multiple of 4 in [4, %d]", origin, d,
                        MVE_MAX_EMBED_DIM);
    if (c == 0 || c > MVE_MAX_KV_DIM)
        return mve_fail(MVE_ERR_FORMAT, "%s: kv_dim %u out of range [1, %d]", origin, c, MVE_MAX_KV_DIM);
    if (q == 0 || q > MVE_MAX_QUERY_NUM)
        return mve_fail(MVE_ERR_FORMAT, "%s: query_num %u out of range [1, %d]", origin, q, MVE_MAX_QUERY_NUM);
    if (heads == 0 || heads > MVE_MAX_HEADS || d % heads != 0)
        return mve_fail(MVE_ERR_FORMAT, "%s: num_heads %u is not a divisor of embed_dim %u in [1, %d]", origin,
                        heads, d, MVE_MAX_HEADS);
    if ((uint64_t)heads * q > MVE_MAX_ATTENTION_ROWS)
        return mve_fail(MVE_ERR_FORMAT, "%s: num_heads %u x query_num %u is more than %d attention rows", origin,
                        heads, q, MVE_MAX_ATTENTION_ROWS);
    if (!(eps > 0.0f) || !(eps <= 1.0f))
        return mve_fail(MVE_ERR_FORMAT, "%s: layer_norm_eps %g is not a number in (0, 1]", origin, (double)eps);
    for (int i = 48; i < 64; i++)
        if (p[i] != 0) return mve_fail(MVE_ERR_FORMAT, "%s: reserved: header bytes 48..63 are not zero", origin);
    if (file_size != (uint64_t)size)
        return mve_fail(MVE_ERR_FORMAT, "%s: file_size: the header says %llu bytes but there are %zu (truncated or "
                        "padded file)",
                        origin, (unsigned long long)file_size, size);
    if (n_tensors != MVE_T_COUNT)
        return mve_fail(MVE_ERR_FORMAT, "%s: n_tensors is %u, expected %d", origin, n_tensors, MVE_T_COUNT);
    size_t table_end = MVE_FILE_HEADER_BYTES + (size_t)n_tensors * MVE_FILE_ENTRY_BYTES;
    if (size < table_end) return mve_fail(MVE_ERR_FORMAT, "%s: tensor table: the file ends inside it", origin);
    if (((uintptr_t)data & 3u) != 0)
        return mve_fail(MVE_ERR_INVALID_ARGUMENT, "%s: data must be 4-byte aligned", origin);

    w->dtype = (int32_t)dtype;
    w->embed_dim = (int32_t)d, w->kv_dim = (int32_t)c, w->query_num = (int32_t)q;
    w->num_heads = (int32_t)heads, w->head_dim = (int32_t)(d / heads);
    w->ln_eps = eps;

    uint64_t prev_end = table_end;
    for (uint32_t i = 0; i < n_tensors; i++) {
        const unsigned char *e = p + MVE_FILE_HEADER_BYTES + (size_t)i * MVE_FILE_ENTRY_BYTES;
        uint32_t id = rd32(e), tdtype = rd32(e + 4), rows = rd32(e + 8), cols = rd32(e + 12);
        uint64_t off = rd64(e + 16), nbytes = rd64(e + 24);
        const char *name = i < MVE_T_COUNT ? tensor_names[i] : "?";
        uint32_t want_rows, want_cols, want_dtype = is_matrix((int)i) ? dtype : 0;
        expected_shape((int)i, w, &want_rows, &want_cols);
        if (id != i)
            return mve_fail(MVE_ERR_FORMAT, "%s: tensor %s: table entry %u has id %u (tensors must be in order)",
                            origin, name, i, id);
        if (tdtype != want_dtype || rows != want_rows || cols != want_cols)
            return mve_fail(MVE_ERR_FORMAT, "%s: tensor %s: is %ux%u dtype %u, expected %ux%u dtype %u for "
                            "embed_dim %u kv_dim %u query_num %u", origin, name, rows, cols, tdtype, want_rows,
                            want_cols, want_dtype, d, c, q);
        uint64_t want_bytes = (uint64_t)rows * cols * (tdtype == 1 ? 2u : 4u);
        if (nbytes != want_bytes)
            return mve_fail(MVE_ERR_FORMAT, "%s: tensor %s: nbytes is %llu, its shape needs %llu", origin, name,
                            (unsigned long long)nbytes, (unsigned long long)want_bytes);
        if (off % MVE_FILE_ALIGN != 0 || off < prev_end || off > (uint64_t)size || nbytes > (uint64_t)size - off)
            return mve_fail(MVE_ERR_FORMAT, "%s: tensor %s: offset %llu (+%llu bytes) is misaligned, overlaps "
                            "another tensor or runs past the end of the file", origin, name,
                            (unsigned long long)off, (unsigned long long)nbytes);
        prev_end = off + nbytes;
        if (nbytes == 0) {
            w->t[i] = NULL;
            continue;
        }
        w->t[i] = p + off;
        size_t n = (size_t)rows * cols;
        int finite = tdtype == 1 ? all_finite_f16((const uint16_t *)w->t[i], n)
                                 : all_finite_f32((const float *)w->t[i], n);
        if (!finite)
            return mve_fail(MVE_ERR_NONFINITE, "%s: tensor %s: holds NaN or infinity", origin, name);
    }
    return MVE_OK;
}
