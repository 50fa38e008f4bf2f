/* vlmc CPU kernels: y[M, N] = x[M, K] @ W[N, K]^T (+ bias) for small M (decode).
 *
 * Decode is bound by the bytes of W read per token, so W stays in its stored form
 * (float32, bfloat16, or MLX affine-quantized codes + per-group scales/biases) and is
 * streamed once; x (M <= 8 rows, float32) stays in cache. All arithmetic is float32.
 *
 * Quantized layout (MLX "affine", verified against mx.quantize/mx.dequantize for bits
 * 2, 3, 4, 5, 6, 8): each row of W is one little-endian bit stream of K codes, `bits`
 * bits each, stored as uint32 words; code k occupies stream bits [k*bits, (k+1)*bits)
 * (codes of 3/5/6 bits straddle word and byte boundaries). Row stride is K*bits/32
 * words. scales/biases are [N, K/group_size]; w = scale*q + bias.
 *
 * For a group g the kernels use  sum_k x_k (s_g q_k + b_g) = s_g sum_k x_k q_k
 * + b_g sum_k x_k : the group sums of x are computed once per call, so the inner loop
 * only converts codes to float and multiplies by x.
 *
 * AVX2+FMA paths are used when the compiler targets them (-march=native on a machine
 * that has them; with AVX-512VL the same intrinsics get 32 registers and wider kernel
 * configurations); otherwise a portable scalar path computes the same thing. The SIMD
 * kernels cover float32/bfloat16 weights and 4/8-bit codes; 2/3/5/6-bit codes are
 * widened to bytes (in registers with AVX512-VBMI, else a few rows into a buffer) for the
 * 8-bit kernels; the portable path decodes a row at a time into a float buffer.
 *
 * What keeps the weight stream at memory speed:
 * - one weight row at a time when x fits in L1, so consecutive rows form a single
 *   sequential stream for the hardware prefetcher (interleaved rows break it up);
 * - several rows per block when x is long (K ~ 9k), sharing each x load;
 * - K chunks of 16 KiB of x for M >= 2 so x stays in L1, with software prefetch of the
 *   weights (the hardware prefetcher falls behind once per-byte compute grows).
 * Work is split over output rows (dynamic chunks) between the calling thread and a small
 * persistent pthread pool (workers spin ~200 us, then sleep on a condition variable).
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

typedef struct {
    int kind;          /* 0 f32, 1 bf16, 2 quantized */
    int M, N, K;
    const float *x;    /* [M, K] natural layout */
    const float *xq;   /* quantized: x permuted for the 4-bit kernel, else == x */
    const float *xs;   /* quantized: [M, G] group sums of x */
    const int8_t *x8;  /* codes, VNNI: x as int8 per 64-block, in the codes' order (see qv_block) */
    const int8_t *x8r; /* 8-bit codes: x's rounding residual in 1/256 steps (x8_block), or NULL */
    const float *x8s;  /* its scale per 64-block (with x8r: the scale of 256 x8 + x8r) */
    const void *w;
    const void *sc, *bi;
    int st;            /* scales/biases type */
    int bits, gs, G;
    packed_t pk;       /* 2/3/5/6-bit codes: how to widen them (packed_init) */
    const float *bias; /* [N] or NULL */
    float *y;          /* [M, N] */
    int kc;            /* K elements per chunk (x chunk stays in L1) */
    int kmain;         /* K covered by the SIMD blocks (4-bit: whole 64-spans) */
    int long_rows;     /* M x K floats of x exceed X_CHUNK_FLOATS (pick the long-row tables) */
    int bias_folded;   /* the block kernel adds the bias terms itself (qv_block), not q_finish */
    size_t rowbytes;   /* bytes of one weight row */
    int chunk;
    _Atomic int next;
} job_t;

static ALWAYS int grab(job_t *J, int *n0, int *n1) {
    int s = atomic_fetch_add_explicit(&J->next, J->chunk, memory_order_relaxed);
    if (s >= J->N) return 0;
    *n0 = s;
    *n1 = s + J->chunk < J->N ? s + J->chunk : J->N;
    return 1;
}

/* sum_g biases[n, g] * xs[m, g] */
/* sum_{g < G} p[n, g] * xs[m, g] for the per-group parameters p (biases or scales) */
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
        for (; g + 8 <= G; g += 8) {
            __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(b + g)));
            acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(h, 16)), _mm256_loadu_ps(xs + g), acc);
        }
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    s = _mm_cvtss_f32(h);
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
/* The one-x-row kernel (qv_m1_range) computes faster, so it reaches further ahead, into
 * L2 (its x and the codes in flight would crowd the L1). */
#ifndef PF_M1
#define PF_M1 8192
#endif
static ALWAYS void pf(const void *p, size_t off) {
    if (PF_DIST > 0 && off > 0) _mm_prefetch((const char *)p + off, _MM_HINT_T0);
}
static ALWAYS void pf_l2(const void *p, size_t off) {
    if (PF_DIST > 0 && off > 0) _mm_prefetch((const char *)p + off, _MM_HINT_T1);
}

/* Every block function below adds, for R weight rows n.. and M activation rows, the
 * partial dot products over k in [k0, k1) to part[r * M + m]. The range drivers walk
 * K in chunks (J->kc) so that the x chunk stays in L1 while many weight rows pass. */

