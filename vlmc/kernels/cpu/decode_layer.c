/* One decode step of a pre-norm decoder layer (Llama/Qwen2, and the Gemma and Qwen3 options
 * of vlmc_layer) in a single call: the same kernels the cpu op library calls one by one
 * (vlmc_norm, the GEMVs, vlmc_rope, the KV cache's attention with this step's keys/values
 * as its extra row, vlmc_sigmoid_gate) in the same order on the same data, so the result is
 * the same float32; what goes away is ~20-30 Python op calls per layer, a large share of a
 * decode step on a small CPU. The cache of each layer is dense float32 or affine codes
 * (vlmc.runtime.kv_codecs.Affine, 4 or 8 bits), possibly a sliding window: for affine codes
 * this step's keys and values are encoded here as the codec encodes them
 * (kv_affine_encode_rows), and the attention reads them as codes, as the ops do. A
 * TurboQuant cache's step (kv_turbo.c) codes its keys and values, rotates the queries in
 * and the attention's output back around the attention over the codes.
 *
 *   q,k,v = split(qkv(rms_norm(x)));  q,k = qk_norm(q), qk_norm(k)  (optional, per head)
 *   h = x + post_attn(o_proj(attention(rope(q), rope(k), v; cache + this step)))
 *   gate,up = split(gate_up(rms_norm(h)))
 *   out = h + post_ff(down(act(gate) * up))           post_attn, post_ff: optional norms
 *
 * and the options of vlmc_layer that Gemma 4 brought, each usable alone: a value norm
 * (RMSNorm of each value head, weighted or not); a shared-cache layer (queries only,
 * attending over the keys and values another layer stored this step); a per-layer input
 * branch after the MLP (out += norm(proj(act(gate(out)) * input row of this layer)));
 * the output times a per-layer scalar.
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

/* x, out [B, T, hidden]: T new tokens per sequence (one decode step, or the tokens of a
 * draft being verified); normed: rms_norm(x) already computed (the caller's own, e.g.
 * MLX's for an mx.array x), or NULL; cos, sin: the row of token t of sequence b at b ca +
 * t cl (ca = 0: shared by the sequences), unless kv->cs; kv: the layer's cache (kv->held >=
 * 1 tokens, kv->starts each sequence's first visible key, kv->window its sliding window)
 * and where this step's keys and values go for the caller to store. Every row of x goes through the same kernels as it would alone (the
 * GEMVs' rows are exact whatever their number, the attention's query t sees the held keys
 * and this step's tokens 0..t), so token t's output is what T one-token steps give. */
/* each token's heads (n rows of D at offset `at` of its qkv row) RMS-normed in place: the
 * ops norm the [B, T, n, D] view row by row, with the same arithmetic per row */
static int heads_norm(float *qkv, int BT, int QKV, size_t at, int n, int D, const float *w, float eps, int mode) {
    int rc = 0;
    for (int r = 0; r < BT && !rc; r++) {
        float *row = qkv + (size_t)r * QKV + at;
        rc = vlmc_norm(row, n, D, w, NULL, eps, mode, row, 1);
    }
    return rc;
}

/* the same for query heads hs apart in the row (gated queries: [q, gate] per head) */
static int heads_norm_strided(float *qkv, int BT, int QKV, int n, int D, int hs, const float *w, float eps) {
    int rc = 0;
    for (int r = 0; r < BT && !rc; r++)
        for (int h = 0; h < n && !rc; h++) {
            float *row = qkv + (size_t)r * QKV + (size_t)h * hs;
            rc = vlmc_norm(row, 1, D, w, NULL, eps, 0, row, 1);
        }
    return rc;
}

/* rotary on the first RD of each head (rows of x as vlmc_rope reads them), the other D - RD
 * copied: out [A, H, L, D]; tmp [A, H, L, RD] scratch */
static int rope_partial(const float *x, int A, int H, int L, int D, int RD, int64_t sa, int64_t sh, int64_t sl,
                        const float *cs, const float *sn, int64_t ca, int64_t cl, float *tmp, float *out,
                        int n_threads) {
    int rc = vlmc_rope(x, A, H, L, RD, sa, sh, sl, cs, sn, ca, cl, tmp, n_threads);
    for (int a = 0; a < A && !rc; a++)
        for (int h = 0; h < H; h++)
            for (int l = 0; l < L; l++) {
                const size_t r = ((size_t)a * H + h) * L + l;
                memcpy(out + r * D, tmp + r * RD, sizeof(float) * RD);
                memcpy(out + r * D + RD, x + a * sa + h * sh + l * sl + RD, sizeof(float) * (D - RD));
            }
    return rc;
}

