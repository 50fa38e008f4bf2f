/* Routed experts of a mixture-of-experts layer (Qwen3.5-MoE, Qwen3-MoE) in one call: the
 * tokens' selected experts only, each expert's weights read once for all the rows routed
 * to it, in whatever form they are stored (float32, bfloat16, affine codes of any width
 * the GEMVs take):
 *
 *   for each expert e chosen by some row (ascending):
 *       rows R = the rows that chose e (ascending), w_r their routing weight for e
 *       g, u = split(gate_up_e(x[R]));  h = act(g) * u;  y = down_e(h)
 *       out[r] = out[r] + y[r] * w_r           (r in R; out starts at 0)
 *
 * Every (expert, row) pair goes through the kernels of the op library's loop over the
 * experts (kernels/cpu/moe.py: vlmc_gemv_*, vlmc_sigmoid_gate, numpy's product then sum)
 * with the same arithmetic, so the result is that loop's to the last bit; and since a GEMV
 * row is exact whatever rows share the call, a row's result does not depend on the other
 * rows (batch invariance).
 *
 * Scheduling: one parallel region per projection, not one per expert. The experts' rows
 * are cut into tiles of ~TILE_BYTES of weights (a gate_up tile: gate rows j0 .. j1 and
 * the up rows I + j0 .. I + j1, then their activation; a down tile: output rows c0 .. c1),
 * and the threads take tiles from one counter, each running the GEMV on its tile alone
 * (n_threads = 1: computing a subset of a weight's rows changes no row's arithmetic). A
 * decode step's 8 experts so become ~40 tiles shared by the threads with one handoff per
 * projection, instead of 16 GEMV calls each handing work to the pool and waiting for its
 * slowest thread (which on a loaded machine, a thread descheduled, costs far more than
 * the GEMV itself).
 */
#include "vlmc.h"

/* the weighted sum: no fused multiply-add, the product rounds before the sum (numpy's) */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
static void add_weighted(float *o, const float *y, float w, int n) {
    for (int j = 0; j < n; j++) {
        const float t = y[j] * w;
        o[j] = o[j] + t;
    }
}

/* weight bytes per tile: large enough that a tile's fixed work (rounding x to int8 for
 * its GEMV) is a few percent, small enough for ~20 tiles per projection of a decode step */
#ifndef TILE_BYTES
#define TILE_BYTES (192 * 1024)
#endif

/* bytes of one row of a projection's weight */
static size_t row_bytes(const vlmc_proj *p) {
    if (p->kind == 0) return (size_t)p->K * 4;
    if (p->kind == 1) return (size_t)p->K * 2;
    return (size_t)p->K * p->bits / 8 + (size_t)(p->K / p->gs) * 2 * (p->st == ST_F32 ? 4 : 2);
}

/* rows [n0, n0 + n) of expert e's projection for the M rows of x: y [M, n] */
static int expert_rows(const vlmc_experts *X, int e, int n0, int n, const float *x, int M, float *y) {
    const vlmc_proj *p = &X->p;
    const size_t rb = p->kind == 2 ? (size_t)p->K * p->bits / 8 : row_bytes(p);
    const uint8_t *w = (const uint8_t *)p->w + (size_t)e * X->w_stride + (size_t)n0 * rb;
    switch (p->kind) {
    case 0: return vlmc_gemv_f32(x, M, p->K, (const float *)w, n, NULL, y, 1);
    case 1: return vlmc_gemv_bf16(x, M, p->K, (const uint16_t *)w, n, NULL, y, 1);
    case 2: {
        const size_t pb = (size_t)(p->K / p->gs) * (p->st == ST_F32 ? 4 : 2) * n0;
        return vlmc_gemv_q(x, M, p->K, (const uint32_t *)w, (const uint8_t *)p->scales + (size_t)e * X->s_stride + pb,
                           (const uint8_t *)p->biases + (size_t)e * X->b_stride + pb, p->st, n, p->bits, p->gs, NULL,
                           y, 1);
    }
    default: return -2;
    }
}

/* one expert's share of a step: its rows' gate_up GEMV and activation, then down, in tiles */
typedef struct {
    const vlmc_experts *gu, *dn; /* its stacked weights and its index e in them */
    int e, inter, n;             /* intermediate width, rows */
    const float *x;              /* [n, H]: its rows of x */
    float *h, *y;                /* [n, inter]: act(gate) * up; [n, H]: down */
    int tw, td;                  /* gate_up tile width (gate rows), down tile rows */
    int t0[2];                   /* its first tile in each phase's numbering */
} moe_unit;

