/* vlmc CPU kernels: 2- to 8-bit weights x int8 activations, many rows (prefill, vision;
 * AVX512-VNNI): y[M, N] = x @ dequantize(w)^T (+ bias). x is rounded to int8 per 64 values
 * of a row (scale amax / 127), as in the GEMV (qv_block), by all threads, into tiles of
 * 6 rows whose 4-byte groups at one k lie together (one stream per tile). Output columns
 * go in panels of 32: a thread unpacks the panel's 32 weight rows to bytes and transposes
 * them in registers (16 x 16 dwords) into codes laid out [K / 4][32][4] (64-byte aligned),
 * so two loads feed vpdpbusd for 32 columns x 4 k against a broadcast of 4 bytes of an x
 * row. A tile of 6 rows keeps 12 integer and 12 float accumulators in registers; the dots
 * of each 64-block are assembly (GI8_DOTS), as compiled intrinsics moved the accumulators
 * through copies and the stack. K goes in chunks of GI8_KC (partial sums kept per row).
 * Every 64 k the integer sums are scaled by the weight group's scales (a vector over the
 * panel) times the x block's scale. The bias terms use group sums of the rounded x (see
 * qv_block); the last chunk adds the output bias and stores into y with masks. The float
 * arithmetic is the GEMV's, bit for bit (see gi8_panel). Needs gs % 64 == 0. */
#include "vlmc.h"

#if VLMC_VNNI && defined(__AVX512F__) && defined(__AVX512BW__)
#define VLMC_GEMM_I8 1
#define GI8_COLS 32
#define GI8_ROWS 6
#define GI8_CLASSES 8 /* partial sums per (row, column): blocks b with the same b mod 8 */
#ifndef GI8_KC
#define GI8_KC 4096 /* k per pass over the rows (the panel's codes, 128 KB, stay in L2): fewer chunks
                     * mean fewer spills of the eight partial sums (1024: ~10% slower at vision shapes) */
#endif
typedef struct {
    const float *x;        /* [M, K] */
    int8_t *x8;            /* rounded x in tiles of GI8_ROWS rows: [Mp / GI8_ROWS][K / 4][GI8_ROWS][4] */
    int8_t *x8r;           /* the same layout: x's rounding residual (8-bit codes, x8_block), else NULL */
    float *xsc;            /* [Mp / GI8_ROWS][K / 64][GI8_ROWS] x block scales (with x8r: of 256 x8 + x8r) */
    float *xsum;           /* [Mp / GI8_ROWS][G][GI8_ROWS] group sums of the rounded x */
    const uint8_t *w;
    const void *sc, *bi;
    const float *bias;
    float *y;
    int st, M, Mp, N, K, bits, gs, G;
    packed_t pk;           /* 2/3/5/6 bits */
    _Atomic int next;
} gi8_t;

/* rows [M ith / nth, M (ith + 1) / nth) of x to int8 per 64-block, into the tile layout: a
 * tile's 4 bytes of its GI8_ROWS rows at one k4 lie together, so the dots read one stream
 * (the rows' dwords are constant offsets from one pointer) */
static void gi8_quant_task(void *ctx, int ith, int nth) {
    gi8_t *J = ctx;
    const int K = J->K, nb = K / 64, G = J->G, m0 = (int)((long)J->M * ith / nth), m1 = (int)((long)J->M * (ith + 1) / nth);
    int8_t q[64], qr[64];
    for (int m = m0; m < m1; m++) {
        const int t = m / GI8_ROWS, i = m % GI8_ROWS;
        int8_t *xt = J->x8 + (size_t)t * GI8_ROWS * K, *xtr = J->x8r ? J->x8r + (size_t)t * GI8_ROWS * K : NULL;
        for (int b = 0; b < nb; b++) {
            int sum;
            const float sc = x8_block(J->x + (size_t)m * K + b * 64, X8_NATURAL, q, 32, xtr ? qr : NULL, &sum);
            for (int e = 0; e < 16; e++) {
                const size_t at = ((size_t)(b * 16 + e) * GI8_ROWS + i) * 4;
                memcpy(xt + at, q + 4 * e, 4);
                if (xtr) memcpy(xtr + at, qr + 4 * e, 4);
            }
            J->xsc[((size_t)t * nb + b) * GI8_ROWS + i] = sc;
            J->xsum[((size_t)t * G + b * 64 / J->gs) * GI8_ROWS + i] += sc * (float)sum;
        }
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

/* 16 rows x 64 codes (16 dwords each, rows `stride` bytes apart) -> dst[e * GI8_COLS + i] =
 * dword e of row i: a 16 x 16 dword transpose in registers (the panel's [K / 4][32][4] layout) */
static ALWAYS void gi8_transpose16(const uint8_t *src, size_t stride, uint32_t *dst) {
    __m512i r[16], t[16], u[16];
    UNROLL for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512((const void *)(src + (size_t)i * stride));
    UNROLL for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    UNROLL for (int g = 0; g < 4; g++) { /* u[4g + j], 128-bit lane L: rows 4g..4g+3 of dword 4L + j */
        u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    UNROLL for (int j = 0; j < 4; j++) { /* lane L of u[j], u[4 + j], u[8 + j], u[12 + j] -> dword 4L + j */
        const __m512i ab0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44), ab1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);
        const __m512i cd0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44), cd1 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xEE);
        _mm512_store_si512((void *)(dst + (size_t)j * GI8_COLS), _mm512_shuffle_i32x4(ab0, cd0, 0x88));
        _mm512_store_si512((void *)(dst + (size_t)(4 + j) * GI8_COLS), _mm512_shuffle_i32x4(ab0, cd0, 0xDD));
        _mm512_store_si512((void *)(dst + (size_t)(8 + j) * GI8_COLS), _mm512_shuffle_i32x4(ab1, cd1, 0x88));
        _mm512_store_si512((void *)(dst + (size_t)(12 + j) * GI8_COLS), _mm512_shuffle_i32x4(ab1, cd1, 0xDD));
    }
}

