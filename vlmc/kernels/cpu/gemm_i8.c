/* vlmc CPU kernels: 2- to 8-bit weights x int8 activations, many rows (prefill, vision;
 * AVX512-VNNI): y[M, N] = x @ dequantize(w)^T (+ bias). x is rounded to int8 per 64 values
 * of a row (scale amax / 127), as in the GEMV (qv_block), by all threads. Output columns go
 * in panels of 32: a thread unpacks the panel's 32 weight rows into uint8 codes laid out
 * [K / 4][32][4], so two 64-byte loads feed vpdpbusd for 32 columns x 4 k, against a
 * broadcast of 4 bytes of an x row. Six x rows at a time keep 12 integer and 12 float
 * accumulators (24 of the 32 vector registers): 12 vpdpbusd per 8 loads, where 16 columns
 * x 8 rows need 9 loads per 8. K goes in chunks of GI8_KC (partial sums kept per row).
 * Every 64 k the integer sums are scaled by the weight group's scales (a vector over the
 * panel) times the x block's scale. The bias terms use group sums of the rounded x (see
 * qv_block). Needs gs % 64 == 0. */
#include "vlmc.h"

#if VLMC_VNNI && defined(__AVX512F__) && defined(__AVX512BW__)
#define VLMC_GEMM_I8 1
#define GI8_COLS 32
#define GI8_ROWS 6
#ifndef GI8_KC
#define GI8_KC 1024 /* k per pass over the rows: the panel's 32 x GI8_KC codes stay in L1 */
#endif
typedef struct {
    const float *x;        /* [M, K] */
    int8_t *x8;            /* [Mp, K] rounded x, Mp = M rounded up to GI8_ROWS (zero rows) */
    int8_t *x8r;           /* [Mp, K] 8-bit codes: x's rounding residual (x8_block), else NULL */
    float *xsc;            /* [Mp, K / 64] x block scales (with x8r: of 256 x8 + x8r) */
    float *xsum;           /* [Mp, G] group sums of the rounded x */
    const uint8_t *w;
    const void *sc, *bi;
    const float *bias;
    float *y;
    int st, M, Mp, N, K, bits, gs, G;
    packed_t pk;           /* 2/3/5/6 bits */
    _Atomic int next;
} gi8_t;

/* rows [M ith / nth, M (ith + 1) / nth) of x to int8 per 64-block, in natural order */
static void gi8_quant_task(void *ctx, int ith, int nth) {
    gi8_t *J = ctx;
    const int K = J->K, nb = K / 64, m0 = (int)((long)J->M * ith / nth), m1 = (int)((long)J->M * (ith + 1) / nth);
    for (int m = m0; m < m1; m++)
        for (int b = 0; b < nb; b++) {
            int sum;
            const float sc = x8_block(J->x + (size_t)m * K + b * 64, X8_NATURAL, J->x8 + (size_t)m * K + b * 64, 32,
                                      J->x8r ? J->x8r + (size_t)m * K + b * 64 : NULL, &sum);
            J->xsc[(size_t)m * nb + b] = sc;
            J->xsum[(size_t)m * J->G + b * 64 / J->gs] += sc * (float)sum;
        }
}

/* codes of weight row n in natural order, one byte each (K bytes) */
static ALWAYS void gi8_unpack_row(const gi8_t *J, int n, uint8_t *out) {
    const int K = J->K;
    const uint8_t *wr = J->w + (size_t)n * ((size_t)K / 8 * J->bits);
    if (J->bits == 8) {
        memcpy(out, wr, (size_t)K);
        return;
    }
    if (J->bits != 4) {
        expand_packed(&J->pk, wr, out, K);
        return;
    }
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int k = 0; k < K; k += 64) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(wr + k / 2));
        const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        const __m256i a = _mm256_unpacklo_epi8(lo, hi), b = _mm256_unpackhi_epi8(lo, hi);
        _mm256_storeu_si256((__m256i *)(out + k), _mm256_permute2x128_si256(a, b, 0x20));
        _mm256_storeu_si256((__m256i *)(out + k + 32), _mm256_permute2x128_si256(a, b, 0x31));
    }
}

