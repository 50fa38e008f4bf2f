/* vlmc CPU kernels: decode-step attention over a KV cache, read in place, and the encoding
 * of a step's keys and values into affine codes (kv_affine_encode_rows).
 *
 * The attention computes what vlmc.kernels.kv_quant.kv_{dense,affine,turbo}_decode do:
 * per (sequence, KV head), scores of its R = H / HKV query heads against every held key,
 * softmax, then the values accumulated. Buffers are [B, HKV, cap, *]; keys starts[b] <= i
 * < held count. A step may bring T tokens per sequence (speculative decoding verifies a
 * draft's tokens at once): then the last T held rows are this step's and its query t sees
 * the keys before row held - T + 1 + t (causal), and its result is, bit for bit, what the
 * one-token kernel gives at that position: every query row runs the one-token arithmetic
 * over its own keys; the T x R query rows only share the reading and decoding of the rows.
 * Two drivers serve every layout, each instantiated per layout (kv_task_*): with AVX-512
 * and D % 16 == 0 (affine 4-bit: D % 32), kv_group16 takes blocks of rows (kv_rows_fn);
 * otherwise kv_group takes one row at a time (kv_row_fn). A layout only says how to turn
 * stored rows into floats, and each row is decoded once for all query rows. */
#include "vlmc.h"

typedef struct kv_job kv_job;
/* Row i of the keys (v = 0) or values (v = 1) of the (sequence, KV head) whose rows start
 * at cache row `base`, as D floats: either x, filled, or a pointer into the cache; *f is a
 * factor the row's dot products or weights are multiplied by. */
typedef const float *(*kv_row_fn)(const kv_job *J, int v, size_t base, int i, float *x, float *f);
struct kv_job {
    const float *q;
    const int32_t *starts;
    int B, H, HKV, D, T, cap, held;
    int sst;           /* stride of the score rows: max(cap, held) */
    float scale;
    float *out;
    size_t q_sb, q_sh, q_st; /* element strides of q (sequence, head, token; D contiguous) */
    size_t o_sb, o_sh, o_st; /* and of out */
    /* layout data: dense float32 rows; affine codes (bf16 scales/minimums); TurboQuant codes */
    const float *k, *v;
    const float *xk, *xv; /* rows held - T .. held - 1 of every (sequence, KV head) from here, [B, HKV, T, D], not the cache (dense) */
    const uint8_t *kc, *vc;
    const uint16_t *ks, *kb, *vs, *vb;
    const kv_codes *xkc, *xvc; /* affine: those rows from here, [B, HKV, T, *], not the cache */
    const float *kn, *vn, *kcb, *vcb;
    int bits, gs, kbits, vbits;
    _Atomic int next;
};

/* query row j = h T + t of a (sequence b, KV head hk): local head h, token t */
static ALWAYS const float *q_row(const kv_job *J, int b, int hk, int j) {
    const int R = J->H / J->HKV;
    return J->q + b * J->q_sb + (size_t)(hk * R + j / J->T) * J->q_sh + (size_t)(j % J->T) * J->q_st;
}
static ALWAYS float *o_row(const kv_job *J, int b, int hk, int j) {
    const int R = J->H / J->HKV;
    return J->out + b * J->o_sb + (size_t)(hk * R + j / J->T) * J->o_sh + (size_t)(j % J->T) * J->o_st;
}
/* the keys query row j sees end before this row (its token's own row included) */
static ALWAYS int q_end(const kv_job *J, int j) { return J->held - J->T + 1 + j % J->T; }

/* Softmax over keys first <= i < n of a score row, in place, and zero the output row of D
 * floats that the value pass accumulates into. */