/* The dots of one 64-block: 16 steps of 4 k, each 2 loads of 16 columns' codes, 6 broadcasts
 * of 4 bytes of a row of the tile and 12 vpdpbusd, in assembly: compiled from intrinsics
 * the 12 accumulators (beside 12 float ones) were shuffled through copies and the stack
 * in every step, and the core ran at about half the vpdpbusd rate. w: 16 x 32 dwords of
 * codes, x: 16 x GI8_ROWS dwords of the tile's rows (gi8_quant_task's layout). */
#define GI8_ROW(i, ox) "vpdpbusd " ox "+" #i "*4(%[x])%{1to16%}, %[w0], %[a" #i "0]\n\t" \
    "vpdpbusd " ox "+" #i "*4(%[x])%{1to16%}, %[w1], %[a" #i "1]\n\t"
#define GI8_STEP(ow, ox) "vmovdqa32 " ow "(%[w]), %[w0]\n\t" "vmovdqa32 " ow "+64(%[w]), %[w1]\n\t" \
    GI8_ROW(0, ox) GI8_ROW(1, ox) GI8_ROW(2, ox) GI8_ROW(3, ox) GI8_ROW(4, ox) GI8_ROW(5, ox)
#define GI8_STEPS GI8_STEP("0", "0") GI8_STEP("128", "24") GI8_STEP("256", "48") GI8_STEP("384", "72") \
                GI8_STEP("512", "96") GI8_STEP("640", "120") GI8_STEP("768", "144") GI8_STEP("896", "168") \
                GI8_STEP("1024", "192") GI8_STEP("1152", "216") GI8_STEP("1280", "240") GI8_STEP("1408", "264") \
                GI8_STEP("1536", "288") GI8_STEP("1664", "312") GI8_STEP("1792", "336") GI8_STEP("1920", "360") \
               
#define GI8_DOTS(wp, xp)                                                                              \
    do {                                                                                              \
        __m512i w0_, w1_, xv_;                                                                        \
        __asm__(GI8_STEPS                                                                             \
                : [a00] "+v"(a00), [a01] "+v"(a01), [a10] "+v"(a10), [a11] "+v"(a11), [a20] "+v"(a20), \
                  [a21] "+v"(a21), [a30] "+v"(a30), [a31] "+v"(a31), [a40] "+v"(a40), [a41] "+v"(a41), \
                  [a50] "+v"(a50), [a51] "+v"(a51), [w0] "=&v"(w0_), [w1] "=&v"(w1_), [xv] "=&v"(xv_)    \
                : [w] "r"(wp), [x] "r"(xp)                                                            \
                : "memory");                                                                          \
    } while (0)
#define GI8_ROWS_DO(F) F(0) F(1) F(2) F(3) F(4) F(5)

/* per-thread buffers: the panel's codes and parameters, partial sums across K chunks */
typedef struct {
    uint32_t *pk;   /* [K / 4][32] dwords of codes, 64-byte aligned */
    uint8_t *rows;  /* [32][K] codes of the panel's weight rows */
    float *ps, *pb; /* [G][32] scales and biases */
    float *acc;     /* [Mp / GI8_ROWS][GI8_CLASSES][GI8_ROWS][32] partial sums between K chunks */
    float *fin;     /* [GI8_CLASSES][GI8_ROWS][32]: one tile's sums after the last chunk */
    float pbias[GI8_COLS];
} gi8_buf;

