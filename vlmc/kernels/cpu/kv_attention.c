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
 * A sliding window (window > 0: a rotating cache's rows, the oldest first) hides the keys
 * more than window - 1 rows before a query's own; softcap > 0 soft-caps the scaled scores,
 * softcap * tanh(s / softcap), before the softmax (Gemma 2).
 * Two drivers serve every layout, each instantiated per layout (kv_task_*): with AVX-512
 * and D % 16 == 0 (affine 4-bit: D % 32), kv_group16 takes blocks of rows (kv_rows_fn);
 * otherwise kv_group takes one row at a time (kv_row_fn). A layout only says how to turn
 * stored rows into floats, and each row is decoded once for all query rows. Affine codes
 * score the keys against the query's int8 codes per group (kv_query_int8; the float
 * drivers read those values as floats): with VNNI a third driver (kvq_*) scores them in the
 * integer domain and splits the sequence into chunks for the threads. */
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
    int window;        /* > 0: query row j sees no key before q_end - window */
    float softcap;     /* > 0: scores softcap * tanh(s / softcap) */
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
    const kv_turbo *xtk, *xtv; /* TurboQuant: those rows from here, [B, HKV, T, *], not the cache */
    int bits, gs, kbits, vbits;
    const int8_t *qi, *qr; /* affine: q as int8 codes and residuals per group of gs (kv_query_int8), or NULL */
    const float *qa, *qs;  /* their scale and scale x sum per group, [B H T, D / gs] */
    int nch;               /* the VNNI driver's chunks per (sequence, KV head) */
    float *po, *pm, *pl;   /* and their partial outputs, largest scores, exp sums */
    _Atomic int failed;
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
/* and begin at this row (first: the sequence's first visible key) */
static ALWAYS int q_begin(const kv_job *J, int j, int first) {
    const int w = J->window > 0 ? q_end(J, j) - J->window : first;
    return w > first ? w : first;
}
/* a scaled score as the softmax reads it */
static ALWAYS float kv_cap(const kv_job *J, float s) { return J->softcap > 0.f ? tanhf(s / J->softcap) * J->softcap : s; }

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
            if (i < q_end(J, j) && i >= q_begin(J, j, first))
                sc[(size_t)j * sst + i] = kv_cap(J, dot16(q_row(J, b, hk, j), k, D) * f);
    }
    for (int j = 0; j < RT; j++)
        kv_softmax_row(sc + (size_t)j * sst, q_begin(J, j, first), q_end(J, j), o_row(J, b, hk, j), D);
    for (int i = first; i < n; i++) {
        float f = 1.f;
        const float *v = i >= xi ? x_row(J, 1, bk, i) : row(J, 1, base, i, x, &f);
        for (int j = 0; j < RT; j++) {
            if (i >= q_end(J, j) || i < q_begin(J, j, first)) continue;
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

/* the job's shapes, checked (0, or -1) */
static int kv_check(const kv_job *J) {
    const int extra = J->xk != NULL || J->xkc != NULL || J->xtk != NULL;
    if (J->B < 1 || J->H < 1 || J->HKV < 1 || J->H % J->HKV || J->D < 1 || J->T < 1 || J->held < J->T
        || J->held - (extra ? J->T : 0) > J->cap)
        return -1;
    return 0;
}

static int kv_run(kv_job *J, task_fn task, int n_threads) {
    if (kv_check(J)) return -1;
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
/* row i of a (sequence, KV head) at cache row `base`: its codes and norm, from the cache or,
 * for this step's rows when the caller passed them apart (xtk / xtv), from there */
static ALWAYS const uint8_t *turbo_row(const kv_job *J, int v, size_t base, int i, const float **nrm) {
    const int bits = v ? J->vbits : J->kbits;
    const size_t rb = (size_t)(J->D * bits / 8);
    const kv_turbo *x = v ? J->xtv : J->xtk;
    if (x && i >= J->held - J->T) {
        const size_t at = base / (size_t)J->cap * J->T + (size_t)(i - (J->held - J->T));
        *nrm = x->norms + at;
        return x->codes + at * rb;
    }
    *nrm = (v ? J->vn : J->kn) + base + (size_t)i;
    return (v ? J->vc : J->kc) + (base + (size_t)i) * rb;
}

static const float *kv_row_turbo(const kv_job *J, int v, size_t base, int i, float *x, float *f) {
    const int D = J->D, bits = v ? J->vbits : J->kbits;
    const float *nrm;
    const uint8_t *c = turbo_row(J, v, base, i, &nrm);
    const float *cb = v ? J->vcb : J->kcb;
    const uint32_t mask = (1u << bits) - 1;
    for (int g = 0; g < D / 8; g++, c += bits) {
        uint32_t w = c[0] | ((uint32_t)c[1] << 8);
        if (bits > 2) w |= (uint32_t)c[2] << 16;
        if (bits > 3) w |= (uint32_t)c[3] << 24;
        for (int i = 0; i < 8; i++) x[g * 8 + i] = cb[(w >> (i * bits)) & mask];
    }
    *f = *nrm / sqrtf((float)D);
    return x;
}

#if defined(__AVX512F__)
/* nr (<= 16) scaled scores of 16 key rows, soft-capped where the job says, to dst */
static ALWAYS void kv_store16(const kv_job *J, float *dst, __m512 x, int nr) {
    if (J->softcap > 0.f) {
        float tmp[16];
        _mm512_storeu_ps(tmp, x);
        for (int r = 0; r < nr; r++) dst[r] = kv_cap(J, tmp[r]);
    } else {
        _mm512_mask_storeu_ps(dst, nr == 16 ? 0xFFFF : (__mmask16)((1u << nr) - 1), x);
    }
}

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
    const float *cb = v ? J->vcb : J->kcb;
    float levels[16] = {0};
    memcpy(levels, cb, sizeof(float) * ((size_t)1 << bits));
    const __m512 cbv = _mm512_loadu_ps(levels);
    const __m512i mask = _mm512_set1_epi32((1 << bits) - 1);
    const __m512i shifts = _mm512_mullo_epi32(_mm512_set_epi32(7, 6, 5, 4, 3, 2, 1, 0, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(bits));
    const float inv_sqrt_d = 1.f / sqrtf((float)D);
    for (int r = 0; r < nr; r++) {
        const float *nrm;
        const uint8_t *c = turbo_row(J, v, base, i0 + r, &nrm);
        const __m512 f = _mm512_set1_ps(*nrm * inv_sqrt_d);
        float *x = buf + (size_t)r * D;
        for (int j = 0; j < D; j += 16, c += 2 * bits) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
            /* the 2 bits bytes of 16 codes in one masked load (a memcpy of a variable size
             * per 8 codes was a library call) */
            const uint64_t u = (uint64_t)_mm_cvtsi128_si64(_mm_maskz_loadu_epi8((__mmask16)((1u << (2 * bits)) - 1), c));
            const uint32_t w0 = (uint32_t)(u & ((1ull << (8 * bits)) - 1)), w1 = (uint32_t)(u >> (8 * bits));
#else
            uint32_t w0 = 0, w1 = 0;
            memcpy(&w0, c, (size_t)bits);
            memcpy(&w1, c + bits, (size_t)bits);
#endif
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
static ALWAYS void kv_scores16(const kv_job *J, int bk, float *sc, float *buf, kv_rows_fn rows) {
    const int D = J->D, RT = J->H / J->HKV * J->T, b = bk / J->HKV, hk = bk % J->HKV, nz = D / 16;
    const int first = J->starts[b], n = J->held, cap = J->cap, sst = J->sst;
    const size_t base = ((size_t)b * J->HKV + hk) * cap;
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
                    if (h < hb) sc[(size_t)(h0 + h) * sst + i0 + r] = kv_cap(J, _mm512_reduce_add_ps(acc[h]) * J->scale);
            }
        }
    }
}

/* s[i] = exp(s[i] - m) over [beg, e) (beg < e), m the largest of them: their sum; m in *pm */
static ALWAYS float kv_exp_span(float *s, int beg, int e, float *pm) {
    __m512 mv = _mm512_set1_ps(-3.0e38f);
    int i = beg;
    for (; i + 16 <= e; i += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + i));
    float m = _mm512_reduce_max_ps(mv);
    for (; i < e; i++) m = s[i] > m ? s[i] : m;
    const __m256 m8 = _mm256_set1_ps(m);
    __m256 tv = _mm256_setzero_ps();
    for (i = beg; i + 8 <= e; i += 8) {
        const __m256 x = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), m8));
        _mm256_storeu_ps(s + i, x);
        tv = _mm256_add_ps(tv, x);
    }
    float total = hsum(tv);
    for (; i < e; i++) {
        s[i] = exp1(s[i] - m);
        total += s[i];
    }
    *pm = m;
    return total;
}

