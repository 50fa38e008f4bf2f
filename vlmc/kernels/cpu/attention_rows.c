/* vlmc CPU kernels: attention over many query rows (prefill, vision towers) in one pass.
 *
 *   vlmc_attention_rows   out = softmax(scale q k^T, masked) v, per head, float32
 *
 * The BLAS path (cpu/attention.py) makes each head's [rows, keys] score matrix in memory
 * (4 MB for 1024 x 1024), reads it back for the softmax and again for p v, in two BLAS
 * calls with their thread handoffs per head. Here a thread takes tiles of AR_ROWS query
 * rows of one head: the tile's scores (AR_ROWS x keys) stay in L1/L2 from q k^T through the
 * softmax (elementwise.c's softmax_row: the same arithmetic as the BLAS path's) to p v.
 * q k^T reads the head's keys transposed ([D][keys], made once per call), so each FMA
 * multiplies one query value by 16 keys. Needs AVX-512; elsewhere it returns -6 and the
 * BLAS path runs.
 */
#include "vlmc.h"

#define AR_ROWS 8

typedef struct {
    const float *q, *k, *v;
    float *out;
    long q_sh, q_sl, k_sh, k_sl, v_sh, v_sl, o_sh, o_sl;
    long Hq, Hk, L, S, D, Dv;
    float scale;
    const uint8_t *keep;
    long keep_ld;
    float *kt;  /* [Hk][S32 / 32][D][32]: keys transposed in blocks of 32, zero past S */
    float *sc;  /* per thread: [AR_ROWS][SLD] scores of its tile */
    long S32, SLD, tiles;
} ar_job;

#if VLMC_SIMD && defined(__AVX512F__) && defined(__AVX512BW__)

static void transpose_task(void *ctx, int ith, int nth) {
    const ar_job *J = (const ar_job *)ctx;
    const long nb = J->S32 / 32, n = J->Hk * nb, i0 = n * ith / nth, i1 = n * (ith + 1) / nth;
    for (long i = i0; i < i1; i++) {  /* one (KV head, block of 32 keys) */
        const long h = i / nb, j0 = (i % nb) * 32;
        float *dst = J->kt + i * J->D * 32;
        for (long jj = 0; jj < 32; jj++) {
            const long j = j0 + jj;
            const float *src = J->k + h * J->k_sh + j * J->k_sl;
            for (long d = 0; d < J->D; d++) dst[d * 32 + jj] = j < J->S ? src[d] : 0.f;
        }
    }
}

/* scores[r][0 .. S32) = q_r . keys, for AR_ROWS rows (rows past R repeat the last).
 * The block layout keeps a 32-key block's D x 32 values contiguous: rows of a plain
 * [D][keys] transpose sit 4 KB apart and fight over the same L1 sets. */
static void tile_scores(const ar_job *J, const float *const *qr, const float *kt, float *sc) {
    const long D = J->D, S32 = J->S32, SLD = J->SLD;
    for (long j = 0; j < S32; j += 32) {
        const float *kb = kt + j * D;
        __m512 a[AR_ROWS][2];
        for (int r = 0; r < AR_ROWS; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
        for (long d = 0; d < D; d++) {
            const __m512 k0 = _mm512_loadu_ps(kb + d * 32), k1 = _mm512_loadu_ps(kb + d * 32 + 16);
            for (int r = 0; r < AR_ROWS; r++) {
                const __m512 qb = _mm512_set1_ps(qr[r][d]);
                a[r][0] = _mm512_fmadd_ps(qb, k0, a[r][0]);
                a[r][1] = _mm512_fmadd_ps(qb, k1, a[r][1]);
            }
        }
        for (int r = 0; r < AR_ROWS; r++) {
            _mm512_storeu_ps(sc + r * SLD + j, a[r][0]);
            _mm512_storeu_ps(sc + r * SLD + j + 16, a[r][1]);
        }
    }
}

/* out rows (R of them) = p v over the S keys, 32 output columns at a time */
static void tile_values(const ar_job *J, const float *v, const float *sc, float *o, long R) {
    const long S = J->S, SLD = J->SLD, Dv = J->Dv;
    for (long c = 0; c < Dv; c += 32) {
        const long w = Dv - c < 32 ? Dv - c : 32;
        const __mmask16 m0 = w >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << w) - 1u);
        const __mmask16 m1 = w >= 32 ? (__mmask16)0xFFFF : w > 16 ? (__mmask16)((1u << (w - 16)) - 1u) : 0;
        __m512 a[AR_ROWS][2];
        for (int r = 0; r < AR_ROWS; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
        for (long j = 0; j < S; j++) {
            const float *vj = v + j * J->v_sl + c;
            const __m512 v0 = _mm512_maskz_loadu_ps(m0, vj), v1 = _mm512_maskz_loadu_ps(m1, vj + 16);
            for (int r = 0; r < AR_ROWS; r++) {
                const __m512 pb = _mm512_set1_ps(sc[r * SLD + j]);
                a[r][0] = _mm512_fmadd_ps(pb, v0, a[r][0]);
                a[r][1] = _mm512_fmadd_ps(pb, v1, a[r][1]);
            }
        }
        for (int r = 0; r < AR_ROWS; r++)  /* a constant trip count keeps a[][] in registers */
            if (r < R) {
                _mm512_mask_storeu_ps(o + r * J->o_sl + c, m0, a[r][0]);
                _mm512_mask_storeu_ps(o + r * J->o_sl + c + 16, m1, a[r][1]);
            }
    }
}

