/* vlmc CPU kernels: y[M, N] = x[M, K] @ W[N, K]^T (+ bias) for small M (decode, and the
 * verification of several draft tokens per sequence).
 *
 * Decode is bound by the bytes of W read per token, so W stays in its stored form
 * (float32, bfloat16, or MLX affine-quantized codes + per-group scales/biases) and is
 * streamed once for all M rows of x.
 *
 * Quantized layout (MLX "affine", verified against mx.quantize/mx.dequantize for bits
 * 2, 3, 4, 5, 6, 8): each row of W is one little-endian bit stream of K codes, `bits`
 * bits each, stored as uint32 words; code k occupies stream bits [k*bits, (k+1)*bits)
 * (codes of 3/5/6 bits straddle word and byte boundaries). Row stride is K*bits/32
 * words. scales/biases are [N, K/group_size]; w = scale*q + bias. For a group g the
 * kernels use  sum_k x_k (s_g q_k + b_g) = s_g sum_k x_k q_k + b_g sum_k x_k.
 *
 * Row exactness: output y[m, n] is the same float32, bit for bit, whatever M is and
 * whichever other rows share the call (speculative decoding checks a draft's tokens in
 * one call and must get what one-token steps would have). So every kernel computes each
 * (weight row, x row) pair as one fixed sequence of operations: the number of weight
 * rows a kernel configuration takes at once, the x rows beside it, K chunks and threads
 * change only which pairs run together, never an accumulation order.
 *
 * Two families of kernels:
 * - codes x int8 activations (AVX512-VNNI, the default where present): one x row reads
 *   each weight row as one sequential stream (qv_m1_range); several x rows take panels
 *   of 16 weight rows whose codes are transposed in registers once per block for all of
 *   them (qp_panel). Both do the same float arithmetic per pair (see there).
 * - float32 x (float/bfloat16 weights; codes where int8 x is off or unavailable):
 *   weight rows against x rows with fixed accumulators per pair, carried across K chunks
 *   (x chunk kept in L1 for M >= 2), summed horizontally once at the end.
 * Both walk rows in dynamic chunks shared by the calling thread and a small persistent
 * pthread pool (threadpool.c); the panel kernels' chunks shrink towards the end of a call
 * and each thread takes its next chunk one panel early, to prefetch it. Without AVX2+FMA a portable scalar path computes the same
 * arithmetic up to summation order.
 */
#include "vlmc.h"

/* ------------------------------------------------------------------------------------ */
/* GEMV job description and dynamic row scheduling                                       */

#ifndef CHUNK_MIN_M
#define CHUNK_MIN_M 2
#endif
#ifndef X_CHUNK_FLOATS
#define X_CHUNK_FLOATS 4096 /* M x kc floats of x kept in L1 per K chunk (16 KiB) */
#endif
#define DENSE_SEG 512 /* float32 / bfloat16 weights: elements per segment (dense_block) */
#define QP 16 /* weight rows per panel of the int8-x kernels (lanes of a vector) */
#define QP_MAX_M 16 /* x rows per pass of the panel kernels */
#ifndef SHRINK_CHUNKS
#define SHRINK_CHUNKS 1 /* the panel kernels' chunks shrink towards a job's end (grab) */
#endif

typedef struct {
    int kind;          /* 0 f32, 1 bf16, 2 quantized */
    int M, N, K;
    const float *x;    /* [M, K] natural layout */
    const float *xq;   /* quantized, float x: x permuted for the 4-bit kernel, else == x */
    const float *xs;   /* quantized: [M, G] group sums of x (int8 x: of the rounded x) */
    const int8_t *x8;  /* int8 x: x per 64-block (x8_block, in the order x8_order) */
    int x8_order;      /* X8_NATURAL, or for 4-bit codes X8_OCTETS / X8_HALVES (one x row) */
    const int8_t *x8r; /* 8-bit codes: x's rounding residual in 1/256 steps (x8_block), or NULL */
    const float *x8s;  /* its scale per 64-block (with x8r: the scale of 256 x8 + x8r) */
    const void *w;
    const void *sc, *bi;
    int st;            /* scales/biases type */
    int bits, gs, G;
    packed_t pk;       /* 2/3/5/6-bit codes: how to widen them (packed_init) */
    const float *bias; /* [N] or NULL */
    float *y;          /* [M, N] */
    int kc;            /* float x: K elements per chunk (x chunk stays in L1) */
    int kmain;         /* float x: K covered by the SIMD blocks (the rest: the finish) */
    int long_rows;     /* float x: M x K floats of x exceed X_CHUNK_FLOATS (x re-read from L2) */
    size_t rowbytes;   /* bytes of one weight row */
    int chunk;         /* rows per grab (with shrink: the most) */
    int shrink, nth;   /* panel kernels: chunks shrink towards the end (grab) */
    int amx;           /* the panel kernels on AMX tiles (amx_rows), with these tables: */
    const int8_t *bx, *bxr; /* x8, x8r per 64-block as tile B (amx_prep) */
    const float *tx8s, *txs; /* x8s per block, xs per group: 16 floats each (x rows; 0 past M) */
    _Atomic int next;
} job_t;

static ALWAYS int grab(job_t *J, int *n0, int *n1) {
    if (!J->shrink) {
        const int s = atomic_fetch_add_explicit(&J->next, J->chunk, memory_order_relaxed);
        if (s >= J->N) return 0;
        *n0 = s;
        *n1 = s + J->chunk < J->N ? s + J->chunk : J->N;
        return 1;
    }
    /* chunks shrink with the rows left (a quarter of each thread's share, whole panels, at
     * most J->chunk): the threads then finish within about one panel of each other */
    int s = atomic_load_explicit(&J->next, memory_order_relaxed), c;
    do {
        if (s >= J->N) return 0;
        c = (J->N - s) / (4 * J->nth);
        c = c < QP ? QP : c > J->chunk ? J->chunk : (c + QP - 1) / QP * QP;
    } while (!atomic_compare_exchange_weak_explicit(&J->next, &s, s + c, memory_order_relaxed, memory_order_relaxed));
    *n0 = s;
    *n1 = s + c < J->N ? s + c : J->N;
    return 1;
}

/* sum_{g < G} p[n, g] * xs[m, g] for the per-group parameters p (biases) */
__attribute__((unused)) static float group_dot(const job_t *J, const void *p, int n, int m, int G) {
    const size_t off = (size_t)n * J->G;
    const float *xs = J->xs + (size_t)m * J->G;
    int g = 0;
    float s = 0.f;
#if VLMC_SIMD
    __m256 acc = _mm256_setzero_ps();
    if (J->st == ST_F32) {
        const float *b = (const float *)p + off;
        for (; g + 8 <= G; g += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(b + g), _mm256_loadu_ps(xs + g), acc);
    } else if (J->st == ST_BF16) {
        const uint16_t *b = (const uint16_t *)p + off;
        for (; g + 8 <= G; g += 8) acc = _mm256_fmadd_ps(ld8_bf16(b + g), _mm256_loadu_ps(xs + g), acc);
    }
    s = hsum(acc);
#endif
    for (; g < G; g++) s += ld_param(p, off + g, J->st) * xs[g];
    return s;
}

static ALWAYS void store_out(const job_t *J, int n, int m, float v) {
    if (J->bias) v += J->bias[n];
    J->y[(size_t)m * J->N + n] = v;
}

#if VLMC_SIMD
/* Software prefetch of the weight stream, this many bytes ahead (quantized formats: their
 * decode is long enough that the hardware prefetcher alone falls behind). */
#ifndef PF_DIST
#define PF_DIST 2048
#endif
static ALWAYS void pf(const void *p, size_t off) {
    if (PF_DIST > 0 && off > 0) _mm_prefetch((const char *)p + off, _MM_HINT_T0);
}

/* ==== float32 x ====================================================================== *
 * Each pair (weight row, x row) has one accumulator vector for all of K (carried in
 * `part` between K chunks), then one horizontal sum and the scalar terms (finish_pair).
 * How many weight rows and x rows a block takes changes only which pairs run side by
 * side. */

/* the scalar terms of a pair after its vector sum s: the dense tail (k >= kmain), or the
 * bias terms and the 4-bit half-span tail; then the store */
static void finish_pair(const job_t *J, int n, int m, float s) {
    const int K = J->K, G = J->G;
    if (J->kind != 2) {
        const float *xr = J->x + (size_t)m * K;
        for (int k = J->kmain; k < K; k++)
            s += (J->kind == 1 ? bf16_to_f32(((const uint16_t *)J->w)[(size_t)n * K + k])
                               : ((const float *)J->w)[(size_t)n * K + k]) * xr[k];
        store_out(J, n, m, s);
        return;
    }
    s += group_dot(J, J->bi, n, m, G);
    if (J->bits == 4 && J->kmain < K) {
        const uint32_t *w = (const uint32_t *)J->w + (size_t)n * (K / 8);
        float t = 0.f;
        for (int k = J->kmain; k < K; k++) t += (float)((w[k / 8] >> (4 * (k % 8))) & 0xF) * J->x[(size_t)m * K + k];
        s += t * ld_param(J->sc, (size_t)n * G + G - 1, J->st);
    }
    store_out(J, n, m, s);
}

/* ---- float32 / bfloat16 weights: R weight rows against up to DENSE_MG x rows. Per pair,
 * per segment of DENSE_SEG elements: DV_P accumulator vectors, element k to vector
 * (k / DV_W) % DV_P, summed (a0 + a1, or (a0 + a1) + (a2 + a3)) and added to the pair's
 * sum; the elements past the last whole 32 (K % 32) follow its horizontal sum one by one
 * (finish_pair). One x row takes one weight row at a time: the weights are then one
 * sequential stream, which the hardware prefetcher follows at memory speed, and DV_P
 * chains per pair hide the FMA latency. k0 is a multiple of DENSE_SEG, k1 too or
 * J->kmain. ----------------------------------------------------------------------------- */
#if defined(__AVX512F__)
typedef __m512 dvec;
#define DV_W 16
#define DV_P 2
#define DENSE_MG 8 /* 16 accumulators of 32 registers */
static ALWAYS dvec dv_zero(void) { return _mm512_setzero_ps(); }
static ALWAYS dvec dv_ld(const float *p) { return _mm512_loadu_ps(p); }
static ALWAYS dvec dv_ldbf(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static ALWAYS dvec dv_fma(dvec a, dvec b, dvec c) { return _mm512_fmadd_ps(a, b, c); }
static ALWAYS dvec dv_add(dvec a, dvec b) { return _mm512_add_ps(a, b); }
static ALWAYS void dv_st(float *p, dvec v) { _mm512_storeu_ps(p, v); }
static ALWAYS float dv_hsum(dvec v) { return _mm512_reduce_add_ps(v); }
#else
typedef __m256 dvec;
#define DV_W 8
#define DV_P 4
#define DENSE_MG 2 /* 8 accumulators of 16 registers */
static ALWAYS dvec dv_zero(void) { return _mm256_setzero_ps(); }
static ALWAYS dvec dv_ld(const float *p) { return _mm256_loadu_ps(p); }
static ALWAYS dvec dv_ldbf(const uint16_t *p) { return ld8_bf16(p); }
static ALWAYS dvec dv_fma(dvec a, dvec b, dvec c) { return _mm256_fmadd_ps(a, b, c); }
static ALWAYS dvec dv_add(dvec a, dvec b) { return _mm256_add_ps(a, b); }
static ALWAYS void dv_st(float *p, dvec v) { _mm256_storeu_ps(p, v); }
static ALWAYS float dv_hsum(dvec v) { return hsum(v); }
#endif
#define PART_W 16 /* floats per pair in the range functions' partial sums (>= DV_W, 8) */

static ALWAYS void dense_block(const int R, const int MG, const int BF, const job_t *J, int n, int m0, int k0, int k1,
                               float *part, size_t pfo) {
    const int K = J->K, M = J->M;
    const float *wf = (const float *)J->w + (size_t)n * K;
    const uint16_t *wh = (const uint16_t *)J->w + (size_t)n * K;
    dvec tot[4][DENSE_MG];
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int m = 0; m < MG; m++)
        tot[r][m] = dv_ld(part + ((size_t)r * M + m0 + m) * PART_W);
    for (int s0 = k0; s0 < k1; s0 += DENSE_SEG) {
        const int s1 = s0 + DENSE_SEG < k1 ? s0 + DENSE_SEG : k1;
        dvec acc[4][DENSE_MG][DV_P];
        UNROLL for (int r = 0; r < R; r++) UNROLL for (int m = 0; m < MG; m++) UNROLL for (int p = 0; p < DV_P; p++)
            acc[r][m][p] = dv_zero();
        for (int k = s0; k < s1; k += 32) {
            if (pfo)
                UNROLL for (int r = 0; r < R; r++) {
                    pf(BF ? (const void *)(wh + (size_t)r * K + k) : (const void *)(wf + (size_t)r * K + k), pfo);
                    if (!BF) pf(wf + (size_t)r * K + k + 16, pfo);
                }
            UNROLL for (int p = 0; p < DV_P; p++) {
                dvec wv[4];
                UNROLL for (int r = 0; r < R; r++)
                    wv[r] = BF ? dv_ldbf(wh + (size_t)r * K + k + DV_W * p) : dv_ld(wf + (size_t)r * K + k + DV_W * p);
                UNROLL for (int m = 0; m < MG; m++) {
                    const dvec xv = dv_ld(J->x + (size_t)(m0 + m) * K + k + DV_W * p);
                    UNROLL for (int r = 0; r < R; r++) acc[r][m][p] = dv_fma(wv[r], xv, acc[r][m][p]);
                }
            }
        }
        UNROLL for (int r = 0; r < R; r++) UNROLL for (int m = 0; m < MG; m++) {
            const dvec seg = DV_P == 2 ? dv_add(acc[r][m][0], acc[r][m][1])
                                       : dv_add(dv_add(acc[r][m][0], acc[r][m][1]), dv_add(acc[r][m][DV_P - 2], acc[r][m][DV_P - 1]));
            tot[r][m] = dv_add(tot[r][m], seg);
        }
    }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int m = 0; m < MG; m++)
        dv_st(part + ((size_t)r * M + m0 + m) * PART_W, tot[r][m]);
}