/* the per-layer input branch, out [BT, hid] in place: out += ple_norm(ple_proj(act(ple_gate(out))
 * * input)), input row r at in + r in_ld; g [BT, P], y [BT, hid] scratch. The ops compute
 * act, the product, the projection, the norm and the sum one after another, as here. */
static int ple_branch(const vlmc_layer *L, float *out, int BT, const float *in, int64_t in_ld, float *g, float *y,
                      int n_threads) {
    const int hid = L->hidden, P = L->ple_dim;
    int rc = proj_run(&L->ple_gate, out, BT, g, n_threads);
    if (!rc) rc = vlmc_sigmoid_gate(g, P, NULL, 0, g, BT, P, L->ple_act_a, L->ple_act_c, n_threads);
    if (!rc)
        for (int r = 0; r < BT; r++)
            for (int j = 0; j < P; j++) g[(size_t)r * P + j] *= in[r * in_ld + j];
    if (!rc) rc = proj_run(&L->ple_proj, g, BT, y, n_threads);
    if (!rc) rc = vlmc_norm(y, BT, hid, L->ple_norm, NULL, L->eps_ple, 0, y, n_threads);
    if (!rc)
        for (size_t i = 0; i < (size_t)BT * hid; i++) out[i] = out[i] + y[i];
    return rc;
}