/* ---- float32 / bfloat16 weights: P accumulators per (row, activation) -------------- */
static ALWAYS void dense_block(const int R, const int M, const int P, const int BF, const job_t *J, int n,
                               int k0, int k1, float *part, size_t pfo) {
    const int K = J->K;
    __m256 acc[4][8][4];
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int m = 0; m < M; m++) UNROLL for (int p = 0; p < P; p++)
        acc[r][m][p] = _mm256_setzero_ps();
    const float *wf = (const float *)J->w + (size_t)n * K;
    const uint16_t *wh = (const uint16_t *)J->w + (size_t)n * K;
    int k = k0;
    for (; k + 8 * P <= k1; k += 8 * P) {
        if (pfo)
            UNROLL for (int r = 0; r < R; r++)
                pf(BF ? (const void *)(wh + (size_t)r * K + k) : (const void *)(wf + (size_t)r * K + k), pfo);
        UNROLL for (int p = 0; p < P; p++) {
            __m256 wv[4];
            UNROLL for (int r = 0; r < R; r++)
                wv[r] = BF ? ld8_bf16(wh + (size_t)r * K + k + 8 * p) : _mm256_loadu_ps(wf + (size_t)r * K + k + 8 * p);
            UNROLL for (int m = 0; m < M; m++) {
                __m256 xv = _mm256_loadu_ps(J->x + (size_t)m * K + k + 8 * p);
                UNROLL for (int r = 0; r < R; r++) acc[r][m][p] = _mm256_fmadd_ps(wv[r], xv, acc[r][m][p]);
            }
        }
    }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int m = 0; m < M; m++) {
        __m256 a = acc[r][m][0];
        UNROLL for (int p = 1; p < P; p++) a = _mm256_add_ps(a, acc[r][m][p]);
        float s = hsum(a);
        for (int kk = k; kk < k1; kk++)
            s += (BF ? bf16_to_f32(wh[(size_t)r * K + kk]) : wf[(size_t)r * K + kk]) * J->x[(size_t)m * K + kk];
        part[r * M + m] += s;
    }
}

/* scale vector for 64 consecutive codes of group `off` (gs == 32: groups off, off+1) */
static ALWAYS __m256 scale_vec(const int ST, const job_t *J, size_t off, int two) {
    if (two) {
        float s0 = ld_param(J->sc, off, ST), s1 = ld_param(J->sc, off + 1, ST);
        return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(s0)), _mm_set1_ps(s1), 1);
    }
    return _mm256_set1_ps(ld_param(J->sc, off, ST));
}

/* ---- 4-bit: a 32-byte load holds 8 words = 64 codes; nibble j of word l is code 8l+j.
 * x is pre-permuted per 64-block so that xq[8j + l] = x[8l + j]: shifting the whole
 * vector by 4j and masking then yields 8 codes that pair with 8 contiguous floats.
 * FOLD: accumulate q*x over a span (64 codes, or one group if larger) and apply the
 * scale once per span (small M); otherwise scale the codes first (fewer registers).
 * Covers whole spans only; the last half-span (gs == 32, K % 64 == 32) is done by
 * q_finish. ------------------------------------------------------------------------- */
static ALWAYS void q4_block(const int R, const int M, const int P, const int FOLD, const int ST, const job_t *J,
                            int n, int k0, int k1, float *part, size_t pfo) {
    const int K = J->K, gs = J->gs, G = J->G;
    const int span = gs < 64 ? 64 : gs, two = gs < 64;
    const size_t ws = (size_t)K / 8; /* words per row */
    const uint32_t *w = (const uint32_t *)J->w + (size_t)n * ws;
    const __m256i mask = _mm256_set1_epi32(0xF);
    __m256 tot[4][8];
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int m = 0; m < M; m++) tot[r][m] = _mm256_setzero_ps();
    for (int ks = k0; ks < k1; ks += span) {
        __m256 sv[4], acc[4][8][4];
        UNROLL for (int r = 0; r < R; r++) sv[r] = scale_vec(ST, J, (size_t)(n + r) * G + (size_t)ks / gs, two);
        if (FOLD)
            UNROLL for (int r = 0; r < R; r++) UNROLL for (int m = 0; m < M; m++) UNROLL for (int p = 0; p < P; p++)
                acc[r][m][p] = _mm256_setzero_ps();
        for (int kb = ks; kb < ks + span; kb += 64) {
            __m256i v[4];
            const uint32_t *wb = w + ((unsigned)kb >> 3);
            UNROLL for (int r = 0; r < R; r++) {
                pf(wb + r * ws, pfo);
                v[r] = _mm256_loadu_si256((const __m256i *)(wb + r * ws));
            }
            UNROLL for (int j = 0; j < 8; j++) {
                __m256 q[4];
                UNROLL for (int r = 0; r < R; r++) {
                    __m256i t = j ? _mm256_srli_epi32(v[r], 4 * j) : v[r];
                    if (j < 7) t = _mm256_and_si256(t, mask);
                    q[r] = _mm256_cvtepi32_ps(t);
                    if (!FOLD) q[r] = _mm256_mul_ps(q[r], sv[r]);
                }
                UNROLL for (int m = 0; m < M; m++) {
                    __m256 xv = _mm256_loadu_ps(J->xq + (size_t)m * K + kb + 8 * j);
                    UNROLL for (int r = 0; r < R; r++) {
                        if (FOLD) acc[r][m][j % P] = _mm256_fmadd_ps(q[r], xv, acc[r][m][j % P]);
                        else tot[r][m] = _mm256_fmadd_ps(q[r], xv, tot[r][m]);
                    }
                }
            }
        }
        if (FOLD)
            UNROLL for (int r = 0; r < R; r++) UNROLL for (int m = 0; m < M; m++) {
                __m256 a = acc[r][m][0];
                UNROLL for (int p = 1; p < P; p++) a = _mm256_add_ps(a, acc[r][m][p]);
                tot[r][m] = _mm256_fmadd_ps(a, sv[r], tot[r][m]);
            }
    }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int m = 0; m < M; m++) part[r * M + m] += hsum(tot[r][m]);
}

#if VLMC_VNNI
#define BITS_PACKED 0 /* qv kernels' BITS for 2/3/5/6-bit codes (the width is J->bits) */
/* ---- codes x int8 activations (up to 8 activation rows per pass; AVX512-VNNI). Per
 * 64-block, x is rounded to int8 with its own scale (x8s); for 8-bit codes its rounding
 * residual too (x8r, x8_block). For byte codes (8-bit, and 2/3/5/6-bit widened in
 * registers) x8 is in natural order. For 4-bit codes the low nibbles of a block's 32 code
 * bytes hold its even codes and the high nibbles its odd ones, so x8 holds each block's
 * even values, then its odd values; two blocks that share a 128-aligned pair interleave
 * those halves (A even, B even, A odd, B odd: x8_offsets), so one 64-byte load of codes
 * (two blocks) pairs with two 64-byte loads of x. vpdpbusd leaves each block's integer
 * dot in 8 lanes; per 8 blocks a transpose-add folds them into one vector of 8 dots that
 * one FMA scales by (weight group scale x x's block scale): ~6 instructions per 64 codes
 * and one FMA dependency per 512 codes, where a per-block form needs ~13 and one FMA per
 * block (a dependency chain that bounds it when the codes come from cache). The bias
 * terms (q_finish) use group sums of the rounded x, so the minimum and the codes' mean
 * cancel as they do without rounding. Needs gs % 64 == 0. */