typedef struct {
    const moe_unit *u;
    int nu, H, phase, total; /* units, hidden size, 0: gate_up and activation / 1: down, tiles */
    float act_a, act_c;
    size_t need;             /* scratch floats per thread */
    _Atomic int next, err;
} moe_job;

static void moe_task(void *ctx, int ith, int nth) {
    (void)ith;
    (void)nth;
    moe_job *J = ctx;
    const int H = J->H, ph = J->phase;
    float *buf = malloc(sizeof(float) * J->need);
    if (!buf) {
        atomic_store(&J->err, -5);
        return;
    }
    for (;;) {
        const int t = atomic_fetch_add_explicit(&J->next, 1, memory_order_relaxed);
        if (t >= J->total || atomic_load_explicit(&J->err, memory_order_relaxed)) break;
        int lo = 0, hi = J->nu - 1; /* the unit whose tiles hold t: the last with t0 <= t */
        while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if (J->u[mid].t0[ph] <= t) lo = mid;
            else hi = mid - 1;
        }
        const moe_unit *U = &J->u[lo];
        const int tile = t - U->t0[ph], n = U->n, I = U->inter;
        int rc;
        if (ph == 0) {
            const int j0 = tile * U->tw, w = I - j0 < U->tw ? I - j0 : U->tw;
            float *g = buf, *u = g + (size_t)n * w, *a = u + (size_t)n * w;
            rc = expert_rows(U->gu, U->e, j0, w, U->x, n, g);
            if (!rc) rc = expert_rows(U->gu, U->e, I + j0, w, U->x, n, u);
            if (!rc) rc = vlmc_sigmoid_gate(g, w, u, w, a, n, w, J->act_a, J->act_c, 1);
            for (int r = 0; r < n && !rc; r++) memcpy(U->h + (size_t)r * I + j0, a + (size_t)r * w, sizeof(float) * w);
        } else {
            const int c0 = tile * U->td, w = H - c0 < U->td ? H - c0 : U->td;
            rc = expert_rows(U->dn, U->e, c0, w, U->h, n, buf);
            for (int r = 0; r < n && !rc; r++) memcpy(U->y + (size_t)r * H + c0, buf + (size_t)r * w, sizeof(float) * w);
        }
        if (rc) atomic_store(&J->err, rc);
    }
    free(buf);
}

/* both phases over the units: one parallel region each, the tiles taken from one counter */
static int moe_run(moe_unit *u, int nu, int H, float act_a, float act_c, int n_threads) {
    moe_job J = {.u = u, .nu = nu, .H = H, .act_a = act_a, .act_c = act_c};
    size_t need[2] = {0, 0};
    int total[2] = {0, 0};
    for (int i = 0; i < nu; i++) {
        /* tiles: gate_up's width a multiple of 16 (the activation's vector steps fall on the
         * same columns as in one call over the whole row), down's rows a multiple of 16 */
        const size_t gb = 2 * row_bytes(&u[i].gu->p), db = row_bytes(&u[i].dn->p);
        const int tw = (int)(TILE_BYTES / gb) / 16 * 16, td = (int)(TILE_BYTES / db) / 16 * 16, I = u[i].inter;
        u[i].tw = tw < 16 ? 16 : tw > I ? I : tw;
        u[i].td = td < 16 ? 16 : td > H ? H : td;
        u[i].t0[0] = total[0];
        u[i].t0[1] = total[1];
        total[0] += (I + u[i].tw - 1) / u[i].tw;
        total[1] += (H + u[i].td - 1) / u[i].td;
        if (3 * (size_t)u[i].n * u[i].tw > need[0]) need[0] = 3 * (size_t)u[i].n * u[i].tw;
        if ((size_t)u[i].n * u[i].td > need[1]) need[1] = (size_t)u[i].n * u[i].td;
    }
    atomic_store(&J.err, 0);
    for (int ph = 0; ph < 2 && !atomic_load(&J.err); ph++) {
        J.phase = ph;
        J.total = total[ph];
        J.need = need[ph];
        atomic_store(&J.next, 0);
        run_parallel(moe_task, &J, n_threads < total[ph] ? n_threads : total[ph]);
    }
    return atomic_load(&J.err);
}

/* x [M, hidden] through the routed experts (idx, wts [M, topk]: each row's experts, distinct
 * and in range, and routing weights) and, when S > 0, the shared expert (gate_up sgu [2S,
 * hidden], down sdn [hidden, S]) on every row with weight sw[r]:
 *     out[r] = sum over r's experts e ascending of y_e[r] * w  (+ y_shared[r] * sw[r]) */