/* Row range [n0, n1) of a dense weight for M x rows (a compile-time constant): one x row
 * takes each weight row whole, several take K in chunks (x chunk in L1) across the rows;
 * either way every pair runs the same segments in order. */
static ALWAYS void dense_range(const int M, const int BF, const job_t *J, int n0, int n1, float *part) {
    memset(part, 0, sizeof(float) * PART_W * (size_t)(n1 - n0) * M);
    /* one long x row is re-read from L2 for every weight row: 4 rows share each x load */
    const int R4 = M == 1 && J->long_rows;
    for (int k0 = 0; k0 < J->kmain; k0 += J->kc) {
        const int k1 = k0 + J->kc < J->kmain ? k0 + J->kc : J->kmain;
        /* chunks: each row's chunk is a stream of its own (prefetch the rows after it);
         * 4 rows at once: prefetch ahead in each */
        const size_t pfo = J->kc < J->kmain ? (size_t)2 * J->rowbytes : R4 ? PF_DIST : 0;
        int n = n0;
        if (R4)
            for (; n + 4 <= n1; n += 4) dense_block(4, 1, BF, J, n, 0, k0, k1, part + (size_t)(n - n0) * M * PART_W, pfo);
        for (; n < n1; n++) {
            float *pn = part + (size_t)(n - n0) * M * PART_W;
            UNROLL for (int m0 = 0; m0 < M; m0 += DENSE_MG) {
                if (M - m0 >= DENSE_MG) dense_block(1, DENSE_MG, BF, J, n, m0, k0, k1, pn, pfo);
                else dense_block(1, M - m0 < DENSE_MG ? M - m0 : DENSE_MG, BF, J, n, m0, k0, k1, pn, pfo);
            }
        }
    }
    for (int n = n0; n < n1; n++)
        for (int m = 0; m < M; m++) finish_pair(J, n, m, dv_hsum(dv_ld(part + ((size_t)(n - n0) * M + m) * PART_W)));
}

/* Row range [n0, n1): K chunks outside, blocks of R rows inside (the rest one by one),
 * each pair's accumulator kept in part ([n1 - n0][M][8] floats) between chunks; then the
 * horizontal sums and finish_pair. */
/* scale vector for 64 consecutive codes of group `off` (gs == 32: groups off, off+1) */
static ALWAYS __m256 scale_vec(const int ST, const job_t *J, size_t off, int two) {
    if (two) {
        float s0 = ld_param(J->sc, off, ST), s1 = ld_param(J->sc, off + 1, ST);
        return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(s0)), _mm_set1_ps(s1), 1);
    }
    return _mm256_set1_ps(ld_param(J->sc, off, ST));
}

/* ---- codes with float x. Every block function continues, for R weight rows n.. and M x
 * rows, the pairs' accumulator vectors (8 floats each, in part[(r * M + m) * PART_W])
 * over k in [k0, k1): per group or 4-bit span an inner accumulator of q * x, 8 codes at a
 * time in k order, then scaled into the outer one; the same for every R and M. At the end
 * (the range's finish) one horizontal sum and the scalar terms. */

/* 4-bit: a 32-byte load holds 8 words = 64 codes; nibble j of word l is code 8l+j. x is
 * pre-permuted per 64-block so that xq[8j + l] = x[8l + j]: shifting the whole vector by
 * 4j and masking then yields 8 codes that pair with 8 contiguous floats. A span is 64
 * codes, or one group if larger. Covers whole spans only; the last half-span (gs == 32,
 * K % 64 == 32) is the finish's. */
static ALWAYS void q4_block(const int R, const int M, const int ST, const job_t *J, int n, int k0, int k1,
                            float *part, size_t pfo) {
    const int K = J->K, gs = J->gs, G = J->G;
    const int span = gs < 64 ? 64 : gs, two = gs < 64;
    const size_t ws = (size_t)K / 8; /* words per row */
    const uint32_t *w = (const uint32_t *)J->w + (size_t)n * ws;
    const __m256i mask = _mm256_set1_epi32(0xF);
    __m256 tot[4][8];
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int m = 0; m < M; m++)
        tot[r][m] = _mm256_loadu_ps(part + (size_t)(r * M + m) * PART_W);
    for (int ks = k0; ks < k1; ks += span) {
        __m256 sv[4], acc[4][8];
        UNROLL for (int r = 0; r < R; r++) sv[r] = scale_vec(ST, J, (size_t)(n + r) * G + (size_t)ks / gs, two);
        UNROLL for (int r = 0; r < R; r++) UNROLL for (int m = 0; m < M; m++) acc[r][m] = _mm256_setzero_ps();
        for (int kb = ks; kb < ks + span; kb += 64) {
            __m256i v[4];
            const uint32_t *wb = w + ((unsigned)kb >> 3);
            UNROLL for (int r = 0; r < R; r++) {
                if (kb & 64) pf(wb + r * ws, pfo); /* one prefetch per 64 bytes */
                v[r] = _mm256_loadu_si256((const __m256i *)(wb + r * ws));
            }
            UNROLL for (int j = 0; j < 8; j++) {
                __m256 q[4];
                UNROLL for (int r = 0; r < R; r++) {
                    __m256i t = j ? _mm256_srli_epi32(v[r], 4 * j) : v[r];
                    if (j < 7) t = _mm256_and_si256(t, mask);
                    q[r] = _mm256_cvtepi32_ps(t);
                }
                UNROLL for (int m = 0; m < M; m++) {
                    const __m256 xv = _mm256_loadu_ps(J->xq + (size_t)m * K + kb + 8 * j);
                    UNROLL for (int r = 0; r < R; r++) acc[r][m] = _mm256_fmadd_ps(q[r], xv, acc[r][m]);
                }
            }
        }
        UNROLL for (int r = 0; r < R; r++) UNROLL for (int m = 0; m < M; m++)
            tot[r][m] = _mm256_fmadd_ps(acc[r][m], sv[r], tot[r][m]);
    }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int m = 0; m < M; m++)
        _mm256_storeu_ps(part + (size_t)(r * M + m) * PART_W, tot[r][m]);
}

/* 8-bit: 8 bytes -> 8 codes in natural order (vpmovzxbd), per group */
static ALWAYS void q8_block(const int R, const int M, const int ST, const job_t *J, int n, int k0, int k1,
                            float *part, size_t pfo) {
    const int K = J->K, gs = J->gs, G = J->G;
    const uint8_t *w = (const uint8_t *)J->w + (size_t)n * K;
    __m256 tot[4][8];
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int m = 0; m < M; m++)
        tot[r][m] = _mm256_loadu_ps(part + (size_t)(r * M + m) * PART_W);
    for (int ks = k0; ks < k1; ks += gs) {
        __m256 sv[4], acc[4][8];
        UNROLL for (int r = 0; r < R; r++) sv[r] = _mm256_set1_ps(ld_param(J->sc, (size_t)(n + r) * G + ks / gs, ST));
        UNROLL for (int r = 0; r < R; r++) UNROLL for (int m = 0; m < M; m++) acc[r][m] = _mm256_setzero_ps();
        for (int c = ks; c < ks + gs; c += 8) {
            if ((c & 63) == 0) UNROLL for (int r = 0; r < R; r++) pf(w + (size_t)r * K + c, pfo);
            __m256 q[4];
            UNROLL for (int r = 0; r < R; r++)
                q[r] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w + (size_t)r * K + c))));
            UNROLL for (int m = 0; m < M; m++) {
                const __m256 xv = _mm256_loadu_ps(J->x + (size_t)m * K + c);
                UNROLL for (int r = 0; r < R; r++) acc[r][m] = _mm256_fmadd_ps(q[r], xv, acc[r][m]);
            }
        }
        UNROLL for (int r = 0; r < R; r++) UNROLL for (int m = 0; m < M; m++)
            tot[r][m] = _mm256_fmadd_ps(acc[r][m], sv[r], tot[r][m]);
    }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int m = 0; m < M; m++)
        _mm256_storeu_ps(part + (size_t)(r * M + m) * PART_W, tot[r][m]);
}

/* Row range [n0, n1): K chunks outside, blocks of R rows inside (the rest one by one),
 * each pair's accumulator kept in part between chunks; then the horizontal sums and
 * finish_pair. */
#define DEFINE_RANGE(name, CALL)                                                                         \
    static ALWAYS void name##_range(const int R, const int M, const int ST, const job_t *J, int n0,     \
                                    int n1, float *part) {                                              \
        memset(part, 0, sizeof(float) * PART_W * (size_t)(n1 - n0) * M);                                \
        (void)ST;                                                                                       \
        for (int k0 = 0; k0 < J->kmain; k0 += J->kc) {                                                  \
            const int k1 = k0 + J->kc < J->kmain ? k0 + J->kc : J->kmain;                               \
            const size_t pfo = J->kc < J->kmain ? (size_t)2 * R * J->rowbytes : PF_DIST;                \
            int n = n0;                                                                                 \
            for (; n + R <= n1; n += R) CALL(R, M, ST, J, n, k0, k1, part + (size_t)(n - n0) * M * PART_W, pfo); \
            for (; n < n1; n++) CALL(1, M, ST, J, n, k0, k1, part + (size_t)(n - n0) * M * PART_W, pfo); \
        }                                                                                               \
        for (int n = n0; n < n1; n++)                                                                   \
            for (int m = 0; m < M; m++)                                                                 \
                finish_pair(J, n, m, hsum(_mm256_loadu_ps(part + ((size_t)(n - n0) * M + m) * PART_W))); \
    }
DEFINE_RANGE(q4, q4_block)
DEFINE_RANGE(q8, q8_block)

/* Kernel configurations of the codes with float x: R weight rows per block for each M in
 * {1, 2, 3, 4, 8} (M = 5..7 runs as 8 on zero-padded x, M > 8 in slices of 8:
 * gemv_sliced; the dense kernels likewise). R only sets how many accumulators are in
 * flight (R x M chains, of one FMA latency per 8 codes each), which the 32 vector
 * registers of AVX-512VL allow more of than AVX2's 16. */