/* where block kb's even and odd halves of x8 start (4-bit codes), see above */
static ALWAYS size_t x8_even(int kb, int K) {
    const int base = kb & ~127;
    return base + 128 <= K ? (size_t)base + (kb & 64 ? 32 : 0) : (size_t)kb;
}
static ALWAYS size_t x8_odd_gap(int kb, int K) { return (kb & ~127) + 128 <= K ? 64 : 32; }

/* the 8 weight-group scales of blocks kb .. kb + 448 of row n */
static ALWAYS __m256 scale8(const int ST, const job_t *J, int n, int kb) {
    const size_t off = (size_t)n * J->G + (size_t)kb / J->gs;
    if (J->gs == 64) return ST == ST_BF16 ? ld8_bf16((const uint16_t *)J->sc + off) : _mm256_loadu_ps((const float *)J->sc + off);
    if (J->gs == 128) {
        const __m128 v = ST == ST_BF16 ? _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)((const uint16_t *)J->sc + off))), 16))
                                       : _mm_loadu_ps((const float *)J->sc + off);
        return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
    }
    float t[8];
    for (int i = 0; i < 8; i++) t[i] = ld_param(J->sc, (size_t)n * J->G + (size_t)(kb + 64 * i) / J->gs, ST);
    return _mm256_loadu_ps(t);
}

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

/* the folded bias terms' 8 group biases of row n from block kb (gs == 64), else zeros */
static ALWAYS __m256 bias8(const int ST, const job_t *J, int n, int kb) {
    const size_t bo = (size_t)n * J->G + (size_t)kb / 64;
    return !J->bias_folded ? _mm256_setzero_ps()
           : ST == ST_BF16 ? ld8_bf16((const uint16_t *)J->bi + bo) : _mm256_loadu_ps((const float *)J->bi + bo);
}

/* tot + 8 blocks' integer dots x (weight scale x x's block scale) + their bias terms, x row m */
static ALWAYS __m256 acc8(const job_t *J, int m, int kb, __m256i dots, __m256 sv, __m256 bv, __m256 tot) {
    const __m256 xs = _mm256_loadu_ps(J->x8s + (size_t)m * (J->K / 64) + (kb >> 6));
    tot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), _mm256_mul_ps(sv, xs), tot);
    if (J->bias_folded) /* sum_g b_g * (group sum of rounded x), 8 groups */
        tot = _mm256_fmadd_ps(bv, _mm256_loadu_ps(J->xs + (size_t)m * J->G + (kb >> 6)), tot);
    return tot;
}

/* 8 blocks (512 codes) from kb, 4-bit codes, kb % 128 == 0 */
static ALWAYS void qv4_wide(const int R, const int M, const int ST, const int L2, const job_t *J, int n, int kb,
                            __m256 tot[4][8], size_t pfo) {
    const int K = J->K;
    const size_t row = (size_t)K / 2;
    const __m512i m4 = _mm512_set1_epi8(0x0F), z = _mm512_setzero_si512();
    UNROLL for (int r = 0; r < R; r++) {
        const uint8_t *wb = (const uint8_t *)J->w + (size_t)(n + r) * row + (size_t)kb / 2;
        __m512i lo[4], hi[4];
        UNROLL for (int i = 0; i < 4; i++) {
            if (L2) pf_l2(wb + 64 * i, pfo);
            else pf(wb + 64 * i, pfo);
            const __m512i v = _mm512_loadu_si512((const void *)(wb + 64 * i));
            lo[i] = _mm512_and_si512(v, m4);
            hi[i] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        }
        const __m256 sv = scale8(ST, J, n + r, kb), bv = bias8(ST, J, n + r, kb);
        UNROLL for (int m = 0; m < M; m++) {
            const int8_t *xb = J->x8 + (size_t)m * K + kb;
            __m512i a[4];
            UNROLL for (int i = 0; i < 4; i++) {
                a[i] = _mm512_dpbusd_epi32(z, lo[i], _mm512_loadu_si512((const void *)(xb + 128 * i)));
                a[i] = _mm512_dpbusd_epi32(a[i], hi[i], _mm512_loadu_si512((const void *)(xb + 128 * i + 64)));
            }
            tot[r][m] = acc8(J, m, kb, fold8(a[0], a[1], a[2], a[3]), sv, bv, tot[r][m]);
        }
    }
}

/* tot[m] += 8 blocks' (512 codes from kb, one byte each in c[0..7], natural order) int8
 * dots with x row m, scaled, with row n's folded bias terms: each block's 16 lanes are
 * first halved into 8, two blocks per vector, for fold8 */