static int moe_forward(const vlmc_moe *moe, const float *x, int M, int topk, const int32_t *idx, const float *wts,
                       const vlmc_experts *sgu, const vlmc_experts *sdn, int S, const float *sw, float *out,
                       int n_threads) {
    const int E = moe->experts, H = moe->hidden, I = moe->inter;
    const size_t MK = (size_t)M * topk, MS = S > 0 ? (size_t)M : 0;
    /* counting sort of the (expert, row) slots: by expert, rows ascending within one */
    int *ints = calloc((size_t)E + 1 + 4 * MK, sizeof(int));
    float *buf = malloc(sizeof(float) * (MK * ((size_t)I + 2 * (size_t)H) + MS * ((size_t)S + H)));
    moe_unit *u = calloc(MK + 1, sizeof(moe_unit));
    int rc = 0;
    if (!ints || !buf || !u) {
        rc = -5;
        goto done;
    }
    int *start = ints, *slot = start + E + 1, *first = slot + MK;
    for (size_t i = 0; i < MK; i++) start[idx[i] + 1]++;
    for (int e = 0; e < E; e++) start[e + 1] += start[e];
    int ne = 0;
    float *h = buf, *y = h + MK * I, *xg = y + MK * H, *hs = xg + MK * H, *ys = hs + MS * S;
    for (int e = 0; e < E; e++)
        if (start[e + 1] > start[e]) {
            const int f = start[e], n = start[e + 1] - start[e];
            first[ne] = f;
            u[ne++] = (moe_unit){.gu = &moe->gate_up, .dn = &moe->down, .e = e, .inter = I, .n = n,
                                 .h = h + (size_t)f * I, .y = y + (size_t)f * H};
        }
    for (size_t i = 0; i < MK; i++) slot[start[idx[i]]++] = (int)i; /* i ascending: rows ascending */
    for (int i = 0; i < ne; i++) { /* each expert's rows of x: x itself when every row chose it */
        const int *s = slot + first[i];
        if (u[i].n == M) {
            u[i].x = x;
            continue;
        }
        float *dst = xg + (size_t)first[i] * H;
        for (int r = 0; r < u[i].n; r++) memcpy(dst + (size_t)r * H, x + (size_t)(s[r] / topk) * H, sizeof(float) * H);
        u[i].x = dst;
    }
    if (S > 0) u[ne] = (moe_unit){.gu = sgu, .dn = sdn, .e = 0, .inter = S, .n = M, .x = x, .h = hs, .y = ys};
    rc = moe_run(u, ne + (S > 0), H, moe->act_a, moe->act_c, n_threads);
    if (!rc) { /* the weighted sum, experts ascending (the loop's order), then the shared expert */
        memset(out, 0, sizeof(float) * (size_t)M * H);
        for (int i = 0; i < ne; i++)
            for (int r = 0; r < u[i].n; r++) {
                const int s = slot[first[i] + r];
                add_weighted(out + (size_t)(s / topk) * H, u[i].y + (size_t)r * H, wts[s], H);
            }
        for (size_t r = 0; r < MS; r++) add_weighted(out + r * H, ys + r * H, sw[r], H);
    }
done:
    free(ints);
    free(buf);
    free(u);
    return rc;
}

static int moe_valid(const vlmc_moe *moe) {
    const int H = moe->hidden, I = moe->inter;
    return moe->experts >= 1 && H >= 1 && I >= 1 && moe->gate_up.p.N == 2 * I && moe->gate_up.p.K == H
           && moe->down.p.N == H && moe->down.p.K == I;
}

/* x [M, hidden] -> out [M, hidden]; idx, wts [M, topk]: each row's experts (distinct, in
 * 0 .. experts - 1) and routing weights. Returns 0, -1 for bad arguments, -5 without
 * memory, or a GEMV's error. */
int vlmc_moe_experts(const vlmc_moe *moe, const float *x, int M, int topk, const int32_t *idx, const float *wts,
                     float *out, int n_threads) {
    if (!moe || !x || !idx || !wts || !out || M < 1 || topk < 1 || topk > moe->experts || !moe_valid(moe)) return -1;
    const int E = moe->experts;
    const size_t MK = (size_t)M * topk;
    for (size_t i = 0; i < MK; i++)
        if (idx[i] < 0 || idx[i] >= E) return -1;
    for (int m = 0; m < M; m++) /* a row's experts are distinct (top-k of one row) */
        for (int a = 0; a < topk; a++)
            for (int b = a + 1; b < topk; b++)
                if (idx[(size_t)m * topk + a] == idx[(size_t)m * topk + b]) return -1;
    return moe_forward(moe, x, M, topk, idx, wts, NULL, NULL, 0, NULL, out, n_threads);
}

