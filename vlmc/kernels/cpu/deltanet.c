/* One decode step of a Gated DeltaNet decoder layer (Qwen3.5's linear-attention layers) in
 * a single call, each sequence one new token, with its recurrent cache read from `before`
 * buffers and written to `after` buffers (the caller keeps the step's inputs, as the ops'
 * StateCache records them, to rewind exactly):
 *
 *   n = rms_norm(x);  c = qkv(n), z = z_proj(n), b = b_proj(n), a = a_proj(n)
 *   c' = silu(causal depthwise conv over the K-1 kept inputs and c)      (conv state shifts)
 *   q, k = l2_norm per key head (q times scale), v per value head
 *   g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b)
 *   per value head h (key head h / (Hv / Hk)):  S <- exp(g) S;  S += k (beta (v - S^T k))^T;
 *                                                o = S^T q
 *   h = x + out_proj(rms_norm(o) w * silu(z))     (the gated norm, per value head)
 *   out = h + down(silu(gate) * up)               gate, up = gate_up(rms_norm(h))
 *
 * The projections, norms and gates are the kernels the op library runs (vlmc_proj_run,
 * vlmc_norm, vlmc_sigmoid_gate); the convolution, the L2 norms, the gates and the
 * recurrence are written here in the order the MLX reference ops compute them, so the
 * result is the ops' to float32 rounding (reductions may sum in another order). Every
 * sequence's row goes through the same arithmetic whatever B is: a row's result does not
 * depend on the batch. */
#include "vlmc.h"

/* the l2-normed q (times scale) and k of one token's conv output c', one row per value head
 * (key head kh serves value heads kh G .. kh G + G - 1), value head h's rows at q + h stride
 * and k + h stride (the decode step's heads-first rows, and the prompt path's [B, Hv, T, Dk]) */
void dn_qk_heads(const vlmc_deltanet *L, const float *cv, float *q, float *k, size_t stride) {
    const int Hk = L->key_heads, Hv = L->value_heads, Dk = L->key_dim, G = Hv / Hk;
    for (int kh = 0; kh < Hk; kh++) {
        const float *qs = cv + (size_t)kh * Dk, *ks = cv + (size_t)(Hk + kh) * Dk;
        float sq = 0.f, sk = 0.f;
        for (int i = 0; i < Dk; i++) sq += qs[i] * qs[i];
        for (int i = 0; i < Dk; i++) sk += ks[i] * ks[i];
        const float rq = 1.f / sqrtf(sq + 1e-6f), rk = 1.f / sqrtf(sk + 1e-6f);
        for (int r = 0; r < G; r++) {
            float *qd = q + (size_t)(kh * G + r) * stride, *kd = k + (size_t)(kh * G + r) * stride;
            for (int i = 0; i < Dk; i++) qd[i] = (qs[i] * rq) * L->scale;
            for (int i = 0; i < Dk; i++) kd[i] = ks[i] * rk;
        }
    }
}

/* the l2-normed, heads-first q (times scale), k and v of one sequence's conv output c' */
static void qkv_heads(const vlmc_deltanet *L, const float *cv, float *q, float *k, float *v) {
    dn_qk_heads(L, cv, q, k, (size_t)L->key_dim);
    memcpy(v, cv + (size_t)2 * L->key_heads * L->key_dim, sizeof(float) * (size_t)L->value_heads * L->value_dim);
}

typedef struct {
    const float *S0, *q, *k, *v, *g, *beta;
    float *S1, *o;
    int n, Dk, Dv;
} rule_job;

/* the recurrence of one (sequence, value head): S0 [Dk, Dv] -> S1, o [Dv] */
static void rule_head(const float *S0, const float *q, const float *k, const float *v, float g, float beta,
                      float *S1, float *o, int Dk, int Dv) {
    const float e = expf(g);
    float pred[Dv], delta[Dv];
    for (int j = 0; j < Dv; j++) pred[j] = 0.f;
    for (int i = 0; i < Dk; i++) { /* S^T k of the decayed state */
        const float *s = S0 + (size_t)i * Dv, ki = k[i];
        for (int j = 0; j < Dv; j++) pred[j] += (s[j] * e) * ki;
    }
    for (int j = 0; j < Dv; j++) delta[j] = (v[j] - pred[j]) * beta;
    for (int j = 0; j < Dv; j++) o[j] = 0.f;
    for (int i = 0; i < Dk; i++) {
        const float *s = S0 + (size_t)i * Dv, ki = k[i], qi = q[i];
        float *d = S1 + (size_t)i * Dv;
        for (int j = 0; j < Dv; j++) {
            const float x = s[j] * e + ki * delta[j];
            d[j] = x;
            o[j] += x * qi;
        }
    }
}