static void kv_softmax_row(float *s, int first, int n, float *out, int D) {
    float m = -3.0e38f, total = 0.f;
    for (int i = first; i < n; i++) m = s[i] > m ? s[i] : m;
    for (int i = first; i < n; i++) {
        s[i] = expf(s[i] - m);
        total += s[i];
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;
    for (int i = first; i < n; i++) s[i] *= inv;
    for (int d = 0; d < D; d++) out[d] = 0.f;
}

/* a . b over n floats with 16 independent partial sums: without -ffast-math a single
 * running sum must stay sequential, and these dots are most of a decode step's attention */
static ALWAYS float dot16(const float *a, const float *b, int n) {
    float acc[16] = {0};
    int j = 0;
    for (; j + 16 <= n; j += 16)
        for (int l = 0; l < 16; l++) acc[l] += a[j + l] * b[j + l];
    float s = 0.f;
    for (; j < n; j++) s += a[j] * b[j];
    for (int l = 0; l < 16; l++) s += acc[l];
    return s;
}

/* this step's row i (>= held - T) of a (sequence, KV head) bk, dense: from xk / xv */
static ALWAYS const float *x_row(const kv_job *J, int v, int bk, int i) {
    return (v ? J->xv : J->xk) + ((size_t)bk * J->T + (size_t)(i - (J->held - J->T))) * J->D;
}

/* One (sequence, KV head). sc: R T * sst floats; x: D floats of scratch. */
static ALWAYS void kv_group(const kv_job *J, kv_row_fn row, int bk, float *sc, float *x) {
    const int D = J->D, RT = J->H / J->HKV * J->T, b = bk / J->HKV, hk = bk % J->HKV;
    const int first = J->starts[b], n = J->held, cap = J->cap, sst = J->sst;
    const size_t base = ((size_t)b * J->HKV + hk) * cap;
    const int xi = J->xk ? n - J->T : n; /* the rows from xk / xv (dense), not in the cache */
    for (int i = first; i < n; i++) {
        float f = 1.f;
        const float *k = i >= xi ? x_row(J, 0, bk, i) : row(J, 0, base, i, x, &f);
        f *= J->scale;
        for (int j = 0; j < RT; j++)
            if (i < q_end(J, j)) sc[(size_t)j * sst + i] = dot16(q_row(J, b, hk, j), k, D) * f;
    }
    for (int j = 0; j < RT; j++) kv_softmax_row(sc + (size_t)j * sst, first, q_end(J, j), o_row(J, b, hk, j), D);
    for (int i = first; i < n; i++) {
        float f = 1.f;
        const float *v = i >= xi ? x_row(J, 1, bk, i) : row(J, 1, base, i, x, &f);
        for (int j = 0; j < RT; j++) {
            if (i >= q_end(J, j)) continue;
            const float p = sc[(size_t)j * sst + i] * f;
            float *out = o_row(J, b, hk, j);
            for (int d = 0; d < D; d++) out[d] += p * v[d];
        }
    }
}

/* the work loop, instantiated per layout below so that its row function is inlined */
static ALWAYS void kv_task(kv_job *J, kv_row_fn row) {
    const int RT = J->H / J->HKV * J->T;
    float *sc = malloc(sizeof(float) * ((size_t)RT * J->sst + (size_t)J->D));
    if (!sc) return;
    for (;;) {
        int bk = atomic_fetch_add_explicit(&J->next, 1, memory_order_relaxed);
        if (bk >= J->B * J->HKV) break;
        kv_group(J, row, bk, sc, sc + (size_t)RT * J->sst);
    }
    free(sc);
}

static int kv_run(kv_job *J, task_fn task, int n_threads) {
    const int extra = J->xk != NULL || J->xkc != NULL;
    if (J->B < 1 || J->H < 1 || J->HKV < 1 || J->H % J->HKV || J->D < 1 || J->T < 1 || J->held < J->T
        || J->held - (extra ? J->T : 0) > J->cap)
        return -1;
    J->sst = J->held > J->cap ? J->held : J->cap;
    atomic_store(&J->next, 0);
    int nth = n_threads < 1 ? 1 : n_threads;
    if (nth > J->B * J->HKV) nth = J->B * J->HKV;
    run_parallel(task, J, nth);
    return 0;
}

/* dense float32 rows: the cache itself */
static const float *kv_row_dense(const kv_job *J, int v, size_t base, int i, float *x, float *f) {
    (void)x;
    *f = 1.f;
    return (v ? J->v : J->k) + (base + (size_t)i) * J->D;
}

/* affine codes (vlmc.runtime.kv_codecs.Affine): uint8 rows of D * bits / 8 bytes (8-bit:
 * one byte each; 4-bit: byte b holds codes 2b (low nibble) and 2b + 1), code * scale +
 * minimum per group of gs with bfloat16 scales and minimums [.., D / gs]. Row i of a
 * (sequence, KV head) comes from the cache, or, for this step's rows when the caller passed
 * them apart (xkc / xvc), from there (they may lie past the capacity). */
static ALWAYS kv_codes affine_row(const kv_job *J, int v, size_t base, int i) {
    const int G = J->D / J->gs;
    const size_t rb = (size_t)J->D * J->bits / 8, r = base + (size_t)i;
    const kv_codes *x = v ? J->xvc : J->xkc;
    if (x && i >= J->held - J->T) {
        const size_t at = base / (size_t)J->cap * J->T + (size_t)(i - (J->held - J->T));
        return (kv_codes){x->codes + at * rb, x->scales + at * G, x->mins + at * G};
    }
    return (kv_codes){(v ? J->vc : J->kc) + r * rb, (v ? J->vs : J->ks) + r * G, (v ? J->vb : J->kb) + r * G};
}

static const float *kv_row_affine(const kv_job *J, int v, size_t base, int i, float *x, float *f) {
    const int D = J->D, G = D / J->gs;
    const kv_codes src = affine_row(J, v, base, i);
    const uint8_t *c = src.codes;
    const uint16_t *sc = src.scales, *mn = src.mins;
    if (J->bits == 8) {
        for (int j = 0; j < D; j++) x[j] = (float)c[j];
    } else {
        for (int b = 0; b < D / 2; b++) {
            x[2 * b] = (float)(c[b] & 15);
            x[2 * b + 1] = (float)(c[b] >> 4);
        }
    }
    for (int g = 0; g < G; g++) {
        const float a = bf16_to_f32(sc[g]), o = bf16_to_f32(mn[g]);
        for (int j = g * J->gs; j < (g + 1) * J->gs; j++) x[j] = x[j] * a + o;
    }
    *f = 1.f;
    return x;
}

/* TurboQuant codes (vlmc.runtime.kv_codecs.Turbo), in the rotated space: codebook levels
 * packed as vlmc.kernels.kv_quant.pack (8 codes in `bits` bytes, code i at bit i * bits of
 * their little-endian word), times the row's float32 norm / sqrt(D) */
static const float *kv_row_turbo(const kv_job *J, int v, size_t base, int i, float *x, float *f) {
    const int D = J->D, bits = v ? J->vbits : J->kbits;
    const size_t r = base + (size_t)i;
    const uint8_t *c = (v ? J->vc : J->kc) + r * (size_t)(D * bits / 8);
    const float *cb = v ? J->vcb : J->kcb;
    const uint32_t mask = (1u << bits) - 1;
    for (int g = 0; g < D / 8; g++, c += bits) {
        uint32_t w = c[0] | ((uint32_t)c[1] << 8);
        if (bits > 2) w |= (uint32_t)c[2] << 16;
        if (bits > 3) w |= (uint32_t)c[3] << 24;
        for (int i = 0; i < 8; i++) x[g * 8 + i] = cb[(w >> (i * bits)) & mask];
    }
    *f = (v ? J->vn : J->kn)[r] / sqrtf((float)D);
    return x;
}

#if defined(__AVX512F__)
#define KVD_SIMD 1
#define KVD_HB 6     /* query heads per pass (a 7:1 or wider group takes two) */
#define KVD_ROWS 128 /* cached rows per block */
/* Prefetch n floats of a cached row 4096 bytes ahead: the hardware prefetcher alone falls
 * behind the per-row arithmetic of every query head */
static ALWAYS void kv_pf(const float *row, int n) {
    for (int z = 0; z < n; z += 16) _mm_prefetch((const char *)(row + z) + 4096, _MM_HINT_T0);
}
/* Rows i0 .. i0 + nr - 1 of the keys (v = 0) or values (v = 1) of the KV head at cache row
 * `base`, as nr x D contiguous floats: a pointer into the cache (dense) or rows decoded
 * into buf. */
typedef const float *(*kv_rows_fn)(const kv_job *J, int v, size_t base, int i0, int nr, float *buf);

static const float *kv_rows_dense(const kv_job *J, int v, size_t base, int i0, int nr, float *buf) {
    const float *rows = (v ? J->v : J->k) + (base + (size_t)i0) * J->D;
    const int xi = J->held - J->T; /* this step's rows (with xk / xv) */
    if (!J->xk || i0 + nr <= xi) return rows;
    /* the block ends with rows from xk / xv: the cached ones, then those, into buf */
    const int nc = xi > i0 ? xi - i0 : 0;
    memcpy(buf, rows, sizeof(float) * (size_t)nc * J->D);
    for (int r = nc; r < nr; r++) memcpy(buf + (size_t)r * J->D, x_row(J, v, (int)(base / J->cap), i0 + r), sizeof(float) * J->D);
    return buf;
}

/* affine codes (kv_row_affine's layout) with D % 16 == 0 and gs % 16 == 0: 16 codes per
 * step, nibbles interleaved back into natural order, then code * scale + minimum */
static const float *kv_rows_affine(const kv_job *J, int v, size_t base, int i0, int nr, float *buf) {
    const int D = J->D;
    const __m512i lo_hi = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i lo_hi2 = _mm512_add_epi32(lo_hi, _mm512_set1_epi32(8));
    for (int r = 0; r < nr; r++) {
        const kv_codes src = affine_row(J, v, base, i0 + r);
        const uint8_t *c = src.codes;
        const uint16_t *sc = src.scales, *mn = src.mins;
        float *x = buf + (size_t)r * D;
        if (J->bits == 8) {
            for (int j = 0; j < D; j += 16)
                _mm512_storeu_ps(x + j, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + j)))));
        } else {
            for (int j = 0; j < D; j += 32) { /* 16 bytes: codes j .. j + 31 */
                const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + j / 2)));
                const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
                const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
                _mm512_storeu_ps(x + j, _mm512_permutex2var_ps(lo, lo_hi, hi));
                _mm512_storeu_ps(x + j + 16, _mm512_permutex2var_ps(lo, lo_hi2, hi));
            }
        }
        for (int j = 0; j < D; j += 16) {
            const int g = j / J->gs;
            _mm512_storeu_ps(x + j, _mm512_fmadd_ps(_mm512_loadu_ps(x + j), _mm512_set1_ps(bf16_to_f32(sc[g])),
                                                    _mm512_set1_ps(bf16_to_f32(mn[g]))));
        }
    }
    return buf;
}

