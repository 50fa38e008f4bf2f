// kv_affine_decode (Metal, for mx.fast.metal_kernel): same inputs, outputs, template, grid
// and semantics as kv_affine_decode.cu (see there). Helpers: kv_common.metal.
// @body
constexpr int G = H / HKV;
constexpr int WARPS = BLOCK / 32;
constexpr int ROW = D * BITS / 8;
constexpr int GROUPS = D / GROUP;
threadgroup float qs[G * D];
threadgroup float p[G * CHUNK];
const int n = held[0];
const int nch = (n + CHUNK - 1) / CHUNK;
const int blk = int(threadgroup_position_in_grid.x);
const int c = blk % nch;
const int bk = blk / nch;  // sequence * HKV + KV head
const int b = bk / HKV;
const int t = int(thread_position_in_threadgroup.x);
const int lane = int(thread_index_in_simdgroup), warp = int(simdgroup_index_in_threadgroup);
const int cap = k_codes_shape[2];
const int c0 = c * CHUNK;
const int lo = max(c0, starts[b]), hi = min(c0 + CHUNK, n);
const size_t base = size_t(bk) * cap;
const size_t row = size_t(b) * H + (bk % HKV) * G;  // first query head served
for (int i = t; i < G * D; i += BLOCK) qs[i] = q[row * D + i] * scale[0];
threadgroup_barrier(mem_flags::mem_threadgroup);
for (int i = c0 + warp; i < c0 + CHUNK; i += WARPS) {  // scores: a simdgroup per key, lanes along D
  float s[G];
  for (int h = 0; h < G; ++h) s[h] = 0.0f;
  if (i >= lo && i < hi) {
    const size_t r = base + i;
    const device uint8_t* codes = k_codes + r * ROW;
    for (int j = lane; j < D; j += 32) {
      const int g = j / GROUP;
      const float k = float(k_scales[r * GROUPS + g]) * float(kv_code(codes, j, BITS)) + float(k_biases[r * GROUPS + g]);
      for (int h = 0; h < G; ++h) s[h] += qs[h * D + j] * k;
    }
    for (int h = 0; h < G; ++h) s[h] = simd_sum(s[h]);
  }
  if (lane == 0) {
    for (int h = 0; h < G; ++h) p[h * CHUNK + i - c0] = (i >= lo && i < hi) ? s[h] : -INFINITY;
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
kv_chunk_softmax<G, CHUNK, WARPS>(p, stats, row, nch, c, lane, warp);
threadgroup_barrier(mem_flags::mem_threadgroup);
for (int d = t; d < D; d += BLOCK) {  // values: a thread per coordinate, every head at once
  const int g = d / GROUP;
  float acc[G];
  for (int h = 0; h < G; ++h) acc[h] = 0.0f;
  for (int i = lo; i < hi; ++i) {
    const size_t r = base + i;
    const float v = float(v_scales[r * GROUPS + g]) * float(kv_code(v_codes + r * ROW, d, BITS)) + float(v_biases[r * GROUPS + g]);
    for (int h = 0; h < G; ++h) acc[h] += p[h * CHUNK + i - c0] * v;
  }
  for (int h = 0; h < G; ++h) partial[((row + h) * nch + c) * D + d] = acc[h];
}