#if defined(__AVX512VL__)
#define WIDE_REGS 1
#else
#define WIDE_REGS 0
#endif

#define KFN(name, R, M) name##_k##R##_##M
#define DEFK(name, R, M)                                                                           \
    static __attribute__((noinline)) void KFN(name, R, M)(const job_t *J, int n0, int n1, float *part) { \
        if (J->st == ST_BF16) name##_range(R, M, ST_BF16, J, n0, n1, part);                       \
        else name##_range(R, M, ST_F32, J, n0, n1, part);                                          \
    }
#define DEFK_(args) DEFK args
#define KFN_(args) KFN args

#if WIDE_REGS
#define Q_1 4, 1
#define Q_2 2, 2
#define Q_3 2, 3
#define Q_4 2, 4
#define Q_8 1, 8
#else
#define Q_1 2, 1
#define Q_2 2, 2
#define Q_3 1, 3
#define Q_4 1, 4
#define Q_8 1, 8
#endif

#define DEF_ROWS(name, C1, C2, C3, C4, C8)                                                       \
    DEFK_((name, C1)) DEFK_((name, C2)) DEFK_((name, C3)) DEFK_((name, C4)) DEFK_((name, C8))    \
    static void name##_rows(const job_t *J, int n0, int n1, float *part) {                       \
        switch (J->M) {                                                                          \
        case 1: KFN_((name, C1))(J, n0, n1, part); break;                                        \
        case 2: KFN_((name, C2))(J, n0, n1, part); break;                                        \
        case 3: KFN_((name, C3))(J, n0, n1, part); break;                                        \
        case 4: KFN_((name, C4))(J, n0, n1, part); break;                                        \
        default: KFN_((name, C8))(J, n0, n1, part); break;                                       \
        }                                                                                        \
    }
#define DEF_DENSE(name, BF)                                                                      \
    static __attribute__((noinline)) void name##_rows(const job_t *J, int n0, int n1, float *part) { \
        switch (J->M) {                                                                          \
        case 1: dense_range(1, BF, J, n0, n1, part); break;                                      \
        case 2: dense_range(2, BF, J, n0, n1, part); break;                                      \
        case 3: dense_range(3, BF, J, n0, n1, part); break;                                      \
        case 4: dense_range(4, BF, J, n0, n1, part); break;                                      \
        default: dense_range(8, BF, J, n0, n1, part); break;                                     \
        }                                                                                        \
    }
DEF_DENSE(f32, 0)
DEF_DENSE(bf16, 1)
DEF_ROWS(q4, Q_1, Q_2, Q_3, Q_4, Q_8)
DEF_ROWS(q8, Q_1, Q_2, Q_3, Q_4, Q_8)

/* ==== codes x int8 x (AVX512-VNNI) ==================================================== *
 * Per 64-block, x is rounded to int8 with its own scale (x8s); for 8-bit codes its
 * rounding residual too (x8r, x8_block); vpdpbusd gives each block's dot exactly, as an
 * integer. Per pair (weight row, x row) the float work is then fixed: eight partial sums
 * A_0 .. A_7, block b adding to A_(b mod 8):  A += float(dot_b) x (s_g x xs_b)  (g its
 * group), and right after the last block of each group, to the same A, the bias term
 * b_g x (group sum of the rounded x) (the rounded x's group sums make the minimum and the
 * codes' mean cancel as they do without rounding); finally y = ((A_0 + A_1) + (A_2 +
 * A_3)) + ((A_4 + A_5) + (A_6 + A_7)) (+ bias). Two kernels compute it:
 * - one x row (qv_m1_range): each weight row's codes are one sequential stream, 512 codes
 *   (8 blocks) per step, vpdpbusd against 64 bytes of x and the 16 lanes of each block's
 *   dot folded into one (fold8): lane i of one vector is A_i, and 8 rows' sums finish
 *   together (hsum8x8), ~6 instructions per 64 codes;
 * - several x rows (qp4_panel for 4-bit codes, qp_panel for the others): 16 weight rows'
 *   codes of a block are transposed in registers so that vpdpbusd multiplies 4 codes of
 *   16 rows by 4 bytes of one x row broadcast; the transpose is paid once per block for
 *   all x rows, and A_i is a vector over the 16 rows (no horizontal sums; where one x
 *   row's fold costs ~13 instructions per 8 blocks and pair, the panel's per-pair work is
 *   its 16 vpdpbusd, a multiply and two FMAs).
 * On Zen 4 vpdpbusd zmm issues 1 per cycle; shuffles, masks, shifts, conversions and
 * loads run beside it at no cost, while multiplies, FMAs and zmm stores take its cycles
 * (measured one kind at a time against 16 vpdpbusd): so a pair's block costs 16 + 3
 * cycles at best, and the kernels keep the transposes out of the vpdpbusd chain's way
 * and store as little as they can. Needs gs % 64 == 0. */
#if VLMC_VNNI
#define BITS_PACKED 0 /* the kernels' BITS for 2/3/5/6-bit codes (the width is J->bits) */
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T1 /* the next panel into L2 (a panel of long rows would crowd L1) */
#endif
#ifndef PF_M1
#define PF_M1 8192 /* one x row: bytes ahead, into L2 (codes in flight would crowd x out of L1) */
#endif
static ALWAYS void pf_l2(const void *p, size_t off) { _mm_prefetch((const char *)p + off, _MM_HINT_T1); }

/* ---- one x row ------------------------------------------------------------------------ */

/* p[i] (i < 4): int32 lanes 0-7 belong to block 2i, lanes 8-15 to block 2i + 1; returns
 * the 8 block sums in block order */
static ALWAYS __m256i fold8(__m512i p0, __m512i p1, __m512i p2, __m512i p3) {
    const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(p0, p1), _mm512_unpackhi_epi32(p0, p1));
    const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(p2, p3), _mm512_unpackhi_epi32(p2, p3));
    /* per 128-bit lane j: the sums of lane j's four values of p0, p1, p2, p3 */
    const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
    /* lane 0 + lane 1: blocks 0, 2, 4, 6; lane 2 + lane 3: blocks 1, 3, 5, 7 */
    const __m512i v = _mm512_add_epi32(u, _mm512_shuffle_i32x4(u, u, _MM_SHUFFLE(2, 3, 0, 1)));
    const __m512i idx = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_castsi512_si256(_mm512_permutexvar_epi32(idx, v));
}

/* the blocks of the 512-code step from kb that lie below K (1 .. 8) */
static ALWAYS int step_blocks(const job_t *J, int kb) { return (J->K - kb) / 64 < 8 ? (J->K - kb) / 64 : 8; }

/* 8 consecutive float32 or bfloat16 parameters from element off (0 from the nbk-th on) */
static ALWAYS __m256 ld8_param(const int ST, const void *p, size_t off, int nbk) {
    if (nbk == 8) return ST == ST_BF16 ? ld8_bf16((const uint16_t *)p + off) : _mm256_loadu_ps((const float *)p + off);
    const __mmask8 k = (__mmask8)((1u << nbk) - 1);
    if (ST == ST_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_maskz_loadu_epi16(k, (const uint16_t *)p + off)), 16));
    return _mm256_maskz_loadu_ps(k, (const float *)p + off);
}

/* row n's weight-group scales of blocks kb / 64 .. + 7 (0 past the row's last block) */
static ALWAYS __m256 scale8(const int ST, const job_t *J, int n, int kb, int nbk) {
    const size_t off = (size_t)n * J->G + (size_t)kb / J->gs;
    if (J->gs == 64) return ld8_param(ST, J->sc, off, nbk);
    float t[8];
    for (int i = 0; i < 8; i++) t[i] = i < nbk ? ld_param(J->sc, (size_t)n * J->G + (size_t)(kb + 64 * i) / J->gs, ST) : 0.f;
    return _mm256_loadu_ps(t);
}

/* tot + the 8 blocks' dots of row n x (scale x x's block scale) + the bias terms of the
 * groups whose last block is among them (in that block's lane) */
static ALWAYS __m256 acc8(const int ST, const job_t *J, int n, int kb, int nbk, __m256i dots, __m256 tot) {
    const __m256 xs = ld8_param(ST_F32, J->x8s, (size_t)kb >> 6, nbk);
    tot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), _mm256_mul_ps(scale8(ST, J, n, kb, nbk), xs), tot);
    __m256 bv, xg;
    if (J->gs == 64) {
        bv = ld8_param(ST, J->bi, (size_t)n * J->G + (kb >> 6), nbk);
        xg = ld8_param(ST_F32, J->xs, (size_t)kb >> 6, nbk);
    } else {
        float b[8], s[8];
        const int bpg = J->gs / 64;
        for (int i = 0; i < 8; i++) {
            const int blk = kb / 64 + i, last = i < nbk && (blk + 1) % bpg == 0;
            b[i] = last ? ld_param(J->bi, (size_t)n * J->G + blk / bpg, ST) : 0.f;
            s[i] = last ? J->xs[blk / bpg] : 0.f;
        }
        bv = _mm256_loadu_ps(b);
        xg = _mm256_loadu_ps(s);
    }
    return _mm256_fmadd_ps(bv, xg, tot);
}

/* 8 blocks (512 codes) from kb, 4-bit codes; x8 in X8_HALVES order, so a 64-byte load of
 * codes (blocks A, B) meets A's and B's even values, then their odd ones */
static ALWAYS __m256i dots_q4(const job_t *J, const uint8_t *w, int kb, int nbk) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), z = _mm512_setzero_si512();
    const uint8_t *wb = w + kb / 2;
    __m512i a[4];
    UNROLL for (int i = 0; i < 4; i++) {
        if (2 * i >= nbk) {
            a[i] = z;
            continue;
        }
        const __mmask64 mk = 2 * i + 1 < nbk ? ~(__mmask64)0 : (__mmask64)0xFFFFFFFFu; /* a lone last block */
        pf_l2(wb + 64 * i, PF_M1);
        const __m512i v = _mm512_maskz_loadu_epi8(mk, wb + 64 * i);
        const int8_t *xe = J->x8 + kb + 128 * i;
        const size_t gap = kb + 128 * i + 128 <= J->K ? 64 : 32;
        a[i] = _mm512_dpbusd_epi32(z, _mm512_and_si512(v, m4), _mm512_maskz_loadu_epi8(mk, xe));
        a[i] = _mm512_dpbusd_epi32(a[i], _mm512_and_si512(_mm512_srli_epi16(v, 4), m4), _mm512_maskz_loadu_epi8(mk, xe + gap));
    }
    return fold8(a[0], a[1], a[2], a[3]);
}

/* 8 blocks from kb of byte codes c[0..7] (natural order): each block's 16 lanes halved
 * into 8, two blocks per vector, for fold8 */
