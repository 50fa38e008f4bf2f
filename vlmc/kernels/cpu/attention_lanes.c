/* vlmc CPU kernels: unmasked attention over long key sequences (vision towers), float32.
 *
 *   vlmc_attention_lanes   out = softmax(scale q k^T) v, per head
 *
 * attention_rows.c keeps a tile's whole score rows (8 x keys) in cache and lays keys
 * across the vector lanes; at 4096 keys a head's K and V (2 x 1.2 MB at D 72) no longer
 * fit L2 and every 8-row tile streams them again, and a head width of 72 fills only 72 of
 * every 96 lanes of p v. Here 32 query rows lie across the lanes (two vectors), and keys
 * come in blocks of LN_KEYS with an online softmax (running max and sum per row, the
 * partial output rescaled when the max grows), so a block's scores (LN_KEYS x 32) stay in
 * L1 and its keys and values in L2 while 32 rows use them:
 *   q k^T  per head dim d: 2 loads of q (scaled, transposed) x 12 broadcast keys = 24 FMAs
 *   p v    per key j: 2 loads of p x 12 broadcast value columns = 24 FMAs
 * every lane does useful work whatever D is; the softmax is lane-wise, no horizontal sums.
 * Keys are repacked once per call as [Hk][blocks of 12][D][12] (zeros past S). Tiles are
 * taken from a shared counter, so a core slowed by another process takes fewer.
 *
 * With bf16 set (where the CPU has AVX512-BF16), q, k, the probabilities and v are rounded
 * to bfloat16 and multiplied in pairs by vdpbf16ps (float32 sums, one instruction per two
 * products): q k^T over pairs of head dims, p v over pairs of keys; keys are packed as
 * [Hk][blocks of 12][D / 2][12] pairs, values as [Hk][S / 2][Dv] pairs. The softmax stays
 * float32. Needs AVX-512; elsewhere it returns -6 (bf16 without AVX512-BF16: -7) and the
 * caller uses another path. */
#include "vlmc.h"

#define LN_ROWS 32   /* query rows per tile: two vectors of 16 lanes */
#define LN_KEYS 240  /* keys per online-softmax block: 20 groups of 12; 30 KB of scores */
#define LN_NK 12     /* keys per q k^T step */
#define LN_ND 12     /* value columns per p v step */

typedef struct {
    const float *q, *k, *v;
    float *out;
    long q_sh, q_sl, k_sh, k_sl, v_sh, v_sl, o_sh, o_sl;
    long Hq, Hk, L, S, D, Dv, S12, tiles;
    float scale;
    int bf16;
    long D2, S2; /* bf16: head-dim pairs, keys rounded up to pairs */
    uint32_t *vp; /* bf16: [Hk][S2 / 2][Dv] pairs of keys' values */
    float *kp;   /* [Hk][S12 / 12][D][12]; bf16: [Hk][S12 / 12][D2][12] pairs as uint32 */
    float *buf;  /* per thread: qT [D][32], scores [LN_KEYS][32], acc [Dv][32], 1 / sum [32] */
    long buf_len;
    atomic_long next;
} ln_job;

#if VLMC_SIMD && defined(__AVX512F__)

/* float32 -> bfloat16, round to nearest even (finite inputs) */
static ALWAYS uint32_t bf16_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

static ALWAYS uint32_t bf16_pair(float lo, float hi) { return bf16_bits(lo) | bf16_bits(hi) << 16; }

static void pack_task(void *ctx, int ith, int nth) {
    ln_job *J = (ln_job *)ctx;
    const long nb = J->S12 / LN_NK, n = J->Hk * nb, i0 = n * ith / nth, i1 = n * (ith + 1) / nth;
    if (J->bf16) {
        for (long i = i0; i < i1; i++) {
            const long h = i / nb, j0 = (i % nb) * LN_NK;
            uint32_t *dst = (uint32_t *)J->kp + i * J->D2 * LN_NK;
            for (long jj = 0; jj < LN_NK; jj++) {
                const long j = j0 + jj;
                const float *src = J->k + h * J->k_sh + j * J->k_sl;
                for (long t = 0; t < J->D2; t++)
                    dst[t * LN_NK + jj] = j < J->S ? bf16_pair(src[2 * t], 2 * t + 1 < J->D ? src[2 * t + 1] : 0.f) : 0;
            }
        }
        const long m = J->Hk * (J->S2 / 2), u0 = m * ith / nth, u1 = m * (ith + 1) / nth;
        for (long i = u0; i < u1; i++) {  /* one (KV head, pair of keys) */
            const long h = i / (J->S2 / 2), j = (i % (J->S2 / 2)) * 2;
            const float *a = J->v + h * J->v_sh + j * J->v_sl, *b = a + J->v_sl;
            uint32_t *dst = J->vp + i * J->Dv;
            for (long d = 0; d < J->Dv; d++) dst[d] = bf16_pair(a[d], j + 1 < J->S ? b[d] : 0.f);
        }
        return;
    }
    for (long i = i0; i < i1; i++) {
        const long h = i / nb, j0 = (i % nb) * LN_NK;
        float *dst = J->kp + i * J->D * LN_NK;
        for (long jj = 0; jj < LN_NK; jj++) {
            const long j = j0 + jj;
            const float *src = J->k + h * J->k_sh + j * J->k_sl;
            for (long d = 0; d < J->D; d++) dst[d * LN_NK + jj] = j < J->S ? src[d] : 0.f;
        }
    }
}