/* iacc += one 64-block's integer dots: 32 columns of codes (pk, from k4 = k40) x GI8_ROWS rows of x */
static ALWAYS void gi8_block_dots(const uint32_t *pk, const int8_t *xr, int K, int k40, __m512i iacc[GI8_ROWS][2]) {
    for (int k4 = k40; k4 < k40 + 16; k4++) {
        const __m512i w0 = _mm512_loadu_si512((const void *)(pk + (size_t)k4 * GI8_COLS));
        const __m512i w1 = _mm512_loadu_si512((const void *)(pk + (size_t)k4 * GI8_COLS + 16));
        UNROLL for (int i = 0; i < GI8_ROWS; i++) {
            const __m512i xv = _mm512_set1_epi32(ld_i32(xr + (size_t)i * K + 4 * k4));
            iacc[i][0] = _mm512_dpbusd_epi32(iacc[i][0], w0, xv);
            iacc[i][1] = _mm512_dpbusd_epi32(iacc[i][1], w1, xv);
        }
    }
}

static void gi8_panel(const gi8_t *J, int n0, uint32_t *pk, float *ps, float *pb, uint8_t *row, float *acc) {
    const int K = J->K, G = J->G, K4 = K / 4, nb = K / 64, cols = J->N - n0 < GI8_COLS ? J->N - n0 : GI8_COLS;
    for (int c = 0; c < GI8_COLS; c++) {
        if (c < cols) {
            gi8_unpack_row(J, n0 + c, row);
            for (int k4 = 0; k4 < K4; k4++) pk[(size_t)k4 * GI8_COLS + c] = (uint32_t)ld_i32(row + 4 * (size_t)k4);
            for (int g = 0; g < G; g++) {
                ps[g * GI8_COLS + c] = ld_param(J->sc, (size_t)(n0 + c) * G + g, J->st);
                pb[g * GI8_COLS + c] = ld_param(J->bi, (size_t)(n0 + c) * G + g, J->st);
            }
        } else {
            for (int k4 = 0; k4 < K4; k4++) pk[(size_t)k4 * GI8_COLS + c] = 0;
            for (int g = 0; g < G; g++) ps[g * GI8_COLS + c] = pb[g * GI8_COLS + c] = 0.f;
        }
    }
    const int bpg = J->gs / 64;                                 /* x blocks per weight group */
    const int gpc = J->gs >= GI8_KC ? 1 : GI8_KC / J->gs;        /* weight groups per K chunk */
    for (int g0 = 0; g0 < G; g0 += gpc) {
        const int g1 = g0 + gpc < G ? g0 + gpc : G;
        for (int m0 = 0; m0 < J->Mp; m0 += GI8_ROWS) {
            __m512 facc[GI8_ROWS][2];
            float *ar = acc + (size_t)m0 * GI8_COLS;
            UNROLL for (int i = 0; i < GI8_ROWS; i++) {
                facc[i][0] = g0 ? _mm512_loadu_ps(ar + i * GI8_COLS) : _mm512_setzero_ps();
                facc[i][1] = g0 ? _mm512_loadu_ps(ar + i * GI8_COLS + 16) : _mm512_setzero_ps();
            }
            const int8_t *xr = J->x8 + (size_t)m0 * K;
            for (int g = g0; g < g1; g++) {
                const __m512 sv0 = _mm512_loadu_ps(ps + g * GI8_COLS), sv1 = _mm512_loadu_ps(ps + g * GI8_COLS + 16);
                for (int xb = 0; xb < bpg; xb++) {
                    const int b = g * bpg + xb, k40 = b * 16;
                    __m512i iacc[GI8_ROWS][2];
                    UNROLL for (int i = 0; i < GI8_ROWS; i++) iacc[i][0] = iacc[i][1] = _mm512_setzero_si512();
                    gi8_block_dots(pk, xr, K, k40, iacc);
                    if (J->x8r) { /* 8-bit codes: 256 x (the dots so far) + the residual's dots */
                        UNROLL for (int i = 0; i < GI8_ROWS; i++) {
                            iacc[i][0] = _mm512_slli_epi32(iacc[i][0], 8);
                            iacc[i][1] = _mm512_slli_epi32(iacc[i][1], 8);
                        }
                        gi8_block_dots(pk, J->x8r + (size_t)m0 * K, K, k40, iacc);
                    }
                    UNROLL for (int i = 0; i < GI8_ROWS; i++) {
                        const __m512 xs = _mm512_set1_ps(J->xsc[(size_t)(m0 + i) * nb + b]);
                        facc[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[i][0]), _mm512_mul_ps(sv0, xs), facc[i][0]);
                        facc[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[i][1]), _mm512_mul_ps(sv1, xs), facc[i][1]);
                    }
                }
                const __m512 bv0 = _mm512_loadu_ps(pb + g * GI8_COLS), bv1 = _mm512_loadu_ps(pb + g * GI8_COLS + 16);
                UNROLL for (int i = 0; i < GI8_ROWS; i++) {
                    const __m512 xs = _mm512_set1_ps(J->xsum[(size_t)(m0 + i) * G + g]);
                    facc[i][0] = _mm512_fmadd_ps(bv0, xs, facc[i][0]);
                    facc[i][1] = _mm512_fmadd_ps(bv1, xs, facc[i][1]);
                }
            }
            UNROLL for (int i = 0; i < GI8_ROWS; i++) {
                _mm512_storeu_ps(ar + i * GI8_COLS, facc[i][0]);
                _mm512_storeu_ps(ar + i * GI8_COLS + 16, facc[i][1]);
            }
        }
    }
    for (int m = 0; m < J->M; m++) {
        const float *ar = acc + (size_t)m * GI8_COLS;
        float *yr = J->y + (size_t)m * J->N + n0;
        for (int c = 0; c < cols; c++) yr[c] = ar[c] + (J->bias ? J->bias[n0 + c] : 0.f);
    }
}