/* TurboQuant codes (kv_row_turbo's layout: 8 codes of `bits` bits in `bits` bytes), D %
 * 16 == 0, at most 16 levels: 16 codes per step through a codebook held in one register,
 * times the row's norm / sqrt(D) */
static const float *kv_rows_turbo(const kv_job *J, int v, size_t base, int i0, int nr, float *buf) {
    const int D = J->D, bits = v ? J->vbits : J->kbits;
    const float *cb = v ? J->vcb : J->kcb, *nrm = v ? J->vn : J->kn;
    float levels[16] = {0};
    memcpy(levels, cb, sizeof(float) * ((size_t)1 << bits));
    const __m512 cbv = _mm512_loadu_ps(levels);
    const __m512i mask = _mm512_set1_epi32((1 << bits) - 1);
    const __m512i shifts = _mm512_mullo_epi32(_mm512_set_epi32(7, 6, 5, 4, 3, 2, 1, 0, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(bits));
    const float inv_sqrt_d = 1.f / sqrtf((float)D);
    for (int r = 0; r < nr; r++) {
        const size_t row = base + (size_t)i0 + r;
        const uint8_t *c = (v ? J->vc : J->kc) + row * (size_t)(D * bits / 8);
        const __m512 f = _mm512_set1_ps(nrm[row] * inv_sqrt_d);
        float *x = buf + (size_t)r * D;
        for (int j = 0; j < D; j += 16, c += 2 * bits) {
            uint32_t w0 = 0, w1 = 0;
            memcpy(&w0, c, (size_t)bits);
            memcpy(&w1, c + bits, (size_t)bits);
            const __m512i w = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32((int)w0), _mm512_set1_epi32((int)w1));
            const __m512i idx = _mm512_and_si512(_mm512_srlv_epi32(w, shifts), mask);
            _mm512_storeu_ps(x + j, _mm512_mul_ps(_mm512_permutexvar_ps(idx, cbv), f));
        }
    }
    return buf;
}