static void rule_task(void *ctx, int ith, int nth) {
    const rule_job *J = (const rule_job *)ctx;
    const int n0 = (int)((int64_t)J->n * ith / nth), n1 = (int)((int64_t)J->n * (ith + 1) / nth);
    const size_t ss = (size_t)J->Dk * J->Dv;
    for (int r = n0; r < n1; r++)
        rule_head(J->S0 + r * ss, J->q + (size_t)r * J->Dk, J->k + (size_t)r * J->Dk, J->v + (size_t)r * J->Dv,
                  J->g[r], J->beta[r], J->S1 + r * ss, J->o + (size_t)r * J->Dv, J->Dk, J->Dv);
}

/* softplus as the reference computes it: x past 20 as it is, else log(exp(x) + 1) */
static float softplus(float x) {
    if (x > 20.f) return x;
    return x > 0.f ? x + log1pf(expf(-x)) : log1pf(expf(x));
}

static int deltanet_layer(const vlmc_deltanet *L, const vlmc_dn_state *st, const float *x, const float *normed,
                          int B, float *out, int n_threads) {
    const int hid = L->hidden, Hk = L->key_heads, Hv = L->value_heads, Dk = L->key_dim, Dv = L->value_dim;
    const int K = L->conv_kernel, I = L->inter, C = 2 * Hk * Dk + Hv * Dv, HV = Hv * Dv;
    if (B < 1 || Hk < 1 || Hv % Hk || K < 2 || Dv > 4096 || L->qkv.N != C || L->qkv.K != hid || L->z.N != HV
        || L->z.K != hid || L->b.N != Hv || L->b.K != hid || L->a.N != Hv || L->a.K != hid || L->out.K != HV
        || L->out.N != hid || L->gate_up.N != 2 * I || L->gate_up.K != hid || L->down.K != I || L->down.N != hid)
        return -1;
    const size_t per = (size_t)hid + C + HV + 2 * (size_t)Hv + 2 * (size_t)Hv * Dk + HV + hid + 2 * (size_t)I + I;
    float *buf = malloc(sizeof(float) * per * B);
    if (!buf) return -5;
    float *n1 = buf, *cv = n1 + (size_t)B * hid, *z = cv + (size_t)B * C, *bb = z + (size_t)B * HV;
    float *ab = bb + (size_t)B * Hv, *q = ab + (size_t)B * Hv, *o = q + (size_t)B * Hv * Dk;
    float *h = o + (size_t)B * HV, *gu = h + (size_t)B * hid, *m = gu + (size_t)B * 2 * I;
    /* st->k is the records' (and the recurrence's) keys; q lives in scratch */
    int rc = 0;
    if (normed) memcpy(n1, normed, sizeof(float) * (size_t)B * hid);
    else rc = vlmc_norm(x, B, hid, L->norm1, NULL, L->eps1, 0, n1, n_threads);
    if (!rc) rc = vlmc_proj_run(&L->qkv, n1, B, st->rows, n_threads);
    if (!rc) rc = vlmc_proj_run(&L->z, n1, B, z, n_threads);
    if (!rc) rc = vlmc_proj_run(&L->b, n1, B, bb, n_threads);
    if (!rc) rc = vlmc_proj_run(&L->a, n1, B, ab, n_threads);
    if (rc) goto done;
    /* the convolution over [the K-1 kept inputs, this token], then the kept inputs shift */
    for (int b = 0; b < B; b++) {
        const float *prev = st->conv + (size_t)b * (K - 1) * C, *cur = st->rows + (size_t)b * C;
        float *dst = cv + (size_t)b * C, *keep = st->conv_out + (size_t)b * (K - 1) * C;
        for (int c = 0; c < C; c++) {
            const float *w = L->conv_w + (size_t)c * K;
            float acc = prev[c] * w[0];
            for (int j = 1; j < K - 1; j++) acc = acc + prev[(size_t)j * C + c] * w[j];
            dst[c] = acc + cur[c] * w[K - 1];
        }
        if (K > 2) memcpy(keep, prev + C, sizeof(float) * (size_t)(K - 2) * C);
        memcpy(keep + (size_t)(K - 2) * C, cur, sizeof(float) * C);
    }
    rc = vlmc_sigmoid_gate(cv, C, NULL, 0, cv, B, C, 1.f, 0.f, n_threads);
    if (rc) goto done;
    for (int b = 0; b < B; b++) {
        qkv_heads(L, cv + (size_t)b * C, q + (size_t)b * Hv * Dk, st->k + (size_t)b * Hv * Dk,
                  st->v + (size_t)b * HV);
        for (int hh = 0; hh < Hv; hh++) {
            const float a = ab[(size_t)b * Hv + hh] + L->dt_bias[hh];
            st->g[(size_t)b * Hv + hh] = -expf(L->a_log[hh]) * softplus(a);
            st->beta[(size_t)b * Hv + hh] = 1.f / (1.f + expf(-bb[(size_t)b * Hv + hh]));
        }
    }
    rule_job J = {st->state, q, st->k, st->v, st->g, st->beta, st->state_out, o, B * Hv, Dk, Dv};
    run_parallel(rule_task, &J, n_threads < B * Hv ? n_threads : B * Hv);
    /* the gated norm: rms_norm(o) w per value head, times silu(z) */
    rc = vlmc_norm(o, (int64_t)B * Hv, Dv, L->o_norm, NULL, L->eps_o, 0, o, n_threads);
    if (!rc) rc = vlmc_sigmoid_gate(z, HV, NULL, 0, z, B, HV, 1.f, 0.f, n_threads);
    if (rc) goto done;
    for (size_t i = 0; i < (size_t)B * HV; i++) o[i] = o[i] * z[i];
    rc = vlmc_proj_run(&L->out, o, B, h, n_threads);
    if (!rc) {
        for (size_t i = 0; i < (size_t)B * hid; i++) h[i] = x[i] + h[i];
        rc = vlmc_norm(h, B, hid, L->norm2, NULL, L->eps2, 0, n1, n_threads);
    }
    if (!rc) rc = vlmc_proj_run(&L->gate_up, n1, B, gu, n_threads);
    if (!rc) rc = vlmc_sigmoid_gate(gu, 2 * I, gu + I, 2 * I, m, B, I, L->act_a, L->act_c, n_threads);
    if (!rc) rc = vlmc_proj_run(&L->down, m, B, out, n_threads);
    if (!rc)
        for (size_t i = 0; i < (size_t)B * hid; i++) out[i] = h[i] + out[i];
done:
    free(buf);
    return rc;
}

