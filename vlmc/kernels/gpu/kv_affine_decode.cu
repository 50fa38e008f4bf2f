// kv_affine_decode (CUDA body for mx.fast.cuda_kernel): one decode step's attention over an
// affine-coded KV cache, reading the codes in place (no decoded copy of the cache), split
// into chunks of CHUNK tokens (see kv_common.cu).
// Inputs: q [B, H, D] float32; k_codes, v_codes [B, HKV, CAP, D*BITS/8] uint8 (packed as
// vlmc.kernels.kv_quant.pack); k_scales, k_biases, v_scales, v_biases [B, HKV, CAP, D/GROUP]
// bfloat16; starts [B] int32 (first valid key per sequence); held [1] int32 (keys cached);
// scale [1] float32. Outputs, NCH = ceil(held / CHUNK): partial [B, H, NCH, D] float32
// (sum over the chunk's keys of exp(s - m) * v) and stats [B, H, NCH, 2] float32 (m, sum of
// exp(s - m)). Grid: B * HKV * NCH blocks of BLOCK threads.
// Template: H, HKV, D, BITS (2, 3, 4 or 8), GROUP, CHUNK, BLOCK (a multiple of 32).
// Reference: vlmc.kernels.kv_quant.kv_affine_decode (after merge_chunks). Helpers: kv_common.cu.
constexpr int G = H / HKV;
constexpr int WARPS = BLOCK / 32;
constexpr int ROW = D * BITS / 8;
constexpr int GROUPS = D / GROUP;
__shared__ float qs[G][D];
__shared__ float p[G][CHUNK];
const int n = held[0];
const int nch = (n + CHUNK - 1) / CHUNK;
const int c = blockIdx.x % nch;
const int bk = blockIdx.x / nch;  // sequence * HKV + KV head
const int b = bk / HKV;
const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
const int cap = k_codes_shape[2];
const int c0 = c * CHUNK;
const int lo = max(c0, starts[b]), hi = min(c0 + CHUNK, n);
const size_t base = (size_t)bk * cap;
const size_t row = (size_t)b * H + (bk % HKV) * G;  // first query head served
for (int i = t; i < G * D; i += BLOCK) qs[i / D][i % D] = q[row * D + i] * scale[0];
__syncthreads();
for (int i = c0 + warp; i < c0 + CHUNK; i += WARPS) {  // scores: a warp per key, lanes along D
  float s[G];
  for (int h = 0; h < G; ++h) s[h] = 0.0f;
  if (i >= lo && i < hi) {
    const size_t r = base + i;
    const uint8_t* codes = k_codes + r * ROW;
    for (int j = lane; j < D; j += 32) {
      const int g = j / GROUP;
      const float k = static_cast<float>(k_scales[r * GROUPS + g]) * (float)kv_code(codes, j, BITS) +
          static_cast<float>(k_biases[r * GROUPS + g]);
      for (int h = 0; h < G; ++h) s[h] += qs[h][j] * k;
    }
    for (int h = 0; h < G; ++h) s[h] = kv_warp_sum(s[h]);
  }
  if (lane == 0) {
    for (int h = 0; h < G; ++h) p[h][i - c0] = (i >= lo && i < hi) ? s[h] : __int_as_float(0xff800000);
  }
}
__syncthreads();
kv_chunk_softmax<G, CHUNK, WARPS>(p, stats, row, nch, c, lane, warp);
__syncthreads();
for (int d = t; d < D; d += BLOCK) {  // values: a thread per coordinate, every head at once
  const int g = d / GROUP;
  float acc[G];
  for (int h = 0; h < G; ++h) acc[h] = 0.0f;
  for (int i = lo; i < hi; ++i) {
    const size_t r = base + i;
    const float v = static_cast<float>(v_scales[r * GROUPS + g]) * (float)kv_code(v_codes + r * ROW, d, BITS) +
        static_cast<float>(v_biases[r * GROUPS + g]);
    for (int h = 0; h < G; ++h) acc[h] += p[h][i - c0] * v;
  }
  for (int h = 0; h < G; ++h) partial[((row + h) * nch + c) * D + d] = acc[h];
}
