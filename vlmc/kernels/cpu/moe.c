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

typedef struct {
    const vlmc_moe *moe;
    int ne;                 /* experts chosen by some row */
    const int *ex;          /* [ne] those experts, ascending */
    const int *first, *cnt; /* [ne] each one's slots: slot[first .. first + cnt) */
    const int *slot;        /* (expert, row) slots sorted by expert then row: row * topk + k */
    int topk, M;
    const float *const *xe; /* [ne] each expert's rows of x, gathered [cnt, H] */
    float *h;               /* [M topk, I]: act(gate) * up of each slot (in slot order) */
    float *y;               /* [M topk, H]: down of each slot (in slot order) */
    int tw, td;             /* gate_up tile width (gate rows), down tile rows */
    int tiles_gu, tiles_d;  /* tiles per expert */
    int phase;              /* 0: gate_up and activation, 1: down */
    _Atomic int next, err;
} moe_job;

static void moe_task(void *ctx, int ith, int nth) {
    (void)ith;
    (void)nth;
    moe_job *J = ctx;
    const vlmc_moe *m = J->moe;
    const int H = m->hidden, I = m->inter, M = J->M;
    const size_t need = J->phase == 0 ? 3 * (size_t)M * J->tw : (size_t)M * J->td;
    float *buf = malloc(sizeof(float) * need);
    if (!buf) {
        atomic_store(&J->err, -5);
        return;
    }
    const int per = J->phase == 0 ? J->tiles_gu : J->tiles_d, total = per * J->ne;
    for (;;) {
        const int t = atomic_fetch_add_explicit(&J->next, 1, memory_order_relaxed);
        if (t >= total || atomic_load_explicit(&J->err, memory_order_relaxed)) break;
        const int i = t / per, tile = t % per, e = J->ex[i], n = J->cnt[i], f = J->first[i];
        int rc;
        if (J->phase == 0) {
            const int j0 = tile * J->tw, w = I - j0 < J->tw ? I - j0 : J->tw;
            float *g = buf, *u = g + (size_t)n * w, *a = u + (size_t)n * w;
            rc = expert_rows(&m->gate_up, e, j0, w, J->xe[i], n, g);
            if (!rc) rc = expert_rows(&m->gate_up, e, I + j0, w, J->xe[i], n, u);
            if (!rc) rc = vlmc_sigmoid_gate(g, w, u, w, a, n, w, m->act_a, m->act_c, 1);
            for (int r = 0; r < n && !rc; r++) memcpy(J->h + (size_t)(f + r) * I + j0, a + (size_t)r * w, sizeof(float) * w);
        } else {
            const int c0 = tile * J->td, w = H - c0 < J->td ? H - c0 : J->td;
            rc = expert_rows(&m->down, e, c0, w, J->h + (size_t)f * I, n, buf);
            for (int r = 0; r < n && !rc; r++) memcpy(J->y + (size_t)(f + r) * H + c0, buf + (size_t)r * w, sizeof(float) * w);
        }
        if (rc) atomic_store(&J->err, rc);
    }
    free(buf);
}

/* x [M, hidden] -> out [M, hidden]; idx, wts [M, topk]: each row's experts (distinct, in
 * 0 .. experts - 1) and routing weights. Returns 0, -1 for bad arguments, -5 without
 * memory, or a GEMV's error. */