static ALWAYS void bytes_dots(const int M, const int ST, const job_t *J, int n, int kb, const __m512i c[8],
                              __m256 tot[8]) {
    const __m512i z = _mm512_setzero_si512();
    const __m256 sv = scale8(ST, J, n, kb), bv = bias8(ST, J, n, kb);
    UNROLL for (int m = 0; m < M; m++) {
        const int8_t *xb = J->x8 + (size_t)m * J->K + kb, *xrb = J->x8r ? J->x8r + (size_t)m * J->K + kb : NULL;
        __m512i a[4];
        UNROLL for (int i = 0; i < 4; i++) {
            __m512i p0 = _mm512_dpbusd_epi32(z, c[2 * i], _mm512_loadu_si512((const void *)(xb + 128 * i)));
            __m512i p1 = _mm512_dpbusd_epi32(z, c[2 * i + 1], _mm512_loadu_si512((const void *)(xb + 128 * i + 64)));
            if (xrb) { /* 256 x8 + x8r: the residual's dots added in 1/256 steps */
                p0 = _mm512_dpbusd_epi32(_mm512_slli_epi32(p0, 8), c[2 * i], _mm512_loadu_si512((const void *)(xrb + 128 * i)));
                p1 = _mm512_dpbusd_epi32(_mm512_slli_epi32(p1, 8), c[2 * i + 1],
                                         _mm512_loadu_si512((const void *)(xrb + 128 * i + 64)));
            }
            a[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(p0, p1, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_i32x4(p0, p1, _MM_SHUFFLE(3, 2, 3, 2)));
        }
        tot[m] = acc8(J, m, kb, fold8(a[0], a[1], a[2], a[3]), sv, bv, tot[m]);
    }
}

/* 8 blocks (512 codes) from kb, 8-bit codes (natural order, one block per 64-byte load) */
static ALWAYS void qv8_wide(const int R, const int M, const int ST, const int L2, const job_t *J, int n, int kb,
                            __m256 tot[4][8], size_t pfo) {
    const int K = J->K;
    UNROLL for (int r = 0; r < R; r++) {
        const uint8_t *wb = (const uint8_t *)J->w + (size_t)(n + r) * K + kb;
        __m512i c[8];
        /* One x row (qv_m1_range): prefetched PF_M1 bytes ahead into L2, not L1, where
         * the codes would crowd out x (doubled by its rounding residual for 8-bit codes). */
        if (L2) UNROLL for (int i = 0; i < 8; i++) pf_l2(wb + 64 * i, pfo);
        UNROLL for (int i = 0; i < 8; i++) c[i] = _mm512_loadu_si512((const void *)(wb + 64 * i));
        bytes_dots(M, ST, J, n + r, kb, c, tot[r]);
    }
}

#if VLMC_CODES_PACKED
/* qv8_wide on packed (2/3/5/6-bit) codes, widened in registers (8 x 8 * bits bytes per
 * step), prefetched into L2 like the 4-bit one-row kernel: they stream from memory at
 * bits / 8 bytes per code */
static ALWAYS void qvp_wide(const int R, const int M, const int ST, const int L2, const job_t *J, const packed_v *u,
                            int n, int kb, __m256 tot[4][8], size_t pfo) {
    const int K = J->K, bits = J->bits;
    UNROLL for (int r = 0; r < R; r++) {
        const uint8_t *wb = (const uint8_t *)J->w + (size_t)(n + r) * (K / 8 * bits) + (size_t)kb / 8 * bits;
        for (int i = 0; i < bits; i++) { /* 512 codes: `bits` cache lines */
            if (L2) pf_l2(wb + 64 * i, pfo);
            else pf(wb + 64 * i, pfo);
        }
        __m512i c[8];
        UNROLL for (int i = 0; i < 8; i++) c[i] = codes_packed(u, wb + 8 * bits * i);
        bytes_dots(M, ST, J, n + r, kb, c, tot[r]);
    }
}
#endif

/* Rows n .. n + R - 1, codes k0 .. k1: the dot products accumulate in tot (lanes to be
 * summed) and part (scalar bias terms of blocks outside whole 512-steps). BITS: 4, 8 or
 * BITS_PACKED (2/3/5/6-bit codes widened in registers; the width is J->bits). */
static ALWAYS void qv_acc(const int BITS, const int R, const int M, const int ST, const int L2, const job_t *J, int n,
                          int k0, int k1, __m256 tot[4][8], float *part, size_t pfo) {
    const int K = J->K, gs = J->gs, G = J->G, nb = K / 64, B = BITS == BITS_PACKED ? J->bits : BITS;
    const size_t row = (size_t)K * B / 8; /* bytes per weight row */
    const uint8_t *w = (const uint8_t *)J->w + (size_t)n * row;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
#if VLMC_CODES_PACKED
    const packed_v u = packed_regs(&J->pk);
#endif
    int kb = k0;
    if (BITS == 4) /* k0 is 128-aligned (plan_k) */
        for (; kb + 512 <= k1; kb += 512) qv4_wide(R, M, ST, L2, J, n, kb, tot, pfo);
#if VLMC_CODES_PACKED
    else if (BITS == BITS_PACKED && M == 1)
        for (; kb + 512 <= k1; kb += 512) qvp_wide(R, M, ST, L2, J, &u, n, kb, tot, pfo);
#endif
    else if (BITS == 8 && M == 1) /* several x rows: the per-block loop below serves them better */
        for (; kb + 512 <= k1; kb += 512) qv8_wide(R, M, ST, L2, J, n, kb, tot, pfo);
    for (; kb < k1; kb += 64) {
        const size_t g = (size_t)kb / gs;
        const size_t xe = BITS == 4 ? x8_even(kb, K) : (size_t)kb, xo = xe + (BITS == 4 ? x8_odd_gap(kb, K) : 32);
        UNROLL for (int r = 0; r < R; r++) {
            const uint8_t *wb = w + r * row + (size_t)kb * B / 8;
            if (L2) pf_l2(wb, pfo);
            else pf(wb, pfo);
            __m256i c0, c1; /* the 64 codes as bytes, in x8's order */
            if (BITS == 4) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)wb);
                c0 = _mm256_and_si256(v, m4);
                c1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
#if VLMC_CODES_PACKED
            } else if (BITS == BITS_PACKED) {
                const __m512i v = codes_packed(&u, wb);
                c0 = _mm512_castsi512_si256(v);
                c1 = _mm512_extracti64x4_epi64(v, 1);
#endif
            } else {
                c0 = _mm256_loadu_si256((const __m256i *)wb);
                c1 = _mm256_loadu_si256((const __m256i *)(wb + 32));
            }
            const float s = ld_param(J->sc, (size_t)(n + r) * G + g, ST);
            const float b = J->bias_folded ? ld_param(J->bi, (size_t)(n + r) * G + g, ST) : 0.f;
            UNROLL for (int m = 0; m < M; m++) {
                const int8_t *xm = J->x8 + (size_t)m * K;
                if (J->bias_folded) part[r * M + m] += b * J->xs[(size_t)m * G + g];
                __m256i a = _mm256_dpbusd_epi32(_mm256_setzero_si256(), c0, _mm256_loadu_si256((const __m256i *)(xm + xe)));
                a = _mm256_dpbusd_epi32(a, c1, _mm256_loadu_si256((const __m256i *)(xm + xo)));
                if (BITS == 8 && J->x8r) { /* 256 x8 + x8r (natural order: xe = kb, xo = kb + 32) */
                    const int8_t *xr = J->x8r + (size_t)m * K;
                    a = _mm256_dpbusd_epi32(_mm256_slli_epi32(a, 8), c0, _mm256_loadu_si256((const __m256i *)(xr + xe)));
                    a = _mm256_dpbusd_epi32(a, c1, _mm256_loadu_si256((const __m256i *)(xr + xo)));
                }
                tot[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a),
                                            _mm256_set1_ps(s * J->x8s[(size_t)m * nb + (kb >> 6)]), tot[r][m]);
            }
        }
    }
}