static ALWAYS __m256i dots_bytes(const job_t *J, int kb, int nbk, const __m512i c[8]) {
    const __m512i z = _mm512_setzero_si512();
    __m512i a[4];
    UNROLL for (int i = 0; i < 4; i++) {
        __m512i p[2] = {z, z};
        UNROLL for (int h = 0; h < 2; h++) {
            if (2 * i + h >= nbk) continue;
            const size_t k = (size_t)kb + 128 * i + 64 * h;
            p[h] = _mm512_dpbusd_epi32(z, c[2 * i + h], _mm512_loadu_si512((const void *)(J->x8 + k)));
            if (J->x8r) /* 256 x8 + x8r: the residual's dots in 1/256 steps */
                p[h] = _mm512_dpbusd_epi32(_mm512_slli_epi32(p[h], 8), c[2 * i + h], _mm512_loadu_si512((const void *)(J->x8r + k)));
        }
        a[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(p[0], p[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                _mm512_shuffle_i32x4(p[0], p[1], _MM_SHUFFLE(3, 2, 3, 2)));
    }
    return fold8(a[0], a[1], a[2], a[3]);
}

/* the integer dots of the step's blocks (0 past K) of weight row w */
static ALWAYS __m256i step_dots(const int BITS, const job_t *J, const uint8_t *w, const void *pu, int kb, int nbk) {
    if (BITS == 4) return dots_q4(J, w, kb, nbk);
    const int bits = BITS == BITS_PACKED ? J->bits : BITS;
    __m512i c[8];
    UNROLL for (int j = 0; j < 8; j++) {
        if (j >= nbk) {
            c[j] = _mm512_setzero_si512();
            continue;
        }
        const uint8_t *wb = w + (size_t)(kb + 64 * j) / 8 * bits;
#if VLMC_CODES_PACKED
        if (BITS == BITS_PACKED) {
            if (j == 0) /* the step's 8 x bits bytes: `bits` cache lines */
                for (int l = 0; l < bits; l++) pf_l2(wb + 64 * l, PF_M1);
            c[j] = codes_packed((const packed_v *)pu, wb);
            continue;
        }
#endif
        (void)pu;
        pf_l2(wb, PF_M1);
        c[j] = _mm512_loadu_si512((const void *)wb);
    }
    return dots_bytes(J, kb, nbk, c);
}

/* the 8 lane sums of each of t[0..7], in that order, each as ((l0 + l1) + (l2 + l3)) +
 * ((l4 + l5) + (l6 + l7)) */
static ALWAYS __m256 hsum8x8(const __m256 t[8]) {
    const __m256 b0 = _mm256_hadd_ps(_mm256_hadd_ps(t[0], t[1]), _mm256_hadd_ps(t[2], t[3]));
    const __m256 b1 = _mm256_hadd_ps(_mm256_hadd_ps(t[4], t[5]), _mm256_hadd_ps(t[6], t[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}

/* Rows n0 .. n1 - 1 for one x row, 8 at a time (a last group of fewer repeats its last
 * row, not stored), each row's codes one after the other. */
static ALWAYS void qv_m1_range(const int BITS, const int ST, const job_t *J, int n0, int n1) {
    const int K = J->K;
    const size_t rb = (size_t)K / 8 * (BITS == BITS_PACKED ? J->bits : BITS);
    const void *pu = NULL;
#if VLMC_CODES_PACKED
    const packed_v u = packed_regs(&J->pk);
    pu = &u;
#endif
    for (int n = n0; n < n1; n += 8) {
        const int rows = n1 - n < 8 ? n1 - n : 8;
        __m256 t[8];
        UNROLL for (int j = 0; j < 8; j++) {
            const int r = n + (j < rows ? j : rows - 1);
            const uint8_t *w = (const uint8_t *)J->w + (size_t)r * rb;
            __m256 tot = _mm256_setzero_ps();
            int kb = 0;
            for (; kb + 512 <= K; kb += 512) tot = acc8(ST, J, r, kb, 8, step_dots(BITS, J, w, pu, kb, 8), tot);
            if (kb < K) { /* a last step of fewer blocks */
                const int nbk = step_blocks(J, kb);
                tot = acc8(ST, J, r, kb, nbk, step_dots(BITS, J, w, pu, kb, nbk), tot);
            }
            t[j] = tot;
        }
        const __mmask8 keep = (__mmask8)((1u << rows) - 1);
        __m256 y = hsum8x8(t);
        if (J->bias) y = _mm256_add_ps(y, _mm256_maskz_loadu_ps(keep, J->bias + n));
        _mm256_mask_storeu_ps(J->y + n, keep, y);
    }
}

/* ---- several x rows: panels of 16 weight rows ------------------------------------------ */

/* 8 x 8 dword transposes in both 256-bit halves: z[i] holds dwords 0..7 of row i in its
 * low half and of row i + 8 in its high half; v[d] gets dword d of rows 0..15 */
static ALWAYS void t16x8_regs(const __m512i z[8], __m512i v[8]) {
    __m512i t[8], u[8];
    UNROLL for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(z[2 * i], z[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(z[2 * i], z[2 * i + 1]);
    }
    UNROLL for (int h = 0; h < 2; h++) { /* rows 0-3 / 8-11 (h = 0), rows 4-7 / 12-15 */
        u[4 * h] = _mm512_unpacklo_epi64(t[4 * h], t[4 * h + 2]);         /* dwords 0 and 4 */
        u[4 * h + 1] = _mm512_unpackhi_epi64(t[4 * h], t[4 * h + 2]);     /* 1, 5 */
        u[4 * h + 2] = _mm512_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]); /* 2, 6 */
        u[4 * h + 3] = _mm512_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]); /* 3, 7 */
    }
    const __m512i lo = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13), hi = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
    UNROLL for (int d = 0; d < 4; d++) {
        v[d] = _mm512_permutex2var_epi64(u[d], lo, u[4 + d]);
        v[d + 4] = _mm512_permutex2var_epi64(u[d], hi, u[4 + d]);
    }
}

/* 4 bytes of x in every dword (read through a may_alias type: the compiler then folds the
 * load into vpdpbusd's broadcast operand) */
typedef int32_t __attribute__((may_alias, aligned(1))) i32_alias;
static ALWAYS __m512i bcast4(const int8_t *p) { return _mm512_set1_epi32(*(const i32_alias *)p); }
/* acc + vpdpbusd(q, 4 bytes at p in every dword), the broadcast as the instruction's own
 * memory operand ({1to16}: no separate broadcast instruction) */
static ALWAYS __m512i dp_bcast(__m512i acc, __m512i q, const int8_t *p) {
#if defined(__GNUC__) && !defined(VLMC_NO_ASM)
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(q), "m"(*(const i32_alias *)p));
    return acc;
#else
    return _mm512_dpbusd_epi32(acc, q, bcast4(p));
#endif
}

/* the 16 rows' integer dots of one 64-block with the x8 bytes at x (4 chains: an integer
 * sum, so their split changes nothing) */
static ALWAYS __m512i dots16(const __m512i Q[16], const int8_t *x) {
    __m512i a[4];
    UNROLL for (int c = 0; c < 4; c++) a[c] = _mm512_setzero_si512();
    UNROLL for (int q = 0; q < 16; q++) a[q & 3] = dp_bcast(a[q & 3], Q[q], x + 4 * q);
    return _mm512_add_epi32(_mm512_add_epi32(a[0], a[1]), _mm512_add_epi32(a[2], a[3]));
}

/* v[d]: dword d of the 32 bytes at p[i] + off, for rows i = 0..15 */
static ALWAYS void t16x8(const uint8_t *const *p, size_t off, __m512i v[8]) {
    __m512i z[8];
    UNROLL for (int i = 0; i < 8; i++)
        z[i] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(p[i] + off))),
                                  _mm256_loadu_si256((const __m256i *)(p[i + 8] + off)), 1);
    t16x8_regs(z, v);
}

/* the panel's scales or biases ([N, G]) for the panel's rows rows[0..15] as tab: float32
 * tab[G][16], or bfloat16 kept as stored, groups 2p and 2p + 1 of a row in one dword
 * (uint32 tab[(G + 1) / 2][16]): half the stores, and qp_pvec widens a group's 16 values
 * with one instruction where a block uses them */
static void qp_params(const void *par, int st, int G, const int *rows, void *tab) {
    const size_t rb = (size_t)G * (st == ST_BF16 ? 2 : 4);
    const uint8_t *rp[QP];
    for (int i = 0; i < QP; i++) rp[i] = (const uint8_t *)par + (size_t)rows[i] * rb;
    int g = 0;
    if (st == ST_BF16 && G >= 16) { /* 16 groups (8 pairs) a step */
        uint32_t *t = tab;
        for (int last = 0; !last && g < G - 1;) {
            int g0 = g;
            if (g + 16 > G) g0 = (G - 16) & ~1, last = 1; /* overlaps the step before; whole pairs */
            __m512i v[8];
            t16x8(rp, (size_t)g0 * 2, v);
            UNROLL for (int d = 0; d < 8; d++) _mm512_storeu_si512((void *)(t + (size_t)(g0 / 2 + d) * QP), v[d]);
            g = g0 + 16;
        }
    } else if (st == ST_F32 && G >= 8) {
        float *t = tab;
        while (g < G) {
            const int g0 = g + 8 <= G ? g : G - 8;
            __m512i v[8];
            t16x8(rp, (size_t)g0 * 4, v);
            UNROLL for (int d = 0; d < 8; d++) _mm512_storeu_ps(t + (size_t)(g0 + d) * QP, _mm512_castsi512_ps(v[d]));
            g = g0 + 8;
        }
    }
    for (; g < G; g++) /* the rest (a last odd group, or all of a short row) one by one */
        for (int i = 0; i < QP; i++) {
            const size_t at = (size_t)rows[i] * G + g;
            if (st == ST_BF16) {
                uint16_t *t = (uint16_t *)tab + ((size_t)(g / 2) * QP + i) * 2 + g % 2;
                *t = ((const uint16_t *)par)[at];
            } else {
                ((float *)tab)[(size_t)g * QP + i] = ld_param(par, at, st);
            }
        }
}

/* The panel kernels' prefetch, during block b, of the next panel's codes (at next; pshare
 * bytes a block: the panel as one sequential run spread over the blocks) */
static ALWAYS void pf_panel(const char *next, int b, size_t pshare) {
    for (size_t o = (size_t)b * pshare; o < (size_t)(b + 1) * pshare; o += 64) _mm_prefetch(next + o, PF_HINT);
}

/* and of the next panel's scales and biases (plines lines each), PF_PARAM_LINES lines of
 * each per block: asked for within the first quarter of a panel (float32 parameters of 16
 * rows are a line per block: one a block, the last came just before qp_params read them) */
#ifndef PF_PARAM_LINES
#define PF_PARAM_LINES 4
#endif
static ALWAYS void pf_params(const char *nsc, const char *nbi, size_t plines, int b) {
    UNROLL for (int i = 0; i < PF_PARAM_LINES; i++) {
        const size_t l = (size_t)b * PF_PARAM_LINES + i;
        if (l < plines) {
            _mm_prefetch(nsc + 64 * l, PF_HINT);
            _mm_prefetch(nbi + 64 * l, PF_HINT);
        }
    }
}

/* the 16 rows' parameters of group g from a qp_params table */
static ALWAYS __m512 qp_pvec(int st, const void *tab, int g) {
    if (st != ST_BF16) return _mm512_loadu_ps((const float *)tab + (size_t)g * QP);
    const __m512i w = _mm512_loadu_si512((const uint32_t *)tab + (size_t)(g / 2) * QP);
    return _mm512_castsi512_ps(g % 2 ? _mm512_and_si512(w, _mm512_set1_epi32((int)0xFFFF0000u)) : _mm512_slli_epi32(w, 16));
}

/* A panel of the kernels below: its rows p0 .. p0 + 15 (past N the last row again), their
 * scales' and biases' qp_params tables (ts, tb), and what of the next panel (first row pn,
 * or -1: none) to prefetch while this one runs: its codes as one sequential stream, a
 * block's share of it per block (16 row streams a panel apart are more than the hardware
 * prefetcher follows), and its scales and biases (a contiguous run of 16 rows each, G x 16
 * x 2 or 4 bytes: at most one line per block), which qp_params would otherwise wait for */
typedef struct {
    int rows, idx[QP];
    const uint8_t *rp[QP];
    const char *next, *nsc, *nbi;
    size_t pshare, plines;
} panel_t;

static ALWAYS void panel_open(panel_t *P, const job_t *J, int st, size_t rb, int p0, int pn, float *ts, float *tb) {
    const int G = J->G, nb = J->K / 64;
    P->rows = J->N - p0 < QP ? J->N - p0 : QP;
    for (int i = 0; i < QP; i++) {
        P->idx[i] = p0 + (i < P->rows ? i : P->rows - 1);
        P->rp[i] = (const uint8_t *)J->w + (size_t)P->idx[i] * rb;
    }
    qp_params(J->sc, st, G, P->idx, ts);
    qp_params(J->bi, st, G, P->idx, tb);
    const int pr = pn < 0 ? p0 : pn; /* none: the panel itself again (in cache, no traffic) */
    P->next = (const char *)J->w + (size_t)pr * rb;
    P->pshare = ((size_t)QP * rb / nb + 63) & ~(size_t)63;
    const size_t pb = (size_t)G * (J->st == ST_BF16 ? 2 : 4);
    P->plines = (QP * pb + 63) / 64;
    P->nsc = (const char *)J->sc + (size_t)pr * pb;
    P->nbi = (const char *)J->bi + (size_t)pr * pb;
}