/* ---- the whole block: router, routing, routed and shared experts ---------------------- */

/* one row's routing: probabilities p [E] (the softmax of its router logits) -> its top k
 * experts, most probable first, equal probabilities in ascending expert order (a stable
 * sort's order, as the op path's argsort); their probabilities, renormalised to sum to 1
 * when `normalize` (the sum in that order) */
static void route_row(const float *p, int E, int k, int normalize, int32_t *idx, float *w) {
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int i = 0; i < j && !taken; i++) taken = idx[i] == e;
            if (!taken && (best < 0 || p[e] > p[best])) best = e;
        }
        idx[j] = best;
        w[j] = p[best];
    }
    if (normalize) {
        float s = 0.f;
        for (int j = 0; j < k; j++) s += w[j];
        for (int j = 0; j < k; j++) w[j] = w[j] / s;
    }
}

static int proj_is(const vlmc_proj *p, int N, int K) { return p->N == N && p->K == K && p->w && !p->bias; }

/* x [M, hidden] (a MoE layer's normed input) -> out [M, hidden]: vlmc_moe_block_ex with the
 * router reading x and no per-expert scale (Qwen3.5-MoE, Qwen3-MoE) */
int vlmc_moe_block(const vlmc_moe_layer *L, const float *x, int M, float *out, int32_t *experts, float *weights,
                   int n_threads) {
    return vlmc_moe_block_ex(L, x, x, NULL, M, out, experts, weights, n_threads);
}

/* x [M, hidden] (the experts' and the shared expert's input) -> out [M, hidden], the router
 * reading router_x [M, hidden] (NULL: x); expert_scale [experts] (or NULL) multiplies each
 * chosen expert's weight after the renormalisation (Gemma 4's per_expert_scale); experts,
 * weights [M, top_k] (or NULL): the routing it chose, scaled. Returns 0, -1 for a bad layer
 * description or arguments, -5 without memory, or a GEMV's error. */
int vlmc_moe_block_ex(const vlmc_moe_layer *L, const float *x, const float *router_x, const float *expert_scale,
                      int M, float *out, int32_t *experts, float *weights, int n_threads) {
    if (!L || !x || !out || M < 1 || !moe_valid(&L->moe)) return -1;
    const int E = L->moe.experts, H = L->moe.hidden, K = L->top_k, S = L->shared_inter;
    if (K < 1 || K > E || S < 0 || !proj_is(&L->router, E, H)
        || (S > 0 && (!proj_is(&L->shared_gate_up.p, 2 * S, H) || !proj_is(&L->shared_down.p, H, S)
                      || !proj_is(&L->shared_gate, 1, H))))
        return -1;
    const size_t MK = (size_t)M * K;
    float *f = malloc(sizeof(float) * ((size_t)M * E + MK + 2 * (size_t)M));
    int32_t *idx = malloc(sizeof(int32_t) * MK);
    int rc = 0;
    if (!f || !idx) {
        rc = -5;
        goto done;
    }
    float *p = f, *w = p + (size_t)M * E, *sw = w + MK;
    rc = vlmc_proj_run(&L->router, router_x ? router_x : x, M, p, n_threads);
    for (int r = 0; r < M && !rc; r++) {
        softmax_row(p + (size_t)r * E, E, 1.f, NULL);
        route_row(p + (size_t)r * E, E, K, L->normalize, idx + (size_t)r * K, w + (size_t)r * K);
    }
    if (!rc && expert_scale) /* one product per weight, as the op path's multiply */
        for (size_t i = 0; i < MK; i++) w[i] = w[i] * expert_scale[idx[i]];
    if (!rc && S > 0) { /* the shared expert's gate: sigmoid of one output per row */
        rc = vlmc_proj_run(&L->shared_gate, x, M, sw, 1);
        for (int r = 0; r < M && !rc; r++) sw[r] = 1.f / (1.f + expf(-sw[r]));
    }
    if (!rc)
        rc = moe_forward(&L->moe, x, M, K, idx, w, &L->shared_gate_up, &L->shared_down, S, sw, out, n_threads);
    if (!rc && experts) memcpy(experts, idx, sizeof(int32_t) * MK);
    if (!rc && weights) memcpy(weights, w, sizeof(float) * MK);
done:
    free(f);
    free(idx);
    return rc;
}