static ALWAYS void qv_block(const int BITS, const int R, const int M, const int ST, const job_t *J, int n,
                            int k0, int k1, float *part, size_t pfo) {
    __m256 tot[4][8];
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int m = 0; m < M; m++) tot[r][m] = _mm256_setzero_ps();
    qv_acc(BITS, R, M, ST, 0, J, n, k0, k1, tot, part, pfo);
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int m = 0; m < M; m++) part[r * M + m] += hsum(tot[r][m]);
}

/* the 8 lane sums of each of t[0..7], in that order */
static ALWAYS __m256 hsum8x8(const __m256 t[8]) {
    const __m256 b0 = _mm256_hadd_ps(_mm256_hadd_ps(t[0], t[1]), _mm256_hadd_ps(t[2], t[3]));
    const __m256 b1 = _mm256_hadd_ps(_mm256_hadd_ps(t[4], t[5]), _mm256_hadd_ps(t[6], t[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}

/* One x row, whole weight rows with their bias terms folded in (q_finish has nothing to
 * add): rows one after another as one sequential stream, but 8 rows' lane sums reduced
 * together and stored as one vector: with short rows (K = 1536 is 3 x 512 codes) a
 * reduction and epilogue per row would be a large share of the work. */
static ALWAYS void qv_m1_range(const int BITS, const int ST, const job_t *J, int n0, int n1) {
    const int K = J->K;
    const size_t pfo = PF_M1;
    int n = n0;
    for (; n + 8 <= n1; n += 8) {
        __m256 t[8];
        float p[8] = {0};
        UNROLL for (int j = 0; j < 8; j++) {
            __m256 tot[4][8];
            tot[0][0] = _mm256_setzero_ps();
            qv_acc(BITS, 1, 1, ST, 1, J, n + j, 0, K, tot, p + j, pfo);
            t[j] = tot[0][0];
        }
        __m256 y = _mm256_add_ps(hsum8x8(t), _mm256_loadu_ps(p));
        if (J->bias) y = _mm256_add_ps(y, _mm256_loadu_ps(J->bias + n));
        _mm256_storeu_ps(J->y + n, y);
    }
    for (; n < n1; n++) {
        __m256 tot[4][8];
        float p = 0.f;
        tot[0][0] = _mm256_setzero_ps();
        qv_acc(BITS, 1, 1, ST, 1, J, n, 0, K, tot, &p, pfo);
        store_out(J, n, 0, p + hsum(tot[0][0]));
    }
}
#endif /* VLMC_VNNI */

/* ---- 8-bit: 8 bytes -> 8 codes in natural order (vpmovzxbd) ------------------------- */
static ALWAYS void q8_block(const int R, const int M, const int P, const int FOLD, const int ST, const job_t *J,
                            int n, int k0, int k1, float *part, size_t pfo) {
    const int K = J->K, gs = J->gs, G = J->G;
    const uint8_t *w = (const uint8_t *)J->w + (size_t)n * K;
    __m256 tot[4][8];
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int m = 0; m < M; m++) tot[r][m] = _mm256_setzero_ps();
    for (int ks = k0; ks < k1; ks += gs) {
        __m256 sv[4], acc[4][8][4];
        UNROLL for (int r = 0; r < R; r++) sv[r] = _mm256_set1_ps(ld_param(J->sc, (size_t)(n + r) * G + ks / gs, ST));
        if (FOLD)
            UNROLL for (int r = 0; r < R; r++) UNROLL for (int m = 0; m < M; m++) UNROLL for (int p = 0; p < P; p++)
                acc[r][m][p] = _mm256_setzero_ps();
        for (int c = ks; c < ks + gs; c += 8 * P) {
            if ((c & 63) == 0) UNROLL for (int r = 0; r < R; r++) pf(w + (size_t)r * K + c, pfo);
            UNROLL for (int p = 0; p < P; p++) {
                __m256 q[4];
                UNROLL for (int r = 0; r < R; r++) {
                    __m128i b8 = _mm_loadl_epi64((const __m128i *)(w + (size_t)r * K + c + 8 * p));
                    q[r] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b8));
                    if (!FOLD) q[r] = _mm256_mul_ps(q[r], sv[r]);
                }
                UNROLL for (int m = 0; m < M; m++) {
                    __m256 xv = _mm256_loadu_ps(J->x + (size_t)m * K + c + 8 * p);
                    UNROLL for (int r = 0; r < R; r++) {
                        if (FOLD) acc[r][m][p] = _mm256_fmadd_ps(q[r], xv, acc[r][m][p]);
                        else tot[r][m] = _mm256_fmadd_ps(q[r], xv, tot[r][m]);
                    }
                }
            }
        }
        if (FOLD)
            UNROLL for (int r = 0; r < R; r++) UNROLL for (int m = 0; m < M; m++) {
                __m256 a = acc[r][m][0];
                UNROLL for (int p = 1; p < P; p++) a = _mm256_add_ps(a, acc[r][m][p]);
                tot[r][m] = _mm256_fmadd_ps(a, sv[r], tot[r][m]);
            }
    }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int m = 0; m < M; m++) part[r * M + m] += hsum(tot[r][m]);
}

