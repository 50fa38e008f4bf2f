/* vlmc CPU kernels: the elementwise ops of the host path:
 *
 *   vlmc_softmax_rows   in place, softmax(scale * s) along rows, with an optional keep
 *                       mask shared by blocks of rows (attention scores);
 *   vlmc_sigmoid_gate   out = x * sigmoid(a (x + c x^3)) [* up]  (silu, quick_gelu, GELU-tanh, their GLUs);
 *   vlmc_norm           RMSNorm / LayerNorm of rows (RMSNorm also in MLX's arithmetic);
 *   vlmc_rope           rotary embedding of strided rows.
 *
 * numpy evaluates these one pass per operation on one core; here they are one or two
 * passes over L1-sized rows, split across the pool's threads.
 */
#include "vlmc.h"

/* threads for an elementwise job: one below 64k values or for a single row (the pool's
 * handoff costs more than it saves there), else all */
static int ew_threads(long rows, long cols, int n_threads) {
    return rows * cols < (1L << 16) || rows < 2 ? 1 : n_threads;
}

/* ---- softmax rows ----------------------------------------------------------------- */

typedef struct {
    float *s;
    long rows, cols;
    float scale;
    const uint8_t *keep; /* [keep_rows, cols] (1 = attend) or NULL; row r reads keep row r % keep_rows */
    long keep_rows;
} softmax_job;

#if VLMC_SIMD && defined(__AVX512F__) && defined(__AVX512BW__)
/* the lanes of keep[c .. c + 16) that are set (all when keep is NULL) */
static ALWAYS __mmask16 keep16(const uint8_t *keep, long c, long cols) {
    const __mmask16 tail = cols - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (cols - c)) - 1u);
    if (!keep) return tail;
    return _mm_mask_test_epi8_mask(tail, _mm_maskz_loadu_epi8(tail, keep + c), _mm_set1_epi8(-1));
}

/* One row in three passes over L1 (max, exp and sum, scale), 16 lanes at a time. */
void softmax_row(float *s, long cols, float scale, const uint8_t *keep) {
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (long c = 0; c < cols; c += 16) {
        const __mmask16 k = keep16(keep, c, cols);
        mv = _mm512_mask_max_ps(mv, k, mv, _mm512_maskz_loadu_ps(k, s + c));
    }
    const float m = _mm512_reduce_max_ps(mv);
    if (m == -INFINITY) { /* nothing visible (a left-padding query row): zeros, no NaN */
        memset(s, 0, sizeof(float) * (size_t)cols);
        return;
    }
    const __m512 sv = _mm512_set1_ps(scale), msv = _mm512_set1_ps(m * scale);
    __m512 acc = _mm512_setzero_ps();
    for (long c = 0; c < cols; c += 16) {
        const __mmask16 t = cols - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (cols - c)) - 1u);
        const __mmask16 k = keep16(keep, c, cols);
        const __m512 e = _mm512_maskz_mov_ps(k, exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(t, s + c), sv, msv)));
        _mm512_mask_storeu_ps(s + c, t, e);
        acc = _mm512_add_ps(acc, e);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(acc));
    for (long c = 0; c < cols; c += 16) {
        const __mmask16 t = cols - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (cols - c)) - 1u);
        _mm512_mask_storeu_ps(s + c, t, _mm512_mul_ps(_mm512_maskz_loadu_ps(t, s + c), inv));
    }
}
#else
void softmax_row(float *s, long cols, float scale, const uint8_t *keep) {
    float m = -INFINITY;
    for (long c = 0; c < cols; c++)
        if ((!keep || keep[c]) && s[c] > m) m = s[c];
    if (m == -INFINITY) { /* nothing visible (a left-padding query row): zeros, no NaN */
        memset(s, 0, sizeof(float) * (size_t)cols);
        return;
    }
    const float ms = m * scale;
    float total = 0.f;
    long c = 0;
#if VLMC_SIMD
    const __m256 sv = _mm256_set1_ps(scale), msv = _mm256_set1_ps(ms);
    __m256 acc = _mm256_setzero_ps();
    for (; c + 8 <= cols; c += 8) {
        __m256 e = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(s + c), sv, msv));
        if (keep) {
            const __m128i k8 = _mm_loadl_epi64((const __m128i *)(keep + c));
            const __m256i k32 = _mm256_cvtepu8_epi32(k8);
            e = _mm256_and_ps(e, _mm256_castsi256_ps(_mm256_cmpgt_epi32(k32, _mm256_setzero_si256())));
        }
        _mm256_storeu_ps(s + c, e);
        acc = _mm256_add_ps(acc, e);
    }
    total = hsum(acc);
#endif
    for (; c < cols; c++) {
        const float e = (!keep || keep[c]) ? exp1(s[c] * scale - ms) : 0.f;
        s[c] = e;
        total += e;
    }
    const float inv = 1.f / total;
    for (c = 0; c < cols; c++) s[c] *= inv;
}
#endif