/* sc[jj][32] = scaled q rows . keys jj of one packed group, for the 12 keys */
static ALWAYS void qk_group(const float *qT, const float *kg, long D, float *sc) {
    __m512 a[LN_NK][2];
    UNROLL for (int jj = 0; jj < LN_NK; jj++) a[jj][0] = a[jj][1] = _mm512_setzero_ps();
    for (long d = 0; d < D; d++) {
        const __m512 q0 = _mm512_load_ps(qT + d * LN_ROWS), q1 = _mm512_load_ps(qT + d * LN_ROWS + 16);
        UNROLL for (int jj = 0; jj < LN_NK; jj++) {
            const __m512 kb = _mm512_set1_ps(kg[d * LN_NK + jj]);
            a[jj][0] = _mm512_fmadd_ps(kb, q0, a[jj][0]);
            a[jj][1] = _mm512_fmadd_ps(kb, q1, a[jj][1]);
        }
    }
    UNROLL for (int jj = 0; jj < LN_NK; jj++) {
        _mm512_store_ps(sc + jj * LN_ROWS, a[jj][0]);
        _mm512_store_ps(sc + jj * LN_ROWS + 16, a[jj][1]);
    }
}

/* acc[d0 + dd][32] += sum over the block's n keys of p[j][32] v[j][d0 + dd], dd < nd <= 12 */
static ALWAYS void pv_cols(const float *p, const float *v, long v_sl, long n, long d0, long nd, float *acc) {
    __m512 a[LN_ND][2];
    UNROLL for (int dd = 0; dd < LN_ND; dd++)
        if (dd < nd) {
            a[dd][0] = _mm512_load_ps(acc + (d0 + dd) * LN_ROWS);
            a[dd][1] = _mm512_load_ps(acc + (d0 + dd) * LN_ROWS + 16);
        }
    for (long j = 0; j < n; j++) {
        const __m512 p0 = _mm512_load_ps(p + j * LN_ROWS), p1 = _mm512_load_ps(p + j * LN_ROWS + 16);
        const float *vj = v + j * v_sl + d0;
        UNROLL for (int dd = 0; dd < LN_ND; dd++)
            if (dd < nd) {
                const __m512 vb = _mm512_set1_ps(vj[dd]);
                a[dd][0] = _mm512_fmadd_ps(vb, p0, a[dd][0]);
                a[dd][1] = _mm512_fmadd_ps(vb, p1, a[dd][1]);
            }
    }
    UNROLL for (int dd = 0; dd < LN_ND; dd++)
        if (dd < nd) {
            _mm512_store_ps(acc + (d0 + dd) * LN_ROWS, a[dd][0]);
            _mm512_store_ps(acc + (d0 + dd) * LN_ROWS + 16, a[dd][1]);
        }
}

#if defined(__AVX512BF16__)
#define LN_BF16 1
/* bf16 q k^T: sc[jj][32] for 12 keys of a packed group, over D2 pairs of head dims */
static ALWAYS void qk_group_bf16(const uint32_t *qT, const uint32_t *kg, long D2, float *sc) {
    __m512 a[LN_NK][2];
    UNROLL for (int jj = 0; jj < LN_NK; jj++) a[jj][0] = a[jj][1] = _mm512_setzero_ps();
    for (long t = 0; t < D2; t++) {
        const __m512bh q0 = (__m512bh)_mm512_load_si512(qT + t * LN_ROWS);
        const __m512bh q1 = (__m512bh)_mm512_load_si512(qT + t * LN_ROWS + 16);
        UNROLL for (int jj = 0; jj < LN_NK; jj++) {
            const __m512bh kb = (__m512bh)_mm512_set1_epi32((int)kg[t * LN_NK + jj]);
            a[jj][0] = _mm512_dpbf16_ps(a[jj][0], kb, q0);
            a[jj][1] = _mm512_dpbf16_ps(a[jj][1], kb, q1);
        }
    }
    UNROLL for (int jj = 0; jj < LN_NK; jj++) {
        _mm512_store_ps(sc + jj * LN_ROWS, a[jj][0]);
        _mm512_store_ps(sc + jj * LN_ROWS + 16, a[jj][1]);
    }
}

