// kv_affine_decode (CUDA body for mx.fast.cuda_kernel): one decode step's attention over an
// affine-coded KV cache, reading the codes in place (no decoded copy of the cache).
// Inputs: q [B, H, D] float32; k_codes, v_codes [B, HKV, CAP, D*BITS/8] uint8 (packed as
// vlmc.kernels.kv_quant.pack); k_scales, k_biases, v_scales, v_biases [B, HKV, CAP, D/GROUP]
// bfloat16; starts [B] int32 (first valid key per sequence); held [1] int32 (keys cached);
// scale [1] float32. Outputs: out [B, H, D] float32; scores [B, H, CAP] float32 (scratch).
// Template: H, HKV, D, BITS (2, 3, 4 or 8), GROUP, BLOCK (threads, a multiple of 32).
// Reference: vlmc.kernels.kv_quant.kv_affine_decode.
constexpr int WARPS = BLOCK / 32;
constexpr int ROW = D * BITS / 8;
constexpr int GROUPS = D / GROUP;
__shared__ float qs[D];
__shared__ float red[WARPS];
const int bh = blockIdx.x;
const int b = bh / H;
const int hk = (bh % H) / (H / HKV);
const int t = threadIdx.x;
const int n = held[0];
const int cap = k_codes_shape[2];
const int first = starts[b];
const size_t base = ((size_t)b * HKV + hk) * cap;
float* sc = scores + (size_t)bh * cap;
auto code = [](const uint8_t* row, int j) -> float {
  if (BITS == 8) return (float)row[j];
  const uint8_t* g = row + (j >> 3) * BITS;
  uint32_t w = g[0] | ((uint32_t)g[1] << 8);
  if (BITS > 2) w |= (uint32_t)g[2] << 16;
  if (BITS > 3) w |= (uint32_t)g[3] << 24;
  return (float)((w >> ((j & 7) * BITS)) & ((1u << BITS) - 1));
};
auto block_reduce = [&](float v, bool is_max) -> float {
  for (int o = 16; o > 0; o >>= 1) {
    float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = is_max ? fmaxf(v, other) : v + other;
  }
  __syncthreads();
  if ((t & 31) == 0) red[t >> 5] = v;
  __syncthreads();
  v = red[0];
  for (int w = 1; w < WARPS; ++w) v = is_max ? fmaxf(v, red[w]) : v + red[w];
  return v;
};
for (int i = t; i < D; i += BLOCK) qs[i] = q[(size_t)bh * D + i] * scale[0];
__syncthreads();
float m = __int_as_float(0xff800000);  // -infinity
for (int i = first + t; i < n; i += BLOCK) {
  const uint8_t* row = k_codes + (base + i) * ROW;
  float acc = 0.0f;
  for (int g = 0; g < GROUPS; ++g) {
    float dot = 0.0f, qsum = 0.0f;
    for (int j = g * GROUP; j < (g + 1) * GROUP; ++j) {
      dot += qs[j] * code(row, j);
      qsum += qs[j];
    }
    acc += static_cast<float>(k_scales[(base + i) * GROUPS + g]) * dot +
        static_cast<float>(k_biases[(base + i) * GROUPS + g]) * qsum;
  }
  sc[i] = acc;
  m = fmaxf(m, acc);
}
m = block_reduce(m, true);
float total = 0.0f;
for (int i = first + t; i < n; i += BLOCK) {
  float e = expf(sc[i] - m);
  sc[i] = e;
  total += e;
}
total = block_reduce(total, false);  // its barriers also publish every sc[i]
for (int d = t; d < D; d += BLOCK) {
  const int g = d / GROUP;
  float acc = 0.0f;
  for (int i = first; i < n; ++i) {
    const size_t r = base + i;
    acc += sc[i] * (static_cast<float>(v_scales[r * GROUPS + g]) * code(v_codes + r * ROW, d) +
                    static_cast<float>(v_biases[r * GROUPS + g]));
  }
  out[(size_t)bh * D + d] = n > first ? acc / total : 0.0f;
}
