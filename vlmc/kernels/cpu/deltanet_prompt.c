/* A prompt chunk of a Gated DeltaNet layer (Qwen3.5's linear attention): T new tokens per
 * sequence, everything between the in-projections and the output projection, which the
 * caller runs on the prompt matmul kernels (the int8 GEMM, or BLAS) as the layer's ops do:
 *
 *   c' = silu(causal depthwise conv over the K-1 kept inputs and the chunk's rows)
 *   q, k = l2_norm per key head (q times scale), v per value head
 *   g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b)
 *   the delta rule token by token from the state kept:  S <- exp(g) S;
 *                                 S += k (beta (v - S^T k))^T;  o = S^T q
 *   o = rms_norm(o) w * silu(z)                            (the gated norm, per value head)
 *
 * The recurrence runs token by token, not in chunks: each state column S[:, j] evolves on
 * its own (only k, q, g, beta are shared across columns), so a 16-column slice of a head's
 * state stays in registers' reach (L1) for the whole chunk, one pass over it per token.
 * Every (sequence, head) sums in the same order whatever B, T or where a prompt was cut
 * into chunks, and padding rows (zeroed inputs) leave a zero state zero: a row's result
 * does not depend on the batch or the chunking. The result is the ops' (chunked form) to
 * float32 rounding. */
#include "vlmc.h"

typedef struct {
    const vlmc_deltanet *L;
    const vlmc_dn_state *st;
    const float *a, *b, *wt, *zero; /* wt: the conv taps [K, C]; zero: C zeros */
    float *cv, *q, *ke;             /* ke [B, Hv, T, Dk]: k times the token's decay exp(g) */
    int B, T;
} prep_job;

static float softplus_ref(float x) {
    if (x > 20.f) return x;
    return x > 0.f ? x + log1pf(expf(-x)) : log1pf(expf(x));
}

/* rows [r0, r1) of the chunk (row b T + t): the conv (before silu), from the taps
 * transposed to [K, C] (wt) so each tap runs along the channels */
static void conv_task(void *ctx, int ith, int nth) {
    const prep_job *J = (const prep_job *)ctx;
    const vlmc_deltanet *L = J->L;
    const int K = L->conv_kernel, C = 2 * L->key_heads * L->key_dim + L->value_heads * L->value_dim, T = J->T;
    const long rows = (long)J->B * T, r0 = rows * ith / nth, r1 = rows * (ith + 1) / nth;
    const float *in[64];
    for (long r = r0; r < r1; r++) {
        const int b = (int)(r / T), t = (int)(r % T);
        for (int j = 0; j < K; j++) { /* input t - K + 1 + j: a kept one (zeros when none) or a row */
            const int at = t - K + 1 + j;
            in[j] = at >= 0 ? J->st->rows + ((size_t)b * T + at) * C
                  : J->st->conv ? J->st->conv + ((size_t)b * (K - 1) + (K - 1 + at)) * C : J->zero;
        }
        float *dst = J->cv + (size_t)r * C;
        for (int c = 0; c < C; c++) dst[c] = in[0][c] * J->wt[c];
        for (int j = 1; j < K; j++) {
            const float *x = in[j], *w = J->wt + (size_t)j * C;
            for (int c = 0; c < C; c++) dst[c] = dst[c] + x[c] * w[c];
        }
    }
}

/* rows [r0, r1): q (scaled), k (the records') heads-first [B, Hv, T, D], v, g, beta */
static void heads_task(void *ctx, int ith, int nth) {
    const prep_job *J = (const prep_job *)ctx;
    const vlmc_deltanet *L = J->L;
    const vlmc_dn_state *st = J->st;
    const int Hk = L->key_heads, Hv = L->value_heads, Dk = L->key_dim, Dv = L->value_dim, T = J->T;
    const int C = 2 * Hk * Dk + Hv * Dv;
    const long rows = (long)J->B * T, r0 = rows * ith / nth, r1 = rows * (ith + 1) / nth;
    for (long r = r0; r < r1; r++) {
        const int b = (int)(r / T), t = (int)(r % T);
        const float *cv = J->cv + (size_t)r * C;
        const size_t at = ((size_t)b * Hv * T + t) * Dk; /* value head 0's row; head h's T Dk further */
        dn_qk_heads(L, cv, J->q + at, st->k + at, (size_t)T * Dk);
        for (int h = 0; h < Hv; h++) {
            memcpy(st->v + (((size_t)b * Hv + h) * T + t) * Dv, cv + (size_t)2 * Hk * Dk + (size_t)h * Dv,
                   sizeof(float) * Dv);
            const size_t gi = ((size_t)b * Hv + h) * T + t;
            const float a = J->a[(size_t)r * Hv + h] + L->dt_bias[h];
            st->g[gi] = -expf(L->a_log[h]) * softplus_ref(a);
            st->beta[gi] = 1.f / (1.f + expf(-J->b[(size_t)r * Hv + h]));
            const float e = expf(st->g[gi]), *k = st->k + gi * Dk;
            for (int i = 0; i < Dk; i++) J->ke[gi * Dk + i] = e * k[i];
        }
    }
}