/* nl such layers in a row (consecutive Gated DeltaNet layers of a hybrid stack), one token
 * per sequence: layer i's output is layer i + 1's input. x, out [B, hidden]; normed:
 * rms_norm(x) for layer 0 already computed (MLX's, for an mx.array x), or NULL; st[i]:
 * layer i's cache before (conv [B, K-1, C], state [B, Hv, Dk, Dv]) and where its step
 * goes: the conv inputs (rows [B, C]), the kept inputs and state after, and the
 * recurrence's inputs (k [B, Hv, Dk] l2-normed, v [B, Hv, Dv], g, beta [B, Hv]). */
int vlmc_deltanet_layers(const vlmc_deltanet *const *L, const vlmc_dn_state *st, int nl, const float *x,
                         const float *normed, int B, float *out, int n_threads) {
    if (nl < 1 || B < 1) return -1;
    const int hid = L[0]->hidden;
    for (int i = 1; i < nl; i++)
        if (L[i]->hidden != hid) return -1;
    const size_t n = (size_t)B * hid;
    float *buf = nl > 1 ? malloc(sizeof(float) * 2 * n) : NULL;
    if (nl > 1 && !buf) return -5;
    const float *cur = x;
    int rc = 0;
    for (int i = 0; i < nl && !rc; i++) {
        float *dst = i == nl - 1 ? out : buf + (size_t)(i % 2) * n;
        rc = deltanet_layer(L[i], &st[i], cur, i == 0 ? normed : NULL, B, dst, n_threads);
        cur = dst;
    }
    free(buf);
    return rc;
}