/* the panel's 32 weight rows from n0 (zeros past N) -> pk, ps, pb, pbias */
static void gi8_pack(const gi8_t *J, int n0, int cols, gi8_buf *B) {
    const int K = J->K, G = J->G;
    for (int c = 0; c < GI8_COLS; c++) {
        if (c < cols) gi8_unpack_row(J, n0 + c, B->rows + (size_t)c * K);
        else memset(B->rows + (size_t)c * K, 0, (size_t)K);
        B->pbias[c] = c < cols && J->bias ? J->bias[n0 + c] : 0.f;
        for (int g = 0; g < G; g++) {
            B->ps[g * GI8_COLS + c] = c < cols ? ld_param(J->sc, (size_t)(n0 + c) * G + g, J->st) : 0.f;
            B->pb[g * GI8_COLS + c] = c < cols ? ld_param(J->bi, (size_t)(n0 + c) * G + g, J->st) : 0.f;
        }
    }
    for (int k = 0; k < K; k += 64)
        for (int h = 0; h < GI8_COLS; h += 16)
            gi8_transpose16(B->rows + (size_t)h * K + k, (size_t)K, B->pk + (size_t)(k / 4) * GI8_COLS + h);
}

/* The float arithmetic per (x row, column) is the GEMV's (gemv.c, "codes x int8 x"), to
 * the last bit, so that a row's result does not depend on how many rows share the call
 * (batch invariance: a prompt alone and in a batch, a decode row and a prefill row): eight
 * partial sums A_0 .. A_7, block b adding float(dot_b) x (s_g x xs_b) to A_(b mod 8) and,
 * right after the last block of group g, b_g x (group sum of the rounded x) to the same
 * A; then y = ((A_0 + A_1) + (A_2 + A_3)) + ((A_4 + A_5) + (A_6 + A_7)) + bias. A chunk of
 * K visits its blocks one class (b mod 8) at a time, so a tile keeps one class's 12
 * accumulators in registers and the eight classes wait in acc between visits. */