/* during block b: its share of the next panel's codes, scales and biases */
static ALWAYS void panel_prefetch(const panel_t *P, int b) {
    pf_panel(P->next, b, P->pshare);
    pf_params(P->nsc, P->nbi, P->plines, b);
}

/* One panel of 8-bit or 2/3/5/6-bit codes (4-bit codes: qp4_panel): weight rows p0 ..
 * p0 + 15 (past N: the last row again, not stored), all M x rows; pn: the first row of the
 * panel that follows (prefetched meanwhile), or -1. For each block the 16
 * rows' codes become Q[q], dword i = codes 4q .. 4q + 3 of row i. tab: the scales' and the
 * biases' qp_params tables (2 G x 16 floats of room); acc: M x 8 vectors (the pairs'
 * A_0 .. A_7). */
static ALWAYS void qp_panel(const int BITS, const int ST, const job_t *J, int p0, int pn, float *tab, __m512 *acc) {
    const int K = J->K, M = J->M, N = J->N, G = J->G, nb = K / 64, bpg = J->gs / 64;
    const int bits = BITS == BITS_PACKED ? J->bits : BITS;
    const size_t rb = (size_t)K / 8 * bits, bb = (size_t)8 * bits; /* bytes per row, per 64-block */
    float *ts = tab, *tb = tab + (size_t)G * QP;
    panel_t P;
    panel_open(&P, J, ST, rb, p0, pn, ts, tb);
    const int rows = P.rows;
    const uint8_t *const *rp = P.rp;
    for (int i = 0; i < 8 * M; i++) acc[i] = _mm512_setzero_ps();
#if VLMC_CODES_PACKED
    const packed_v u = packed_regs(&J->pk);
#endif
    for (int b = 0, g = 0, in_g = 0; b < nb; b++) {
        const int last = ++in_g == bpg; /* the group's bias term follows, in the same A */
        const size_t off = (size_t)b * bb;
        panel_prefetch(&P, b);
        __m512i Q[16];
        if (BITS == 8) {
            t16x8(rp, off, Q);
            t16x8(rp, off + 32, Q + 8);
        } else {
            __m512i z0[8], z1[8]; /* rows i and i + 8 widened, their halves paired */
            UNROLL for (int i = 0; i < 8; i++) {
                __m512i a, c;
#if VLMC_CODES_PACKED
                a = codes_packed(&u, rp[i] + off);
                c = codes_packed(&u, rp[i + 8] + off);
#else
                uint8_t ea[64], ec[64];
                expand_packed(&J->pk, rp[i] + off, ea, 64);
                expand_packed(&J->pk, rp[i + 8] + off, ec, 64);
                a = _mm512_loadu_si512((const void *)ea);
                c = _mm512_loadu_si512((const void *)ec);
#endif
                z0[i] = _mm512_inserti64x4(a, _mm512_castsi512_si256(c), 1);
                z1[i] = _mm512_shuffle_i64x2(a, c, _MM_SHUFFLE(3, 2, 3, 2));
            }
            t16x8_regs(z0, Q);
            t16x8_regs(z1, Q + 8);
        }
        const __m512 sv = qp_pvec(J->st, ts, g);
        /* not a group's last block: a zero bias term (as the one-row kernel adds one) */
        const __m512 bv = last ? qp_pvec(J->st, tb, g) : _mm512_setzero_ps();
        const int8_t *x8 = J->x8 + 64 * (size_t)b, *x8r = J->x8r ? J->x8r + 64 * (size_t)b : NULL;
        const float *x8s = J->x8s + b, *xs = J->xs + g;
        __m512 *A = acc + (b & 7);
        for (int m = 0; m < M; m++) {
            __m512i d = dots16(Q, x8 + (size_t)m * K);
            if (BITS != 4 && x8r) /* 256 x8 + x8r: the residual's dots in 1/256 steps */
                d = _mm512_add_epi32(_mm512_slli_epi32(d, 8), dots16(Q, x8r + (size_t)m * K));
            __m512 a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sv, _mm512_set1_ps(x8s[(size_t)m * nb])), A[8 * m]);
            A[8 * m] = _mm512_fmadd_ps(bv, _mm512_set1_ps(xs[(size_t)m * G]), a);
        }
        if (last) g++, in_g = 0;
    }
    const __mmask16 keep = (__mmask16)(rows == QP ? 0xFFFFu : (1u << rows) - 1);
    const __m512 bias = J->bias ? _mm512_maskz_loadu_ps(keep, J->bias + p0) : _mm512_setzero_ps();
    for (int m = 0; m < M; m++) {
        const __m512 *A = acc + 8 * m;
        __m512 y = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(A[0], A[1]), _mm512_add_ps(A[2], A[3])),
                                 _mm512_add_ps(_mm512_add_ps(A[4], A[5]), _mm512_add_ps(A[6], A[7])));
        if (J->bias) y = _mm512_add_ps(y, bias);
        _mm512_mask_storeu_ps(J->y + (size_t)m * N + p0, keep, y);
    }
}

/* ---- 4-bit codes: the transpose of block b + 1 ahead of block b's dots ----------------
 * The same arithmetic as qp_panel, for 4-bit codes and M a constant. The transpose of a
 * block (its loads, 24 shuffles, 24 mask and shift instructions) runs on other execution
 * units than vpdpbusd, but behind a block's M x 16 vpdpbusd in program order it waits
 * until they drain: each block then paid its transpose's latency. Here block b + 1's
 * transposed dwords (8 registers; split into low and high nibbles only where used) are
 * made before block b's dots, which leaves room for the dots of up to 8 x rows at once
 * (one accumulator each) in the 32 vector registers. */

/* T x rows' integer dots of one block (codes dwords V, x row t's 64 bytes at x + t K) */
static ALWAYS void qp4_dots(const int T, const __m512i V[8], const int8_t *x, size_t K, __m512i d[]) {
    const int C = T == 1 ? 4 : T < 4 ? 2 : 1; /* chains per row: at least 4 in flight */
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    __m512i a[8][4];
    UNROLL for (int t = 0; t < T; t++) UNROLL for (int c = 0; c < C; c++) a[t][c] = _mm512_setzero_si512();
    UNROLL for (int e = 0; e < 8; e++) {
        const __m512i lo = _mm512_and_si512(V[e], m4), hi = _mm512_and_si512(_mm512_srli_epi16(V[e], 4), m4);
        UNROLL for (int t = 0; t < T; t++) {
            a[t][(2 * e) % C] = dp_bcast(a[t][(2 * e) % C], lo, x + (size_t)t * K + 8 * e);
            a[t][(2 * e + 1) % C] = dp_bcast(a[t][(2 * e + 1) % C], hi, x + (size_t)t * K + 8 * e + 4);
        }
    }
    UNROLL for (int t = 0; t < T; t++) {
        if (C == 1) d[t] = a[t][0];
        else if (C == 2) d[t] = _mm512_add_epi32(a[t][0], a[t][1]);
        else d[t] = _mm512_add_epi32(_mm512_add_epi32(a[t][0], a[t][1]), _mm512_add_epi32(a[t][2], a[t][3]));
    }
}

/* x rows m0 .. m0 + T - 1 of block b (group g): dots, then each pair's float step */
static ALWAYS void qp4_tile(const int T, const job_t *J, const __m512i V[8], int b, int g, int m0, __m512 sv, __m512 bv,
                            __m512 *acc) {
    const size_t K = (size_t)J->K;
    const int nb = J->K / 64, G = J->G;
    __m512i d[8];
    qp4_dots(T, V, J->x8 + (size_t)m0 * K + 64 * (size_t)b, K, d);
    UNROLL for (int t = 0; t < T; t++) {
        const int m = m0 + t;
        __m512 *A = acc + 8 * m + (b & 7);
        const __m512 a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[t]), _mm512_mul_ps(sv, _mm512_set1_ps(J->x8s[(size_t)m * nb + b])), *A);
        *A = _mm512_fmadd_ps(bv, _mm512_set1_ps(J->xs[(size_t)m * G + g]), a);
    }
}

static ALWAYS void qp4_panel(const int M, const job_t *J, int p0, int pn, float *tab, __m512 *acc) {
    const int K = J->K, N = J->N, G = J->G, nb = K / 64, bpg = J->gs / 64;
    const size_t rb = (size_t)K / 2; /* bytes per row; 32 per block */
    float *ts = tab, *tb = tab + (size_t)G * QP;
    panel_t P;
    panel_open(&P, J, J->st, rb, p0, pn, ts, tb);
    const int rows = P.rows;
    const uint8_t *const *rp = P.rp;
    for (int i = 0; i < 8 * M; i++) acc[i] = _mm512_setzero_ps();
    const int nt = (M + 7) / 8; /* tiles of x rows, as even as they come: 9 rows as 5 + 4 */
    __m512i V[8];
    t16x8(rp, 0, V);
    for (int b = 0, g = 0, in_g = 0; b < nb; b++) {
        const int last = ++in_g == bpg; /* the group's bias term follows, in the same A */
        __m512i Vn[8];
        t16x8(rp, (size_t)(b + 1 < nb ? b + 1 : b) * 32, Vn); /* past the last block: that block again */
        panel_prefetch(&P, b);
        const __m512 sv = qp_pvec(J->st, ts, g);
        /* not a group's last block: a zero bias term (as the one-row kernel adds one) */
        const __m512 bv = last ? qp_pvec(J->st, tb, g) : _mm512_setzero_ps();
        UNROLL for (int t = 0; t < nt; t++) {
            const int m0 = t * M / nt, T = (t + 1) * M / nt - m0;
            switch (T) {
            case 1: qp4_tile(1, J, V, b, g, m0, sv, bv, acc); break;
            case 2: qp4_tile(2, J, V, b, g, m0, sv, bv, acc); break;
            case 3: qp4_tile(3, J, V, b, g, m0, sv, bv, acc); break;
            case 4: qp4_tile(4, J, V, b, g, m0, sv, bv, acc); break;
            case 5: qp4_tile(5, J, V, b, g, m0, sv, bv, acc); break;
            case 6: qp4_tile(6, J, V, b, g, m0, sv, bv, acc); break;
            case 7: qp4_tile(7, J, V, b, g, m0, sv, bv, acc); break;
            default: qp4_tile(8, J, V, b, g, m0, sv, bv, acc); break;
            }
        }
        UNROLL for (int e = 0; e < 8; e++) V[e] = Vn[e];
        if (last) g++, in_g = 0;
    }
    const __mmask16 keep = (__mmask16)(rows == QP ? 0xFFFFu : (1u << rows) - 1);
    const __m512 bias = J->bias ? _mm512_maskz_loadu_ps(keep, J->bias + p0) : _mm512_setzero_ps();
    for (int m = 0; m < M; m++) {
        const __m512 *A = acc + 8 * m;
        __m512 y = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(A[0], A[1]), _mm512_add_ps(A[2], A[3])),
                                 _mm512_add_ps(_mm512_add_ps(A[4], A[5]), _mm512_add_ps(A[6], A[7])));
        if (J->bias) y = _mm512_add_ps(y, bias);
        _mm512_mask_storeu_ps(J->y + (size_t)m * N + p0, keep, y);
    }
}

/* A thread's panels: it grabs its next chunk as it starts the last panel of the one it
 * has, so that panel prefetches the next chunk's first (a chunk would start cold) */
#define PANEL_WALK(J, CALL)                                                                        \
    do {                                                                                           \
        int n0, n1, m0 = 0, m1 = 0;                                                                \
        for (int more = grab(J, &n0, &n1); more; n0 = m0, n1 = m1)                                 \
            for (int p = n0; p < n1; p += QP) {                                                    \
                int pn = p + QP;                                                                   \
                if (pn >= n1) pn = (more = grab(J, &m0, &m1)) ? m0 : -1;                           \
                CALL;                                                                              \
            }                                                                                      \
    } while (0)
#define QP4_M(M)                                                                                   \
    static __attribute__((noinline)) void qp4_rows_m##M(job_t *J, float *tab, __m512 *acc) {       \
        PANEL_WALK(J, qp4_panel(M, J, p, pn, tab, acc));                                           \
    }
