/* One decode step of a pre-norm decoder layer (Qwen2 style) in a single call: the same
 * kernels the cpu op library calls one by one (vlmc_norm, the GEMVs, vlmc_rope,
 * vlmc_kv_dense_decode with this step's keys/values as its extra row, vlmc_sigmoid_gate)
 * in the same order on the same data, so the result is the same float32; what goes away
 * is ~20 Python op calls per layer, a large share of a decode step on a small CPU.
 *
 *   h = x + o_proj(attention(rope(q), rope(k), v; cache + this step))   q,k,v = split(qkv(rms_norm(x)))
 *   out = h + down(act(gate) * up)                                      gate,up = split(gate_up(rms_norm(h)))
 */
#include "vlmc.h"

static int proj_run(const vlmc_proj *p, const float *x, int M, float *y, int n_threads) {
    switch (p->kind) {
    case 0: return vlmc_gemv_f32(x, M, p->K, (const float *)p->w, p->N, p->bias, y, n_threads);
    case 1: return vlmc_gemv_bf16(x, M, p->K, (const uint16_t *)p->w, p->N, p->bias, y, n_threads);
    case 2:
        return vlmc_gemv_q(x, M, p->K, (const uint32_t *)p->w, p->scales, p->biases, p->st, p->N, p->bits, p->gs,
                           p->bias, y, n_threads);
    default: return -2;
    }
}

/* x, out [B, hidden]; normed: rms_norm(x) already computed (the caller's own, e.g. MLX's
 * for an mx.array x), or NULL; cos, sin [B or 1, head_dim] (ca: their row stride, 0 = shared);
 * the cache's dense float32 keys/values [B, kv_heads, cap, head_dim] hold `held` tokens
 * (held >= 1); new_k, new_v [B, kv_heads, head_dim] receive this step's roped keys and
 * values for the caller to store. starts: each sequence's first visible key. */
static int decode_layer(const vlmc_layer *L, const float *x, const float *normed, int B, const float *cs, const float *sn,
                      int64_t ca,
                      const float *kcache, const float *vcache, const int32_t *starts, int cap, int held,
                      float *new_k, float *new_v, float *out, int n_threads) {
    const int hid = L->hidden, H = L->heads, HKV = L->kv_heads, D = L->head_dim, I = L->inter;
    const int QKV = (H + 2 * HKV) * D;
    if (B < 1 || held < 1 || held > cap || H * D != hid || L->qkv.N != QKV || L->qkv.K != hid || L->o.K != H * D
        || L->o.N != hid || L->gate_up.N != 2 * I || L->gate_up.K != hid || L->down.K != I || L->down.N != hid)
        return -1;
    const size_t per = (size_t)hid + QKV + (size_t)H * D + hid + hid + 2 * (size_t)I + I;
    float *buf = malloc(sizeof(float) * per * B);
    if (!buf) return -5;
    float *n1 = buf, *qkv = n1 + (size_t)B * hid, *q = qkv + (size_t)B * QKV, *att = q + (size_t)B * H * D;
    float *h = att + (size_t)B * hid, *gu = h + (size_t)B * hid, *m = gu + (size_t)B * 2 * I;
    int rc = 0;
    if (normed) memcpy(n1, normed, sizeof(float) * (size_t)B * hid);
    else rc = vlmc_norm(x, B, hid, L->norm1, NULL, L->eps1, 0, n1, n_threads);
    if (!rc) rc = proj_run(&L->qkv, n1, B, qkv, n_threads);
    /* rope of q and k straight from the qkv rows ([B, 1 position, heads, D] views) */
    if (!rc) rc = vlmc_rope(qkv, B, H, 1, D, QKV, D, 0, cs, sn, ca, 0, q, n_threads);
    if (!rc) rc = vlmc_rope(qkv + (size_t)H * D, B, HKV, 1, D, QKV, D, 0, cs, sn, ca, 0, new_k, n_threads);
    if (!rc)
        for (int b = 0; b < B; b++)
            memcpy(new_v + (size_t)b * HKV * D, qkv + (size_t)b * QKV + (size_t)(H + HKV) * D, sizeof(float) * HKV * D);
    if (!rc)
        rc = vlmc_kv_dense_decode(q, kcache, vcache, new_k, new_v, starts, B, H, HKV, D, cap, held + 1, L->scale,
                                  att, n_threads);
    if (!rc) rc = proj_run(&L->o, att, B, h, n_threads);
    if (!rc) {
        for (size_t i = 0; i < (size_t)B * hid; i++) h[i] = x[i] + h[i];
        rc = vlmc_norm(h, B, hid, L->norm2, NULL, L->eps2, 0, n1, n_threads);
    }
    if (!rc) rc = proj_run(&L->gate_up, n1, B, gu, n_threads);
    if (!rc) rc = vlmc_sigmoid_gate(gu, 2 * I, gu + I, 2 * I, m, B, I, L->act_a, n_threads);
    if (!rc) rc = proj_run(&L->down, m, B, out, n_threads);
    if (!rc)
        for (size_t i = 0; i < (size_t)B * hid; i++) out[i] = h[i] + out[i];
    free(buf);
    return rc;
}

/* The decode step of nl such layers in a row (a model's whole decoder stack): layer i's
 * output is layer i + 1's input, in the same calls as nl vlmc_decode_layer calls, so the
 * result is theirs to the last bit; what goes away is the Python between the layers. normed: as above, for
 * layer 0. kc[i], vc[i], cap[i], held[i]: layer i's cache; new_kv: [nl, 2, B, kv_heads,
 * head_dim], each layer's new keys then values; where inplace[i], they also go into the
 * cache's column held[i] (the caller has checked that no array can see it). */
int vlmc_decode_layers(const vlmc_layer *const *L, int nl, const float *x, const float *normed, int B, const float *cs,
                       const float *sn, int64_t ca, float *const *kc, float *const *vc, const int32_t *starts,
                       const int32_t *cap, const int32_t *held, const int32_t *inplace, float *new_kv, float *out,
                       int n_threads) {
    if (nl < 1 || B < 1) return -1;
    const int hid = L[0]->hidden;
    for (int i = 1; i < nl; i++)
        if (L[i]->hidden != hid || L[i]->kv_heads != L[0]->kv_heads || L[i]->head_dim != L[0]->head_dim) return -1;
    const size_t n = (size_t)B * L[0]->kv_heads * L[0]->head_dim;
    float *buf = nl > 1 ? malloc(sizeof(float) * 2 * (size_t)B * hid) : NULL;
    if (nl > 1 && !buf) return -5;
    const float *cur = x;
    int rc = 0;
    for (int i = 0; i < nl && !rc; i++) {
        float *dst = i == nl - 1 ? out : buf + (size_t)(i % 2) * B * hid;
        float *nk = new_kv + 2 * n * i, *nv = nk + n;
        rc = decode_layer(L[i], cur, i == 0 ? normed : NULL, B, cs, sn, ca, kc[i], vc[i], starts, cap[i], held[i],
                               nk, nv, dst, n_threads);
        if (!rc && inplace[i]) { /* rows (b, h) of D floats, at column held of [B, HKV, cap, D] */
            const size_t D = L[i]->head_dim, rows = (size_t)B * L[i]->kv_heads;
            for (size_t r = 0; r < rows; r++) {
                const size_t at = (r * cap[i] + held[i]) * D;
                memcpy(kc[i] + at, nk + r * D, sizeof(float) * D);
                memcpy(vc[i] + at, nv + r * D, sizeof(float) * D);
            }
        }
        cur = dst;
    }
    free(buf);
    return rc;
}