/* bias terms, the 4-bit half-span tail, and the store */
static void q_finish(const job_t *J, int n, const float *part) {
    const int K = J->K, G = J->G;
    for (int m = 0; m < J->M; m++) {
        float s = part[m] + (J->bias_folded ? 0.f : group_dot(J, J->bi, n, m, G));
        if (J->bits == 4 && J->kmain < K) {
            const uint32_t *w = (const uint32_t *)J->w + (size_t)n * (K / 8);
            float t = 0.f;
            for (int k = J->kmain; k < K; k++)
                t += (float)((w[k / 8] >> (4 * (k % 8))) & 0xF) * J->x[(size_t)m * K + k];
            s += t * ld_param(J->sc, (size_t)n * G + G - 1, J->st);
        }
        store_out(J, n, m, s);
    }
}

/* Row range [n0, n1): K chunks outside, blocks of R rows inside, then the epilogue. */
#define DEFINE_RANGE(name, CALL, QUANT)                                                                  \
    static ALWAYS void name##_range(const int R, const int M, const int P, const int F, const int ST,   \
                                    const job_t *J, int n0, int n1) {                                  \
        float part[CHUNK_MAX * 8];                                                                     \
        memset(part, 0, sizeof(float) * (size_t)(n1 - n0) * M);                                        \
        (void)F;                                                                                       \
        (void)ST;                                                                                      \
        for (int k0 = 0; k0 < J->kmain; k0 += J->kc) {                                                 \
            const int k1 = k0 + J->kc < J->kmain ? k0 + J->kc : J->kmain;                              \
            const size_t pfo = J->kc < J->kmain ? (size_t)2 * R * J->rowbytes                           \
                               : R > 1 || QUANT ? PF_DIST : 0; /* one dense stream: hardware suffices */ \
            int n = n0;                                                                                \
            for (; n + R <= n1; n += R) CALL(R, M, P, F, ST, J, n, k0, k1, part + (n - n0) * M, pfo);  \
            for (; n < n1; n++) CALL(1, M, P, F, ST, J, n, k0, k1, part + (n - n0) * M, pfo);          \
        }                                                                                              \
        for (int n = n0; n < n1; n++) {                                                                \
            if (QUANT) q_finish(J, n, part + (n - n0) * M);                                            \
            else for (int m = 0; m < M; m++) store_out(J, n, m, part[(n - n0) * M + m]);               \
        }                                                                                              \
    }
#define CALL_F32(R, M, P, F, ST, J, n, k0, k1, part, pfo) dense_block(R, M, P, 0, J, n, k0, k1, part, pfo)
#define CALL_BF16(R, M, P, F, ST, J, n, k0, k1, part, pfo) dense_block(R, M, P, 1, J, n, k0, k1, part, pfo)
DEFINE_RANGE(f32, CALL_F32, 0)
DEFINE_RANGE(bf16, CALL_BF16, 0)
DEFINE_RANGE(q4, q4_block, 1)
DEFINE_RANGE(q8, q8_block, 1)
#if VLMC_VNNI
#define CALL_Q4V(R, M, P, F, ST, J, n, k0, k1, part, pfo) qv_block(4, R, M, ST, J, n, k0, k1, part, pfo)
#define CALL_Q8V(R, M, P, F, ST, J, n, k0, k1, part, pfo) qv_block(8, R, M, ST, J, n, k0, k1, part, pfo)
DEFINE_RANGE(q4v, CALL_Q4V, 1)
DEFINE_RANGE(q8v, CALL_Q8V, 1)
#if VLMC_CODES_PACKED
#define CALL_QPV(R, M, P, F, ST, J, n, k0, k1, part, pfo) qv_block(BITS_PACKED, R, M, ST, J, n, k0, k1, part, pfo)
DEFINE_RANGE(qpv, CALL_QPV, 1)
#endif
#endif

/* Kernel configurations (R weight rows per block, P accumulators, FOLD) per M in
 * {1, 2, 3, 4, 8}; M = 5..7 runs the M = 8 kernel on zero-padded x (gemv_sliced), which
 * keeps the number of instantiations (and the compile time) down. Chosen by timing with
 * AVX-512VL's 32 vector registers; with AVX2's 16 the configurations keep accumulators +
 * temporaries within 16.
 * Two tables: short rows (M x K floats of x fit in L1: one weight row at a time, so
 * consecutive rows form one sequential stream that the hardware prefetcher follows) and
 * long rows (several rows share each x load; x would otherwise be re-read from L2). */
#if defined(__AVX512VL__)
#define WIDE_REGS 1
#else
#define WIDE_REGS 0
#endif

#define KFN(name, R, M, P, F) name##_k##R##_##M##_##P##_##F
#define DEFK(name, R, M, P, F)                                                                     \
    static __attribute__((noinline)) void KFN(name, R, M, P, F)(const job_t *J, int n0, int n1) { \
        name##_range(R, M, P, F, ST_F32, J, n0, n1);                                               \
    }
/* quantized kernels: one instance per scales/biases type (float32 or bfloat16) */
#define DEFQ(name, R, M, P, F)                                                                     \
    static __attribute__((noinline)) void KFN(name, R, M, P, F)(const job_t *J, int n0, int n1) { \
        if (J->st == ST_BF16) name##_range(R, M, P, F, ST_BF16, J, n0, n1);                       \
        else name##_range(R, M, P, F, ST_F32, J, n0, n1);                                          \
    }
#define DEFQ_(args) DEFQ args
#define DEFK_(args) DEFK args
#define KFN_(args) KFN args

/* dense (f32 and bf16 share the tables) */
#define D_S1 1, 1, 4, 0
#define D_S2 1, 2, 2, 0
#define D_S3 1, 3, 2, 0
#define D_S4 1, 4, 1, 0
#define D_L1 4, 1, 2, 0
#define D_L2 2, 2, 2, 0
#define D_L3 2, 3, 1, 0
#if WIDE_REGS
#define D_L4 4, 4, 1, 0
#define D_8 2, 8, 1, 0
#else
#define D_L4 2, 4, 1, 0
#define D_8 1, 8, 1, 0
#endif
/* quantized (4- and 8-bit share the tables but for M = 1 and 4) */
#define Q_S1 1, 1, 4, 1
#define Q_2 1, 2, 2, 1
#define Q_3 1, 3, 1, 1
#define Q_8 1, 8, 1, 0
#if WIDE_REGS
#define Q4_L1 4, 1, 1, 1
#define Q4_4 4, 4, 1, 0
#define Q8_4 2, 4, 1, 1
#else
#define Q4_L1 2, 1, 2, 1
#define Q4_4 1, 4, 1, 1
#define Q8_4 1, 4, 1, 1
#endif
#define Q8_L1 2, 1, 2, 1