/* bf16 p v: acc[d0 + dd][32] += over u < n2 key pairs of p pair [u][32] . v pair [u][d0 + dd] */
static ALWAYS void pv_cols_bf16(const uint32_t *p, const uint32_t *v, long Dv, long n2, long d0, long nd,
                                float *acc) {
    __m512 a[LN_ND][2];
    UNROLL for (int dd = 0; dd < LN_ND; dd++)
        if (dd < nd) {
            a[dd][0] = _mm512_load_ps(acc + (d0 + dd) * LN_ROWS);
            a[dd][1] = _mm512_load_ps(acc + (d0 + dd) * LN_ROWS + 16);
        }
    for (long u = 0; u < n2; u++) {
        const __m512bh p0 = (__m512bh)_mm512_load_si512(p + u * LN_ROWS);
        const __m512bh p1 = (__m512bh)_mm512_load_si512(p + u * LN_ROWS + 16);
        const uint32_t *vu = v + u * Dv + d0;
        UNROLL for (int dd = 0; dd < LN_ND; dd++)
            if (dd < nd) {
                const __m512bh vb = (__m512bh)_mm512_set1_epi32((int)vu[dd]);
                a[dd][0] = _mm512_dpbf16_ps(a[dd][0], vb, p0);
                a[dd][1] = _mm512_dpbf16_ps(a[dd][1], vb, p1);
            }
    }
    UNROLL for (int dd = 0; dd < LN_ND; dd++)
        if (dd < nd) {
            _mm512_store_ps(acc + (d0 + dd) * LN_ROWS, a[dd][0]);
            _mm512_store_ps(acc + (d0 + dd) * LN_ROWS + 16, a[dd][1]);
        }
}

/* e^x for x <= 0 (a score less the running max) to ~3e-6 relative, ahead of a rounding to
 * bfloat16 (4e-3): 2^(x log2 e) as 2^n (vscalefps; 0 far below) times 2^f, |f| <= 1/2, by
 * its degree-5 Taylor polynomial. A NaN stays NaN. */
static ALWAYS __m512 exp_nonpos16(__m512 x) {
    const __m512 t = _mm512_mul_ps(_mm512_max_ps(_mm512_set1_ps(-150.f), x), _mm512_set1_ps(1.44269504088896341f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 y = _mm512_set1_ps(1.3333558e-3f);
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.6181291e-3f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.5504109e-2f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.4022651e-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.9314718e-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(y, n);
}

/* two keys' probabilities (16 rows each) -> 16 lanes of bf16 pairs (lo: key a, hi: key b) */
static ALWAYS __m512i pair_lanes(__m512 a, __m512 b) {
    const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(a));
    const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(b));
    return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
}
#else
#define LN_BF16 0
#endif