typedef struct {
    const vlmc_deltanet *L;
    const vlmc_dn_state *st;
    const float *q, *ke;
    float *o; /* [B, T, Hv, Dv] */
    int B, T, W; /* W: 32-column slices per head */
} rule_job;

/* The recurrence of one (sequence, head)'s columns over the chunk, its state slice S
 * [Dk, cols] (row stride Dv) updated in place; per token t, with e = exp(g_t):
 *   pred = sum_i S[i] ke_t[i]      (ke_t = e k_t: the decayed state's S^T k)
 *   x_i = k_t[i] delta + S[i] e,   delta = (v_t - pred) beta_t;   S[i] = x_i
 *   o_t = sum_i x_i q_t[i]
 * and the next token's pred summed in the same pass over the x_i (sums in i order). */
#if VLMC_SIMD && defined(__AVX512F__)
static ALWAYS void rule_cols(float *S, int nb, int Dk, int Dv, const float *q, const float *k, const float *ke,
                             const float *v, const float *g, const float *beta, float *o, size_t o_ld, int T) {
    __m512 pred[2], delta[2], out[2], next[2];
    for (int c = 0; c < nb; c++) pred[c] = _mm512_setzero_ps();
    for (int i = 0; i < Dk; i++)
        for (int c = 0; c < nb; c++)
            pred[c] = _mm512_fmadd_ps(_mm512_loadu_ps(S + (size_t)i * Dv + 16 * c), _mm512_set1_ps(ke[i]), pred[c]);
    for (int t = 0; t < T; t++) {
        const float *kt = k + (size_t)t * Dk, *qt = q + (size_t)t * Dk;
        const float *kn = t + 1 < T ? ke + (size_t)(t + 1) * Dk : ke; /* past the end: unused */
        const __m512 e = _mm512_set1_ps(expf(g[t])), bt = _mm512_set1_ps(beta[t]);
        for (int c = 0; c < nb; c++) {
            delta[c] = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(v + (size_t)t * Dv + 16 * c), pred[c]), bt);
            out[c] = next[c] = _mm512_setzero_ps();
        }
        for (int i = 0; i < Dk; i++) {
            float *s = S + (size_t)i * Dv;
            const __m512 ki = _mm512_set1_ps(kt[i]), qi = _mm512_set1_ps(qt[i]), ni = _mm512_set1_ps(kn[i]);
            for (int c = 0; c < nb; c++) {
                const __m512 x = _mm512_fmadd_ps(ki, delta[c], _mm512_mul_ps(_mm512_loadu_ps(s + 16 * c), e));
                _mm512_storeu_ps(s + 16 * c, x);
                out[c] = _mm512_fmadd_ps(x, qi, out[c]);
                next[c] = _mm512_fmadd_ps(x, ni, next[c]);
            }
        }
        for (int c = 0; c < nb; c++) {
            _mm512_storeu_ps(o + (size_t)t * o_ld + 16 * c, out[c]);
            pred[c] = next[c];
        }
    }
}
#endif

/* the same, one column at a time, in the same arithmetic (fmaf: one rounding, as the
 * vector FMA; no other products fused) */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
static void rule_col(float *S, int Dk, int Dv, const float *q, const float *k, const float *ke, const float *v,
                     const float *g, const float *beta, float *o, size_t o_ld, int T) {
    float pred = 0.f;
    for (int i = 0; i < Dk; i++) pred = fmaf(S[(size_t)i * Dv], ke[i], pred);
    for (int t = 0; t < T; t++) {
        const float *kt = k + (size_t)t * Dk, *qt = q + (size_t)t * Dk;
        const float *kn = t + 1 < T ? ke + (size_t)(t + 1) * Dk : ke;
        const float e = expf(g[t]), delta = (v[(size_t)t * Dv] - pred) * beta[t];
        float out = 0.f, next = 0.f;
        for (int i = 0; i < Dk; i++) {
            float *s = S + (size_t)i * Dv;
            const float x = fmaf(kt[i], delta, *s * e);
            *s = x;
            out = fmaf(x, qt[i], out);
            next = fmaf(x, kn[i], next);
        }
        o[(size_t)t * o_ld] = out;
        pred = next;
    }
}