static int decode_layer(const vlmc_layer *L, const float *x, const float *normed, int B, int T, const float *cs,
                        const float *sn, int64_t ca, int64_t cl, const vlmc_kv *kv, const float *in, int64_t in_ld,
                        float *out, int n_threads) {
    const int hid = L->hidden, H = L->heads, HKV = L->kv_heads, D = L->head_dim, I = L->inter, BT = B * T;
    const int shared = L->shared, P = L->ple_dim, gated = L->q_gate, RD = L->rope_dim ? L->rope_dim : D;
    const int QW = gated ? 2 * D : D; /* a query head's columns in the qkv row */
    const int QKV = H * QW + (shared ? 0 : 2 * HKV * D), held = kv->held, cap = kv->cap;
    const int affine = kv->layout == VLMC_KV_AFFINE;
    if (B < 1 || T < 1 || held < 1 || held > cap || L->qkv.N != QKV || L->qkv.K != hid
        || L->o.K != H * D || L->o.N != hid || L->gate_up.N != 2 * I || L->gate_up.K != hid || L->down.K != I
        || L->down.N != hid || (shared && held < T) || P < 0 || RD < 2 || RD > D || RD % 2 || (gated && shared))
        return -1;
    if (P && (!in || in_ld < P || !L->ple_norm || L->ple_gate.N != P || L->ple_gate.K != hid
              || L->ple_proj.N != hid || L->ple_proj.K != P))
        return -1;
    const int turbo = kv->layout == VLMC_KV_TURBO, coded = affine || turbo;
    if (kv->layout != VLMC_KV_DENSE && !coded) return -2;
    if (affine && ((kv->bits != 4 && kv->bits != 8) || kv->gs < 2 || kv->gs % 2 || D % kv->gs)) return -2;
    if (turbo && (shared || kv->kbits < 2 || kv->kbits > 4 || kv->vbits < 2 || kv->vbits > 4 || D % 8 || !kv->krot
                  || !kv->vrot || !kv->vrot_t || !kv->kcb || !kv->vcb || !kv->kn || !kv->vn))
        return -2;
    const size_t nkv = shared ? 0 : (size_t)BT * HKV * D, nq = (size_t)BT * H * D;
    const size_t per = (size_t)hid + QKV + 2 * (size_t)H * D + hid + 2 * (size_t)I + I + (P ? (size_t)P + hid : 0);
    const size_t rtmp = RD < D ? (size_t)BT * (H + HKV) * RD : 0; /* partial rotary's scratch */
    const size_t tq = turbo ? 2 * nq + D : 0;                        /* TurboQuant's */
    float *buf = malloc(sizeof(float) * (per * BT + (coded ? 2 * nkv : 0) + tq + rtmp));
    if (!buf) return -5;
    float *n1 = buf, *qkv = n1 + (size_t)BT * hid, *q = qkv + (size_t)BT * QKV, *att = q + (size_t)BT * H * D;
    float *h = att + (size_t)BT * H * D, *gu = h + (size_t)BT * hid, *m = gu + (size_t)BT * 2 * I;
    float *pg = m + (size_t)BT * I, *py = pg + (size_t)BT * P; /* the per-layer input branch's */
    /* this step's roped keys and values as floats [B, HKV, T, D]: what a dense cache stores, else scratch */
    float *nk = coded ? py + (size_t)BT * (P ? hid : 0) : (float *)kv->nk, *nv = coded ? nk + nkv : (float *)kv->nv;
    float *qr = coded ? nk + 2 * nkv : py + (size_t)BT * (P ? hid : 0), *ar = qr + nq, *tmp = ar + nq; /* TurboQuant: q R_k, the output before R_v^T */
    float *rt = qr + tq; /* rtmp floats */
    const size_t k_at = (size_t)H * QW, v_at = k_at + (size_t)HKV * D;
    int rc = 0;
    if (normed) memcpy(n1, normed, sizeof(float) * (size_t)BT * hid);
    else rc = vlmc_norm(x, BT, hid, L->norm1, NULL, L->eps1, 0, n1, n_threads);
    if (!rc) rc = proj_run(&L->qkv, n1, BT, qkv, n_threads);
    if (!rc && L->q_norm)
        rc = gated ? heads_norm_strided(qkv, BT, QKV, H, D, QW, L->q_norm, L->eps_q)
                   : heads_norm(qkv, BT, QKV, 0, H, D, L->q_norm, L->eps_q, 0);
    if (!rc && L->k_norm && !shared) rc = heads_norm(qkv, BT, QKV, k_at, HKV, D, L->k_norm, L->eps_k, 0);
    if (!rc && L->v_norm && !shared)
        /* unweighted: MLX's arithmetic, as the op library's unweighted norm (host.rms_norm) */
        rc = heads_norm(qkv, BT, QKV, v_at, HKV, D, L->v_norm_w, L->eps_v, L->v_norm_w ? 0 : 2);
    if (kv->cs) cs = kv->cs, sn = kv->sn;
    /* rope of q and k straight from the qkv rows ([B, T positions, heads, D] views): q
     * [B, H, T, D], k [B, HKV, T, D] */
    if (!rc && RD == D) rc = vlmc_rope(qkv, B, H, T, D, (int64_t)T * QKV, QW, QKV, cs, sn, ca, cl, q, n_threads);
    if (!rc && RD < D)
        rc = rope_partial(qkv, B, H, T, D, RD, (int64_t)T * QKV, QW, QKV, cs, sn, ca, cl, rt, q, n_threads);
    if (!rc && !shared && RD == D)
        rc = vlmc_rope(qkv + k_at, B, HKV, T, D, (int64_t)T * QKV, D, QKV, cs, sn, ca, cl, nk, n_threads);
    if (!rc && !shared && RD < D)
        rc = rope_partial(qkv + k_at, B, HKV, T, D, RD, (int64_t)T * QKV, D, QKV, cs, sn, ca, cl,
                          rt + (size_t)BT * H * RD, nk, n_threads);
    if (!rc && !shared)
        for (int b = 0; b < B; b++)
            for (int g = 0; g < HKV; g++)
                for (int t = 0; t < T; t++)
                    memcpy(nv + (((size_t)b * HKV + g) * T + t) * D,
                           qkv + ((size_t)b * T + t) * QKV + v_at + (size_t)g * D, sizeof(float) * D);
    /* attention into [B, T, H, D]: the output projection's rows; a shared-cache layer's
     * queries are the last T of the held rows, all in the cache already */
    if (!rc && shared && affine) {
        rc = kv_affine_decode_x(q, kv->k, kv->ks, kv->kb, kv->v, kv->vs, kv->vb, NULL, NULL, kv->starts, B, H, HKV, D,
                                T, cap, held, kv->bits, kv->gs, L->scale, kv->window, L->softcap, att, 1, n_threads);
    } else if (!rc && shared) {
        rc = kv_dense_decode_t(q, kv->k, kv->v, NULL, NULL, kv->starts, B, H, HKV, D, T, cap, held, L->scale,
                               kv->window, L->softcap, att, 1, n_threads);
    } else if (!rc && affine) {
        const size_t rows = (size_t)BT * HKV;
        kv_affine_encode_rows(nk, rows, D, kv->bits, kv->gs, kv->nk, kv->nks, kv->nkb);
        kv_affine_encode_rows(nv, rows, D, kv->bits, kv->gs, kv->nv, kv->nvs, kv->nvb);
        const kv_codes xk = {kv->nk, kv->nks, kv->nkb}, xv = {kv->nv, kv->nvs, kv->nvb};
        rc = kv_affine_decode_x(q, kv->k, kv->ks, kv->kb, kv->v, kv->vs, kv->vb, &xk, &xv, kv->starts, B, H, HKV, D,
                                T, cap, held + T, kv->bits, kv->gs, L->scale, kv->window, L->softcap, att, 1,
                                n_threads);
    } else if (!rc && turbo) {
        const size_t rows = (size_t)BT * HKV;
        kv_turbo_encode_rows(nk, rows, D, kv->kbits, kv->krot, kv->kcb, kv->nk, kv->nkn, tmp);
        kv_turbo_encode_rows(nv, rows, D, kv->vbits, kv->vrot, kv->vcb, kv->nv, kv->nvn, tmp);
        const kv_turbo xk = {kv->nk, kv->nkn}, xv = {kv->nv, kv->nvn};
        kv_rotate_rows(q, (size_t)BT * H, D, kv->krot, qr);
        rc = kv_turbo_decode_x(qr, kv->k, kv->kn, kv->v, kv->vn, kv->kcb, kv->vcb, &xk, &xv, kv->starts, B, H, HKV, D,
                               T, cap, held + T, kv->kbits, kv->vbits, L->scale, kv->window, L->softcap, ar, 1,
                               n_threads);
        if (!rc) kv_rotate_rows(ar, (size_t)BT * H, D, kv->vrot_t, att);
    } else if (!rc) {
        rc = kv_dense_decode_t(q, kv->k, kv->v, nk, nv, kv->starts, B, H, HKV, D, T, cap, held + T, L->scale,
                               kv->window, L->softcap, att, 1, n_threads);
    }
    if (!rc && gated) /* the output gate: sigmoid of each query head's gate columns */
        for (int r = 0; r < BT; r++)
            for (int hh = 0; hh < H; hh++) {
                const float *g = qkv + (size_t)r * QKV + (size_t)hh * QW + D;
                float *o = att + ((size_t)r * H + hh) * D;
                for (int j = 0; j < D; j++) o[j] = o[j] * (1.f / (1.f + expf(-g[j])));
            }
    if (!rc) rc = proj_run(&L->o, att, BT, h, n_threads);
    if (!rc && L->post_attn) rc = vlmc_norm(h, BT, hid, L->post_attn, NULL, L->eps_pa, 0, h, n_threads);
    if (!rc) {
        for (size_t i = 0; i < (size_t)BT * hid; i++) h[i] = x[i] + h[i];
        rc = vlmc_norm(h, BT, hid, L->norm2, NULL, L->eps2, 0, n1, n_threads);
    }
    if (!rc) rc = proj_run(&L->gate_up, n1, BT, gu, n_threads);
    if (!rc) rc = vlmc_sigmoid_gate(gu, 2 * I, gu + I, 2 * I, m, BT, I, L->act_a, L->act_c, n_threads);
    if (!rc) rc = proj_run(&L->down, m, BT, out, n_threads);
    if (!rc && L->post_ff) rc = vlmc_norm(out, BT, hid, L->post_ff, NULL, L->eps_pf, 0, out, n_threads);
    if (!rc)
        for (size_t i = 0; i < (size_t)BT * hid; i++) out[i] = h[i] + out[i];
    if (!rc && P) rc = ple_branch(L, out, BT, in, in_ld, pg, py, n_threads);
    if (!rc && L->out_scale) {
        const float s = L->out_scale[0];
        for (size_t i = 0; i < (size_t)BT * hid; i++) out[i] = out[i] * s;
    }
    free(buf);
    return rc;
}