/* the softmax of every query row's scores over [its begin, its end), in place */
static ALWAYS void kv_softmax16(const kv_job *J, int bk, float *sc) {
    const int RT = J->H / J->HKV * J->T, first = J->starts[bk / J->HKV], sst = J->sst;
    for (int j = 0; j < RT; j++) {
        float *s = sc + (size_t)j * sst;
        const int e = q_end(J, j), beg = q_begin(J, j, first);
        if (beg >= e) continue;
        float m;
        const float total = kv_exp_span(s, beg, e, &m);
        const float inv = total > 0.f ? 1.f / total : 0.f;
        for (int i = beg; i < e; i++) s[i] *= inv;
    }
}

/* out += probabilities x value rows (the output rows zeroed by the caller) */
static ALWAYS void kv_values16(const kv_job *J, int bk, const float *sc, float *buf, kv_rows_fn rows) {
    const int D = J->D, RT = J->H / J->HKV * J->T, b = bk / J->HKV, hk = bk % J->HKV, nz = D / 16;
    const int first = J->starts[b], n = J->held, cap = J->cap, sst = J->sst;
    const int common = n - J->T + 1; /* keys every query row sees end here */
    const int lo_all = q_begin(J, J->T - 1, first); /* and begin here (a window's bound grows with the token) */
    const size_t base = ((size_t)b * J->HKV + hk) * cap;
    for (int i0 = first; i0 < n; i0 += KVD_ROWS) {
        const int nr = n - i0 < KVD_ROWS ? n - i0 : KVD_ROWS;
        const int nall = common - i0 < nr ? (common > i0 ? common - i0 : 0) : nr; /* rows every query row takes */
        const float *V = rows(J, 1, base, i0, nr, buf);
        for (int h0 = 0; h0 < RT; h0 += KVD_HB) {
            const int hb = RT - h0 < KVD_HB ? RT - h0 : KVD_HB;
            float *o0[KVD_HB];
            int end[KVD_HB], beg[KVD_HB];
            UNROLL for (int h = 0; h < KVD_HB; h++) {
                o0[h] = o_row(J, b, hk, h0 + (h < hb ? h : 0));
                end[h] = q_end(J, h0 + (h < hb ? h : 0));
                beg[h] = q_begin(J, h0 + (h < hb ? h : 0), first);
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
                        if (h < hb && ((r < nall && i0 + r >= lo_all) || (i0 + r < end[h] && i0 + r >= beg[h]))) {
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

static ALWAYS void kv_group16(const kv_job *J, int bk, float *sc, float *buf, kv_rows_fn rows) {
    const int RT = J->H / J->HKV * J->T, b = bk / J->HKV, hk = bk % J->HKV;
    for (int j = 0; j < RT; j++) memset(o_row(J, b, hk, j), 0, sizeof(float) * (size_t)J->D);
    if (J->starts[b] >= J->held) return; /* nothing visible: zeros, as the generic driver gives */
    kv_scores16(J, bk, sc, buf, rows);
    kv_softmax16(J, bk, sc);
    kv_values16(J, bk, sc, buf, rows);
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
#if VLMC_VNNI
/* ---- affine codes, keys scored in the integer domain (VNNI) ------------------------------
 * The query rows come as int8 codes and rounding residuals per group of gs (kv_query_int8:
 * qi, qr, with scale qa and qa * the group's sum of 256 qi + qr in qs), so the score of a
 * key row is, per group, its scale s times qa times the integer sum of code x (256 qi + qr)
 * plus its minimum m times qs: two vpdpbusd per 4 codes and query row. A block of 16 key rows is transposed in dwords so
 * that each lane holds one row: the scores then come out as 16 lanes, no horizontal sums.
 * The values stay in float: out += (p s) x code per row and group, plus sum(p m) per group
 * at the end, the codes widened in registers (no decoded copy of the rows). */
#define KVQ_GMAX 8 /* groups per row this path takes */

/* t[c] lane r := t[r] lane c, 16 x 16 dwords */
static ALWAYS void tr16x16(__m512i t[16]) {
    __m512i a[16], c[16];
    UNROLL for (int i = 0; i < 8; i++) {
        a[2 * i] = _mm512_unpacklo_epi32(t[2 * i], t[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(t[2 * i], t[2 * i + 1]);
    }
    UNROLL for (int i = 0; i < 4; i++) { /* lane L of c[4 i + k]: dword 4 L + k of rows 4 i .. 4 i + 3 */
        c[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        c[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        c[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        c[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    UNROLL for (int k = 0; k < 4; k++) {
        const __m512i e0 = _mm512_shuffle_i32x4(c[k], c[4 + k], 0x88), e1 = _mm512_shuffle_i32x4(c[k], c[4 + k], 0xDD);
        const __m512i e2 = _mm512_shuffle_i32x4(c[8 + k], c[12 + k], 0x88);
        const __m512i e3 = _mm512_shuffle_i32x4(c[8 + k], c[12 + k], 0xDD);
        t[k] = _mm512_shuffle_i32x4(e0, e2, 0x88);
        t[4 + k] = _mm512_shuffle_i32x4(e1, e3, 0x88);
        t[8 + k] = _mm512_shuffle_i32x4(e0, e2, 0xDD);
        t[12 + k] = _mm512_shuffle_i32x4(e1, e3, 0xDD);
    }
}

/* out[g][r] = the bfloat16 values p[r][g] (G per row) of rows r < 16 as floats; rows whose
 * G values lie one after another (the cache's rows) in two vector loads */
static ALWAYS void kvq_lanes(const uint16_t *const p[16], int G, int nr, float out[][16]) {
    int contiguous = G <= 4;
    for (int r = 1; r < nr && contiguous; r++) contiguous = p[r] == p[0] + (size_t)r * G;
    if (contiguous) {
        const int n = nr * G; /* <= 64 values */
        const __m512i a = _mm512_maskz_loadu_epi16(n >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << n) - 1), p[0]);
        const __m512i b = _mm512_maskz_loadu_epi16(n >= 64 ? 0xFFFFFFFFu : n > 32 ? (__mmask32)((1u << (n - 32)) - 1) : 0,
                                                   p[0] + 32);
        const __m512i rg = _mm512_mullo_epi16(_mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17,
                                                               16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi16((short)G));
        for (int g = 0; g < G; g++) {
            const __m512i sel = _mm512_permutex2var_epi16(a, _mm512_add_epi16(rg, _mm512_set1_epi16((short)g)), b);
            const __m512i w = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(sel));
            _mm512_storeu_ps(out[g], _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
        }
        return;
    }
    for (int g = 0; g < G; g++)
        for (int r = 0; r < 16; r++) out[g][r] = bf16_to_f32(p[r < nr ? r : nr - 1][g]);
}

/* the codes, scales and minimums of rows i0 .. i0 + 15 of the keys (v = 0) or values; rows
 * past n repeat row n - 1 (their results are never read) */
static ALWAYS void kvq_block(const kv_job *J, int v, size_t base, int i0, int nr, const uint8_t *c[16],
                             const uint16_t *s[16], const uint16_t *m[16]) {
    UNROLL for (int r = 0; r < 16; r++) {
        const kv_codes x = affine_row(J, v, base, i0 + (r < nr ? r : nr - 1));
        c[r] = x.codes, s[r] = x.scales, m[r] = x.mins;
    }
}

/* query row j of (sequence b, KV head hk) among the B H T rows of q */
static ALWAYS size_t kvq_row(const kv_job *J, int b, int hk, int j) {
    return ((size_t)b * J->H + (size_t)hk * (J->H / J->HKV)) * J->T + (size_t)j;
}

/* one pass of hb (<= KVD_HB) query rows from h0 over a block of 16 key rows, their scores to
 * dst + h sst (h < hb): the rows' dwords
 * of codes, transposed (lane r: row r), come from t (the pass transposes them itself, in
 * registers) or, buffered, from tb (8-bit: P vectors; 4-bit: the low nibbles' P, then the
 * high ones'), transposed once for every pass; integer sums are exact, so both give the
 * same scores */
static ALWAYS void kvq_pass(const kv_job *J, int b, int hk, int h0, int hb, const uint8_t *const c[16],
                            const __m512i *tb, float sv[][16], float mv[][16], float *dst, int sst, int nr,
                            int buffered) {
    const int D = J->D, G = D / J->gs, bits = J->bits;
    const int P = D * bits / 32, dpg = J->gs * bits / 32; /* dwords of codes per row, per group */
    const __m512i lo4 = _mm512_set1_epi8(15);
    const int8_t *qi[KVD_HB], *qr[KVD_HB];
    const float *qa[KVD_HB], *qs[KVD_HB];
    __m512 s[KVD_HB];
    __m512i acc[KVD_HB], accr[KVD_HB]; /* code x query code, code x residual */
    UNROLL for (int h = 0; h < KVD_HB; h++) {
        const size_t row = kvq_row(J, b, hk, h0 + (h < hb ? h : 0));
        qi[h] = J->qi + row * D, qr[h] = J->qr + row * D, qa[h] = J->qa + row * G, qs[h] = J->qs + row * G;
        s[h] = _mm512_setzero_ps();
        acc[h] = accr[h] = _mm512_setzero_si512();
    }
    for (int c0 = 0; c0 < P; c0 += 16) {
        const int np = P - c0 < 16 ? P - c0 : 16;
        __m512i t[16];
        if (!buffered) {
            const __mmask16 km = np == 16 ? 0xFFFF : (__mmask16)((1u << np) - 1);
            UNROLL for (int r = 0; r < 16; r++) t[r] = _mm512_maskz_loadu_epi32(km, c[r] + 4 * (size_t)c0);
            tr16x16(t); /* t[p] lane r: dword c0 + p of row r */
        }
        UNROLL for (int p = 0; p < 16; p++) {
            if (p >= np) break;
            const int pa = c0 + p;
            if (bits == 8) {
                const __m512i x = buffered ? _mm512_load_si512(tb + pa) : t[p];
                UNROLL for (int h = 0; h < KVD_HB; h++)
                    if (h < hb) {
                        acc[h] = _mm512_dpbusd_epi32(acc[h], x, _mm512_set1_epi32(ld_i32(qi[h] + 4 * pa)));
                        accr[h] = _mm512_dpbusd_epi32(accr[h], x, _mm512_set1_epi32(ld_i32(qr[h] + 4 * pa)));
                    }
            } else { /* a dword holds 8 codes: the low nibbles the even ones, the high the odd */
                const __m512i lo = buffered ? _mm512_load_si512(tb + pa) : _mm512_and_si512(t[p], lo4);
                const __m512i hi = buffered ? _mm512_load_si512(tb + P + pa) : _mm512_and_si512(_mm512_srli_epi32(t[p], 4), lo4);
                UNROLL for (int h = 0; h < KVD_HB; h++)
                    if (h < hb) {
                        acc[h] = _mm512_dpbusd_epi32(acc[h], lo, _mm512_set1_epi32(ld_i32(qi[h] + 4 * pa)));
                        acc[h] = _mm512_dpbusd_epi32(acc[h], hi, _mm512_set1_epi32(ld_i32(qi[h] + D / 2 + 4 * pa)));
                        accr[h] = _mm512_dpbusd_epi32(accr[h], lo, _mm512_set1_epi32(ld_i32(qr[h] + 4 * pa)));
                        accr[h] = _mm512_dpbusd_epi32(accr[h], hi, _mm512_set1_epi32(ld_i32(qr[h] + D / 2 + 4 * pa)));
                    }
            }
            if ((pa + 1) % dpg == 0) { /* the end of group g: s qa sum + m qs */
                const int g = pa / dpg;
                const __m512 gs_ = _mm512_loadu_ps(sv[g]), gm = _mm512_loadu_ps(mv[g]);
                UNROLL for (int h = 0; h < KVD_HB; h++)
                    if (h < hb) {
                        const __m512 i = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[h]), _mm512_set1_ps(256.f),
                                                         _mm512_cvtepi32_ps(accr[h])); /* sum code (256 c + r) */
                        const __m512 d = _mm512_mul_ps(i, _mm512_set1_ps(qa[h][g]));
                        s[h] = _mm512_fmadd_ps(gm, _mm512_set1_ps(qs[h][g]), _mm512_fmadd_ps(d, gs_, s[h]));
                        acc[h] = accr[h] = _mm512_setzero_si512();
                    }
            }
        }
    }
    UNROLL for (int h = 0; h < KVD_HB; h++)
        if (h < hb) kv_store16(J, dst + (size_t)h * sst, _mm512_mul_ps(s[h], _mm512_set1_ps(J->scale)), nr);
}

/* scores of key rows r0 .. r1 - 1 of one (sequence, KV head) for query rows j0 <= j < j0 + nq,
 * into sc[(j - j0) sst + i - r0]. With one pass of query rows (a decode step) the pass transposes a
 * block's codes in registers; with several (a prompt's rows) they are transposed once per
 * block into tb (2 D bits / 32 vectors, 64-byte aligned) for every pass: transposing them
 * again for each 6 query rows cost ~40% of the integer dot products. */
static ALWAYS void kvq_scores_x(const kv_job *J, int bk, int r0, int r1, int j0, int nq, float *sc, int sst,
                                __m512i *tb, int buffered) {
    const int D = J->D, G = D / J->gs, bits = J->bits, b = bk / J->HKV, hk = bk % J->HKV;
    const int P = D * bits / 32;
    const size_t base = ((size_t)b * J->HKV + hk) * J->cap, rb = (size_t)D * bits / 8;
    const __m512i lo4 = _mm512_set1_epi8(15);
    for (int i0 = r0; i0 < r1; i0 += 16) {
        const int nr = r1 - i0 < 16 ? r1 - i0 : 16;
        const uint8_t *c[16];
        const uint16_t *sp[16], *mp[16];
        kvq_block(J, 0, base, i0, nr, c, sp, mp);
        if (nr == 16 && c[15] == c[0] + 15 * rb) /* the next blocks' codes, 4 KB ahead */
            for (size_t z = 0; z < 16 * rb; z += 64) _mm_prefetch((const char *)c[0] + 4096 + z, _MM_HINT_T0);
        float sv[KVQ_GMAX][16], mv[KVQ_GMAX][16];
        kvq_lanes(sp, G, nr, sv);
        kvq_lanes(mp, G, nr, mv);
        if (buffered)
            for (int c0 = 0; c0 < P; c0 += 16) {
                const int np = P - c0 < 16 ? P - c0 : 16;
                const __mmask16 km = np == 16 ? 0xFFFF : (__mmask16)((1u << np) - 1);
                __m512i t[16];
                UNROLL for (int r = 0; r < 16; r++) t[r] = _mm512_maskz_loadu_epi32(km, c[r] + 4 * (size_t)c0);
                tr16x16(t);
                for (int p = 0; p < np; p++) {
                    if (bits == 8) {
                        _mm512_store_si512(tb + c0 + p, t[p]);
                    } else {
                        _mm512_store_si512(tb + c0 + p, _mm512_and_si512(t[p], lo4));
                        _mm512_store_si512(tb + P + c0 + p, _mm512_and_si512(_mm512_srli_epi32(t[p], 4), lo4));
                    }
                }
            }
        for (int h0 = j0; h0 < j0 + nq; h0 += KVD_HB)
            kvq_pass(J, b, hk, h0, j0 + nq - h0 < KVD_HB ? j0 + nq - h0 : KVD_HB, c, tb, sv, mv,
                     sc + (size_t)(h0 - j0) * sst + (i0 - r0), sst, nr, buffered);
    }
}

/* the two forms as functions of their own: inlined into the task loop, the prompt's form
 * made the decode step's ~5% slower */
static __attribute__((noinline)) void kvq_scores_step(const kv_job *J, int bk, int r0, int r1, int j0, int nq,
                                                      float *sc, int sst) {
    kvq_scores_x(J, bk, r0, r1, j0, nq, sc, sst, NULL, 0);
}
static __attribute__((noinline)) void kvq_scores_rows(const kv_job *J, int bk, int r0, int r1, int j0, int nq,
                                                      float *sc, int sst, __m512i *tb) {
    kvq_scores_x(J, bk, r0, r1, j0, nq, sc, sst, tb, 1);
}

/* group of output vector z (vectors of 16 floats; 4-bit: in the order the nibbles give
 * them, vector 2 m the even codes of 32 m .. 32 m + 31, 2 m + 1 the odd ones) */
static ALWAYS int kvq_gz(int bits, int gs, int z) { return bits == 4 ? (z >> 1) * 32 / gs : z * 16 / gs; }

/* the codes of vectors z0 .. z0 + 3 of a value row as floats */
static ALWAYS void kvq_widen(const uint8_t *c, int bits, int z0, int zb, __m512 cv[4]) {
    if (bits == 8) {
        UNROLL for (int z = 0; z < 4; z++)
            cv[z] = z < zb ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + 16 * (z0 + z)))))
                           : _mm512_setzero_ps();
        return;
    }
    UNROLL for (int m = 0; m < 2; m++) {
        if (2 * m < zb) {
            const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + 8 * z0 + 16 * m)));
            cv[2 * m] = _mm512_cvtepi32_ps(_mm512_and_si512(w, _mm512_set1_epi32(15)));
            cv[2 * m + 1] = _mm512_cvtepi32_ps(_mm512_srli_epi32(w, 4));
        } else {
            cv[2 * m] = cv[2 * m + 1] = _mm512_setzero_ps();
        }
    }
}

#define KVQ_ROWS 64 /* value rows per block */
/* the value pass's end for n query rows: output row h (po + h D) plus the sum of p m of
 * each group (the lanes of mt[h ms + g]), then (4-bit) the nibble order back to the natural one */
static ALWAYS void kvq_values_end_x(const kv_job *J, int n, float *po, const __m512 *mt, int ms) {
    const int D = J->D, nz = D / 16;
    const __m512i lo_hi = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i lo_hi2 = _mm512_add_epi32(lo_hi, _mm512_set1_epi32(8));
    for (int h = 0; h < n; h++) {
        float *o = po + (size_t)h * D;
        for (int z = 0; z < nz; z++) {
            const __m512 m = _mm512_set1_ps(_mm512_reduce_add_ps(mt[(size_t)h * ms + kvq_gz(J->bits, J->gs, z)]));
            _mm512_storeu_ps(o + 16 * z, _mm512_add_ps(_mm512_loadu_ps(o + 16 * z), m));
        }
        if (J->bits == 4)
            for (int z = 0; z < nz; z += 2) {
                const __m512 ev = _mm512_loadu_ps(o + 16 * z), od = _mm512_loadu_ps(o + 16 * z + 16);
                _mm512_storeu_ps(o + 16 * z, _mm512_permutex2var_ps(ev, lo_hi, od));
                _mm512_storeu_ps(o + 16 * z + 16, _mm512_permutex2var_ps(ev, lo_hi2, od));
            }
    }
}
/* po[j D ..] = sum over the visible rows i of r0 .. r1 - 1 of p (s code + m), p = sc[j sst +
 * i - r0], as sum of (p s) code per group plus sum(p m) per group (po zeroed by the caller) */
static ALWAYS void kvq_values(const kv_job *J, int bk, int r0, int r1, const float *sc, int sst, float *po) {
    const int D = J->D, G = D / J->gs, gs = J->gs, bits = J->bits, nz = D / 16;
    const int RT = J->H / J->HKV * J->T, b = bk / J->HKV, hk = bk % J->HKV;
    const int first = J->starts[b];
    const size_t base = ((size_t)b * J->HKV + hk) * J->cap;
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int h0 = 0; h0 < RT; h0 += KVD_HB) {
        const int hb = RT - h0 < KVD_HB ? RT - h0 : KVD_HB;
        float *o0[KVD_HB];
        int end[KVD_HB], beg[KVD_HB];
        float ws[KVD_HB][KVQ_GMAX][KVQ_ROWS];
        __m512 mt[KVD_HB][KVQ_GMAX];
        for (int h = 0; h < KVD_HB; h++) {
            o0[h] = po + (size_t)(h0 + (h < hb ? h : 0)) * D;
            end[h] = q_end(J, h0 + (h < hb ? h : 0));
            beg[h] = q_begin(J, h0 + (h < hb ? h : 0), first);
            for (int g = 0; g < KVQ_GMAX; g++) mt[h][g] = _mm512_setzero_ps();
        }
        for (int i0 = r0; i0 < r1; i0 += KVQ_ROWS) {
            const int nr = r1 - i0 < KVQ_ROWS ? r1 - i0 : KVQ_ROWS;
            const uint8_t *c[KVQ_ROWS];
            for (int u = 0; u < nr; u += 16) { /* weights p s per row and group; sum of p m */
                const int nu = nr - u < 16 ? nr - u : 16;
                const uint8_t *cu[16];
                const uint16_t *sp[16], *mp[16];
                kvq_block(J, 1, base, i0 + u, nu, cu, sp, mp);
                for (int r = 0; r < nu; r++) c[u + r] = cu[r];
                float sv[KVQ_GMAX][16], mv[KVQ_GMAX][16];
                kvq_lanes(sp, G, nu, sv);
                kvq_lanes(mp, G, nu, mv);
                const __m512i at = _mm512_add_epi32(lane, _mm512_set1_epi32(i0 + u));
                for (int h = 0; h < hb; h++) {
                    const __mmask16 vis = _mm512_cmpge_epi32_mask(at, _mm512_set1_epi32(beg[h]))
                                          & _mm512_cmplt_epi32_mask(at, _mm512_set1_epi32(end[h]))
                                          & (__mmask16)(nu == 16 ? 0xFFFF : (1u << nu) - 1);
                    const __m512 p = _mm512_maskz_loadu_ps(vis, sc + (size_t)(h0 + h) * sst + (i0 - r0) + u);
                    for (int g = 0; g < G; g++) {
                        _mm512_storeu_ps(ws[h][g] + u, _mm512_mul_ps(p, _mm512_loadu_ps(sv[g])));
                        mt[h][g] = _mm512_fmadd_ps(p, _mm512_loadu_ps(mv[g]), mt[h][g]);
                    }
                }
            }
            for (int z0 = 0; z0 < nz; z0 += 4) {
                const int zb = nz - z0 < 4 ? nz - z0 : 4;
                int gz[4];
                UNROLL for (int z = 0; z < 4; z++) gz[z] = kvq_gz(bits, gs, z0 + (z < zb ? z : zb - 1));
                __m512 o[KVD_HB][4];
                UNROLL for (int h = 0; h < KVD_HB; h++) UNROLL for (int z = 0; z < 4; z++)
                    o[h][z] = h < hb && z < zb ? _mm512_loadu_ps(o0[h] + 16 * (z0 + z)) : _mm512_setzero_ps();
                if (gz[0] == gz[3]) { /* one group: one weight per row and query row */
                    for (int r = 0; r < nr; r++) {
                        __m512 cv[4];
                        kvq_widen(c[r], bits, z0, zb, cv);
                        UNROLL for (int h = 0; h < KVD_HB; h++)
                            if (h < hb) {
                                const __m512 w = _mm512_set1_ps(ws[h][gz[0]][r]);
                                UNROLL for (int z = 0; z < 4; z++) o[h][z] = _mm512_fmadd_ps(w, cv[z], o[h][z]);
                            }
                    }
                } else {
                    for (int r = 0; r < nr; r++) {
                        __m512 cv[4];
                        kvq_widen(c[r], bits, z0, zb, cv);
                        UNROLL for (int h = 0; h < KVD_HB; h++)
                            if (h < hb)
                                UNROLL for (int z = 0; z < 4; z++)
                                    o[h][z] = _mm512_fmadd_ps(_mm512_set1_ps(ws[h][gz[z]][r]), cv[z], o[h][z]);
                    }
                }
                UNROLL for (int h = 0; h < KVD_HB; h++)
                    if (h < hb)
                        UNROLL for (int z = 0; z < 4; z++)
                            if (z < zb) _mm512_storeu_ps(o0[h] + 16 * (z0 + z), o[h][z]);
            }
        }
        kvq_values_end_x(J, hb, o0[0], mt[0], KVQ_GMAX);
    }
}

/* kvq_values for query rows j0 .. j0 + nq - 1 in several passes (a prompt's; their
 * probabilities sc[(j - j0) sst + i - r0]), the same sums in the same order:
 * the block loop outside the passes, so each block of KVQ_ROWS value rows is widened to
 * floats once (into vf, KVQ_ROWS x D) for every pass and its scales and minimums read once;
 * each query row's sums of p m per group wait in mt (RT x G vectors) between blocks. The
 * pass-major loop widened every row's codes again for each 6 query rows. */
static ALWAYS void kvq_values_rows(const kv_job *J, int bk, int r0, int r1, int j0, int nq, const float *sc, int sst,
                                   float *po, float *vf, __m512 *mt) {
    const int D = J->D, G = D / J->gs, gs = J->gs, bits = J->bits, nz = D / 16;
    const int b = bk / J->HKV, hk = bk % J->HKV;
    const int first = J->starts[b];
    const size_t base = ((size_t)b * J->HKV + hk) * J->cap;
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int j = 0; j < nq * G; j++) mt[j] = _mm512_setzero_ps();
    for (int i0 = r0; i0 < r1; i0 += KVQ_ROWS) {
        const int nr = r1 - i0 < KVQ_ROWS ? r1 - i0 : KVQ_ROWS;
        float sv[KVQ_ROWS / 16][KVQ_GMAX][16], mv[KVQ_ROWS / 16][KVQ_GMAX][16];
        for (int u = 0; u < nr; u += 16) {
            const int nu = nr - u < 16 ? nr - u : 16;
            const uint8_t *cu[16];
            const uint16_t *sp[16], *mp[16];
            kvq_block(J, 1, base, i0 + u, nu, cu, sp, mp);
            kvq_lanes(sp, G, nu, sv[u / 16]);
            kvq_lanes(mp, G, nu, mv[u / 16]);
            for (int r = 0; r < nu; r++)
                for (int z0 = 0; z0 < nz; z0 += 4) {
                    const int zb = nz - z0 < 4 ? nz - z0 : 4;
                    __m512 cv[4];
                    kvq_widen(cu[r], bits, z0, zb, cv);
                    UNROLL for (int z = 0; z < 4; z++)
                        if (z < zb) _mm512_store_ps(vf + (size_t)(u + r) * D + 16 * (z0 + z), cv[z]);
                }
        }
        for (int h0 = j0; h0 < j0 + nq; h0 += KVD_HB) {
            const int hb = j0 + nq - h0 < KVD_HB ? j0 + nq - h0 : KVD_HB;
            float *o0[KVD_HB];
            float ws[KVD_HB][KVQ_GMAX][KVQ_ROWS];
            UNROLL for (int h = 0; h < KVD_HB; h++) o0[h] = po + (size_t)(h0 + (h < hb ? h : 0)) * D;
            for (int h = 0; h < hb; h++) { /* weights p s per row and group; sum of p m */
                const int end = q_end(J, h0 + h), beg = q_begin(J, h0 + h, first);
                __m512 *m = mt + (size_t)(h0 - j0 + h) * G;
                for (int u = 0; u < nr; u += 16) {
                    const int nu = nr - u < 16 ? nr - u : 16;
                    const __m512i at = _mm512_add_epi32(lane, _mm512_set1_epi32(i0 + u));
                    const __mmask16 vis = _mm512_cmpge_epi32_mask(at, _mm512_set1_epi32(beg))
                                          & _mm512_cmplt_epi32_mask(at, _mm512_set1_epi32(end))
                                          & (__mmask16)(nu == 16 ? 0xFFFF : (1u << nu) - 1);
                    const __m512 p = _mm512_maskz_loadu_ps(vis, sc + (size_t)(h0 - j0 + h) * sst + (i0 - r0) + u);
                    for (int g = 0; g < G; g++) {
                        _mm512_storeu_ps(ws[h][g] + u, _mm512_mul_ps(p, _mm512_loadu_ps(sv[u / 16][g])));
                        m[g] = _mm512_fmadd_ps(p, _mm512_loadu_ps(mv[u / 16][g]), m[g]);
                    }
                }
            }
            for (int z0 = 0; z0 < nz; z0 += 4) {
                const int zb = nz - z0 < 4 ? nz - z0 : 4;
                int gz[4];
                UNROLL for (int z = 0; z < 4; z++) gz[z] = kvq_gz(bits, gs, z0 + (z < zb ? z : zb - 1));
                __m512 o[KVD_HB][4];
                UNROLL for (int h = 0; h < KVD_HB; h++) UNROLL for (int z = 0; z < 4; z++)
                    o[h][z] = h < hb && z < zb ? _mm512_loadu_ps(o0[h] + 16 * (z0 + z)) : _mm512_setzero_ps();
                const float *v0 = vf + 16 * z0;
                if (gz[0] == gz[3]) { /* one group: one weight per row and query row */
                    for (int r = 0; r < nr; r++) {
                        __m512 cv[4];
                        UNROLL for (int z = 0; z < 4; z++) cv[z] = z < zb ? _mm512_load_ps(v0 + (size_t)r * D + 16 * z) : _mm512_setzero_ps();
                        UNROLL for (int h = 0; h < KVD_HB; h++)
                            if (h < hb) {
                                const __m512 w = _mm512_set1_ps(ws[h][gz[0]][r]);
                                UNROLL for (int z = 0; z < 4; z++) o[h][z] = _mm512_fmadd_ps(w, cv[z], o[h][z]);
                            }
                    }
                } else {
                    for (int r = 0; r < nr; r++) {
                        __m512 cv[4];
                        UNROLL for (int z = 0; z < 4; z++) cv[z] = z < zb ? _mm512_load_ps(v0 + (size_t)r * D + 16 * z) : _mm512_setzero_ps();
                        UNROLL for (int h = 0; h < KVD_HB; h++)
                            if (h < hb)
                                UNROLL for (int z = 0; z < 4; z++)
                                    o[h][z] = _mm512_fmadd_ps(_mm512_set1_ps(ws[h][gz[z]][r]), cv[z], o[h][z]);
                    }
                }
                UNROLL for (int h = 0; h < KVD_HB; h++)
                    if (h < hb)
                        UNROLL for (int z = 0; z < 4; z++)
                            if (z < zb) _mm512_storeu_ps(o0[h] + 16 * (z0 + z), o[h][z]);
            }
        }
    }
    kvq_values_end_x(J, nq, po + (size_t)j0 * D, mt, G);
}