int vlmc_moe_experts(const vlmc_moe *moe, const float *x, int M, int topk, const int32_t *idx, const float *wts,
                     float *out, int n_threads) {
    const int E = moe ? moe->experts : 0, H = moe ? moe->hidden : 0, I = moe ? moe->inter : 0;
    if (!moe || !x || !idx || !wts || !out || M < 1 || topk < 1 || topk > E || H < 1 || I < 1
        || moe->gate_up.p.N != 2 * I || moe->gate_up.p.K != H || moe->down.p.N != H || moe->down.p.K != I)
        return -1;
    const size_t MK = (size_t)M * topk;
    for (size_t i = 0; i < MK; i++)
        if (idx[i] < 0 || idx[i] >= E) return -1;
    for (int m = 0; m < M; m++) /* a row's experts are distinct (top-k of one row) */
        for (int a = 0; a < topk; a++)
            for (int b = a + 1; b < topk; b++)
                if (idx[(size_t)m * topk + a] == idx[(size_t)m * topk + b]) return -1;
    /* counting sort of the (expert, row) slots: by expert, rows ascending within one */
    int *ints = calloc((size_t)E + 1 + 4 * MK, sizeof(int));
    float *buf = malloc(sizeof(float) * MK * ((size_t)I + 2 * (size_t)H));
    const float **xe = malloc(sizeof(float *) * MK);
    int rc = 0;
    if (!ints || !buf || !xe) {
        rc = -5;
        goto done;
    }
    int *start = ints, *slot = start + E + 1, *ex = slot + MK, *first = ex + MK, *cnt = first + MK;
    for (size_t i = 0; i < MK; i++) start[idx[i] + 1]++;
    for (int e = 0; e < E; e++) start[e + 1] += start[e];
    int ne = 0;
    for (int e = 0; e < E; e++)
        if (start[e + 1] > start[e]) ex[ne] = e, first[ne] = start[e], cnt[ne] = start[e + 1] - start[e], ne++;
    for (size_t i = 0; i < MK; i++) slot[start[idx[i]]++] = (int)i; /* i ascending: rows ascending */
    float *h = buf, *y = h + MK * I, *xg = y + MK * H;
    for (int i = 0; i < ne; i++) { /* each expert's rows of x: x itself when every row chose it */
        const int *s = slot + first[i];
        if (cnt[i] == M) {
            xe[i] = x;
            continue;
        }
        float *dst = xg + (size_t)first[i] * H;
        for (int r = 0; r < cnt[i]; r++) memcpy(dst + (size_t)r * H, x + (size_t)(s[r] / topk) * H, sizeof(float) * H);
        xe[i] = dst;
    }
    moe_job J = {.moe = moe, .ne = ne, .ex = ex, .first = first, .cnt = cnt, .slot = slot, .topk = topk, .M = M,
                 .xe = xe, .h = h, .y = y};
    /* tiles: gate_up's width a multiple of 16 (the activation's vector steps fall on the same
     * columns as in one call over the whole row), down's rows a multiple of 16 */
    const size_t gb = 2 * row_bytes(&moe->gate_up.p), db = row_bytes(&moe->down.p);
    int tw = (int)(TILE_BYTES / gb) / 16 * 16, td = (int)(TILE_BYTES / db) / 16 * 16;
    J.tw = tw < 16 ? 16 : tw > I ? I : tw;
    J.td = td < 16 ? 16 : td > H ? H : td;
    J.tiles_gu = (I + J.tw - 1) / J.tw;
    J.tiles_d = (H + J.td - 1) / J.td;
    const int nth_gu = n_threads < J.tiles_gu * ne ? n_threads : J.tiles_gu * ne;
    const int nth_d = n_threads < J.tiles_d * ne ? n_threads : J.tiles_d * ne;
    atomic_store(&J.next, 0);
    atomic_store(&J.err, 0);
    run_parallel(moe_task, &J, nth_gu);
    rc = atomic_load(&J.err);
    if (!rc) {
        J.phase = 1;
        atomic_store(&J.next, 0);
        run_parallel(moe_task, &J, nth_d);
        rc = atomic_load(&J.err);
    }
    if (!rc) { /* the weighted sum, experts ascending (the loop's order) */
        memset(out, 0, sizeof(float) * (size_t)M * H);
        for (int i = 0; i < ne; i++)
            for (int r = 0; r < cnt[i]; r++) {
                const int s = slot[first[i] + r];
                add_weighted(out + (size_t)(s / topk) * H, y + (size_t)(first[i] + r) * H, wts[s], H);
            }
    }
done:
    free(ints);
    free(buf);
    free(xe);
    return rc;
}