static void rule_task(void *ctx, int ith, int nth) {
    const rule_job *J = (const rule_job *)ctx;
    const vlmc_deltanet *L = J->L;
    const int Hv = L->value_heads, Dk = L->key_dim, Dv = L->value_dim, T = J->T, W = J->W;
    const long n = (long)J->B * Hv * W, n0 = n * ith / nth, n1 = n * (ith + 1) / nth;
    for (long r = n0; r < n1; r++) {
        const long bh = r / W;
        const int j0 = (int)(r % W) * 32, j1 = j0 + 32 < Dv ? j0 + 32 : Dv;
        float *S = J->st->state_out + (size_t)bh * Dk * Dv;
        const float *q = J->q + (size_t)bh * T * Dk, *k = J->st->k + (size_t)bh * T * Dk;
        const float *ke = J->ke + (size_t)bh * T * Dk;
        const float *v = J->st->v + (size_t)bh * T * Dv, *g = J->st->g + (size_t)bh * T;
        const float *beta = J->st->beta + (size_t)bh * T;
        float *o = J->o + ((size_t)(bh / Hv) * T * Hv + bh % Hv) * Dv; /* [B, T, Hv, Dv] */
        const size_t o_ld = (size_t)Hv * Dv;
        int j = j0;
#if VLMC_SIMD && defined(__AVX512F__)
        if (j1 - j0 == 32) {
            rule_cols(S + j, 2, Dk, Dv, q, k, ke, v + j, g, beta, o + j, o_ld, T);
            j += 32;
        } else if (j1 - j0 >= 16) {
            rule_cols(S + j, 1, Dk, Dv, q, k, ke, v + j, g, beta, o + j, o_ld, T);
            j += 16;
        }
#endif
        for (; j < j1; j++) rule_col(S + j, Dk, Dv, q, k, ke, v + j, g, beta, o + j, o_ld, T);
    }
}

/* T tokens of each of B sequences: st->rows [B, T, C] the in-projection's output (the conv
 * inputs, read), st->conv [B, K-1, C] and st->state [B, Hv, Dk, Dv] the cache before (NULL:
 * a fresh cache, zeros); writes st->conv_out, st->state_out and the recurrence's inputs
 * st->k [B, Hv, T, Dk] (l2-normed), st->v [B, Hv, T, Dv], st->g, st->beta [B, Hv, T];
 * a, b [B, T, Hv] the decay and rate projections; z [B, T, Hv Dv] the gate projection,
 * overwritten (silu(z)); o [B, T, Hv Dv] the gated norm's output (out_proj's input); work:
 * scratch of B T (C + 2 Hv Dk) + (K + 1) C floats (the caller's: memory it reuses, where
 * a fresh allocation of this size would take page faults on every call). */
int vlmc_deltanet_prompt(const vlmc_deltanet *L, const vlmc_dn_state *st, int B, int T, const float *a,
                         const float *b, float *z, float *o, float *work, int n_threads) {
    if (!L || !st || !work || B < 1 || T < 1) return -1;
    const int Hk = L->key_heads, Hv = L->value_heads, Dk = L->key_dim, Dv = L->value_dim, K = L->conv_kernel;
    const int C = 2 * Hk * Dk + Hv * Dv, HV = Hv * Dv;
    if (Hk < 1 || Hv % Hk || K < 2 || K > 64 || Dk < 1 || Dv < 1) return -1;
    const size_t BT = (size_t)B * T;
    float *cv = work;
    float *q = cv + BT * C, *ke = q + BT * Hv * Dk, *wt = ke + BT * Hv * Dk, *zero = wt + (size_t)K * C;
    for (int c = 0; c < C; c++)
        for (int j = 0; j < K; j++) wt[(size_t)j * C + c] = L->conv_w[(size_t)c * K + j];
    memset(zero, 0, sizeof(float) * C);
    prep_job P = {L, st, a, b, wt, zero, cv, q, ke, B, T};
    const int nth_rows = n_threads < (int)(BT < 64 ? BT : 64) ? n_threads : (int)(BT < 64 ? BT : 64);
    run_parallel(conv_task, &P, nth_rows);
    /* the kept inputs after: the window's last K-1 rows */
    for (int bb = 0; bb < B; bb++)
        for (int j = 0; j < K - 1; j++) {
            const int at = T - (K - 1) + j; /* row of the chunk, or a kept input when negative */
            const float *src = at >= 0 ? st->rows + ((size_t)bb * T + at) * C
                             : st->conv ? st->conv + ((size_t)bb * (K - 1) + (K - 1 + at)) * C : NULL;
            float *dst = st->conv_out + ((size_t)bb * (K - 1) + j) * C;
            if (src) memcpy(dst, src, sizeof(float) * C);
            else memset(dst, 0, sizeof(float) * C);
        }
    int rc = vlmc_sigmoid_gate(cv, C, NULL, 0, cv, (int64_t)BT, C, 1.f, 0.f, n_threads);
    if (!rc) {
        run_parallel(heads_task, &P, nth_rows);
        const size_t ss = (size_t)B * Hv * Dk * Dv;
        if (st->state) memcpy(st->state_out, st->state, sizeof(float) * ss);
        else memset(st->state_out, 0, sizeof(float) * ss);
        const int W = (Dv + 31) / 32;
        rule_job R = {L, st, q, ke, o, B, T, W};
        const int tasks = B * Hv * W;
        run_parallel(rule_task, &R, n_threads < tasks ? n_threads : tasks);
        rc = vlmc_norm(o, (int64_t)BT * Hv, Dv, L->o_norm, NULL, L->eps_o, 0, o, n_threads);
    }
    if (!rc) rc = vlmc_sigmoid_gate(z, HV, NULL, 0, z, (int64_t)BT, HV, 1.f, 0.f, n_threads);
    if (!rc)
        for (size_t i = 0; i < BT * HV; i++) o[i] = o[i] * z[i];
    return rc;
}