/* Softmax pieces of rows r0 .. r1 - 1: per query row j0 <= j < j0 + nq, over its visible
 * rows among them, m = the largest score, sc = exp(score - m) in place and l = their sum (l
 * = 0: none) */
static ALWAYS void kvq_softmax_part(const kv_job *J, int bk, int r0, int r1, int j0, int nq, float *sc, int sst,
                                    float *pm, float *pl) {
    const int first = J->starts[bk / J->HKV];
    for (int j = j0; j < j0 + nq; j++) {
        float *s = sc + (size_t)(j - j0) * sst - r0; /* s[i]: row i's score */
        const int e0 = q_end(J, j), b0 = q_begin(J, j, first);
        const int e = e0 < r1 ? e0 : r1, beg = b0 > r0 ? b0 : r0;
        pm[j] = -3.0e38f, pl[j] = 0.f;
        if (beg >= e) continue;
        pl[j] = kv_exp_span(s, beg, e, &pm[j]);
    }
}

/* whether the VNNI driver takes an affine job: whole dwords of codes per group, the value
 * vectors within one group, at most KVQ_GMAX groups */
static int kvq_fits(const kv_job *J) {
    const int G = J->D / J->gs;
    return J->D % 32 == 0 && G <= KVQ_GMAX && J->gs % (J->bits == 4 ? 32 : 16) == 0;
}

