/* vlmc CPU kernels: compile-time help for the quantize step (vlmc.backends.quantize). The
 * scale and bias of each group of an affine-quantized weight, searched for low squared
 * error by the method of searched_params there (whose MLX ops are the fallback): a given
 * first candidate (mx.quantize's), the group's min/max range shrunk about its middle by
 * each factor of `shrink`, then `nrefit` least-squares refits of scale and bias to the
 * chosen codes, each step kept only where it lowered the group's error. In C because the
 * MLX ops make a whole model's compile several times slower. Float sums run in another
 * order than MLX's, so where two candidates come within rounding of each other the two
 * may keep different ones (for the same total error). */
#include "vlmc.h"

typedef struct {
    const float *w;
    const float *s0, *b0; /* the first candidate per group */
    const float *shrink;
    float *scales, *biases;
    int N, K, gs, top, nshrink, nrefit;
} as_job;

/* the nearest code to x for bias b and scale s (a zero scale divides by 1), as MLX's
 * round (ties to even) and clip do in vlmc.backends.quantize._codes */
static inline float as_code(float x, float s, float b, int top) {
    const float c = rintf((x - b) / (s == 0.f ? 1.f : s));
    return c < 0.f ? 0.f : c > (float)top ? (float)top : c;
}

static float as_sse(const float *x, int gs, float s, float b, int top) {
    float e = 0.f;
    for (int i = 0; i < gs; i++) {
        const float r = as_code(x[i], s, b, top) * s + b - x[i];
        e += r * r;
    }
    return e;
}

static void as_group(const as_job *J, const float *x, float s0, float b0, float *so, float *bo) {
    const int gs = J->gs, top = J->top;
    float lo = x[0], hi = x[0];
    for (int i = 1; i < gs; i++) {
        lo = x[i] < lo ? x[i] : lo;
        hi = x[i] > hi ? x[i] : hi;
    }
    const float mid = (lo + hi) / 2.f, half = (hi - lo) / 2.f;
    float bs = s0, bb = b0, be = as_sse(x, gs, s0, b0, top);
    for (int j = 0; j < J->nshrink; j++) {
        const float f = J->shrink[j], s = 2.f * half * f / (float)top, b = mid - half * f;
        const float e = as_sse(x, gs, s, b, top);
        if (e < be) bs = s, bb = b, be = e;
    }
    for (int it = 0; it < J->nrefit; it++) {
        float cm = 0.f, xm = 0.f;
        float c[256];
        for (int i = 0; i < gs; i++) {
            c[i] = as_code(x[i], bs, bb, top);
            cm += c[i];
            xm += x[i];
        }
        cm /= (float)gs;
        xm /= (float)gs;
        float var = 0.f, cov = 0.f;
        for (int i = 0; i < gs; i++) {
            var += (c[i] - cm) * (c[i] - cm);
            cov += (c[i] - cm) * (x[i] - xm);
        }
        const float s = var > 0.f ? cov / var : bs, b = xm - s * cm;
        const float e = as_sse(x, gs, s, b, top);
        if (e < be) bs = s, bb = b, be = e;
    }
    *so = bs;
    *bo = bb;
}

static void as_task(void *ctx, int ith, int nth) {
    const as_job *J = ctx;
    const int G = J->K / J->gs;
    const long n0 = (long)J->N * ith / nth, n1 = (long)J->N * (ith + 1) / nth;
    for (long n = n0; n < n1; n++)
        for (int g = 0; g < G; g++)
            as_group(J, J->w + n * J->K + (long)g * J->gs, J->s0[n * G + g], J->b0[n * G + g], J->scales + n * G + g,
                     J->biases + n * G + g);
}

/* scales, biases: [N, K / gs] float32 for w [N, K] float32; s0, b0 the same shape */
int vlmc_affine_search(const float *w, int N, int K, int gs, int bits, const float *s0, const float *b0,
                       const float *shrink, int nshrink, int nrefit, float *scales, float *biases, int n_threads) {
    if (N < 1 || K < 1 || gs < 1 || gs > 256 || K % gs || bits < 1 || bits > 8 || nshrink < 1 || nrefit < 0)
        return -1;
    as_job J = {.w = w, .s0 = s0, .b0 = b0, .shrink = shrink, .scales = scales, .biases = biases, .N = N, .K = K, .gs = gs,
                .top = (1 << bits) - 1, .nshrink = nshrink, .nrefit = nrefit};
    run_parallel(as_task, &J, n_threads < 1 ? 1 : n_threads > N ? N : n_threads);
    return 0;
}

/* codes: the nearest code per value for the given (stored, float32-widened) scales and
 * biases, packed as MLX does (each row a little-endian bit stream, 8 codes in `bits`
 * bytes): vlmc.backends.quantize.nearest_codes, bit for bit (same division, rint ties to even) */
typedef struct {
    const float *w, *sc, *bi;
    uint8_t *out;
    int N, K, gs, bits;
} ac_job;

static void ac_task(void *ctx, int ith, int nth) {
    const ac_job *J = ctx;
    const int G = J->K / J->gs, top = (1 << J->bits) - 1;
    const long n0 = (long)J->N * ith / nth, n1 = (long)J->N * (ith + 1) / nth;
    const size_t rowbytes = (size_t)J->K / 8 * J->bits;
    for (long n = n0; n < n1; n++) {
        const float *x = J->w + n * J->K;
        uint8_t *o = J->out + n * rowbytes;
        for (int k = 0; k < J->K; k += 8) {
            const int g = k / J->gs;
            const float s = J->sc[n * G + g], b = J->bi[n * G + g];
            uint64_t v = 0;
            for (int i = 0; i < 8; i++) v |= (uint64_t)as_code(x[k + i], s, b, top) << (J->bits * i);
            memcpy(o + (size_t)k / 8 * J->bits, &v, (size_t)J->bits); /* little-endian host */
        }
    }
}

int vlmc_affine_codes(const float *w, int N, int K, int gs, int bits, const float *scales, const float *biases,
                      uint8_t *out, int n_threads) {
    if (N < 1 || K < 8 || K % 8 || gs < 8 || gs % 8 || K % gs || bits < 1 || bits > 8) return -1;
    ac_job J = {.w = w, .sc = scales, .bi = biases, .out = out, .N = N, .K = K, .gs = gs, .bits = bits};
    run_parallel(ac_task, &J, n_threads < 1 ? 1 : n_threads > N ? N : n_threads);
    return 0;
}
