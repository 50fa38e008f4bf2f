// kv_affine_decode (CUDA body for mx.fast.cuda_kernel): one decode step's attention over an
// affine-coded KV cache, reading the codes in place (no decoded copy of the cache).
// Inputs: q [B, H, D] float32; k_codes, v_codes [B, HKV, CAP, D*BITS/8] uint8 (packed as
// vlmc.kernels.kv_quant.pack); k_scales, k_biases, v_scales, v_biases [B, HKV, CAP, D/GROUP]
// bfloat16; starts [B] int32 (first valid key per sequence); held [1] int32 (keys cached);
// scale [1] float32. Outputs: out [B, H, D] float32; scores [B, H, CAP] float32 (scratch).
// Template: H, HKV, D, BITS (2, 3, 4 or 8), GROUP, BLOCK (threads, a multiple of 32).
// Reference: vlmc.kernels.kv_quant.kv_affine_decode. Helpers: kv_common.cu.
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
for (int i = t; i < D; i += BLOCK) qs[i] = q[(size_t)bh * D + i] * scale[0];
__syncthreads();
float m = __int_as_float(0xff800000);  // -infinity
for (int i = first + t; i < n; i += BLOCK) {
  const uint8_t* row = k_codes + (base + i) * ROW;
  float acc = 0.0f;
  for (int g = 0; g < GROUPS; ++g) {
    float dot = 0.0f, qsum = 0.0f;
    for (int j = g * GROUP; j < (g + 1) * GROUP; ++j) {
      dot += qs[j] * (float)kv_code(row, j, BITS);
      qsum += qs[j];
    }
    acc += static_cast<float>(k_scales[(base + i) * GROUPS + g]) * dot +
        static_cast<float>(k_biases[(base + i) * GROUPS + g]) * qsum;
  }
  sc[i] = acc;
  m = fmaxf(m, acc);
}
m = kv_block_reduce<WARPS>(m, true, red, t);
float total = 0.0f;
for (int i = first + t; i < n; i += BLOCK) {
  float e = expf(sc[i] - m);
  sc[i] = e;
  total += e;
}
total = kv_block_reduce<WARPS>(total, false, red, t);  // its barriers also publish every sc[i]
for (int d = t; d < D; d += BLOCK) {
  const int g = d / GROUP;
  float acc = 0.0f;
  for (int i = first; i < n; ++i) {
    const size_t r = base + i;
    acc += sc[i] * (static_cast<float>(v_scales[r * GROUPS + g]) * (float)kv_code(v_codes + r * ROW, d, BITS) +
                    static_cast<float>(v_biases[r * GROUPS + g]));
  }
  out[(size_t)bh * D + d] = n > first ? acc / total : 0.0f;
}