/* The sequence is split into chunks of KVQ_CHUNK rows from each sequence's first visible
 * one, so both threads work whatever the batch and KV heads, and a thread the machine
 * delays holds up one chunk, not half the step. Each (sequence, KV head, chunk) leaves per
 * query row its unnormalized output, largest score and exp sum; kvq_merge rescales them
 * to the largest score of all chunks (exact softmax). Chunks are fixed by the rows, not by
 * the number of held rows, so a query row's result does not depend on the rows after it
 * (several query tokens per step equal one-token steps, bit for bit). */
#define KVQ_CHUNK 1024
/* query rows a unit takes at a time: their score rows (KVQ_QROWS x ~KVQ_CHUNK floats) stay
 * in L2 through the scores, the softmax and the value pass (a prompt's ~1,000 query rows at
 * once went through L3 three times) */
#define KVQ_QROWS 96

static void kv_task_affine_q(void *ctx, int ith, int nth) {
    (void)ith;
    (void)nth;
    kv_job *J = (kv_job *)ctx;
    const int RT = J->H / J->HKV * J->T, D = J->D, sst = KVQ_CHUNK + 16;
    const int nq = RT < KVQ_QROWS ? RT : KVQ_QROWS;
    /* the score rows, then (several passes of query rows) kvq_scores' transposed codes and
     * kvq_values_rows' widened rows and sums of p m, each 64-byte aligned */
    const int rows = RT > KVD_HB;
    const size_t nsc = ((size_t)nq * sst + 15) / 16 * 16, ntb = rows ? (size_t)2 * D * J->bits / 32 * 16 : 0;
    const size_t nvf = rows ? (size_t)KVQ_ROWS * D : 0, nmt = rows ? (size_t)nq * (D / J->gs) * 16 : 0;
    float *sc = aligned_alloc(64, sizeof(float) * (nsc + ntb + nvf + nmt));
    if (!sc) {
        atomic_store(&J->failed, 1);
        return;
    }
    for (;;) {
        const int u = atomic_fetch_add_explicit(&J->next, 1, memory_order_relaxed);
        if (u >= J->B * J->HKV * J->nch) break;
        const int bk = u / J->nch, c = u % J->nch, first = J->starts[bk / J->HKV];
        const int r0 = first + c * KVQ_CHUNK, r1 = J->held - r0 < KVQ_CHUNK ? J->held : r0 + KVQ_CHUNK;
        float *po = J->po + (size_t)u * RT * D, *pm = J->pm + (size_t)u * RT, *pl = J->pl + (size_t)u * RT;
        if (r0 >= J->held) {
            for (int j = 0; j < RT; j++) pm[j] = -3.0e38f, pl[j] = 0.f;
            continue;
        }
        memset(po, 0, sizeof(float) * (size_t)RT * D);
        for (int j0 = 0; j0 < RT; j0 += nq) {
            const int n = RT - j0 < nq ? RT - j0 : nq;
            if (!rows)
                kvq_scores_step(J, bk, r0, r1, j0, n, sc, sst);
            else
                kvq_scores_rows(J, bk, r0, r1, j0, n, sc, sst, (__m512i *)(sc + nsc));
            kvq_softmax_part(J, bk, r0, r1, j0, n, sc, sst, pm, pl);
            if (!rows)
                kvq_values(J, bk, r0, r1, sc, sst, po);
            else
                kvq_values_rows(J, bk, r0, r1, j0, n, sc, sst, po, sc + nsc + ntb, (__m512 *)(sc + nsc + ntb + nvf));
        }
    }
    free(sc);
}