static void one_tile(const ln_job *J, long h, long r0, float *buf) {
    const long D = J->D, Dv = J->Dv, S = J->S, R = J->L - r0 < LN_ROWS ? J->L - r0 : LN_ROWS;
    float *qT = buf, *sc = qT + D * LN_ROWS, *acc = sc + LN_KEYS * LN_ROWS, *sum = acc + Dv * LN_ROWS;
    const long hk = h / (J->Hq / J->Hk);
    const float *q = J->q + h * J->q_sh + r0 * J->q_sl, *kp = J->kp + hk * J->S12 * D, *v = J->v + hk * J->v_sh;
#if LN_BF16
    /* bf16: q pairs [D2][32] in qT, p pairs [LN_KEYS / 2][32] after the scores */
    uint32_t *qb = (uint32_t *)qT, *pb = (uint32_t *)(sum + LN_ROWS);
    const uint32_t *kb = (const uint32_t *)J->kp + hk * J->S12 * J->D2, *vb2 = J->vp + hk * (J->S2 / 2) * Dv;
    if (J->bf16)
        for (long r = 0; r < LN_ROWS; r++)
            for (long t = 0; t < J->D2; t++) {
                const float *qr = q + r * J->q_sl;
                qb[t * LN_ROWS + r] = r < R ? bf16_pair(qr[2 * t] * J->scale, 2 * t + 1 < D ? qr[2 * t + 1] * J->scale : 0.f)
                                            : 0;
            }
    else
#endif
    for (long r = 0; r < LN_ROWS; r++)  /* rows past L repeat zeros: finite, never stored */
        for (long d = 0; d < D; d++) qT[d * LN_ROWS + r] = r < R ? q[r * J->q_sl + d] * J->scale : 0.f;
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0, l0 = _mm512_setzero_ps(), l1 = l0;
    memset(acc, 0, sizeof(float) * (size_t)(Dv * LN_ROWS));
    for (long j0 = 0; j0 < S; j0 += LN_KEYS) {
        const long n = S - j0 < LN_KEYS ? S - j0 : LN_KEYS;
#if LN_BF16
        if (J->bf16)
            for (long g = 0; g < n; g += LN_NK) qk_group_bf16(qb, kb + (j0 + g) * J->D2, J->D2, sc + g * LN_ROWS);
        else
#endif
        for (long g = 0; g < n; g += LN_NK) qk_group(qT, kp + (j0 + g) * D, D, sc + g * LN_ROWS);
        __m512 b0 = m0, b1 = m1;
        for (long j = 0; j < n; j++) {
            b0 = _mm512_max_ps(b0, _mm512_load_ps(sc + j * LN_ROWS));
            b1 = _mm512_max_ps(b1, _mm512_load_ps(sc + j * LN_ROWS + 16));
        }
        if (j0) {  /* the max grew: earlier blocks' sums and outputs shrink by e^(old - new) */
            const __m512 c0 = exp16(_mm512_sub_ps(m0, b0)), c1 = exp16(_mm512_sub_ps(m1, b1));
            l0 = _mm512_mul_ps(l0, c0);
            l1 = _mm512_mul_ps(l1, c1);
            for (long d = 0; d < Dv; d++) {
                _mm512_store_ps(acc + d * LN_ROWS, _mm512_mul_ps(_mm512_load_ps(acc + d * LN_ROWS), c0));
                _mm512_store_ps(acc + d * LN_ROWS + 16, _mm512_mul_ps(_mm512_load_ps(acc + d * LN_ROWS + 16), c1));
            }
        }
        m0 = b0;
        m1 = b1;
#if LN_BF16
        if (J->bf16) {  /* p rounded to bf16 pairs of keys; the sums add the rounded values */
            const __m512i zero = _mm512_setzero_si512();
            for (long j = 0; j < n; j += 2) {
                const __m512 a0 = exp_nonpos16(_mm512_sub_ps(_mm512_load_ps(sc + j * LN_ROWS), m0));
                const __m512 a1 = exp_nonpos16(_mm512_sub_ps(_mm512_load_ps(sc + j * LN_ROWS + 16), m1));
                __m512 c0 = _mm512_setzero_ps(), c1 = c0;
                if (j + 1 < n) {
                    c0 = exp_nonpos16(_mm512_sub_ps(_mm512_load_ps(sc + (j + 1) * LN_ROWS), m0));
                    c1 = exp_nonpos16(_mm512_sub_ps(_mm512_load_ps(sc + (j + 1) * LN_ROWS + 16), m1));
                }
                const __m512i w0 = pair_lanes(a0, c0), w1 = pair_lanes(a1, c1);
                _mm512_store_si512(pb + j / 2 * LN_ROWS, w0);
                _mm512_store_si512(pb + j / 2 * LN_ROWS + 16, w1);
                /* the rounded values back as float32: each pair's low half, then its high half */
                l0 = _mm512_add_ps(l0, _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w0, 16)),
                                                     _mm512_castsi512_ps(_mm512_mask_blend_epi16(0x55555555, w0, zero))));
                l1 = _mm512_add_ps(l1, _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w1, 16)),
                                                     _mm512_castsi512_ps(_mm512_mask_blend_epi16(0x55555555, w1, zero))));
            }
            const long n2 = (n + 1) / 2;
            const uint32_t *vu = vb2 + j0 / 2 * Dv;
            long d0 = 0;
            for (; d0 + LN_ND <= Dv; d0 += LN_ND) pv_cols_bf16(pb, vu, Dv, n2, d0, LN_ND, acc);
            if (d0 < Dv) pv_cols_bf16(pb, vu, Dv, n2, d0, Dv - d0, acc);
            continue;
        }