/* rows of T x `width` bytes (T columns each) from src into columns held .. held + T - 1
 * of the [rows, cap, width] buffer dst */
static void store_columns(void *dst, const void *src, size_t rows, size_t width, int cap, int held, int T) {
    for (size_t r = 0; r < rows; r++)
        memcpy((uint8_t *)dst + (r * cap + held) * width, (const uint8_t *)src + r * T * width, T * width);
}

/* This step's keys and values, as stored, into columns kv->held .. + T - 1 of the cache's
 * buffers. */
static void store_step(const vlmc_kv *kv, size_t rows, int D, int T) {
    if (kv->layout == VLMC_KV_DENSE) {
        store_columns(kv->k, kv->nk, rows, sizeof(float) * D, kv->cap, kv->held, T);
        store_columns(kv->v, kv->nv, rows, sizeof(float) * D, kv->cap, kv->held, T);
        return;
    }
    if (kv->layout == VLMC_KV_TURBO) {
        store_columns(kv->k, kv->nk, rows, (size_t)D * kv->kbits / 8, kv->cap, kv->held, T);
        store_columns(kv->v, kv->nv, rows, (size_t)D * kv->vbits / 8, kv->cap, kv->held, T);
        store_columns((void *)kv->kn, kv->nkn, rows, sizeof(float), kv->cap, kv->held, T);
        store_columns((void *)kv->vn, kv->nvn, rows, sizeof(float), kv->cap, kv->held, T);
        return;
    }
    const size_t rb = (size_t)D * kv->bits / 8, gb = sizeof(uint16_t) * (D / kv->gs);
    store_columns(kv->k, kv->nk, rows, rb, kv->cap, kv->held, T);
    store_columns(kv->v, kv->nv, rows, rb, kv->cap, kv->held, T);
    store_columns(kv->ks, kv->nks, rows, gb, kv->cap, kv->held, T);
    store_columns(kv->kb, kv->nkb, rows, gb, kv->cap, kv->held, T);
    store_columns(kv->vs, kv->nvs, rows, gb, kv->cap, kv->held, T);
    store_columns(kv->vb, kv->nvb, rows, gb, kv->cap, kv->held, T);
}