/* One (sequence, KV head) for D % 16 == 0, its query rows (R heads x T tokens) in passes
 * of up to 6, the cache in blocks of KVD_ROWS rows. Per key row one 16-float load feeds an
 * FMA for every query row of a pass (6 accumulator chains); the value pass keeps 6 query
 * rows x 64 output floats in 24 registers across a block; the softmax uses exp8. The
 * generic driver spends a scalar expf per score and re-reads and re-writes the output
 * rows for every cached token. Scores of keys past a query row's end are computed with the
 * others and never read. sc: R T * sst floats; buf: KVD_ROWS * D. */
static ALWAYS void kv_group16(const kv_job *J, int bk, float *sc, float *buf, kv_rows_fn rows) {
    const int D = J->D, RT = J->H / J->HKV * J->T, b = bk / J->HKV, hk = bk % J->HKV, nz = D / 16;
    const int first = J->starts[b], n = J->held, cap = J->cap, sst = J->sst;
    const int common = n - J->T + 1; /* keys every query row sees end here */
    const size_t base = ((size_t)b * J->HKV + hk) * cap;
    for (int j = 0; j < RT; j++) memset(o_row(J, b, hk, j), 0, sizeof(float) * (size_t)D);
    if (first >= n) return; /* nothing visible: zeros, as the generic driver gives */
    for (int i0 = first; i0 < n; i0 += KVD_ROWS) {
        const int nr = n - i0 < KVD_ROWS ? n - i0 : KVD_ROWS;
        const float *K = rows(J, 0, base, i0, nr, buf);
        for (int h0 = 0; h0 < RT; h0 += KVD_HB) {
            const int hb = RT - h0 < KVD_HB ? RT - h0 : KVD_HB;
            const float *q[KVD_HB];
            UNROLL for (int h = 0; h < KVD_HB; h++) q[h] = q_row(J, b, hk, h0 + (h < hb ? h : 0));
            for (int r = 0; r < nr; r++) {
                const float *k = K + (size_t)r * D;
                if (h0 == 0) kv_pf(k, D);
                __m512 acc[KVD_HB];
                UNROLL for (int h = 0; h < KVD_HB; h++) acc[h] = _mm512_setzero_ps();
                for (int z = 0; z < nz; z++) {
                    const __m512 kv = _mm512_loadu_ps(k + 16 * z);
                    UNROLL for (int h = 0; h < KVD_HB; h++)
                        if (h < hb) acc[h] = _mm512_fmadd_ps(_mm512_loadu_ps(q[h] + 16 * z), kv, acc[h]);
                }
                UNROLL for (int h = 0; h < KVD_HB; h++)
                    if (h < hb) sc[(size_t)(h0 + h) * sst + i0 + r] = _mm512_reduce_add_ps(acc[h]) * J->scale;
            }
        }
    }
    for (int j = 0; j < RT; j++) { /* softmax over [first, its end) */
        float *s = sc + (size_t)j * sst;
        const int e = q_end(J, j);
        if (first >= e) continue;
        __m512 mv = _mm512_set1_ps(-3.0e38f);
        int i = first;
        for (; i + 16 <= e; i += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + i));
        float m = _mm512_reduce_max_ps(mv);
        for (; i < e; i++) m = s[i] > m ? s[i] : m;
        const __m256 m8 = _mm256_set1_ps(m);
        __m256 tv = _mm256_setzero_ps();
        for (i = first; i + 8 <= e; i += 8) {
            const __m256 x = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), m8));
            _mm256_storeu_ps(s + i, x);
            tv = _mm256_add_ps(tv, x);
        }
        float total = hsum(tv);
        for (; i < e; i++) {
            s[i] = exp1(s[i] - m);
            total += s[i];
        }
        const float inv = total > 0.f ? 1.f / total : 0.f;
        for (i = first; i < e; i++) s[i] *= inv;
    }
    for (int i0 = first; i0 < n; i0 += KVD_ROWS) {
        const int nr = n - i0 < KVD_ROWS ? n - i0 : KVD_ROWS;
        const int nall = common - i0 < nr ? (common > i0 ? common - i0 : 0) : nr; /* rows every query row takes */
        const float *V = rows(J, 1, base, i0, nr, buf);
        for (int h0 = 0; h0 < RT; h0 += KVD_HB) {
            const int hb = RT - h0 < KVD_HB ? RT - h0 : KVD_HB;
            float *o0[KVD_HB];
            int end[KVD_HB];
            UNROLL for (int h = 0; h < KVD_HB; h++) {
                o0[h] = o_row(J, b, hk, h0 + (h < hb ? h : 0));
                end[h] = q_end(J, h0 + (h < hb ? h : 0));
            }
            for (int z0 = 0; z0 < nz; z0 += 4) {
                const int zb = nz - z0 < 4 ? nz - z0 : 4;
                __m512 o[KVD_HB][4];
                UNROLL for (int h = 0; h < KVD_HB; h++) UNROLL for (int z = 0; z < 4; z++)
                    o[h][z] = h < hb && z < zb ? _mm512_loadu_ps(o0[h] + 16 * (z0 + z)) : _mm512_setzero_ps();
                for (int r = 0; r < nr; r++) {
                    const float *vr = V + (size_t)r * D + 16 * z0;
                    if (h0 == 0) kv_pf(vr, 16 * zb);
                    __m512 vv[4];
                    UNROLL for (int z = 0; z < 4; z++) vv[z] = z < zb ? _mm512_loadu_ps(vr + 16 * z) : _mm512_setzero_ps();
                    UNROLL for (int h = 0; h < KVD_HB; h++)
                        if (h < hb && (r < nall || i0 + r < end[h])) {
                            const __m512 p = _mm512_set1_ps(sc[(size_t)(h0 + h) * sst + i0 + r]);
                            UNROLL for (int z = 0; z < 4; z++) o[h][z] = _mm512_fmadd_ps(p, vv[z], o[h][z]);
                        }
                }
                UNROLL for (int h = 0; h < KVD_HB; h++)
                    if (h < hb)
                        UNROLL for (int z = 0; z < 4; z++)
                            if (z < zb) _mm512_storeu_ps(o0[h] + 16 * (z0 + z), o[h][z]);
            }
        }
    }
}

