// add_rms_norm (CUDA body for mx.fast.cuda_kernel): h = a + b; y = rms_norm(h) * w.
// One block of BLOCK threads per row of N elements; thread t owns elements t + k * BLOCK
// (k < PER) and keeps them in registers, so a, b and w are read once and h, y written once.
// Inputs a, b [rows, N] (T), w [N] (T), eps [1] (float32); outputs h, y [rows, N] (T).
// Template: T (element type), N (row length), BLOCK (threads, a multiple of 32),
// PER (= ceil(N / BLOCK)). Same semantics as vlmc.kernels.reference.add_rms_norm: h is
// rounded to T before the norm reads it, as MLX's separate add would store it.
constexpr int WARPS = BLOCK / 32;
__shared__ float partial[WARPS];
const size_t row = blockIdx.x;
const int t = threadIdx.x;
const T* ar = a + row * N;
const T* br = b + row * N;
T* hr = h + row * N;
T* yr = y + row * N;
float hv[PER];
float ss = 0.0f;
#pragma unroll
for (int k = 0; k < PER; ++k) {
  const int i = t + k * BLOCK;
  if (i < N) {
    T v = static_cast<T>(static_cast<float>(ar[i]) + static_cast<float>(br[i]));
    hr[i] = v;
    hv[k] = static_cast<float>(v);
    ss += hv[k] * hv[k];
  }
}
for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
if ((t & 31) == 0) partial[t >> 5] = ss;
__syncthreads();
if (t < 32) {
  ss = t < WARPS ? partial[t] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (t == 0) partial[0] = ss;
}
__syncthreads();
const float inv = rsqrtf(partial[0] / N + eps[0]);
#pragma unroll
for (int k = 0; k < PER; ++k) {
  const int i = t + k * BLOCK;
  if (i < N) yr[i] = static_cast<T>(hv[k] * inv * static_cast<float>(w[i]));
}
