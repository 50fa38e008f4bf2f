// kv_turbo_decode (Metal, for mx.fast.metal_kernel): same inputs, outputs, template and
// semantics as kv_turbo_decode.cu (see there). Helpers: kv_common.metal.
// @body
constexpr int WARPS = BLOCK / 32;
constexpr int KROW = D * KBITS / 8;
constexpr int VROW = D * VBITS / 8;
threadgroup float qs[D];
threadgroup float red[WARPS];
threadgroup float kcb[1 << KBITS];
threadgroup float vcb[1 << VBITS];
const int bh = int(threadgroup_position_in_grid.x);
const int b = bh / H;
const int hk = (bh % H) / (H / HKV);
const int t = int(thread_position_in_threadgroup.x);
const uint lane = thread_index_in_simdgroup;
const uint warp = simdgroup_index_in_threadgroup;
const int n = held[0];
const int cap = k_codes_shape[2];
const int first = starts[b];
const size_t base = (size_t(b) * HKV + hk) * cap;
const float unit = metal::rsqrt(float(D));
device float* sc = scores + size_t(bh) * cap;
for (int i = t; i < D; i += BLOCK) qs[i] = q_rot[size_t(bh) * D + i] * scale[0];
for (int i = t; i < (1 << KBITS); i += BLOCK) kcb[i] = k_codebook[i];
for (int i = t; i < (1 << VBITS); i += BLOCK) vcb[i] = v_codebook[i];
threadgroup_barrier(mem_flags::mem_threadgroup);
float m = -INFINITY;
for (int i = first + t; i < n; i += BLOCK) {
  const device uint8_t* row = k_codes + (base + i) * KROW;
  float dot = 0.0f;
  for (int j = 0; j < D; ++j) dot += qs[j] * kcb[kv_code(row, j, KBITS)];
  const float s = dot * k_norms[base + i] * unit;
  sc[i] = s;
  m = max(m, s);
}
m = simd_max(m);
if (lane == 0) red[warp] = m;
threadgroup_barrier(mem_flags::mem_threadgroup | mem_flags::mem_device);
m = red[0];
for (int w = 1; w < WARPS; ++w) m = max(m, red[w]);
threadgroup_barrier(mem_flags::mem_threadgroup);
float total = 0.0f;
for (int i = first + t; i < n; i += BLOCK) {
  float e = metal::exp(sc[i] - m);
  sc[i] = e;
  total += e;
}
total = simd_sum(total);
if (lane == 0) red[warp] = total;
threadgroup_barrier(mem_flags::mem_threadgroup | mem_flags::mem_device);
total = red[0];
for (int w = 1; w < WARPS; ++w) total += red[w];
for (int d = t; d < D; d += BLOCK) {
  float acc = 0.0f;
  for (int i = first; i < n; ++i) {
    acc += sc[i] * v_norms[base + i] * vcb[kv_code(v_codes + (base + i) * VROW, d, VBITS)];
  }
  out[size_t(bh) * D + d] = n > first ? acc * unit / total : 0.0f;
}