static void gi8_panel(const gi8_t *J, int n0, gi8_buf *B) {
    const int K = J->K, G = J->G, N = J->N, cols = N - n0 < GI8_COLS ? N - n0 : GI8_COLS;
    gi8_pack(J, n0, cols, B);
    const uint32_t *pk = B->pk;
    const float *ps = B->ps, *pb = B->pb;
    const __mmask16 mk0 = cols >= 16 ? 0xFFFF : (__mmask16)((1u << cols) - 1);
    const __mmask16 mk1 = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : (__mmask16)((1u << (cols - 16)) - 1);
    const __m512 bias0 = _mm512_loadu_ps(B->pbias), bias1 = _mm512_loadu_ps(B->pbias + 16);
    const int bpg = J->gs / 64;                                 /* x blocks per weight group */
    const int gpc = J->gs >= GI8_KC ? 1 : GI8_KC / J->gs;        /* weight groups per K chunk */
    const size_t tile_acc = (size_t)GI8_CLASSES * GI8_ROWS * GI8_COLS; /* floats of a tile's partial sums */
    for (int g0 = 0; g0 < G; g0 += gpc) {
        const int g1 = g0 + gpc < G ? g0 + gpc : G, b0 = g0 * bpg, b1 = g1 * bpg;
        for (int m0 = 0; m0 < J->Mp; m0 += GI8_ROWS) {
            const size_t t = (size_t)(m0 / GI8_ROWS);
            const int8_t *xt = J->x8 + t * GI8_ROWS * K, *xtr = J->x8r ? J->x8r + t * GI8_ROWS * K : NULL;
            const float *xs_t = J->xsc + t * (size_t)(K / 64) * GI8_ROWS, *xsum_t = J->xsum + t * G * GI8_ROWS;
            float *at = B->acc + t * tile_acc;
            for (int c = 0; c < GI8_CLASSES; c++) {
                float *ar = at + (size_t)c * GI8_ROWS * GI8_COLS;
                /* the last chunk's sums go to the tile's small buffer (in L1) for the final sum */
                float *keep = g1 == G ? B->fin + (size_t)c * GI8_ROWS * GI8_COLS : ar;
#define GI8_F_INIT(i) __m512 f##i##0 = g0 ? _mm512_load_ps(ar + i * GI8_COLS) : _mm512_setzero_ps(), \
                             f##i##1 = g0 ? _mm512_load_ps(ar + i * GI8_COLS + 16) : _mm512_setzero_ps();
                GI8_ROWS_DO(GI8_F_INIT)
                for (int b = b0 + ((c - b0 % GI8_CLASSES) + GI8_CLASSES) % GI8_CLASSES; b < b1; b += GI8_CLASSES) {
                    const int g = b / bpg, k40 = b * 16;
                    const __m512 sv0 = _mm512_load_ps(ps + g * GI8_COLS), sv1 = _mm512_load_ps(ps + g * GI8_COLS + 16);
#define GI8_A_ZERO(i) __m512i a##i##0 = _mm512_setzero_si512(), a##i##1 = _mm512_setzero_si512();
                    GI8_ROWS_DO(GI8_A_ZERO)
                    GI8_DOTS(pk + (size_t)k40 * GI8_COLS, xt + (size_t)k40 * GI8_ROWS * 4);
                    if (xtr) { /* 8-bit codes: 256 x (the dots so far) + the residual's dots */
#define GI8_A_SHIFT(i) a##i##0 = _mm512_slli_epi32(a##i##0, 8), a##i##1 = _mm512_slli_epi32(a##i##1, 8);
                        GI8_ROWS_DO(GI8_A_SHIFT)
                        GI8_DOTS(pk + (size_t)k40 * GI8_COLS, xtr + (size_t)k40 * GI8_ROWS * 4);
                    }
#define GI8_SCALE(i) {                                                                                    \
        const __m512 xs = _mm512_set1_ps(xs_t[b * GI8_ROWS + i]);                                          \
        f##i##0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a##i##0), _mm512_mul_ps(sv0, xs), f##i##0);            \
        f##i##1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a##i##1), _mm512_mul_ps(sv1, xs), f##i##1); }
                    GI8_ROWS_DO(GI8_SCALE)
                    if ((b + 1) % bpg == 0) { /* the group's last block: its bias term */
                        const __m512 bv0 = _mm512_load_ps(pb + g * GI8_COLS), bv1 = _mm512_load_ps(pb + g * GI8_COLS + 16);
#define GI8_BIAS(i) {                                                                                     \
        const __m512 xs = _mm512_set1_ps(xsum_t[g * GI8_ROWS + i]);                                        \
        f##i##0 = _mm512_fmadd_ps(bv0, xs, f##i##0);                                                       \
        f##i##1 = _mm512_fmadd_ps(bv1, xs, f##i##1); }
                        GI8_ROWS_DO(GI8_BIAS)
                    }
                }
#define GI8_KEEP(i) _mm512_store_ps(keep + i * GI8_COLS, f##i##0), _mm512_store_ps(keep + i * GI8_COLS + 16, f##i##1);
                GI8_ROWS_DO(GI8_KEEP)
            }
            if (g1 == G) { /* the last chunk: the classes' pairwise sum + bias, straight into y
                            * (rows past M are the tile's padding) */
#define GI8_A(c, i, h) _mm512_load_ps(B->fin + ((size_t)(c) * GI8_ROWS + (i)) * GI8_COLS + 16 * (h))
#define GI8_SUM8(i, h) _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(GI8_A(0, i, h), GI8_A(1, i, h)),          \
                                                   _mm512_add_ps(GI8_A(2, i, h), GI8_A(3, i, h))),         \
                                     _mm512_add_ps(_mm512_add_ps(GI8_A(4, i, h), GI8_A(5, i, h)),          \
                                                   _mm512_add_ps(GI8_A(6, i, h), GI8_A(7, i, h))))
#define GI8_OUT(i)                                                                                        \
    if (m0 + i < J->M) {                                                                                   \
        float *yr = J->y + (size_t)(m0 + i) * N + n0;                                                      \
        _mm512_mask_storeu_ps(yr, mk0, _mm512_add_ps(GI8_SUM8(i, 0), bias0));                              \
        _mm512_mask_storeu_ps(yr + 16, mk1, _mm512_add_ps(GI8_SUM8(i, 1), bias1));                         \
    }
                GI8_ROWS_DO(GI8_OUT)
            }
        }
    }
}

static void gi8_task(void *ctx, int ith, int nth) {
    (void)ith;
    (void)nth;
    gi8_t *J = ctx;
    const size_t K = (size_t)J->K, G = (size_t)J->G;
    const size_t pk_bytes = GI8_COLS * K, par = sizeof(float) * GI8_COLS * (2 * G + (size_t)GI8_CLASSES * (J->Mp + GI8_ROWS));
    uint8_t *buf = aligned_alloc(64, pk_bytes + par + GI8_COLS * K + 64);
    if (!buf) return;
    gi8_buf B = {.pk = (uint32_t *)buf, .ps = (float *)(buf + pk_bytes)};
    B.pb = B.ps + GI8_COLS * G;
    B.acc = B.pb + GI8_COLS * G;
    B.fin = B.acc + GI8_COLS * (size_t)GI8_CLASSES * J->Mp;
    B.rows = (uint8_t *)(B.fin + GI8_COLS * GI8_CLASSES * GI8_ROWS);
    for (;;) {
        const int p = atomic_fetch_add_explicit(&J->next, 1, memory_order_relaxed);
        if (p * GI8_COLS >= J->N) break;
        gi8_panel(J, p * GI8_COLS, &B);
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