static void rows_task(void *ctx, int ith, int nth) {
    const ar_job *J = (const ar_job *)ctx;
    const long n = J->Hq * J->tiles, i0 = n * ith / nth, i1 = n * (ith + 1) / nth;
    float *sc = J->sc + (size_t)ith * AR_ROWS * J->SLD;
    const long group = J->Hq / J->Hk;
    for (long i = i0; i < i1; i++) {
        const long h = i / J->tiles, r0 = (i % J->tiles) * AR_ROWS;
        const long R = J->L - r0 < AR_ROWS ? J->L - r0 : AR_ROWS, hk = h / group;
        const float *qr[AR_ROWS];
        for (int r = 0; r < AR_ROWS; r++) qr[r] = J->q + h * J->q_sh + (r0 + (r < R ? r : R - 1)) * J->q_sl;
        tile_scores(J, qr, J->kt + hk * J->D * J->S32, sc);
        for (long r = 0; r < AR_ROWS; r++) {
            if (r < R)
                softmax_row(sc + r * J->SLD, J->S, J->scale, J->keep ? J->keep + (r0 + r) * J->keep_ld : NULL);
            else
                memset(sc + r * J->SLD, 0, sizeof(float) * (size_t)J->S);
        }
        tile_values(J, J->v + hk * J->v_sh, sc, J->out + h * J->o_sh + r0 * J->o_sl, R);
    }
}
#endif

/* q [Hq, L, D], k [Hk, S, D], v [Hk, S, Dv], out [Hq, L, Dv]: strides in floats per head
 * (_sh) and per row (_sl), the last axis contiguous; Hq a multiple of Hk (grouped-query:
 * head h reads KV head h / (Hq / Hk)). keep [L, S] bytes with row stride keep_ld (0: one
 * row for all), 0 = masked, or NULL. A row that sees no key gets zeros. Returns 0; -1 bad
 * arguments; -2 out of memory; -6 no AVX-512 here (use another path). */
int vlmc_attention_rows_available(void) {
#if VLMC_SIMD && defined(__AVX512F__) && defined(__AVX512BW__)
    return 1;
#else
    return 0;
#endif
}

int vlmc_attention_rows(const float *q, int64_t q_sh, int64_t q_sl, const float *k, int64_t k_sh, int64_t k_sl,
                        const float *v, int64_t v_sh, int64_t v_sl, float *out, int64_t o_sh, int64_t o_sl,
                        int64_t Hq, int64_t Hk, int64_t L, int64_t S, int64_t D, int64_t Dv, float scale,
                        const uint8_t *keep, int64_t keep_ld, int n_threads) {
    if (!q || !k || !v || !out || Hq < 1 || Hk < 1 || Hq % Hk || L < 1 || S < 1 || D < 1 || Dv < 1 ||
        !(scale > 0.f) || keep_ld < 0)
        return -1;
#if VLMC_SIMD && defined(__AVX512F__) && defined(__AVX512BW__)
    ar_job J = {q, k, v, out, q_sh, q_sl, k_sh, k_sl, v_sh, v_sl, o_sh, o_sl, Hq, Hk, L, S, D, Dv, scale,
                keep, keep_ld, NULL, NULL, (S + 31) / 32 * 32, (S + 31) / 32 * 32 + 16, (L + AR_ROWS - 1) / AR_ROWS};
    const long work = Hq * J.tiles;
    const int nth = work < 2 || n_threads < 1 ? 1 : n_threads > MAXTH ? MAXTH : n_threads;
    J.kt = (float *)aligned_alloc(64, sizeof(float) * (size_t)(Hk * D * J.S32));
    J.sc = (float *)aligned_alloc(64, sizeof(float) * (size_t)(nth * AR_ROWS * J.SLD));
    if (!J.kt || !J.sc) {
        free(J.kt);
        free(J.sc);
        return -2;
    }
    run_parallel(transpose_task, &J, Hk * J.S32 / 32 < 2 ? 1 : nth);
    run_parallel(rows_task, &J, nth);
    free(J.kt);
    free(J.sc);
    return 0;
#else
    (void)q_sh; (void)q_sl; (void)k_sh; (void)k_sl; (void)v_sh; (void)v_sl; (void)o_sh; (void)o_sl;
    (void)keep; (void)n_threads;
    return -6;
#endif
}
