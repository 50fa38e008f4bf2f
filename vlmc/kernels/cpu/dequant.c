/* vlmc CPU kernels: weights to float32 rows. Affine codes of any width (the prefill GEMM
 * converts quantized weights slice by slice, qembedding gathers rows, widen repacks codes
 * through it with unit scales) and bfloat16 (the prefill GEMM upcasts bf16 weights). */
#include "vlmc.h"

/* Decode codes [k0, k0+n) (k0, n multiples of 8) of one packed row into float codes
 * (not scaled). Eight codes always span exactly `bits` bytes. */
static void decode_codes(const uint8_t *row, int bits, int k0, int n, float *out) {
    const uint64_t mask = (1u << bits) - 1;
    const uint8_t *p = row + (size_t)k0 / 8 * bits;
    for (int c = 0; c < n; c += 8, p += bits) {
        uint64_t v = 0;
        memcpy(&v, p, bits); /* little-endian host */
        for (int i = 0; i < 8; i++) out[c + i] = (float)((v >> (i * bits)) & mask);
    }
}

/* one row dequantized to float32 (any bits) */
void dequant_row_generic(const uint8_t *row, int K, int bits, int gs, const void *sc, const void *bi, int st,
                         size_t goff, float *out) {
    decode_codes(row, bits, 0, K, out);
    for (int g = 0; g < K / gs; g++) {
        float s = ld_param(sc, goff + g, st), b = ld_param(bi, goff + g, st);
        float *o = out + (size_t)g * gs;
        for (int i = 0; i < gs; i++) o[i] = s * o[i] + b;
    }
}
/* ---- dequantize: out[N, K] float32 --------------------------------------------------- */
typedef struct {
    const uint32_t *w;
    const void *sc, *bi;
    int st, N, K, bits, gs;
    float *out;
    int chunk;
    _Atomic int next;
} dq_t;

static void dequant_rows(const dq_t *D, int n0, int n1) {
    const int K = D->K, gs = D->gs, G = K / gs, bits = D->bits;
    uint8_t *wide = VLMC_SIMD && is_packed(bits) && K % 64 == 0 ? malloc((size_t)K) : NULL;
    packed_t pk;
    if (wide) packed_init(&pk, bits);
    for (int n = n0; n < n1; n++) {
        const uint8_t *row = (const uint8_t *)D->w + (size_t)n * K / 8 * bits;
        float *o = D->out + (size_t)n * K;
#if VLMC_SIMD
        if (bits == 4 || bits == 8 || wide) {
            if (wide) { /* 2/3/5/6-bit codes widened to bytes, then as 8-bit */
                expand_packed(&pk, row, wide, K);
                row = wide;
            }
            const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), mask = _mm256_set1_epi32(0xF);
            for (int g = 0; g < G; g++) {
                const __m256 s = _mm256_set1_ps(ld_param(D->sc, (size_t)n * G + g, D->st));
                const __m256 b = _mm256_set1_ps(ld_param(D->bi, (size_t)n * G + g, D->st));
                for (int k = g * gs; k < (g + 1) * gs; k += 8) {
                    __m256i q;
                    if (bits != 4) {
                        q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + k)));
                    } else {
                        uint32_t word;
                        memcpy(&word, row + k / 2, 4);
                        q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)word), sh), mask);
                    }
                    _mm256_storeu_ps(o + k, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), s, b));
                }
            }
            continue;
        }
#endif
        dequant_row_generic(row, K, bits, gs, D->sc, D->bi, D->st, (size_t)n * G, o);
    }
    free(wide);
}

static void dequant_task(void *ctx, int ith, int nth) {
    (void)ith;
    (void)nth;
    dq_t *D = ctx;
    for (;;) {
        int s = atomic_fetch_add(&D->next, D->chunk);
        if (s >= D->N) return;
        dequant_rows(D, s, s + D->chunk < D->N ? s + D->chunk : D->N);
    }
}

int vlmc_dequantize(const uint32_t *w, const void *scales, const void *biases, int st, int N, int K, int bits,
                    int gs, float *out, int n_threads) {
    int rc = check_q(K, N, bits, gs, st);
    if (rc) return rc;
    dq_t D = {.w = w, .sc = scales, .bi = biases, .st = st, .N = N, .K = K, .bits = bits, .gs = gs, .out = out};
    int nth = eff_threads(n_threads, 4.0 * N * K, N);
    D.chunk = pick_chunk(N, nth);
    atomic_store(&D.next, 0);
    run_parallel(dequant_task, &D, nth);
    return 0;
}

/* ---- bfloat16 -> float32 (the prefill GEMM upcasts bf16 weights per call) ----------- */
typedef struct { const uint16_t *src; float *dst; int64_t n; } cvt_t;

static void cvt_task(void *ctx, int ith, int nth) {
    cvt_t *C = ctx;
    int64_t per = ((C->n + nth - 1) / nth + 63) & ~(int64_t)63, i0 = per * ith, i1 = i0 + per < C->n ? i0 + per : C->n;
    int64_t i = i0;
#if VLMC_SIMD
    for (; i + 8 <= i1; i += 8) _mm256_storeu_ps(C->dst + i, ld8_bf16(C->src + i));
#endif
    for (; i < i1; i++) C->dst[i] = bf16_to_f32(C->src[i]);
}

void vlmc_bf16_to_f32(const uint16_t *src, int64_t n, float *dst, int n_threads) {
    cvt_t C = {src, dst, n};
    int nth = eff_threads(n_threads, 2.0 * n, (int)(n / 1024 + 1));
    run_parallel(cvt_task, &C, nth);
}