/* out row = sum over chunks of exp(m_c - M) o_c / sum of exp(m_c - M) l_c, M the largest m_c
 * of the chunks that saw a key (none: zeros) */
static void kvq_merge(const kv_job *J) {
    const int RT = J->H / J->HKV * J->T, D = J->D, nch = J->nch;
    for (int bk = 0; bk < J->B * J->HKV; bk++)
        for (int j = 0; j < RT; j++) {
            float M = -3.0e38f, L = 0.f;
            for (int c = 0; c < nch; c++) {
                const size_t u = (size_t)bk * nch + c;
                if (J->pl[u * RT + j] > 0.f && J->pm[u * RT + j] > M) M = J->pm[u * RT + j];
            }
            float *o = o_row(J, bk / J->HKV, bk % J->HKV, j);
            memset(o, 0, sizeof(float) * (size_t)D);
            for (int c = 0; c < nch; c++) {
                const size_t u = (size_t)bk * nch + c;
                if (!(J->pl[u * RT + j] > 0.f)) continue;
                const float w = expf(J->pm[u * RT + j] - M);
                const float *p = J->po + (u * RT + j) * D;
                L += w * J->pl[u * RT + j];
                for (int d = 0; d < D; d += 16)
                    _mm512_storeu_ps(o + d, _mm512_fmadd_ps(_mm512_set1_ps(w), _mm512_loadu_ps(p + d), _mm512_loadu_ps(o + d)));
            }
            const float inv = L > 0.f ? 1.f / L : 0.f;
            for (int d = 0; d < D; d++) o[d] *= inv;
        }
}