/* the work loop of the AVX-512 path, per row provider */
static ALWAYS void kv_task16(kv_job *J, kv_rows_fn rows) {
    const int RT = J->H / J->HKV * J->T;
    float *sc = malloc(sizeof(float) * ((size_t)RT * J->sst + (size_t)KVD_ROWS * J->D));
    if (!sc) return;
    for (;;) {
        const int bk = atomic_fetch_add_explicit(&J->next, 1, memory_order_relaxed);
        if (bk >= J->B * J->HKV) break;
        kv_group16(J, bk, sc, sc + (size_t)RT * J->sst, rows);
    }
    free(sc);
}
#else
#define KVD_SIMD 0
#endif

#if KVD_SIMD
#define KV_BLOCKS(J, rows) kv_task16(J, rows)
#else
#define KV_BLOCKS(J, rows) ((void)0)
#endif
/* kv_task_<layout>: the block driver where the layout's rows fit it, else row by row */
#define KV_TASK(layout, fits)                                            \
    static void kv_task_##layout(void *ctx, int ith, int nth) {          \
        (void)ith;                                                       \
        (void)nth;                                                       \
        kv_job *J = (kv_job *)ctx;                                       \
        if (KVD_SIMD && (fits)) {                                        \
            KV_BLOCKS(J, kv_rows_##layout);                              \
            return;                                                      \
        }                                                                \
        kv_task(J, kv_row_##layout);                                     \
    }
KV_TASK(dense, J->D % 16 == 0)
KV_TASK(affine, J->D % 32 == 0 && J->gs % 16 == 0)
KV_TASK(turbo, J->D % 16 == 0 && J->kbits <= 4 && J->vbits <= 4)

/* q [B, H, T, D]; out [B, H, T, D], or [B, T, H, D] (tok_major: the rows of the output
 * projection's input) */
static void kv_shape(kv_job *J, int tok_major) {
    const size_t D = (size_t)J->D, H = (size_t)J->H, T = (size_t)J->T;
    J->q_sb = H * T * D, J->q_sh = T * D, J->q_st = D;
    J->o_sb = H * T * D;
    J->o_sh = tok_major ? D : T * D;
    J->o_st = tok_major ? H * D : D;
}

int kv_dense_decode_t(const float *q, const float *k, const float *v, const float *xk, const float *xv,
                      const int32_t *starts, int B, int H, int HKV, int D, int T, int cap, int held, float scale,
                      float *out, int tok_major, int n_threads) {
    if ((xk == NULL) != (xv == NULL)) return -1;
    kv_job J = {.q = q, .starts = starts, .B = B, .H = H, .HKV = HKV, .D = D, .T = T, .cap = cap, .held = held,
                .scale = scale, .out = out, .k = k, .v = v, .xk = xk, .xv = xv};
    kv_shape(&J, tok_major);
    return kv_run(&J, kv_task_dense, n_threads);
}

/* xk, xv (NULL: none): this step's keys and values [B, HKV, T, D], as rows held - T ..
 * held - 1 of every (sequence, KV head), so the caller can store them in the cache
 * afterwards (lazily) and the cache holds only the held - T rows before them (k/v may then
 * be NULL when held is T) */
int vlmc_kv_dense_decode_n(const float *q, const float *k, const float *v, const float *xk, const float *xv,
                           const int32_t *starts, int B, int H, int HKV, int D, int T, int cap, int held,
                           float scale, float *out, int n_threads) {
    return kv_dense_decode_t(q, k, v, xk, xv, starts, B, H, HKV, D, T, cap, held, scale, out, 0, n_threads);
}

int vlmc_kv_dense_decode(const float *q, const float *k, const float *v, const float *xk, const float *xv,
                         const int32_t *starts, int B, int H, int HKV, int D, int cap, int held, float scale,
                         float *out, int n_threads) {
    return kv_dense_decode_t(q, k, v, xk, xv, starts, B, H, HKV, D, 1, cap, held, scale, out, 0, n_threads);
}

int kv_affine_decode_x(const float *q, const uint8_t *kc, const uint16_t *ks, const uint16_t *kb, const uint8_t *vc,
                       const uint16_t *vs, const uint16_t *vb, const kv_codes *xk, const kv_codes *xv,
                       const int32_t *starts, int B, int H, int HKV, int D, int T, int cap, int held, int bits, int gs,
                       float scale, float *out, int tok_major, int n_threads) {
    if ((bits != 4 && bits != 8) || gs < 2 || D % gs || gs % 2) return -2;
    if ((xk == NULL) != (xv == NULL)) return -1;
    kv_job J = {.q = q, .starts = starts, .B = B, .H = H, .HKV = HKV, .D = D, .T = T, .cap = cap, .held = held,
                .scale = scale, .out = out, .kc = kc, .vc = vc, .ks = ks, .kb = kb, .vs = vs, .vb = vb,
                .xkc = xk, .xvc = xv, .bits = bits, .gs = gs};
    kv_shape(&J, tok_major);
    return kv_run(&J, kv_task_affine, n_threads);
}

int vlmc_kv_affine_decode_n(const float *q, const uint8_t *kc, const uint16_t *ks, const uint16_t *kb,
                            const uint8_t *vc, const uint16_t *vs, const uint16_t *vb, const int32_t *starts,
                            int B, int H, int HKV, int D, int T, int cap, int held, int bits, int gs, float scale,
                            float *out, int n_threads) {
    return kv_affine_decode_x(q, kc, ks, kb, vc, vs, vb, NULL, NULL, starts, B, H, HKV, D, T, cap, held, bits, gs,
                              scale, out, 0, n_threads);
}

int vlmc_kv_affine_decode(const float *q, const uint8_t *kc, const uint16_t *ks, const uint16_t *kb,
                          const uint8_t *vc, const uint16_t *vs, const uint16_t *vb, const int32_t *starts,
                          int B, int H, int HKV, int D, int cap, int held, int bits, int gs, float scale,
                          float *out, int n_threads) {
    return vlmc_kv_affine_decode_n(q, kc, ks, kb, vc, vs, vb, starts, B, H, HKV, D, 1, cap, held, bits, gs, scale,
                                   out, n_threads);
}

/* ---- this step's keys or values as affine codes ------------------------------------------
 * vlmc.runtime.kv_codecs.Affine._encode in C, its float32 operations one for one, so the
 * bytes are the same: per group of gs values lo = min, hi = max (the first of equal
 * values, as MLX's reductions keep: -0.0 and 0.0 stay apart), scale = bf16((hi - lo) /
 * levels), minimum = bf16(lo), code = clip(rint((x - minimum) / max(scale, 1e-30)), 0,
 * levels) with rint's ties to even, packed as kv_quant.pack packs (4-bit: code 2b in the
 * low nibble of byte b). rows: rows of D floats; codes [rows, D * bits / 8], scales and
 * mins [rows, D / gs] (bfloat16 bits). */

/* float32 -> the nearest bfloat16 (ties to even; NaN -> MLX's quiet NaN) */
static ALWAYS uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

void kv_affine_encode_rows(const float *x, size_t rows, int D, int bits, int gs, uint8_t *codes, uint16_t *scales,
                           uint16_t *mins) {
    const int G = D / gs;
    const float levels = (float)((1 << bits) - 1);
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + r * D;
        uint8_t *cr = codes + r * (size_t)(D * bits / 8);
        for (int g = 0; g < G; g++) {
            const float *xg = xr + (size_t)g * gs;
            float lo = xg[0], hi = xg[0];
            for (int i = 1; i < gs; i++) {
                if (xg[i] < lo) lo = xg[i];
                if (xg[i] > hi) hi = xg[i];
            }
            const uint16_t s = f32_to_bf16((hi - lo) / levels), m = f32_to_bf16(lo);
            scales[r * G + g] = s;
            mins[r * G + g] = m;
            const float s32 = fmaxf(bf16_to_f32(s), 1e-30f), m32 = bf16_to_f32(m);
            for (int i = 0; i < gs; i++) {
                float c = rintf((xg[i] - m32) / s32);
                c = c > 0.f ? c : 0.f; /* NaN -> 0 */
                c = c < levels ? c : levels;
                const int k = g * gs + i;
                if (bits == 8) cr[k] = (uint8_t)c;
                else if (k % 2 == 0) cr[k / 2] = (uint8_t)c;
                else cr[k / 2] |= (uint8_t)((unsigned)c << 4);
            }
        }
    }
}

