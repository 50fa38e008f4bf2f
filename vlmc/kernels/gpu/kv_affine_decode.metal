// kv_affine_decode (Metal, for mx.fast.metal_kernel): same inputs, outputs, template and
// semantics as kv_affine_decode.cu (see there). Helpers: kv_common.metal.
// @body
constexpr int WARPS = BLOCK / 32;
constexpr int ROW = D * BITS / 8;
constexpr int GROUPS = D / GROUP;
threadgroup float qs[D];
threadgroup float red[WARPS];
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
device float* sc = scores + size_t(bh) * cap;
for (int i = t; i < D; i += BLOCK) qs[i] = q[size_t(bh) * D + i] * scale[0];
threadgroup_barrier(mem_flags::mem_threadgroup);
float m = -INFINITY;
for (int i = first + t; i < n; i += BLOCK) {
  const device uint8_t* row = k_codes + (base + i) * ROW;
  float acc = 0.0f;
  for (int g = 0; g < GROUPS; ++g) {
    float dot = 0.0f, qsum = 0.0f;
    for (int j = g * GROUP; j < (g + 1) * GROUP; ++j) {
      dot += qs[j] * float(kv_code(row, j, BITS));
      qsum += qs[j];
    }
    acc += float(k_scales[(base + i) * GROUPS + g]) * dot + float(k_biases[(base + i) * GROUPS + g]) * qsum;
  }
  sc[i] = acc;
  m = max(m, acc);
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
  const int g = d / GROUP;
  float acc = 0.0f;
  for (int i = first; i < n; ++i) {
    const size_t r = base + i;
    acc += sc[i] * (float(v_scales[r * GROUPS + g]) * float(kv_code(v_codes + r * ROW, d, BITS)) + float(v_biases[r * GROUPS + g]));
  }
  out[size_t(bh) * D + d] = n > first ? acc / total : 0.0f;
}