#endif
        for (long j = 0; j < n; j++) {
            const __m512 p0 = exp16(_mm512_sub_ps(_mm512_load_ps(sc + j * LN_ROWS), m0));
            const __m512 p1 = exp16(_mm512_sub_ps(_mm512_load_ps(sc + j * LN_ROWS + 16), m1));
            _mm512_store_ps(sc + j * LN_ROWS, p0);
            _mm512_store_ps(sc + j * LN_ROWS + 16, p1);
            l0 = _mm512_add_ps(l0, p0);
            l1 = _mm512_add_ps(l1, p1);
        }
        const float *vb = v + j0 * J->v_sl;
        long d0 = 0;
        for (; d0 + LN_ND <= Dv; d0 += LN_ND) pv_cols(sc, vb, J->v_sl, n, d0, LN_ND, acc);
        if (d0 < Dv) pv_cols(sc, vb, J->v_sl, n, d0, Dv - d0, acc);
    }
    _mm512_store_ps(sum, _mm512_div_ps(_mm512_set1_ps(1.f), l0));
    _mm512_store_ps(sum + 16, _mm512_div_ps(_mm512_set1_ps(1.f), l1));
    float *o = J->out + h * J->o_sh + r0 * J->o_sl;
    for (long r = 0; r < R; r++)
        for (long d = 0; d < Dv; d++) o[r * J->o_sl + d] = acc[d * LN_ROWS + r] * sum[r];
}

static void tiles_task(void *ctx, int ith, int nth) {
    ln_job *J = (ln_job *)ctx;
    (void)nth;
    float *buf = J->buf + (size_t)ith * (size_t)J->buf_len;
    const long n = J->Hq * J->tiles;
    for (long i; (i = atomic_fetch_add(&J->next, 1)) < n;) one_tile(J, i / J->tiles, (i % J->tiles) * LN_ROWS, buf);
}
#endif

/* q [Hq, L, D], k [Hk, S, D], v [Hk, S, Dv], out [Hq, L, Dv]: strides in floats per head
 * (_sh) and per row (_sl), the last axis contiguous; Hq a multiple of Hk (head h reads KV
 * head h / (Hq / Hk)). No mask. bf16: products of bfloat16-rounded operands (see above).
 * Returns 0; -1 bad arguments; -2 out of memory; -6 no AVX-512 here (use another path);
 * -7 bf16 asked where the CPU has no AVX512-BF16. */
int vlmc_attention_lanes(const float *q, int64_t q_sh, int64_t q_sl, const float *k, int64_t k_sh, int64_t k_sl,
                         const float *v, int64_t v_sh, int64_t v_sl, float *out, int64_t o_sh, int64_t o_sl,
                         int64_t Hq, int64_t Hk, int64_t L, int64_t S, int64_t D, int64_t Dv, float scale,
                         int bf16, int n_threads) {
    if (!q || !k || !v || !out || Hq < 1 || Hk < 1 || Hq % Hk || L < 1 || S < 1 || D < 1 || Dv < 1 ||
        !(scale > 0.f))
        return -1;
#if VLMC_SIMD && defined(__AVX512F__)
#if !LN_BF16
    if (bf16) return -7;
#endif
    ln_job J = {q, k, v, out, q_sh, q_sl, k_sh, k_sl, v_sh, v_sl, o_sh, o_sl, Hq, Hk, L, S, D, Dv,
                (S + LN_NK - 1) / LN_NK * LN_NK, (L + LN_ROWS - 1) / LN_ROWS, scale, bf16 != 0, (D + 1) / 2,
                (S + 1) / 2 * 2, NULL, NULL, NULL, 0, 0};
    const long work = Hq * J.tiles;
    const int nth = work < 2 || n_threads < 1 ? 1 : n_threads > MAXTH ? MAXTH : n_threads;
    J.buf_len = (D + LN_KEYS + Dv + 1 + LN_KEYS / 2) * LN_ROWS;
    J.kp = (float *)aligned_alloc(64, sizeof(float) * (size_t)(Hk * D * J.S12));  /* bf16 pairs: no more */
    J.vp = J.bf16 ? (uint32_t *)aligned_alloc(64, sizeof(uint32_t) * (size_t)(Hk * J.S2 / 2 * Dv)) : NULL;
    J.buf = (float *)aligned_alloc(64, sizeof(float) * (size_t)(nth * J.buf_len));
    if (!J.kp || !J.buf || (J.bf16 && !J.vp)) {
        free(J.kp);
        free(J.vp);
        free(J.buf);
        return -2;
    }
    atomic_init(&J.next, 0);
    run_parallel(pack_task, &J, Hk * J.S12 / LN_NK < 2 ? 1 : nth);
    run_parallel(tiles_task, &J, nth);
    free(J.kp);
    free(J.vp);
    free(J.buf);
    return 0;
#else
    (void)q_sh; (void)q_sl; (void)k_sh; (void)k_sl; (void)v_sh; (void)v_sl; (void)o_sh; (void)o_sl;
    (void)bf16; (void)n_threads;
    return -6;
#endif
}