QP4_M(1) QP4_M(2) QP4_M(3) QP4_M(4) QP4_M(5) QP4_M(6) QP4_M(7) QP4_M(8)
QP4_M(9) QP4_M(10) QP4_M(11) QP4_M(12) QP4_M(13) QP4_M(14) QP4_M(15) QP4_M(16)
static void qp4_rows(job_t *J, float *tab, __m512 *acc) {
    static void (*const fn[QP_MAX_M + 1])(job_t *, float *, __m512 *) = {
        NULL, qp4_rows_m1, qp4_rows_m2, qp4_rows_m3, qp4_rows_m4, qp4_rows_m5, qp4_rows_m6, qp4_rows_m7,
        qp4_rows_m8, qp4_rows_m9, qp4_rows_m10, qp4_rows_m11, qp4_rows_m12, qp4_rows_m13, qp4_rows_m14,
        qp4_rows_m15, qp4_rows_m16};
    fn[J->M](J, tab, acc);
}

#if VLMC_AMX
/* ---- several x rows on AMX tiles ------------------------------------------------------
 * The panel kernels' arithmetic (qp_panel, qp4_panel) with each block's integer dots of
 * 16 weight rows and up to 16 x rows from one tdpbusd: tile A = the 16 rows' 64 codes as
 * unsigned bytes (8-bit codes as stored; 4-bit codes unpacked, a row's even codes then its
 * odd ones), tile B = the x rows' int8 values of the block in the VNNI layout (row q: bytes
 * 4q .. 4q + 3 of x rows 0 .. 15, rows past M zero, in A's code order: amx_prep), C[i][m] =
 * the dot of weight row i and x row m (exact integers, as vpdpbusd's). The float steps of
 * each pair are qp_panel's, op for op, on vectors over the x rows (lane m) instead of the
 * weight rows: the same values rounded in the same order, so the output is the same bits.
 * Up to 8 x rows, tiles B and C are 8 x rows wide and a vector holds two weight rows' pairs.
 * The dots no longer grow with M (one tdpbusd, where vpdpbusd took 16 x M), but the codes'
 * staging (4-bit: unpacked to bytes), the tile loads and stores and the float steps cost
 * about as much as the VNNI kernels take at 8 x rows of 4-bit codes or 4 of 8-bit codes
 * on the Xeon this was measured on (benchmarks/README.md): amx.c's default mode uses them
 * from AMX_MIN_M8 x rows of 8-bit codes and AMX_MIN_M4 of 4-bit codes. */
#ifndef AMX_MIN_M8
#define AMX_MIN_M8 5 /* 8-bit codes: 1.08x the VNNI panels at 5 rows, 1.4x at 8, 1.5x at 16 */
#endif
#ifndef AMX_MIN_M4
#define AMX_MIN_M4 9 /* 4-bit codes: 0.95-1.04x at 8 rows, 1.03-1.2x at 16 */
#endif
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_cfg;

/* the tables every thread reads (job-wide, before the threads start); NULL: out of memory */
static void *amx_prep(job_t *J) {
    const int M = J->M, K = J->K, nb = K / 64, G = J->G, q4 = J->bits == 4, mc = M <= 8 ? 8 : 16;
    const size_t tb = (size_t)nb * 1024, nt = J->x8r ? 2 : 1;
    char *buf = aligned_alloc(64, tb * nt + sizeof(float) * 16 * ((size_t)nb + G));
    if (!buf) return NULL;
    memset(buf, 0, tb * nt + sizeof(float) * 16 * ((size_t)nb + G));
    int8_t *bx = (int8_t *)buf, *bxr = J->x8r ? bx + tb : NULL;
    float *tx8s = (float *)(buf + tb * nt), *txs = tx8s + (size_t)16 * nb;
    int src[64]; /* A's code c of a block, as an index into the block's x8 */
    for (int c = 0; c < 64; c++) {
        const int k = !q4 ? c : c < 32 ? 2 * c : 2 * (c - 32) + 1; /* the code at A's position c */
        src[c] = !q4 ? k : 8 * (k / 8) + (k % 2 ? 4 : 0) + (k % 8) / 2; /* X8_OCTETS */
    }
    for (int m = 0; m < M; m++) {
        for (int b = 0; b < nb; b++) {
            const int8_t *x = J->x8 + (size_t)m * K + 64 * (size_t)b;
            int8_t *t = bx + (size_t)b * 1024 + 4 * m;
            for (int c = 0; c < 64; c++) t[(c / 4) * 4 * mc + c % 4] = x[src[c]];
            if (bxr) {
                const int8_t *xr = J->x8r + (size_t)m * K + 64 * (size_t)b;
                int8_t *tr = bxr + (size_t)b * 1024 + 4 * m;
                for (int c = 0; c < 64; c++) tr[(c / 4) * 4 * mc + c % 4] = xr[c];
            }
            for (int l = m; l < 16; l += mc) tx8s[(size_t)b * 16 + l] = J->x8s[(size_t)m * nb + b];
        }
        for (int g = 0; g < G; g++)
            for (int l = m; l < 16; l += mc) txs[(size_t)g * 16 + l] = J->xs[(size_t)m * G + g];
    }
    J->bx = bx;
    J->bxr = bxr;
    J->tx8s = tx8s;
    J->txs = txs;
    return buf;
}

/* block b's float steps from its dots (c: C as stored, cr: the residual's). MC x rows per
 * tile (8 or 16): vector v holds weight row v's pairs (MC = 16), or rows 2v and 2v + 1 in
 * its halves (MC = 8); tsf, tbf: the panel's scales and biases as float [G][16] */
static ALWAYS void amx_block(const int MC, const int RES, const job_t *J, const int32_t *c, const int32_t *cr, int b,
                             int g, int last, const float *tsf, const float *tbf, __m512 *acc) {
    const __m512 xv = _mm512_load_ps(J->tx8s + (size_t)16 * b), xg = _mm512_load_ps(J->txs + (size_t)16 * g);
    const __m512 sv = _mm512_load_ps(tsf + (size_t)16 * g);
    /* not a group's last block: a zero bias term, as qp_panel adds one */
    const __m512 bv = last ? _mm512_load_ps(tbf + (size_t)16 * g) : _mm512_setzero_ps();
    const __m512i hi8 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    __m512 *A = acc + (b & 7);
    UNROLL for (int v = 0; v < MC; v++) {
        __m512i d = _mm512_load_si512((const void *)(c + 16 * v));
        if (RES) d = _mm512_add_epi32(_mm512_slli_epi32(d, 8), _mm512_load_si512((const void *)(cr + 16 * v)));
        __m512 s, bb;
        if (MC == 16) {
            s = _mm512_set1_ps(tsf[(size_t)16 * g + v]);
            bb = last ? _mm512_set1_ps(tbf[(size_t)16 * g + v]) : _mm512_setzero_ps();
        } else {
            const __m512i at = _mm512_add_epi32(_mm512_set1_epi32(2 * v), hi8);
            s = _mm512_permutexvar_ps(at, sv);
            bb = _mm512_permutexvar_ps(at, bv);
        }
        const __m512 a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(s, xv), A[8 * v]);
        A[8 * v] = _mm512_fmadd_ps(bb, xg, a);
    }
}

/* tile A of block b at a (4-bit codes unpacked, or a last panel's rows copied) */
static ALWAYS void amx_stage_a(const int Q4, const uint8_t *const *rp, int b, uint8_t *a) {
    if (Q4) {
        const __m512i m4 = _mm512_set1_epi8(0x0F);
        UNROLL for (int i = 0; i < QP; i++) { /* bytes 0-31: low nibbles (even codes), 32-63: high */
            const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(rp[i] + (size_t)b * 32)));
            _mm512_store_si512((void *)(a + 64 * i), _mm512_and_si512(_mm512_mask_srli_epi16(v, 0xFFFF0000u, v, 4), m4));
        }
    } else {
        UNROLL for (int i = 0; i < QP; i++)
            _mm512_store_si512((void *)(a + 64 * i), _mm512_loadu_si512((const void *)(rp[i] + (size_t)b * 64)));
    }
}

/* block b's dots on tiles TA (codes), TB (x), TC (C), and the residual's on TBR, TCR
 * (tilezero gives TC a new register: the dots do not wait for the last reader of TC) */
#define AMX_DO(TA, TB, TC, TBR, TCR)                                                               \
    do {                                                                                           \
        _tile_loadd(TA, a, as);                                                                    \
        _tile_loadd(TB, J->bx + (size_t)b * 1024, 4 * MC);                                         \
        _tile_zero(TC);                                                                            \
        _tile_dpbusd(TC, TA, TB);                                                                  \
        if (RES) {                                                                                 \
            _tile_loadd(TBR, J->bxr + (size_t)b * 1024, 4 * MC);                                   \
            _tile_zero(TCR);                                                                       \
            _tile_dpbusd(TCR, TA, TBR);                                                            \
        }                                                                                          \
    } while (0)
/* block sb's C tile TC (and the residual's TCR) to its slot of cbuf (crbuf) */
#define AMX_STORE(TC, TCR)                                                                         \
    do {                                                                                           \
        _tile_stored(TC, cbuf + (size_t)(sb & AMX_SLOTM) * 256, 4 * MC);                                   \
        if (RES) _tile_stored(TCR, crbuf + (size_t)(sb & AMX_SLOTM) * 256, 4 * MC);                        \
    } while (0)

/* One panel (rows p0 .. p0 + 15 as qp_panel; pn the next panel's first row, or -1). w:
 * this thread's buffers (8 KiB of staged A tiles, 8 KiB of C, 8 KiB of the residual's C),
 * acc the pairs' partial sums [16][8] (vectors over x rows). The tiles' work is in flight
 * long after its instructions issue: a tile store right after its dots waits for them, and
 * a vector load of bytes a tile store has not yet written costs far more (measured: a load
 * of the C stored a block before made a block take ~3x as long). So block b's dots issue
 * at step b on tiles of their own (tilezero renames C: no wait for C's last store), its C
 * is stored at step b + 2 (the residual's: b + 1, having fewer tiles), its float steps run
 * at step b + AMX_LAG, and A is staged AMX_STAGE steps ahead. */