#define DEF_DENSE(name)                                                                          \
    DEFK_((name, D_S1)) DEFK_((name, D_S2)) DEFK_((name, D_S3)) DEFK_((name, D_S4))              \
    DEFK_((name, D_L1)) DEFK_((name, D_L2)) DEFK_((name, D_L3)) DEFK_((name, D_L4))              \
    DEFK_((name, D_8))                                                                           \
    static void name##_rows(const job_t *J, int n0, int n1) {                                    \
        const int L = J->long_rows;                                                              \
        switch (J->M) {                                                                          \
        case 1: (L ? KFN_((name, D_L1)) : KFN_((name, D_S1)))(J, n0, n1); break;                 \
        case 2: (L ? KFN_((name, D_L2)) : KFN_((name, D_S2)))(J, n0, n1); break;                 \
        case 3: (L ? KFN_((name, D_L3)) : KFN_((name, D_S3)))(J, n0, n1); break;                 \
        case 4: (L ? KFN_((name, D_L4)) : KFN_((name, D_S4)))(J, n0, n1); break;                 \
        default: KFN_((name, D_8))(J, n0, n1); break;                                            \
        }                                                                                        \
    }
DEF_DENSE(f32)
DEF_DENSE(bf16)

DEFQ_((q4, Q_S1)) DEFQ_((q4, Q4_L1)) DEFQ_((q4, Q_2)) DEFQ_((q4, Q_3)) DEFQ_((q4, Q4_4)) DEFQ_((q4, Q_8))
DEFQ_((q8, Q_S1)) DEFQ_((q8, Q8_L1)) DEFQ_((q8, Q_2)) DEFQ_((q8, Q_3)) DEFQ_((q8, Q8_4)) DEFQ_((q8, Q_8))

#if VLMC_VNNI
/* the int8-activation kernels: (R weight rows, M x rows) per M, as the float tables */
#define DEF_INT8X(name)                                                                                  \
    DEFQ(name, 1, 1, 1, 1) DEFQ(name, 4, 1, 1, 1) DEFQ(name, 2, 2, 1, 1) DEFQ(name, 2, 3, 1, 1)          \
    DEFQ(name, 2, 4, 1, 1) DEFQ(name, 1, 5, 1, 1) DEFQ(name, 1, 6, 1, 1) DEFQ(name, 1, 7, 1, 1)          \
    DEFQ(name, 1, 8, 1, 1)                                                                               \
    static void name##_rows(const job_t *J, int n0, int n1) {                                            \
        switch (J->M) {                                                                                  \
        case 1: (J->long_rows ? KFN(name, 4, 1, 1, 1) : KFN(name, 1, 1, 1, 1))(J, n0, n1); break;        \
        case 2: KFN(name, 2, 2, 1, 1)(J, n0, n1); break;                                                 \
        case 3: KFN(name, 2, 3, 1, 1)(J, n0, n1); break;                                                 \
        case 4: KFN(name, 2, 4, 1, 1)(J, n0, n1); break;                                                 \
        case 5: KFN(name, 1, 5, 1, 1)(J, n0, n1); break;                                                 \
        case 6: KFN(name, 1, 6, 1, 1)(J, n0, n1); break;                                                 \
        case 7: KFN(name, 1, 7, 1, 1)(J, n0, n1); break;                                                 \
        default: KFN(name, 1, 8, 1, 1)(J, n0, n1); break;                                                \
        }                                                                                                \
    }
DEF_INT8X(q4v)
DEF_INT8X(q8v)
#if VLMC_CODES_PACKED
DEF_INT8X(qpv)
#endif
static __attribute__((noinline)) void q4v_m1(const job_t *J, int n0, int n1) {
    if (J->st == ST_BF16) qv_m1_range(4, ST_BF16, J, n0, n1);
    else qv_m1_range(4, ST_F32, J, n0, n1);
}
static __attribute__((noinline)) void q8v_m1(const job_t *J, int n0, int n1) {
    if (J->st == ST_BF16) qv_m1_range(8, ST_BF16, J, n0, n1);
    else qv_m1_range(8, ST_F32, J, n0, n1);
}
#if VLMC_CODES_PACKED
static __attribute__((noinline)) void qpv_m1(const job_t *J, int n0, int n1) {
    if (J->st == ST_BF16) qv_m1_range(BITS_PACKED, ST_BF16, J, n0, n1);
    else qv_m1_range(BITS_PACKED, ST_F32, J, n0, n1);
}
#endif
/* whether qv_m1_range computes this job: nothing left for q_finish, one K chunk */
static int qv_m1_ok(const job_t *J) { return J->M == 1 && !J->long_rows && J->bias_folded && J->kmain == J->K && J->kc >= J->K; }
#endif
static void q4_rows(const job_t *J, int n0, int n1) {
#if VLMC_VNNI
    if (J->x8) {
        if (qv_m1_ok(J)) q4v_m1(J, n0, n1);
        else q4v_rows(J, n0, n1);
        return;
    }
#endif
    switch (J->M) {
    case 1: (J->long_rows ? KFN_((q4, Q4_L1)) : KFN_((q4, Q_S1)))(J, n0, n1); break;
    case 2: KFN_((q4, Q_2))(J, n0, n1); break;
    case 3: KFN_((q4, Q_3))(J, n0, n1); break;
    case 4: KFN_((q4, Q4_4))(J, n0, n1); break;
    default: KFN_((q4, Q_8))(J, n0, n1); break;
    }
}
static void q8_rows(const job_t *J, int n0, int n1) {
#if VLMC_VNNI
    if (J->x8) {
        if (qv_m1_ok(J)) q8v_m1(J, n0, n1);
        else q8v_rows(J, n0, n1);
        return;
    }
#endif
    switch (J->M) {
    case 1: (J->long_rows ? KFN_((q8, Q8_L1)) : KFN_((q8, Q_S1)))(J, n0, n1); break;
    case 2: KFN_((q8, Q_2))(J, n0, n1); break;
    case 3: KFN_((q8, Q_3))(J, n0, n1); break;
    case 4: KFN_((q8, Q8_4))(J, n0, n1); break;
    default: KFN_((q8, Q_8))(J, n0, n1); break;
    }
}
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
    if (is_packed(J->bits)) return J->K % 64 == 0; /* widened to bytes, 64 codes at a time (packed_rows) */
    return J->bits == 8 || (J->bits == 4 && (J->gs == 32 || J->gs % 64 == 0)); /* 64-code blocks */
}