static int kvq_run(kv_job *J, int n_threads) {
    if (kv_check(J)) return -1;
    int longest = 0;
    for (int b = 0; b < J->B; b++) {
        const int first = J->starts[b] > 0 ? J->starts[b] : 0;
        if (J->held - first > longest) longest = J->held - first;
    }
    J->nch = longest > 0 ? (longest + KVQ_CHUNK - 1) / KVQ_CHUNK : 1;
    const size_t units = (size_t)J->B * J->HKV * J->nch, RT = (size_t)(J->H / J->HKV * J->T);
    float *buf = malloc(sizeof(float) * units * RT * (J->D + 2));
    if (!buf) return -5;
    J->po = buf, J->pm = buf + units * RT * J->D, J->pl = J->pm + units * RT;
    atomic_store(&J->next, 0);
    atomic_store(&J->failed, 0);
    int nth = n_threads < 1 ? 1 : n_threads;
    if ((size_t)nth > units) nth = (int)units;
    run_parallel(kv_task_affine_q, J, nth);
    const int rc = atomic_load(&J->failed) ? -5 : 0;
    if (!rc) kvq_merge(J);
    free(buf);
    return rc;
}

/* ---- TurboQuant keys scored with the rows across the lanes --------------------------------
 * A block of 16 key rows' packed codes is transposed in dwords (lane r: row r), each
 * coordinate's codes are cut out of it for the 16 rows at once and looked up in the codebook
 * (levels [D][16], in L1), and each query row's scores of the 16 rows accumulate over the
 * coordinates in order, one lane per row, times the row's norm / sqrt(D) and the scale at
 * the end: no key row decoded to floats and read back, no horizontal sums (the block
 * driver spent ~200 operations per key row on those, twice a dense row's). A row's score is
 * the same arithmetic in whichever lane it falls. */
#define KVT_LANES 1
/* a key row's codes in at most 16 whole dwords */
static ALWAYS int kvt_fits(const kv_job *J) { return J->D % 32 == 0 && J->D * J->kbits <= 512; }

/* acc[h] lane r = sum over d, in order, of q[h][d] x lv[d][r], for KVD_HB (6) query rows: a
 * function of its own so that the six sums stay in registers (inlined into the block loop
 * they went through the stack at every step) */
static __attribute__((noinline)) void kvt_pass(const float *lv, int D, const float *const q[KVD_HB],
                                               __m512 acc[KVD_HB]) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
    const float *q0 = q[0], *q1 = q[1], *q2 = q[2], *q3 = q[3], *q4 = q[4], *q5 = q[5];
    for (int d = 0; d < D; d++) {
        const __m512 l = _mm512_loadu_ps(lv + 16 * (size_t)d);
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(q0[d]), l, a0);
        a1 = _mm512_fmadd_ps(_mm512_set1_ps(q1[d]), l, a1);
        a2 = _mm512_fmadd_ps(_mm512_set1_ps(q2[d]), l, a2);
        a3 = _mm512_fmadd_ps(_mm512_set1_ps(q3[d]), l, a3);
        a4 = _mm512_fmadd_ps(_mm512_set1_ps(q4[d]), l, a4);
        a5 = _mm512_fmadd_ps(_mm512_set1_ps(q5[d]), l, a5);
    }
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3, acc[4] = a4, acc[5] = a5;
}

static ALWAYS void kvt_scores(const kv_job *J, int bk, float *sc, float *lv) {
    const int D = J->D, bits = J->kbits, P = D * bits / 32, RT = J->H / J->HKV * J->T;
    const int b = bk / J->HKV, hk = bk % J->HKV, first = J->starts[b], n = J->held, sst = J->sst;
    const size_t base = ((size_t)b * J->HKV + hk) * J->cap, rb = (size_t)D * bits / 8;
    float levels[16] = {0};
    memcpy(levels, J->kcb, sizeof(float) << bits);
    const __m512 cbv = _mm512_loadu_ps(levels);
    const __m512i mask = _mm512_set1_epi32((1 << bits) - 1);
    const __mmask16 km = P == 16 ? 0xFFFF : (__mmask16)((1u << P) - 1);
    const float fd = J->scale / sqrtf((float)D);
    for (int i0 = first; i0 < n; i0 += 16) {
        const int nr = n - i0 < 16 ? n - i0 : 16;
        __m512i t[16];
        float f[16];
        const uint8_t *c0 = NULL, *c15 = NULL;
        UNROLL for (int r = 0; r < 16; r++) {
            const float *nrm;
            const uint8_t *c = turbo_row(J, 0, base, i0 + (r < nr ? r : nr - 1), &nrm);
            if (r == 0) c0 = c;
            if (r == 15) c15 = c;
            t[r] = _mm512_maskz_loadu_epi32(km, c);
            f[r] = *nrm * fd;
        }
        if (nr == 16 && c15 == c0 + 15 * rb) /* the next blocks' codes, 4 KB ahead */
            for (size_t z = 0; z < 16 * rb; z += 64) _mm_prefetch((const char *)c0 + 4096 + z, _MM_HINT_T0);
        tr16x16(t); /* t[p] lane r: dword p of row r */
        for (int d = 0; d < D; d++) {
            const int bit = d * bits, p = bit >> 5, o = bit & 31;
            __m512i x = _mm512_srl_epi32(t[p], _mm_cvtsi32_si128(o));
            if (o + bits > 32) x = _mm512_or_si512(x, _mm512_sll_epi32(t[p + 1], _mm_cvtsi32_si128(32 - o)));
            _mm512_storeu_ps(lv + 16 * (size_t)d, _mm512_permutexvar_ps(_mm512_and_si512(x, mask), cbv));
        }
        const __m512 fv = _mm512_loadu_ps(f);
        for (int h0 = 0; h0 < RT; h0 += KVD_HB) {
            const int hb = RT - h0 < KVD_HB ? RT - h0 : KVD_HB;
            const float *q[KVD_HB];
            __m512 acc[KVD_HB];
            UNROLL for (int h = 0; h < KVD_HB; h++) q[h] = q_row(J, b, hk, h0 + (h < hb ? h : 0));
            kvt_pass(lv, D, q, acc);
            UNROLL for (int h = 0; h < KVD_HB; h++)
                if (h < hb) kv_store16(J, sc + (size_t)(h0 + h) * sst + i0, _mm512_mul_ps(acc[h], fv), nr);
        }
    }
}

/* the codebook levels of codes j .. j + 15 of a row of packed codes (16 codes in 2 bits bytes) */
static ALWAYS __m512 kvt_levels16(const uint8_t *c, int D, int bits, int j, __m512 cbv) {
    const uint8_t *p = c + (size_t)j * bits / 8;
    const __m512i m = _mm512_set1_epi32((1 << bits) - 1);
#if defined(__AVX512VBMI__)
    /* the 16 codes in one qword, broadcast; byte 0 of dword lane l cut from bit l bits of it */
    __m512i w;
    if (bits == 4 || j + 16 < D) { /* 8 bytes within the row (or its next one) */
        uint64_t u;
        memcpy(&u, p, 8);
        w = _mm512_set1_epi64((long long)u);
    } else {
        w = _mm512_broadcastq_epi64(_mm_maskz_loadu_epi8((__mmask16)((1u << (2 * bits)) - 1), p));
    }
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    /* control byte 4 (l % 2) of qword l / 2: l bits; the other bytes are masked off */
    const __m512i ctrl = _mm512_mullo_epi32(lane, _mm512_set1_epi32(bits));
    const __m512i idx = _mm512_and_si512(_mm512_multishift_epi64_epi8(ctrl, w), m);
#else
    uint64_t u = 0;
    memcpy(&u, p, (size_t)(2 * bits));
    const __m512i shifts = _mm512_mullo_epi32(_mm512_set_epi32(7, 6, 5, 4, 3, 2, 1, 0, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(bits));
    const __m512i w = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32((int)(uint32_t)(u & ((1ull << (8 * bits)) - 1))),
                                              _mm512_set1_epi32((int)(uint32_t)(u >> (8 * bits))));
    const __m512i idx = _mm512_and_si512(_mm512_srlv_epi32(w, shifts), m);
#endif
    return _mm512_permutexvar_ps(idx, cbv);
}

/* The value pass: out += p x value rows (the output rows zeroed by the caller), each row's
 * norm / sqrt(D) folded into its weights p f, the levels cut from the codes in registers as
 * the row is accumulated where one pass of query rows takes them all (a decode step: the
 * block driver decoded the rows into a buffer and read them back), else once per block of
 * rows into lv (KVD_ROWS x D floats) for every pass to read. Rows a query row does not see
 * weigh 0 (their scores were never made): adding 0 x level changes no sum, so a row's
 * result is the one-token kernel's whatever the query rows beside it. */