#ifndef AMX_LAG
#define AMX_LAG 5
#endif
#ifndef AMX_STAGE
#define AMX_STAGE 4
#endif
#ifndef AMX_SLOTS
#define AMX_SLOTS 8 /* blocks' buffers per thread (a power of 2 above AMX_LAG, AMX_STAGE) */
#endif
#define AMX_SLOTM (AMX_SLOTS - 1)
static ALWAYS void amx_panel(const int MC, const int Q4, const int RES, const job_t *J, int p0, int pn, float *tab,
                             __m512 *acc, uint8_t *w) {
    const int K = J->K, M = J->M, N = J->N, G = J->G, nb = K / 64, bpg = J->gs / 64;
    const size_t rb = Q4 ? (size_t)K / 2 : (size_t)K, bb = Q4 ? 32 : 64; /* bytes per row, per block */
    /* the parameters as qp_panel's tables, then as float32 [G][16] (bfloat16: widened) */
    float *ts = tab, *tb = tab + (size_t)G * QP, *tsf = tb + (size_t)G * QP, *tbf = tsf + (size_t)G * QP;
    panel_t P;
    panel_open(&P, J, J->st, rb, p0, pn, ts, tb);
    const int rows = P.rows;
    const int *idx = P.idx;
    const uint8_t *const *rp = P.rp;
    if (J->st == ST_BF16) {
        for (int g = 0; g < G; g++) {
            _mm512_store_ps(tsf + (size_t)16 * g, qp_pvec(J->st, ts, g));
            _mm512_store_ps(tbf + (size_t)16 * g, qp_pvec(J->st, tb, g));
        }
    } else {
        tsf = ts;
        tbf = tb;
    }
    for (int i = 0; i < 8 * MC; i++) acc[i] = _mm512_setzero_ps();
    uint8_t *abuf = w; /* slot b & 7 */
    int32_t *cbuf = (int32_t *)(w + AMX_SLOTS * 1024), *crbuf = (int32_t *)(w + 2 * AMX_SLOTS * 1024);
    const int staged = Q4 || rows < QP; /* else 8-bit codes: tile A straight from the rows */
    if (staged)
        for (int b = 0; b < AMX_STAGE && b < nb; b++) amx_stage_a(Q4, rp, b, abuf + (size_t)(b & AMX_SLOTM) * 1024);
    /* tiles of block b: A b & 1; B 2 + (b & 1), C 4 + (b & 3); with the residual B 2, 3 and
     * C 4 + 2 (b & 1) and the next */
    for (int b = 0, g = 0, in_g = 0; b < nb + AMX_LAG; b++) { /* g: block b - AMX_LAG's group */
        if (b < nb) {
            panel_prefetch(&P, b);
            const void *a = staged ? (const void *)(abuf + (size_t)(b & AMX_SLOTM) * 1024) : (const void *)(rp[0] + (size_t)b * bb);
            const long as = staged ? 64 : (long)rb;
            if (RES) {
                if (b & 1) AMX_DO(1, 2, 6, 3, 7);
                else AMX_DO(0, 2, 4, 3, 5);
            } else {
                switch (b & 3) {
                case 0: AMX_DO(0, 2, 4, 0, 0); break;
                case 1: AMX_DO(1, 3, 5, 0, 0); break;
                case 2: AMX_DO(0, 2, 6, 0, 0); break;
                default: AMX_DO(1, 3, 7, 0, 0); break;
                }
            }
        }
        const int sb = b - (RES ? 1 : 2);
        if (sb >= 0 && sb < nb) {
            if (RES) {
                if (sb & 1) AMX_STORE(6, 7);
                else AMX_STORE(4, 5);
            } else {
                switch (sb & 3) {
                case 0: AMX_STORE(4, 0); break;
                case 1: AMX_STORE(5, 0); break;
                case 2: AMX_STORE(6, 0); break;
                default: AMX_STORE(7, 0); break;
                }
            }
        }
        if (staged && b + AMX_STAGE < nb) amx_stage_a(Q4, rp, b + AMX_STAGE, abuf + (size_t)((b + AMX_STAGE) & AMX_SLOTM) * 1024);
        const int e = b - AMX_LAG;
        if (e >= 0) {
            const int last = ++in_g == bpg; /* the group's bias term follows, in the same A */
            amx_block(MC, RES, J, cbuf + (size_t)(e & AMX_SLOTM) * 256, crbuf + (size_t)(e & AMX_SLOTM) * 256, e, g, last,
                      tsf, tbf, acc);
            if (last) g++, in_g = 0;
        }
    }
    /* each pair's ((A0 + A1) + (A2 + A3)) + ((A4 + A5) + (A6 + A7)) (+ bias), as qp_panel;
     * then the 16 x 16 block turned back to [x row][weight row] */
    float out[QP * QP] __attribute__((aligned(64))), bias[QP] __attribute__((aligned(64)));
    for (int i = 0; i < QP; i++) bias[i] = J->bias ? J->bias[idx[i]] : 0.f;
    const __m512i hi8 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    for (int v = 0; v < MC; v++) {
        const __m512 *A = acc + 8 * v;
        __m512 y = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(A[0], A[1]), _mm512_add_ps(A[2], A[3])),
                                 _mm512_add_ps(_mm512_add_ps(A[4], A[5]), _mm512_add_ps(A[6], A[7])));
        if (J->bias)
            y = _mm512_add_ps(y, MC == 16 ? _mm512_set1_ps(bias[v])
                                          : _mm512_permutexvar_ps(_mm512_add_epi32(_mm512_set1_epi32(2 * v), hi8),
                                                                  _mm512_load_ps(bias)));
        if (MC == 16) {
            _mm512_store_ps(out + QP * v, y);
        } else { /* rows 2v, 2v + 1 */
            _mm256_store_ps(out + QP * 2 * v, _mm512_castps512_ps256(y));
            _mm256_store_ps(out + QP * (2 * v + 1), _mm512_extractf32x8_ps(y, 1));
        }
    }
    const __mmask16 keep = (__mmask16)(rows == QP ? 0xFFFFu : (1u << rows) - 1);
    const __m512i col = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(QP));
    for (int m = 0; m < M; m++)
        _mm512_mask_storeu_ps(J->y + (size_t)m * N + p0, keep, _mm512_i32gather_ps(col, out + m, 4));
}

#define AMX_ROWS(name, Q4, RES)                                                                    \
    static __attribute__((noinline)) void name(job_t *J, float *tab, __m512 *acc, uint8_t *w) {   \
        if (J->M <= 8) PANEL_WALK(J, amx_panel(8, Q4, RES, J, p, pn, tab, acc, w));                \
        else PANEL_WALK(J, amx_panel(16, Q4, RES, J, p, pn, tab, acc, w));                         \
    }
AMX_ROWS(amx_rows_q4, 1, 0)
AMX_ROWS(amx_rows_q8, 0, 0)
AMX_ROWS(amx_rows_q8r, 0, 1)

/* a thread's share of an AMX job: its tile configuration (per thread, released after) */
static void amx_rows(job_t *J) {
    void *buf = aligned_alloc(64, sizeof(__m512) * 8 * QP + 3 * AMX_SLOTS * 1024 + sizeof(float) * 4 * (size_t)J->G * QP);
    if (!buf) return; /* out of memory: output left as is (as the other paths) */
    __m512 *acc = buf;
    uint8_t *w = (uint8_t *)(acc + 8 * QP);
    float *tab = (float *)(w + 3 * AMX_SLOTS * 1024);
    amx_cfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    const int mc = J->M <= 8 ? 8 : 16; /* x rows per tile: B and C are 4 mc bytes wide */
    for (int t = 0; t < 8; t++) cfg.colsb[t] = t < 2 ? 64 : 4 * mc, cfg.rows[t] = 16;
    _tile_loadconfig(&cfg);
    if (J->bits == 4) amx_rows_q4(J, tab, acc, w);
    else if (J->bx && J->bxr) amx_rows_q8r(J, tab, acc, w);
    else amx_rows_q8(J, tab, acc, w);
    _tile_release();
    free(buf);
}
#endif /* VLMC_AMX */

/* whether the one-row kernel computes this job (4-bit codes: x8 in its order) */
static int qv_m1_ok(const job_t *J) { return J->M == 1 && (J->bits != 4 || J->x8_order == X8_HALVES); }

/* the one-row kernel of each width; the panel kernels of 8-bit and 2/3/5/6-bit codes
 * (4-bit codes: qp4_rows above) */
#define DEF_QV1(name, BITS)                                                                        \
    static __attribute__((noinline)) void name##_1(const job_t *J, int n0, int n1) {               \
        if (J->st == ST_BF16) qv_m1_range(BITS, ST_BF16, J, n0, n1);                               \
        else qv_m1_range(BITS, ST_F32, J, n0, n1);                                                 \
    }
#define DEF_QP(name, BITS)                                                                         \
    static __attribute__((noinline)) void name(job_t *J, float *tab, __m512 *acc) {               \
        if (J->st == ST_BF16) PANEL_WALK(J, qp_panel(BITS, ST_BF16, J, p, pn, tab, acc));          \
        else PANEL_WALK(J, qp_panel(BITS, ST_F32, J, p, pn, tab, acc));                            \
    }                                                                                              \
    DEF_QV1(name, BITS)
DEF_QV1(qp4_rows, 4)
DEF_QP(qp8_rows, 8)
DEF_QP(qpp_rows, BITS_PACKED)

#endif /* VLMC_VNNI */
#endif /* VLMC_SIMD */

/* ---- portable paths (and any bit width): decode a row to float, then dot ----------- */
static float dot_f32(const float *a, const float *b, int K) {
    float s = 0.f;
    int k = 0;
#if VLMC_SIMD
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; k + 16 <= K; k += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), a1);
    }
    s = hsum(_mm256_add_ps(a0, a1));
#endif
    for (; k < K; k++) s += a[k] * b[k];
    return s;
}

static void generic_rows(const job_t *J, int n0, int n1, float *buf) {
    const int K = J->K;
    for (int n = n0; n < n1; n++) {
        const float *wr;
        if (J->kind == 0) {
            wr = (const float *)J->w + (size_t)n * K;
        } else if (J->kind == 1) {
            const uint16_t *h = (const uint16_t *)J->w + (size_t)n * K;
            for (int k = 0; k < K; k++) buf[k] = bf16_to_f32(h[k]);
            wr = buf;
        } else {
            const uint8_t *row = (const uint8_t *)J->w + (size_t)n * K / 8 * J->bits;
            dequant_row_generic(row, K, J->bits, J->gs, J->sc, J->bi, J->st, (size_t)n * J->G, buf);
            wr = buf;
        }
        for (int m = 0; m < J->M; m++) store_out(J, n, m, dot_f32(wr, J->x + (size_t)m * K, K));
    }
}

/* the SIMD kernels cover float32/bfloat16 weights and 2-8-bit codes with float32 or
 * bfloat16 scales; everything else takes the portable path */
static int simd_ok(const job_t *J) {
    if (!VLMC_SIMD) return 0;
    if (J->kind != 2) return 1;
    if (J->st == ST_F16 || J->gs % 32) return 0; /* group loops step by up to 32 codes */
    if (is_packed(J->bits)) return J->K % 64 == 0; /* widened to bytes, 64 codes at a time */
    return J->bits == 8 || (J->bits == 4 && (J->gs == 32 || J->gs % 64 == 0)); /* 64-code blocks */
}

#if VLMC_SIMD
/* 2/3/5/6-bit rows with float x: a few rows at a time widened into scratch (kept in
 * L1/L2), then the 8-bit kernels on that copy (J8 is J with 8-bit rows, row n at
 * scratch + (n - s) * K). */
#ifndef WIDEN_BYTES
#define WIDEN_BYTES 24576
#endif
static void packed_rows(const job_t *J, int n0, int n1, uint8_t *scratch, int rows, float *part) {
    const int K = J->K;
    const size_t rb = (size_t)K / 8 * J->bits;
    job_t J8;
    memcpy(&J8, J, sizeof J8); /* the kernels read J8's fields only */
    J8.bits = 8;
    J8.rowbytes = (size_t)K;
    for (int s = n0; s < n1; s += rows) {
        const int e = s + rows < n1 ? s + rows : n1;
        for (int n = s; n < e; n++) expand_packed(&J->pk, (const uint8_t *)J->w + (size_t)n * rb, scratch + (size_t)(n - s) * K, K);
        J8.w = (const void *)((uintptr_t)scratch - (uintptr_t)s * (uintptr_t)K);
        q8_rows(&J8, s, e, part);
    }
}
#endif

static void gemv_task(void *ctx, int ith, int nth) {
    (void)ith;
    (void)nth;
    job_t *J = ctx;
    int n0, n1;
#if VLMC_SIMD
    if (simd_ok(J)) {
#if VLMC_VNNI
        if (J->x8) {
            if (qv_m1_ok(J)) {
                while (grab(J, &n0, &n1)) {
                    if (J->bits == 4) qp4_rows_1(J, n0, n1);
                    else if (J->bits == 8) qp8_rows_1(J, n0, n1);
                    else qpp_rows_1(J, n0, n1);
                }
                return;
            }
#if VLMC_AMX
            if (J->amx) {
                amx_rows(J);
                return;
            }
#endif
            /* the panel kernels: parameter tables, the pairs' partial sums */
            void *buf = aligned_alloc(64, sizeof(__m512) * 8 * (size_t)J->M + sizeof(float) * 2 * (size_t)J->G * QP);
            if (!buf) return; /* out of memory: output left as is (as the portable path) */
            __m512 *acc = buf;
            float *tab = (float *)(acc + 8 * (size_t)J->M);
            if (J->bits == 4) qp4_rows(J, tab, acc);
            else if (J->bits == 8) qp8_rows(J, tab, acc);
            else qpp_rows(J, tab, acc);
            free(buf);
            return;
        }
#endif
        uint8_t *scratch = NULL;
        int rows = 0;
        if (J->kind == 2 && is_packed(J->bits)) {
            rows = (WIDEN_BYTES / J->K) & ~7;
            if (rows < 8) rows = 8;
            scratch = malloc((size_t)rows * J->K);
        }
        float *part = malloc(sizeof(float) * PART_W * (size_t)J->chunk * J->M);
        if (!part || (J->kind == 2 && is_packed(J->bits) && !scratch)) {
            free(part);
            free(scratch);
            return;
        }
        while (grab(J, &n0, &n1)) {
            if (J->kind == 0) f32_rows(J, n0, n1, part);
            else if (J->kind == 1) bf16_rows(J, n0, n1, part);
            else if (J->bits == 4) q4_rows(J, n0, n1, part);
            else if (is_packed(J->bits)) packed_rows(J, n0, n1, scratch, rows, part);
            else q8_rows(J, n0, n1, part);
        }
        free(part);
        free(scratch);
        return;
    }
#endif
    float *buf = J->kind == 0 ? NULL : malloc(sizeof(float) * (size_t)J->K);
    if (J->kind != 0 && !buf) return; /* caller checks nothing; output left as is */
    while (grab(J, &n0, &n1)) generic_rows(J, n0, n1, buf);
    free(buf);
}