#if VLMC_SIMD
/* 2/3/5/6-bit rows: with int8 x (VNNI) and up to 4 x rows straight from the codes,
 * widened in registers (codes_packed); otherwise a few rows at a time widened into scratch
 * (kept in L1/L2), then the 8-bit kernels on that copy (J8 is J with 8-bit rows, row n at
 * scratch + (n - s) * K). For one x row, widening into scratch would leave the weight
 * stream idle while the kernel reads the copy. */
/* from this many int8 x rows the widening into scratch is shared by enough rows to beat
 * widening in registers, which costs the same per code and x row at every width */
#ifndef PACKED_SCRATCH_M
#define PACKED_SCRATCH_M 5
#endif
#ifndef WIDEN_BYTES
#define WIDEN_BYTES 24576
#endif
static void packed_rows(const job_t *J, int n0, int n1, uint8_t *scratch, int rows) {
#if VLMC_VNNI && VLMC_CODES_PACKED
    if (J->x8 && J->M < PACKED_SCRATCH_M) { /* int8 x: the codes widened in registers */
        if (qv_m1_ok(J)) qpv_m1(J, n0, n1);
        else qpv_rows(J, n0, n1);
        return;
    }
#endif
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
        q8_rows(&J8, s, e);
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
        uint8_t *scratch = NULL;
        int rows = 0;
        if (J->kind == 2 && is_packed(J->bits)) {
            rows = (WIDEN_BYTES / J->K) & ~7;
            if (rows < 8) rows = 8;
            scratch = malloc((size_t)rows * J->K);
            if (!scratch) return; /* out of memory: output left as is (as the portable path) */
        }
        while (grab(J, &n0, &n1)) {
            if (J->kind == 0) f32_rows(J, n0, n1);
            else if (J->kind == 1) bf16_rows(J, n0, n1);
            else if (J->bits == 4) q4_rows(J, n0, n1);
            else if (is_packed(J->bits)) packed_rows(J, n0, n1, scratch, rows);
            else q8_rows(J, n0, n1);
        }
        free(scratch);
        return;
    }
#endif
    float *buf = J->kind == 0 ? NULL : malloc(sizeof(float) * (size_t)J->K);
    if (J->kind != 0 && !buf) return; /* caller checks nothing; output left as is */
    while (grab(J, &n0, &n1)) generic_rows(J, n0, n1, buf);
    free(buf);
}

/* K chunking: kc a multiple of the kernel's unit (16, the 4-bit span, or gs) */
static void plan_k(job_t *J) {
    const int K = J->K;
    int unit = 16;
    J->kmain = K;
    if (J->kind == 0) J->rowbytes = (size_t)K * 4;
    else if (J->kind == 1) J->rowbytes = (size_t)K * 2;
    else {
        J->rowbytes = (size_t)K * J->bits / 8;
        unit = J->bits == 4 ? (J->gs < 64 ? 64 : J->gs) : J->gs;
        if (J->bits == 4 && J->x8) unit = unit % 128 ? 2 * unit : unit; /* whole pairs of x8 (qv_block) */
        else if (J->bits == 4) J->kmain = K / unit * unit;
    }
    int kc = X_CHUNK_FLOATS / J->M / unit * unit;
    J->kc = kc < unit ? unit : kc;
    /* bytes of x (int8 or float32) vs 16 KiB: with int8 x, a K = 8960 down projection still
     * fits, and runs one weight row at a time like the short rows */
    J->long_rows = (long)J->M * K * (J->x8 ? 1 : 4) > X_CHUNK_FLOATS * 4;
    J->bias_folded = J->x8 && J->gs == 64 && (J->bits == 4 || J->M == 1); /* 2-8 bits: bytes_dots */
    if (J->M < CHUNK_MIN_M) J->kc = J->kmain; /* one x row: keep the weight stream sequential */
}

static void run_gemv(job_t *J, double wbytes, int n_threads) {
    int nth = eff_threads(n_threads, wbytes, J->N);
    J->chunk = pick_chunk(J->N, nth);
    plan_k(J);
    atomic_store(&J->next, 0);
    run_parallel(gemv_task, J, nth);
}

/* The SIMD kernels exist for M in {1, 2, 3, 4, 8}: M = 5..7 runs as 8 on zero-padded
 * copies of x (the extra outputs are dropped). Returns nonzero when out of memory. */
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

/* Larger M: process x in slices of 8 rows (W is re-read per slice). */
static int gemv_sliced(job_t *J, double wbytes, int n_threads) {
    const int M = J->M, N = J->N;
    const float *x = J->x, *xq = J->xq, *xs = J->xs;
    const int8_t *x8 = J->x8, *x8r = J->x8r;
    const float *x8s = J->x8s;
    float *y = J->y;
    int rc = 0;
    for (int m0 = 0; m0 < M && !rc; m0 += 8) {
        J->M = M - m0 < 8 ? M - m0 : 8;
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

/* 4- and 8-bit GEMVs with int8 activations (VNNI); vlmc_set_int8_x(0) turns them off */
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
    if (use8) { /* see qv_block */
        /* 8-bit weights also get x's rounding residual: one int8 rounding of x is as large
         * as their own error, while 2-6-bit weights' own error dwarfs it. It costs a second
         * vpdpbusd per 64 codes. */
        const int residual = bits == 8 && vlmc_x8_residual;
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
                const size_t e = bits == 4 ? x8_even(kb, K) : (size_t)kb, gap = bits == 4 ? x8_odd_gap(kb, K) : 32;
                const float sc = x8_block(xr + kb, bits == 4, q + e, gap, qr ? qr + kb : NULL, &sum);
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