static ALWAYS void kvt_values(const kv_job *J, int bk, const float *sc, float *lv) {
    const int D = J->D, bits = J->vbits, RT = J->H / J->HKV * J->T, b = bk / J->HKV, hk = bk % J->HKV, nz = D / 16;
    const int first = J->starts[b], n = J->held, sst = J->sst, one = RT <= KVD_HB;
    const int common = n - J->T + 1, lo_all = q_begin(J, J->T - 1, first);
    const int a0 = lo_all > first ? lo_all : first, a1 = common < n ? common : n; /* rows all query rows see */
    const size_t base = ((size_t)b * J->HKV + hk) * J->cap;
    float levels[16] = {0}, fb[KVD_ROWS];
    memcpy(levels, J->vcb, sizeof(float) << bits);
    const __m512 cbv = _mm512_loadu_ps(levels);
    const float inv_sqrt_d = 1.f / sqrtf((float)D);
    for (int i0 = first; i0 < n; i0 += KVD_ROWS) {
        const int nr = n - i0 < KVD_ROWS ? n - i0 : KVD_ROWS;
        const uint8_t *rows[KVD_ROWS];
        for (int r = 0; r < nr; r++) {
            const float *nrm;
            rows[r] = turbo_row(J, 1, base, i0 + r, &nrm);
            fb[r] = *nrm * inv_sqrt_d;
            if (!one)
                for (int z = 0; z < nz; z++)
                    _mm512_storeu_ps(lv + (size_t)r * D + 16 * z, kvt_levels16(rows[r], D, bits, 16 * z, cbv));
        }
        for (int h0 = 0; h0 < RT; h0 += KVD_HB) {
            const int hb = RT - h0 < KVD_HB ? RT - h0 : KVD_HB;
            float *o0[KVD_HB];
            int end[KVD_HB], beg[KVD_HB];
            const float *s0[KVD_HB];
            UNROLL for (int h = 0; h < KVD_HB; h++) {
                const int j = h0 + (h < hb ? h : 0);
                o0[h] = o_row(J, b, hk, j), end[h] = q_end(J, j), beg[h] = q_begin(J, j, first);
                s0[h] = sc + (size_t)j * sst;
            }
            for (int z0 = 0; z0 < nz; z0 += 4) {
                const int zb = nz - z0 < 4 ? nz - z0 : 4;
                __m512 o[KVD_HB][4];
                UNROLL for (int h = 0; h < KVD_HB; h++) UNROLL for (int z = 0; z < 4; z++)
                    o[h][z] = h < hb && z < zb ? _mm512_loadu_ps(o0[h] + 16 * (z0 + z)) : _mm512_setzero_ps();
                for (int r = 0; r < nr; r++) {
                    const int i = i0 + r, all = i >= a0 && i < a1;
                    __m512 cv[4];
                    UNROLL for (int z = 0; z < 4; z++)
                        cv[z] = z >= zb ? _mm512_setzero_ps()
                                : one ? kvt_levels16(rows[r], D, bits, 16 * (z0 + z), cbv)
                                      : _mm512_loadu_ps(lv + (size_t)r * D + 16 * (z0 + z));
                    UNROLL for (int h = 0; h < KVD_HB; h++) {
                        const float w = h < hb && (all || (i < end[h] && i >= beg[h])) ? s0[h][i] * fb[r] : 0.f;
                        const __m512 p = _mm512_set1_ps(w);
                        UNROLL for (int z = 0; z < 4; z++) o[h][z] = _mm512_fmadd_ps(p, cv[z], o[h][z]);
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

/* kv_group16 with the keys scored by kvt_scores; lv: D x 16 floats */
static void kv_task_turbo_lanes(kv_job *J) {
    const int RT = J->H / J->HKV * J->T;
    float *sc = malloc(sizeof(float) * ((size_t)RT * J->sst + (size_t)KVD_ROWS * J->D));
    if (!sc) return;
    float *buf = sc + (size_t)RT * J->sst;
    for (;;) {
        const int bk = atomic_fetch_add_explicit(&J->next, 1, memory_order_relaxed);
        if (bk >= J->B * J->HKV) break;
        const int b = bk / J->HKV, hk = bk % J->HKV;
        for (int j = 0; j < RT; j++) memset(o_row(J, b, hk, j), 0, sizeof(float) * (size_t)J->D);
        if (J->starts[b] >= J->held) continue;
        kvt_scores(J, bk, sc, buf);
        kv_softmax16(J, bk, sc);
        kvt_values(J, bk, sc, buf);
    }
    free(sc);
}
#endif
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
#ifdef KVT_LANES
static void kv_task_turbo(void *ctx, int ith, int nth) {
    (void)ith;
    (void)nth;
    kv_job *J = (kv_job *)ctx;
    const char *blk = getenv("VLMC_KV_TURBO_BLOCKS"); /* 1: the block driver's key scores (to measure against) */
    if (J->D % 16 == 0 && kvt_fits(J) && !(blk && blk[0] == '1'))
        kv_task_turbo_lanes(J);
    else if (J->D % 16 == 0)
        kv_task16(J, kv_rows_turbo);
    else
        kv_task(J, kv_row_turbo);
}
#else
KV_TASK(turbo, J->D % 16 == 0 && J->kbits <= 4 && J->vbits <= 4)
#endif

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
                      int window, float softcap, float *out, int tok_major, int n_threads) {
    if ((xk == NULL) != (xv == NULL) || window < 0 || softcap < 0.f) return -1;
    kv_job J = {.q = q, .starts = starts, .B = B, .H = H, .HKV = HKV, .D = D, .T = T, .cap = cap, .held = held,
                .scale = scale, .window = window, .softcap = softcap, .out = out, .k = k, .v = v, .xk = xk, .xv = xv};
    kv_shape(&J, tok_major);
    return kv_run(&J, kv_task_dense, n_threads);
}

/* xk, xv (NULL: none): this step's keys and values [B, HKV, T, D], as rows held - T ..
 * held - 1 of every (sequence, KV head), so the caller can store them in the cache
 * afterwards (lazily) and the cache holds only the held - T rows before them (k/v may then
 * be NULL when held is T) */
int vlmc_kv_dense_decode_n(const float *q, const float *k, const float *v, const float *xk, const float *xv,
                           const int32_t *starts, int B, int H, int HKV, int D, int T, int cap, int held,
                           float scale, int window, float softcap, float *out, int n_threads) {
    return kv_dense_decode_t(q, k, v, xk, xv, starts, B, H, HKV, D, T, cap, held, scale, window, softcap, out, 0,
                             n_threads);
}

int vlmc_kv_dense_decode(const float *q, const float *k, const float *v, const float *xk, const float *xv,
                         const int32_t *starts, int B, int H, int HKV, int D, int cap, int held, float scale,
                         int window, float softcap, float *out, int n_threads) {
    return kv_dense_decode_t(q, k, v, xk, xv, starts, B, H, HKV, D, 1, cap, held, scale, window, softcap, out, 0,
                             n_threads);
}

/* The query rows [rows, D] as the scores over affine codes take them, per group of gs values:
 * a = max|q| / 127, t = q * (127 / max|q|), code c = rint(t) and residual r = rint(256 (t -
 * c)) (ties to even, t - c is exact; r saturated to 127; an all-zero group: 0), so q ~ a (c +
 * r / 256) to ~1 / 65000 of the group's largest value; qt = (256 c + r) (a / 256), the float
 * values every driver scores with (vlmc.kernels.kv_quant.query_int8 computes the same). For
 * the VNNI driver: c in qi and r in qr in the order the key codes are read (8-bit: natural;
 * 4-bit: the even-indexed values of each 8 as D / 8 dwords, then the odd ones), qa = a / 256
 * and qs = qa x the group's sum of 256 c + r. */
#if defined(__AVX512F__)
/* one group of kv_query_int8 (gs % 16 == 0), 16 values at a time, each lane the scalar
 * loop's operations on its value (NaN kept through the clamps as fminf / fmaxf would not:
 * the scalar comparisons leave it, and it becomes code 0); the codes to c and r */
static ALWAYS void kv_query_group16(const float *x, int gs, float *qt, int *c, int *r, float *pa, int *psum) {
    const __m512 sign = _mm512_set1_ps(-0.f);
    __m512 am = _mm512_setzero_ps();
    for (int i = 0; i < gs; i += 16) am = _mm512_max_ps(_mm512_andnot_ps(sign, _mm512_loadu_ps(x + i)), am); /* NaN: am */
    const float amax = _mm512_reduce_max_ps(am);
    const float inv = amax > 0.f ? 127.f / amax : 0.f, a = amax / 127.f / 256.f;
    __m512i sum = _mm512_setzero_si512();
    for (int i = 0; i < gs; i += 16) {
        const __m512 t = _mm512_mul_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(inv));
        __m512 cf = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        cf = _mm512_max_ps(_mm512_set1_ps(-127.f), _mm512_min_ps(_mm512_set1_ps(127.f), cf)); /* NaN stays */
        __m512 ef = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(t, cf), _mm512_set1_ps(256.f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        ef = _mm512_max_ps(_mm512_set1_ps(-128.f), _mm512_min_ps(_mm512_set1_ps(127.f), ef));
        const __m512i ci = _mm512_maskz_cvttps_epi32(_mm512_cmp_ps_mask(cf, cf, _CMP_ORD_Q), cf);
        const __m512i ri = _mm512_maskz_cvttps_epi32(_mm512_cmp_ps_mask(ef, ef, _CMP_ORD_Q), ef);
        const __m512i v = _mm512_add_epi32(_mm512_slli_epi32(ci, 8), ri);
        sum = _mm512_add_epi32(sum, v);
        _mm512_storeu_ps(qt + i, _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(a)));
        _mm512_storeu_si512(c + i, ci);
        _mm512_storeu_si512(r + i, ri);
    }
    *pa = a;
    *psum = _mm512_reduce_add_epi32(sum);
}
#endif

static void kv_query_int8(const float *q, size_t rows, int D, int gs, int bits, float *qt, int8_t *qi, int8_t *qr,
                          float *qa, float *qs) {
    const int G = D / gs;
#if defined(__AVX512F__)
    if (gs % 16 == 0 && gs <= 256) {
        int c[256], e[256];
        for (size_t r = 0; r < rows; r++)
            for (int g = 0; g < G; g++) {
                float a;
                int sum;
                kv_query_group16(q + r * D + (size_t)g * gs, gs, qt + r * D + (size_t)g * gs, c, e, &a, &sum);
                for (int i = 0; i < gs; i++) {
                    const int k = g * gs + i, at = bits == 8 ? k : (k % 2 ? D / 2 : 0) + k / 8 * 4 + k % 8 / 2;
                    qi[r * D + at] = (int8_t)c[i];
                    qr[r * D + at] = (int8_t)e[i];
                }
                qa[r * G + g] = a;
                qs[r * G + g] = a * (float)sum;
            }
        return;
    }
#endif
    for (size_t r = 0; r < rows; r++)
        for (int g = 0; g < G; g++) {
            const float *x = q + r * D + (size_t)g * gs;
            float amax = 0.f;
            for (int i = 0; i < gs; i++) amax = fmaxf(amax, fabsf(x[i]));
            const float inv = amax > 0.f ? 127.f / amax : 0.f, a = amax / 127.f / 256.f;
            int sum = 0;
            for (int i = 0; i < gs; i++) {
                const float t = x[i] * inv;
                float c = rintf(t);
                c = c > 127.f ? 127.f : c < -127.f ? -127.f : c;
                float e = rintf((t - c) * 256.f);
                e = e > 127.f ? 127.f : e < -128.f ? -128.f : e;
                const int ci = c == c ? (int)c : 0, ri = e == e ? (int)e : 0, k = g * gs + i; /* NaN: 0 */
                sum += 256 * ci + ri;
                qt[r * D + k] = (float)(256 * ci + ri) * a;
                const int at = bits == 8 ? k : (k % 2 ? D / 2 : 0) + k / 8 * 4 + k % 8 / 2;
                qi[r * D + at] = (int8_t)ci;
                qr[r * D + at] = (int8_t)ri;
            }
            qa[r * G + g] = a;
            qs[r * G + g] = a * (float)sum;
        }
}

int kv_affine_decode_x(const float *q, const uint8_t *kc, const uint16_t *ks, const uint16_t *kb, const uint8_t *vc,
                       const uint16_t *vs, const uint16_t *vb, const kv_codes *xk, const kv_codes *xv,
                       const int32_t *starts, int B, int H, int HKV, int D, int T, int cap, int held, int bits, int gs,
                       float scale, int window, float softcap, float *out, int tok_major, int n_threads) {
    if ((bits != 4 && bits != 8) || gs < 2 || D % gs || gs % 2) return -2;
    if ((xk == NULL) != (xv == NULL) || window < 0 || softcap < 0.f) return -1;
    if (B < 1 || H < 1 || T < 1 || D < 1) return -1;
    const size_t rows = (size_t)B * H * T, G = (size_t)(D / gs);
    float *qt = malloc(rows * D * sizeof(float) + rows * G * 2 * sizeof(float) + 2 * rows * D);
    if (!qt) return -5;
    float *qa = qt + rows * D, *qs = qa + rows * G;
    int8_t *qi = (int8_t *)(qs + rows * G), *qr = qi + rows * D;
    kv_query_int8(q, rows, D, gs, bits, qt, qi, qr, qa, qs);
    const char *flt = getenv("VLMC_KV_FLOAT"); /* 1: the float driver (to measure against) */
    kv_job J = {.q = qt, .starts = starts, .B = B, .H = H, .HKV = HKV, .D = D, .T = T, .cap = cap, .held = held,
                .scale = scale, .window = window, .softcap = softcap, .out = out, .kc = kc, .vc = vc, .ks = ks, .kb = kb, .vs = vs, .vb = vb,
                .xkc = xk, .xvc = xv, .bits = bits, .gs = gs, .qi = flt && flt[0] == '1' ? NULL : qi, .qr = qr, .qa = qa, .qs = qs};
    kv_shape(&J, tok_major);
    int rc;
#if VLMC_VNNI
    if (J.qi && kvq_fits(&J))
        rc = kvq_run(&J, n_threads);
    else
#endif
        rc = kv_run(&J, kv_task_affine, n_threads);
    free(qt);
    return rc;
}

int vlmc_kv_affine_decode_n(const float *q, const uint8_t *kc, const uint16_t *ks, const uint16_t *kb,
                            const uint8_t *vc, const uint16_t *vs, const uint16_t *vb, const int32_t *starts,
                            int B, int H, int HKV, int D, int T, int cap, int held, int bits, int gs, float scale,
                            int window, float softcap, float *out, int n_threads) {
    return kv_affine_decode_x(q, kc, ks, kb, vc, vs, vb, NULL, NULL, starts, B, H, HKV, D, T, cap, held, bits, gs,
                              scale, window, softcap, out, 0, n_threads);
}

int vlmc_kv_affine_decode(const float *q, const uint8_t *kc, const uint16_t *ks, const uint16_t *kb,
                          const uint8_t *vc, const uint16_t *vs, const uint16_t *vb, const int32_t *starts,
                          int B, int H, int HKV, int D, int cap, int held, int bits, int gs, float scale,
                          int window, float softcap, float *out, int n_threads) {
    return vlmc_kv_affine_decode_n(q, kc, ks, kb, vc, vs, vb, starts, B, H, HKV, D, 1, cap, held, bits, gs, scale,
                                   window, softcap, out, n_threads);
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

int kv_turbo_decode_x(const float *q, const uint8_t *kc, const float *kn, const uint8_t *vc, const float *vn,
                      const float *kcb, const float *vcb, const kv_turbo *xk, const kv_turbo *xv,
                      const int32_t *starts, int B, int H, int HKV, int D, int T, int cap, int held, int kbits,
                      int vbits, float scale, int window, float softcap, float *out, int tok_major, int n_threads) {
    if (D < 8 || D % 8 || kbits < 2 || kbits > 4 || vbits < 2 || vbits > 4) return -2;
    if ((xk == NULL) != (xv == NULL) || window < 0 || softcap < 0.f) return -1;
    kv_job J = {.q = q, .starts = starts, .B = B, .H = H, .HKV = HKV, .D = D, .T = T, .cap = cap, .held = held,
                .scale = scale, .window = window, .softcap = softcap, .out = out, .kc = kc, .vc = vc, .kn = kn,
                .vn = vn, .kcb = kcb, .vcb = vcb, .xtk = xk, .xtv = xv, .kbits = kbits, .vbits = vbits};
    kv_shape(&J, tok_major);
    return kv_run(&J, kv_task_turbo, n_threads);
}

int vlmc_kv_turbo_decode_n(const float *q, const uint8_t *kc, const float *kn, const uint8_t *vc, const float *vn,
                           const float *kcb, const float *vcb, const int32_t *starts, int B, int H, int HKV, int D,
                           int T, int cap, int held, int kbits, int vbits, float scale, float *out, int n_threads) {
    return kv_turbo_decode_x(q, kc, kn, vc, vn, kcb, vcb, NULL, NULL, starts, B, H, HKV, D, T, cap, held, kbits,
                             vbits, scale, 0, 0.f, out, 0, n_threads);
}

int vlmc_kv_turbo_decode(const float *q, const uint8_t *kc, const float *kn, const uint8_t *vc, const float *vn,
                         const float *kcb, const float *vcb, const int32_t *starts, int B, int H, int HKV, int D,
                         int cap, int held, int kbits, int vbits, float scale, float *out, int n_threads) {
    return vlmc_kv_turbo_decode_n(q, kc, kn, vc, vn, kcb, vcb, starts, B, H, HKV, D, 1, cap, held, kbits, vbits, scale,
                                  out, n_threads);
}
