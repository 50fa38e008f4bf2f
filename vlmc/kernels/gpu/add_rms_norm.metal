// add_rms_norm (Metal body for mx.fast.metal_kernel): h = a + b; y = rms_norm(h) * w.
// Same inputs, outputs, template (T, N, BLOCK, PER) and semantics as add_rms_norm.cu:
// one threadgroup per row, each thread keeping its PER elements of h in registers.
constexpr int WARPS = BLOCK / 32;
threadgroup float partial[WARPS];
const uint row = threadgroup_position_in_grid.x;
const int t = int(thread_position_in_threadgroup.x);
const uint lane = thread_index_in_simdgroup;
const uint warp = simdgroup_index_in_threadgroup;
const device T* ar = a + row * N;
const device T* br = b + row * N;
device T* hr = h + row * N;
device T* yr = y + row * N;
float hv[PER];
float ss = 0.0f;
for (int k = 0; k < PER; ++k) {
  const int i = t + k * BLOCK;
  if (i < N) {
    T v = static_cast<T>(static_cast<float>(ar[i]) + static_cast<float>(br[i]));
    hr[i] = v;
    hv[k] = static_cast<float>(v);
    ss += hv[k] * hv[k];
  }
}
ss = simd_sum(ss);
if (lane == 0) partial[warp] = ss;
threadgroup_barrier(mem_flags::mem_threadgroup);
if (warp == 0) {
  ss = lane < uint(WARPS) ? partial[lane] : 0.0f;
  ss = simd_sum(ss);
  if (lane == 0) partial[0] = ss;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
const float inv = metal::rsqrt(partial[0] / N + eps[0]);
for (int k = 0; k < PER; ++k) {
  const int i = t + k * BLOCK;
  if (i < N) yr[i] = static_cast<T>(hv[k] * inv * static_cast<float>(w[i]));
}