static void softmax_task(void *ctx, int ith, int nth) {
    const softmax_job *J = (const softmax_job *)ctx;
    const long r0 = J->rows * ith / nth, r1 = J->rows * (ith + 1) / nth;
    for (long r = r0; r < r1; r++)
        softmax_row(J->s + r * J->cols, J->cols, J->scale,
                    J->keep ? J->keep + (r % J->keep_rows) * J->cols : NULL);
}

/* s [rows, cols] in place; scale > 0. Returns 0, or -1 for bad arguments. */
int vlmc_softmax_rows(float *s, int64_t rows, int64_t cols, float scale, const uint8_t *keep, int64_t keep_rows,
                      int n_threads) {
    if (!s || rows < 0 || cols < 1 || !(scale > 0.f) || (keep && keep_rows < 1)) return -1;
    softmax_job J = {s, rows, cols, scale, keep, keep_rows};
    run_parallel(softmax_task, &J, ew_threads(rows, cols, n_threads));
    return 0;
}

/* ---- x * sigmoid(a (x + c x^3)) [* up] ------------------------------------------------
 * c = 0: silu (a = 1), quick_gelu (a = 1.702); GELU-tanh is x sigmoid(2 sqrt(2 / pi) (x +
 * 0.044715 x^3)), 0.5 x (1 + tanh(u)) written with 1 + tanh(u) = 2 sigmoid(2 u). */

typedef struct {
    const float *x, *up;
    float *out;
    long rows, cols, x_ld, up_ld; /* row strides in elements (x and up may be column slices) */
    float a, c;
} gate_job;

static void gate_row(const float *x, const float *up, float *out, long cols, float a, float c) {
    long i = 0;
#if VLMC_SIMD
    const __m256 na = _mm256_set1_ps(-a), one = _mm256_set1_ps(1.f), cv = _mm256_set1_ps(c);
    for (; i + 8 <= cols; i += 8) {
        const __m256 xv = _mm256_loadu_ps(x + i);
        const __m256 u = c == 0.f ? xv : _mm256_add_ps(xv, _mm256_mul_ps(cv, _mm256_mul_ps(_mm256_mul_ps(xv, xv), xv)));
        __m256 g = _mm256_div_ps(xv, _mm256_add_ps(one, exp8(_mm256_mul_ps(u, na))));
        if (up) g = _mm256_mul_ps(g, _mm256_loadu_ps(up + i));
        _mm256_storeu_ps(out + i, g);
    }
#endif
    for (; i < cols; i++) {
        const float u = c == 0.f ? x[i] : x[i] + c * (x[i] * x[i] * x[i]);
        const float g = x[i] / (1.f + exp1(-a * u));
        out[i] = up ? g * up[i] : g;
    }
}

static void gate_task(void *ctx, int ith, int nth) {
    const gate_job *J = (const gate_job *)ctx;
    const long r0 = J->rows * ith / nth, r1 = J->rows * (ith + 1) / nth;
    for (long r = r0; r < r1; r++)
        gate_row(J->x + r * J->x_ld, J->up ? J->up + r * J->up_ld : NULL, J->out + r * J->cols, J->cols, J->a, J->c);
}

/* out [rows, cols] = x / (1 + exp(-a (x + c x^3))) (* up when up is not NULL), x and up
 * read with row strides x_ld / up_ld; out may alias x or up when their strides are cols. */
int vlmc_sigmoid_gate(const float *x, int64_t x_ld, const float *up, int64_t up_ld, float *out, int64_t rows,
                      int64_t cols, float a, float c, int n_threads) {
    if (!x || !out || rows < 0 || cols < 0 || x_ld < cols || (up && up_ld < cols)) return -1;
    gate_job J = {x, up, out, rows, cols, x_ld, up_ld, a, c};
    run_parallel(gate_task, &J, ew_threads(rows, cols, n_threads));
    return 0;
}

/* ---- norms -------------------------------------------------------------------------- */

typedef struct {
    const float *x, *w, *b;
    float *out;
    long rows, cols;
    float eps;
    int layer; /* 0: RMSNorm x * w / rms(x); 1: LayerNorm (x - mean) * w / std + b; 2: RMSNorm as MLX */
} norm_job;