static void gi8_task(void *ctx, int ith, int nth) {
    (void)ith;
    (void)nth;
    gi8_t *J = ctx;
    const int K = J->K, G = J->G;
    uint8_t *buf = malloc((size_t)GI8_COLS * K + sizeof(float) * GI8_COLS * (2 * (size_t)G + J->Mp) + (size_t)K + 64);
    if (!buf) return;
    uint32_t *pk = (uint32_t *)buf;
    float *ps = (float *)(buf + (size_t)GI8_COLS * K), *pb = ps + GI8_COLS * (size_t)G;
    float *acc = pb + GI8_COLS * (size_t)G; /* [Mp][32] partial sums across K chunks */
    uint8_t *row = (uint8_t *)(acc + GI8_COLS * (size_t)J->Mp);
    for (;;) {
        const int p = atomic_fetch_add_explicit(&J->next, 1, memory_order_relaxed);
        if (p * GI8_COLS >= J->N) break;
        gi8_panel(J, p * GI8_COLS, pk, ps, pb, row, acc);
    }
    free(buf);
}
#else
#define VLMC_GEMM_I8 0
#endif

int vlmc_gemm_q_i8_available(void) { return VLMC_GEMM_I8; }

/* Returns -6 where the machine or the shape is not covered (the caller uses the GEMM). */
int vlmc_gemm_q_i8(const float *x, int M, int K, const uint32_t *w, const void *scales, const void *biases, int st,
                   int N, int bits, int gs, const float *bias, float *y, int n_threads) {
#if VLMC_GEMM_I8
    if (M < 1 || N < 1 || K < 64 || K % 64 || gs < 64 || gs % 64 || K % gs || st < 0 || st > 1) return -6;
    if (bits != 4 && bits != 8 && !is_packed(bits)) return -6;
    const int Mp = (M + GI8_ROWS - 1) / GI8_ROWS * GI8_ROWS, nb = K / 64, G = K / gs;
    const int residual = bits == 8 && vlmc_x8_residual; /* as in vlmc_gemv_q */
    int8_t *x8 = calloc((size_t)Mp * K * (residual ? 2 : 1), 1);
    float *xsc = calloc((size_t)Mp * nb, sizeof(float)), *xsum = calloc((size_t)Mp * G, sizeof(float));
    if (!x8 || !xsc || !xsum) { free(x8); free(xsc); free(xsum); return -5; }
    gi8_t J = {.x = x, .x8 = x8, .x8r = residual ? x8 + (size_t)Mp * K : NULL, .xsc = xsc, .xsum = xsum,
               .w = (const uint8_t *)w, .sc = scales, .bi = biases,
               .bias = bias, .y = y, .st = st, .M = M, .Mp = Mp, .N = N, .K = K, .bits = bits, .gs = gs, .G = G};
    if (is_packed(bits)) packed_init(&J.pk, bits);
    atomic_store(&J.next, 0);
    int nth = n_threads < 1 ? 1 : n_threads;
    run_parallel(gi8_quant_task, &J, M < 2 * nth ? 1 : nth);
    run_parallel(gi8_task, &J, nth);
    free(x8);
    free(xsc);
    free(xsum);
    return 0;
#else
    (void)x; (void)M; (void)K; (void)w; (void)scales; (void)biases; (void)st; (void)N; (void)bits; (void)gs; (void)bias;
    (void)y; (void)n_threads;
    return -6;
#endif
}