int vlmc_kv_affine_encode(const float *x, int64_t rows, int D, int bits, int gs, uint8_t *codes, uint16_t *scales,
                          uint16_t *mins) {
    if (rows < 0 || (bits != 4 && bits != 8) || gs < 2 || gs % 2 || D < gs || D % gs) return -2;
    kv_affine_encode_rows(x, (size_t)rows, D, bits, gs, codes, scales, mins);
    return 0;
}

int vlmc_kv_turbo_decode_n(const float *q, const uint8_t *kc, const float *kn, const uint8_t *vc, const float *vn,
                           const float *kcb, const float *vcb, const int32_t *starts, int B, int H, int HKV, int D,
                           int T, int cap, int held, int kbits, int vbits, float scale, float *out, int n_threads) {
    if (D < 8 || D % 8 || kbits < 2 || kbits > 4 || vbits < 2 || vbits > 4) return -2;
    kv_job J = {.q = q, .starts = starts, .B = B, .H = H, .HKV = HKV, .D = D, .T = T, .cap = cap, .held = held,
                .scale = scale, .out = out, .kc = kc, .vc = vc, .kn = kn, .vn = vn, .kcb = kcb, .vcb = vcb,
                .kbits = kbits, .vbits = vbits};
    kv_shape(&J, 0);
    return kv_run(&J, kv_task_turbo, n_threads);
}

int vlmc_kv_turbo_decode(const float *q, const uint8_t *kc, const float *kn, const uint8_t *vc, const float *vn,
                         const float *kcb, const float *vcb, const int32_t *starts, int B, int H, int HKV, int D,
                         int cap, int held, int kbits, int vbits, float scale, float *out, int n_threads) {
    return vlmc_kv_turbo_decode_n(q, kc, kn, vc, vn, kcb, vcb, starts, B, H, HKV, D, 1, cap, held, kbits, vbits, scale,
                                  out, n_threads);
}