/* One row's RMSNorm as MLX's CPU backend computes mx.fast.rms_norm (its composed fallback):
 * the squares summed in order, times 1/n, plus eps, 1 / sqrt, times x, then w: the same
 * float32 to the last bit. The unweighted norm (Gemma 4's value norm) is MLX's elsewhere in
 * the op library, so this keeps its numbers where the host computes it. No fused
 * multiply-add: the squares round before they are summed, as MLX's square op stores them. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
static void norm_row_mlx(const float *x, float *o, long n, const float *w, float eps) {
    float s = 0.f;
    for (long i = 0; i < n; i++) {
        const float q = x[i] * x[i];
        s += q;
    }
    const float inv = 1.f / sqrtf(s * (1.f / (float)n) + eps);
    for (long i = 0; i < n; i++) {
        const float v = x[i] * inv;
        o[i] = w ? v * w[i] : v;
    }
}

static void norm_task(void *ctx, int ith, int nth) {
    const norm_job *J = (const norm_job *)ctx;
    const long r0 = J->rows * ith / nth, r1 = J->rows * (ith + 1) / nth, n = J->cols;
    if (J->layer == 2) {
        for (long r = r0; r < r1; r++) norm_row_mlx(J->x + r * n, J->out + r * n, n, J->w, J->eps);
        return;
    }
    for (long r = r0; r < r1; r++) {
        const float *x = J->x + r * n;
        float *o = J->out + r * n;
        float mean = 0.f;
        if (J->layer) {
            float s[16] = {0};
            long i = 0;
            for (; i + 16 <= n; i += 16)
                for (int l = 0; l < 16; l++) s[l] += x[i + l];
            for (int w = 8; w >= 1; w /= 2)
                for (int l = 0; l < w; l++) s[l] += s[l + w];
            for (; i < n; i++) s[0] += x[i];
            mean = s[0] / (float)n;
        }
        float q[16] = {0};
        long i = 0;
        for (; i + 16 <= n; i += 16)
            for (int l = 0; l < 16; l++) {
                const float d = x[i + l] - mean;
                q[l] += d * d;
            }
        for (int w = 8; w >= 1; w /= 2)
            for (int l = 0; l < w; l++) q[l] += q[l + w];
        for (; i < n; i++) q[0] += (x[i] - mean) * (x[i] - mean);
        const float inv = 1.f / sqrtf(q[0] / (float)n + J->eps);
        for (i = 0; i < n; i++) {
            float v = (x[i] - mean) * inv;
            if (J->w) v *= J->w[i];
            o[i] = J->b ? v + J->b[i] : v;
        }
    }
}

/* out [rows, cols] = norm of each row of x (contiguous), scaled by w (NULL: 1) and, for
 * LayerNorm, shifted by b (NULL: 0). layer: 0 RMSNorm, 1 LayerNorm, 2 RMSNorm in MLX's
 * arithmetic (norm_row_mlx). */
int vlmc_norm(const float *x, int64_t rows, int64_t cols, const float *w, const float *b, float eps, int layer,
              float *out, int n_threads) {
    if (!x || !out || rows < 0 || cols < 1) return -1;
    norm_job J = {x, w, b, out, rows, cols, eps, layer};
    run_parallel(norm_task, &J, ew_threads(rows, cols, n_threads));
    return 0;
}

/* ---- rotary embedding ----------------------------------------------------------------- */

typedef struct {
    const float *x, *cs, *sn;
    float *out;
    long A, H, L, D, sa, sh, sl, ca, cl;
} rope_job;

/* no fused multiply-add here: the products and the sum round separately, as in the
 * reference (MLX's multiply and add kernels), so the result is the same float32 */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
static void rope_task(void *ctx, int ith, int nth) {
    const rope_job *J = (const rope_job *)ctx;
    const long rows = J->A * J->H * J->L, r0 = rows * ith / nth, r1 = rows * (ith + 1) / nth, D = J->D, h2 = D / 2;
    for (long r = r0; r < r1; r++) {
        const long a = r / (J->H * J->L), h = r / J->L % J->H, l = r % J->L;
        const float *x = J->x + a * J->sa + h * J->sh + l * J->sl;
        const float *c = J->cs + a * J->ca + l * J->cl, *s = J->sn + a * J->ca + l * J->cl;
        float *o = J->out + r * D;
        /* the reference's x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1] */
        for (long i = 0; i < h2; i++) {
            const float p = x[i] * c[i], q = -x[i + h2] * s[i];
            o[i] = p + q;
        }
        for (long i = h2; i < D; i++) {
            const float p = x[i] * c[i], q = x[i - h2] * s[i];
            o[i] = p + q;
        }
    }
}

/* out [A, H, L, D] (contiguous) = rope of x, whose rows are read at a*sa + h*sh + l*sl
 * (element strides; D contiguous), with cos/sin rows at a*ca + l*cl (ca = 0: shared). */
int vlmc_rope(const float *x, int64_t A, int64_t H, int64_t L, int64_t D, int64_t sa, int64_t sh, int64_t sl,
              const float *cs, const float *sn, int64_t ca, int64_t cl, float *out, int n_threads) {
    if (!x || !cs || !sn || !out || A < 0 || H < 0 || L < 0 || D < 2 || D % 2) return -1;
    rope_job J = {x, cs, sn, out, A, H, L, D, sa, sh, sl, ca, cl};
    run_parallel(rope_task, &J, ew_threads(A * H * L, D, n_threads));
    return 0;
}