/* float x: K chunks, kc a multiple of the kernel's unit (8, the 4-bit span, or gs) */
static void plan_k(job_t *J) {
    const int K = J->K;
    int unit = DENSE_SEG;
    J->kmain = K & ~31;
    if (J->kind == 0) J->rowbytes = (size_t)K * 4;
    else if (J->kind == 1) J->rowbytes = (size_t)K * 2;
    else {
        J->rowbytes = (size_t)K * J->bits / 8;
        unit = J->bits == 4 ? (J->gs < 64 ? 64 : J->gs) : J->gs;
        J->kmain = J->bits == 4 ? K / unit * unit : K;
    }
    int kc = X_CHUNK_FLOATS / J->M / unit * unit;
    J->kc = kc < unit ? unit : kc;
    J->long_rows = (long)J->M * K > X_CHUNK_FLOATS;
    if (J->M < CHUNK_MIN_M || J->x8) J->kc = J->kmain; /* one x row: keep the weight stream sequential */
    if (J->kc < 1) J->kc = 1;
}

static void run_gemv(job_t *J, double wbytes, int n_threads) {
    int nth = eff_threads(n_threads, wbytes, J->N);
    J->chunk = pick_chunk(J->N, nth);
    J->nth = nth;
    J->shrink = 0;
    if (J->x8) J->chunk = (J->chunk + QP - 1) / QP * QP; /* whole panels */
#if VLMC_VNNI
    if (J->x8 && !qv_m1_ok(J)) J->shrink = SHRINK_CHUNKS; /* the panel kernels */
#endif
    plan_k(J);
    atomic_store(&J->next, 0);
    void *amx = NULL;
#if VLMC_AMX
    /* the panel kernels' jobs of 4- and 8-bit codes (mode 1: 8-bit codes from 5 x rows,
     * 4-bit codes from 9, where the tiles measured faster); out of memory for the tables:
     * VNNI */
    J->amx = 0;
    if (J->x8 && !qv_m1_ok(J) && (J->bits == 4 || J->bits == 8)) {
        const int mode = amx_mode();
        if (mode == 2 || (mode == 1 && J->M >= (J->bits == 8 ? AMX_MIN_M8 : AMX_MIN_M4)))
            J->amx = (amx = amx_prep(J)) != NULL;
    }
#endif
    run_parallel(gemv_task, J, nth);
    free(amx);
}

/* The float-x SIMD kernels exist for M in {1, 2, 3, 4, 8}: M = 5..7 runs as 8 on
 * zero-padded copies of x (the extra outputs are dropped). Returns nonzero when out of
 * memory. */
static int gemv_padded(job_t *J, double wbytes, int n_threads) {
    const int M = J->M, K = J->K, N = J->N, G = J->G;
    float *buf = calloc((size_t)8 * (2 * (size_t)K + G) + (size_t)8 * N, sizeof(float));
    if (!buf) return -5;
    float *x8 = buf, *xq8 = x8 + (size_t)8 * K, *xs8 = xq8 + (size_t)8 * K, *y8 = xs8 + (size_t)8 * G;
    const float *x = J->x, *xq = J->xq, *xs = J->xs;
    float *y = J->y;
    memcpy(x8, x, sizeof(float) * (size_t)M * K);
    memcpy(xq8, xq, sizeof(float) * (size_t)M * K);
    if (xs) memcpy(xs8, xs, sizeof(float) * (size_t)M * G);
    J->M = 8;
    J->x = x8;
    J->xq = xq == x ? x8 : xq8;
    J->xs = xs ? xs8 : NULL;
    J->y = y8;
    run_gemv(J, wbytes, n_threads);
    memcpy(y, y8, sizeof(float) * (size_t)M * N);
    free(buf);
    return 0;
}

/* Larger M: x in slices (16 rows for the panel kernels, else 8; W is re-read per slice). */
static int gemv_sliced(job_t *J, double wbytes, int n_threads) {
    const int M = J->M, N = J->N, S = J->x8 ? QP_MAX_M : 8;
    const float *x = J->x, *xq = J->xq, *xs = J->xs;
    const int8_t *x8 = J->x8, *x8r = J->x8r;
    const float *x8s = J->x8s;
    float *y = J->y;
    int rc = 0;
    for (int m0 = 0; m0 < M && !rc; m0 += S) {
        J->M = M - m0 < S ? M - m0 : S;
        J->x = x + (size_t)m0 * J->K;
        J->xq = xq + (size_t)m0 * J->K;
        J->xs = xs ? xs + (size_t)m0 * J->G : NULL;
        J->y = y + (size_t)m0 * N;
        if (x8) {
            J->x8 = x8 + (size_t)m0 * J->K;
            J->x8r = x8r ? x8r + (size_t)m0 * J->K : NULL;
            J->x8s = x8s + (size_t)m0 * (J->K / 64);
        }
        if (simd_ok(J) && J->M > 4 && J->M < 8 && !x8) rc = gemv_padded(J, wbytes, n_threads);
        else run_gemv(J, wbytes, n_threads);
    }
    return rc;
}

/* ------------------------------------------------------------------------------------ */
/* public API. Return 0 on success, a negative code for bad arguments or no memory.      */

int vlmc_gemv_f32(const float *x, int M, int K, const float *w, int N, const float *bias, float *y,
                  int n_threads) {
    if (M < 1 || K < 1 || N < 1) return -1;
    job_t J = {.kind = 0, .M = M, .N = N, .K = K, .x = x, .xq = x, .w = w, .bias = bias, .y = y};
    return gemv_sliced(&J, 4.0 * N * K, n_threads);
}

int vlmc_gemv_bf16(const float *x, int M, int K, const uint16_t *w, int N, const float *bias, float *y,
                   int n_threads) {
    if (M < 1 || K < 1 || N < 1) return -1;
    job_t J = {.kind = 1, .M = M, .N = N, .K = K, .x = x, .xq = x, .w = w, .bias = bias, .y = y};
    return gemv_sliced(&J, 2.0 * N * K, n_threads);
}

/* 2- to 8-bit GEMVs with int8 activations (VNNI); vlmc_set_int8_x(0) turns them off */
static int int8_x = 1;
void vlmc_set_int8_x(int on) { int8_x = on; }
/* the rounding residual of x for 8-bit codes (x8_block); off only to measure it */
int vlmc_x8_residual = 1;
void vlmc_set_x8_residual(int on) { vlmc_x8_residual = on; }
int vlmc_int8_x_available(void) { return VLMC_VNNI; }
/* whether 2/3/5/6-bit codes with int8 x are read in place (codes_packed: AVX512-VBMI),
 * at the speed per byte of the 4- or 8-bit copy they would otherwise be widened into at load */
int vlmc_packed_direct(void) { return VLMC_VNNI && VLMC_CODES_PACKED; }

int vlmc_gemv_q(const float *x, int M, int K, const uint32_t *w, const void *scales, const void *biases,
                int st, int N, int bits, int gs, const float *bias, float *y, int n_threads) {
    int rc = check_q(K, N, bits, gs, st);
    if (rc || M < 1) return rc ? rc : -1;
    const int G = K / gs;
    float *xs = malloc(sizeof(float) * (size_t)M * G);
    float *xq = NULL;
    if (!xs) return -5;
    job_t J = {.kind = 2, .M = M, .N = N, .K = K, .x = x, .xq = x, .xs = xs, .w = w, .sc = scales,
               .bi = biases, .st = st, .bits = bits, .gs = gs, .G = G, .bias = bias, .y = y};
    if (is_packed(bits)) packed_init(&J.pk, bits);
    const int use8 = VLMC_VNNI && gs % 64 == 0 && int8_x && simd_ok(&J);
    if (!use8) { /* float x: its group sums (bias terms) and, for 4 bits, the permuted copy */
        for (int m = 0; m < M; m++)
            for (int g = 0; g < G; g++) {
                float s = 0.f;
                for (int i = 0; i < gs; i++) s += x[(size_t)m * K + (size_t)g * gs + i];
                xs[(size_t)m * G + g] = s;
            }
        if (bits == 4 && simd_ok(&J)) { /* the 4-bit kernel's x permutation (see q4_block) */
            xq = malloc(sizeof(float) * (size_t)M * K);
            if (!xq) { free(xs); return -5; }
            const int span = gs < 64 ? 64 : gs, full = K / span * span;
            for (int m = 0; m < M; m++) {
                const float *xr = x + (size_t)m * K;
                float *o = xq + (size_t)m * K;
                for (int kb = 0; kb < full; kb += 64)
                    for (int l = 0; l < 8; l++)
                        for (int j = 0; j < 8; j++) o[kb + 8 * j + l] = xr[kb + 8 * l + j];
                memcpy(o + full, xr + full, sizeof(float) * (size_t)(K - full));
            }
            J.xq = xq;
        }
    }
    int8_t *x8 = NULL, *x8r = NULL;
    float *x8s = NULL;
#if VLMC_VNNI
    if (use8) { /* see qp_panel */
        /* 8-bit weights also get x's rounding residual: one int8 rounding of x is as large
         * as their own error, while 2-6-bit weights' own error dwarfs it. It costs a second
         * vpdpbusd per 4 codes and x row. */
        const int residual = bits == 8 && vlmc_x8_residual;
        const int order = bits != 4 ? X8_NATURAL : M == 1 ? X8_HALVES : X8_OCTETS;
        J.x8_order = order;
        x8 = malloc((size_t)M * K * (residual ? 2 : 1));
        x8s = malloc(sizeof(float) * (size_t)M * (K / 64));
        if (!x8 || !x8s) { free(x8); free(x8s); free(xs); return -5; }
        x8r = residual ? x8 + (size_t)M * K : NULL;
        for (int m = 0; m < M; m++) {
            const float *xr = x + (size_t)m * K;
            int8_t *q = x8 + (size_t)m * K, *qr = x8r ? x8r + (size_t)m * K : NULL;
            float *xg = xs + (size_t)m * G;
            for (int kb = 0; kb < K; kb += 64) {
                int sum = 0;
                /* X8_HALVES: blocks A, B of a 128-aligned pair as A even, B even, A odd,
                 * B odd (a last lone block: its even, then odd values) */
                const int pair = (kb & ~127) + 128 <= K;
                const size_t at = order == X8_HALVES && pair ? (size_t)(kb & ~127) + (kb & 64 ? 32 : 0) : (size_t)kb;
                const float sc = x8_block(xr + kb, order, q + at, pair ? 64 : 32, qr ? qr + kb : NULL, &sum);
                x8s[(size_t)m * (K / 64) + kb / 64] = sc;
                /* the bias terms must see the same (quantized) x as the codes: the minimum
                 * and the codes' mean cancel, and with exact x here the rounding would not */
                if (kb % gs == 0) xg[kb / gs] = 0.f;
                xg[kb / gs] += sc * (float)sum;
            }
        }
        J.x8 = x8;
        J.x8r = x8r;
        J.x8s = x8s;
    }
#endif
    rc = gemv_sliced(&J, (double)N * K * bits / 8, n_threads);
    free(x8);
    free(x8s);
    free(xq);
    free(xs);
    return rc;
}