/* The step of nl such layers in a row (a model's whole decoder stack): layer i's output is
 * layer i + 1's input, in the same calls as nl one-layer calls, so the result is theirs to
 * the last bit; what goes away is the Python between the layers. x, out [B, T, hidden];
 * normed: as above, for layer 0. kv[i]: layer i's cache (dense and affine layers mix
 * freely); each layer's keys and values go to kv[i].nk / nv (and scales / minimums),
 * [B, HKV, T, *], and where kv[i].inplace also into the cache's columns kv[i].held .. +
 * T - 1 (the caller has checked that no array can see them). cs, sn: the rotary tables of
 * the layers whose kv[i].cs is NULL. inputs[i] (inputs NULL: none): layer i's per-layer input
 * rows (token t of sequence b at (b T + t) in_ld), for the layers with a ple_dim. A
 * shared-cache layer's kv[i] is a cache an earlier call (or layer) wrote, held counting
 * this step's tokens; it stores nothing. */
int vlmc_decode_layers(const vlmc_layer *const *L, const vlmc_kv *kv, int nl, const float *x, const float *normed,
                       int B, int T, const float *cs, const float *sn, int64_t ca, int64_t cl,
                       const float *const *inputs, int64_t in_ld, float *out, int n_threads) {
    if (nl < 1 || B < 1 || T < 1) return -1;
    const int hid = L[0]->hidden;
    for (int i = 1; i < nl; i++)
        if (L[i]->hidden != hid) return -1;
    for (int i = 0; i < nl; i++)
        if ((kv[i].inplace && (L[i]->shared || kv[i].held + T > kv[i].cap)) || (L[i]->ple_dim && !inputs))
            return -1;
    const size_t n = (size_t)B * T * hid;
    float *buf = nl > 1 ? malloc(sizeof(float) * 2 * n) : NULL;
    if (nl > 1 && !buf) return -5;
    const float *cur = x;
    int rc = 0;
    for (int i = 0; i < nl && !rc; i++) {
        float *dst = i == nl - 1 ? out : buf + (size_t)(i % 2) * n;
        rc = decode_layer(L[i], cur, i == 0 ? normed : NULL, B, T, cs, sn, ca, cl, &kv[i], inputs ? inputs[i] : NULL,
                          in_ld, dst, n_threads);
        if (!rc && kv[i].inplace) store_step(&kv[i], (size_t)B * L[i]->kv_heads, L[i]->head_dim, T);
        cur = dst;
    }
    free(buf);
    return rc;
}

/* proj_run for the other layer kinds (deltanet.c) */
int vlmc_proj_run(const vlmc_proj *p, const float *x, int M, float *y, int n_threads) {
    return proj_run(p, x, M, y, n_threads);
}
