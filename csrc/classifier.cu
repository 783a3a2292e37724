// Fused classifier, CUDA: softmax + cross-entropy + its gradient in one kernel (the `cuda` backend).
// Schemas and the CPU version: classifier.cpp. Python side: kernels/classifier.py.
//
// What is fused: one block per row. Sweep 1 reads the row with 128-bit loads and keeps a running
// max and sum of exp per thread (online softmax, fp32), merged across the block by shuffles; the
// loss is (max - logit[target]) + log(sum). When a gradient is wanted, sweep 2 goes over the row
// again and writes dlogits = (softmax - onehot(target)) * scale with 128-bit streaming stores, into a
// new buffer or in place. Where sweep 2 reads the row from:
//   - staged (the default when two rows fit in an SM's shared memory: bf16/fp16 rows up to ~56k
//     columns on an H100, not on an A100): sweep 1 also copies each 16-byte vector it loads into
//     shared memory, and sweep 2 reads it back from there, so DRAM sees the row exactly once.
//   - two sweeps (otherwise, or GPT2K_CE_STAGE=0): sweep 2 re-reads the row from global memory.
//     Measured on an H100 (bench/NOTES.md): 1.68 ms for the 16384 x 50304 bf16 forward, i.e. the
//     re-read came from DRAM, not L2 (264 rows of 100 KB in flight plus the stores overflow it).
//   Both read the same values and compute the same way: same bits.
// scale = 1/count (count = non-ignored rows, computed on the device by a one-block kernel first), so
// backward is only `scale_grad_` by grad_output, a kernel that returns at once when grad_output == 1
// (the usual loss.backward()): no host sync, no extra pass.
// Floor (forward + backward): read the logits once + write dlogits once = N * Vp * 2 bytes each for
// bf16: 1.65 GB + 1.65 GB at N = 16384, Vp = 50304, about 1.0 ms at 3.3 TB/s (H100 SXM).
//
// Determinism: each row's loss is reduced by one block in a fixed order, then one block sums the
// row losses (in double) in a fixed order: no float atomics, same bits every run.
// Invalid rows (target outside [0, vocab_size) and not ignore_index; every real logit -inf) get loss
// NaN and gradient 0, and their row index goes to a workspace (integer atomicMin: deterministic).
// With check=true the op then copies those 8 bytes to the host and raises a ValueError: one sync per
// call (skipped while a CUDA graph is being captured). fused_ce_ (linear_cross_entropy's chunks)
// passes check=false: no sync, the caller checks the summed loss for NaN once.
//
// Static check (CI, no GPU): kernels.classifier.ptxas_report() compiles this file with
// `nvcc -Xptxas -v` for sm_80 and sm_90 and reports registers / spills / shared memory per kernel.
// Test: pytest tests/test_classifier.py     Bench: python bench/run.py cross_entropy (GPU)
//
// Build time: the kernels come first and use no torch headers; the host glue (torch op wrappers)
// is compiled in the host pass only (#ifndef __CUDA_ARCH__), so nvcc's per-arch device passes
// don't parse the torch headers. The kernel templates are instantiated explicitly for that reason.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>
#include <cstring>

namespace gpt2k {
namespace {

constexpr int kThreads = 512;  // per row-block (fewer for narrow rows)
constexpr int kUnroll = 4;     // 16-byte vectors per thread in flight per step
constexpr int kNone = INT_MAX;
// Workspace (int32 x 4): [0] first row with an invalid target, [1] first row whose real logits are
// all -inf (kNone: none), [2] count of targets != ignore_index, [3] bits of 1/max(count, 1) (float).

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// E consecutive elements, moved as one 128-bit access when E * sizeof(T) == 16.
template <typename T, int E>
struct Pack {
  T v[E];
};

template <typename T, int E, bool kStream>
__device__ __forceinline__ Pack<T, E> load(const T* p) {
  Pack<T, E> out;
  if constexpr (sizeof(T) * E == 16) {
    // last use of the data: evict first (ld.global.cs); else keep it in L2 for a second sweep
    uint4 raw = kStream ? __ldcs(reinterpret_cast<const uint4*>(p)) : *reinterpret_cast<const uint4*>(p);
    memcpy(&out, &raw, 16);
  } else {
#pragma unroll
    for (int k = 0; k < E; ++k) out.v[k] = p[k];
  }
  return out;
}

template <typename T, int E>
__device__ __forceinline__ void store(T* p, const Pack<T, E>& x) {
  if constexpr (sizeof(T) * E == 16) {
    uint4 raw;
    memcpy(&raw, &x, 16);
    __stcs(reinterpret_cast<uint4*>(p), raw);  // streaming: dlogits is read next by a GEMM, not by us
  } else {
#pragma unroll
    for (int k = 0; k < E; ++k) p[k] = x.v[k];
  }
}

struct MaxSum {
  float m, s;  // running max, sum of exp(x - m)
};

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, a.s + b.s};  // 0, or NaN when a NaN logit was seen: keep it
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

__device__ __forceinline__ MaxSum warp_merge(MaxSum v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    v = merge(v, {__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)});
  }
  return v;
}

// Every thread gets the block's (max, sum). blockDim.x is a multiple of 32, at most 1024.
__device__ MaxSum block_merge(MaxSum v) {
  __shared__ MaxSum partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_merge(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < (blockDim.x >> 5) ? partial[lane] : MaxSum{-INFINITY, 0.f};
  return warp_merge(v);
}

template <typename A>
__device__ A block_sum(A v) {  // result in thread 0; fixed order (deterministic)
  __shared__ A partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (blockDim.x >> 5) ? partial[lane] : A(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  return v;
}

// One block: count the rows that take part, reset the invalid-row slots.
__global__ void ce_prep_kernel(const int64_t* __restrict__ targets, int64_t n, int64_t ignore_index,
                               int* __restrict__ ws) {
  int c = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) c += targets[i] != ignore_index;
  c = block_sum(c);
  if (threadIdx.x == 0) {
    ws[0] = kNone;
    ws[1] = kNone;
    ws[2] = c;
    ws[3] = __float_as_int(1.f / static_cast<float>(max(c, 1)));
  }
}

// 128-bit vectors <-> packs, for the staged row in shared memory.
template <typename T, int E>
__device__ __forceinline__ uint4 to_raw(const Pack<T, E>& p) {
  uint4 raw;
  memcpy(&raw, &p, 16);
  return raw;
}
template <typename T, int E>
__device__ __forceinline__ Pack<T, E> from_raw(uint4 raw) {
  Pack<T, E> p;
  memcpy(&p, &raw, 16);
  return p;
}

// One block per row. `grad` may be null (loss only) or equal to `logits` (in place): no __restrict__.
// kStage (128-bit vectors only): sweep 1 copies the row's real vectors into dynamic shared memory
// (nvec_real * 16 bytes) and sweep 2 reads them from there. Each thread reads back exactly the vectors
// it wrote (same i0, u, blockDim.x), so no barrier is needed between the two.
template <typename T, int E, bool kStage>
__global__ void __launch_bounds__(kThreads, 2)
    ce_row_kernel(const T* logits,          // (N, vp) row-major
                  T* grad,                  // (N, vp) dlogits, or null, or == logits
                  const int64_t* __restrict__ targets,  // (N,)
                  float* __restrict__ row_loss,         // (N,) out
                  int* __restrict__ ws,                 // workspace, see above
                  int64_t vp,                           // row width (buffer)
                  int64_t v,                            // real columns [0, v)
                  int64_t ignore_index,
                  bool scale_by_count) {                // grad *= 1/count (else 1)
  const int64_t row = blockIdx.x;
  const T* x = logits + row * vp;
  const int64_t t = targets[row];
  const bool ignored = t == ignore_index;
  const bool bad_target = !ignored && (t < 0 || t >= v);
  const bool live = !ignored && !bad_target;
  const int64_t nvec_real = (v + E - 1) / E;
  const int64_t step = int64_t{kUnroll} * blockDim.x;
  static_assert(!kStage || sizeof(T) * E == 16, "the staged row holds 128-bit vectors");
  extern __shared__ uint4 stage[];  // kStage: the row's real vectors

  // Sweep 1: online max / sum of exp over the real columns.
  float xt = 0.f;
  if (live && threadIdx.x == 0) xt = to_float(x[t]);  // before the barrier in block_merge: in place safe
  MaxSum acc{-INFINITY, 0.f};
  if (live) {
    for (int64_t i0 = threadIdx.x; i0 < nvec_real; i0 += step) {
      Pack<T, E> p[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = i0 + int64_t{u} * blockDim.x;
        if (i < nvec_real) {
          p[u] = load<T, E, kStage>(x + i * E);  // staged: the only read of these bytes
          if constexpr (kStage) stage[i] = to_raw(p[u]);
        }
      }
      float cm = -INFINITY;  // max of this step's elements
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = i0 + int64_t{u} * blockDim.x;
#pragma unroll
        for (int k = 0; k < E; ++k) {
          if (i < nvec_real && i * E + k < v) cm = fmaxf(cm, to_float(p[u].v[k]));
        }
      }
      if (cm > acc.m) {  // (fmaxf skips a NaN logit; its exp below makes the sum and the loss NaN)
        acc.s *= __expf(acc.m - cm);
        acc.m = cm;
      }
      const float ms = acc.m == -INFINITY ? 0.f : acc.m;  // all -inf or NaN so far: -inf adds 0, NaN stays
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = i0 + int64_t{u} * blockDim.x;
#pragma unroll
        for (int k = 0; k < E; ++k) {
          if (i < nvec_real && i * E + k < v) acc.s += __expf(to_float(p[u].v[k]) - ms);
        }
      }
    }
  }
  acc = block_merge(acc);

  const bool all_inf = live && acc.m == -INFINITY;
  if (threadIdx.x == 0) {
    if (bad_target) atomicMin(ws + 0, static_cast<int>(row));
    if (all_inf) atomicMin(ws + 1, static_cast<int>(row));
    row_loss[row] = ignored ? 0.f : (bad_target || all_inf) ? NAN : (acc.m - xt) + logf(acc.s);
  }
  if (grad == nullptr) return;

  // Sweep 2: dlogits over the whole row (padded columns, ignored and invalid rows: 0).
  T* g = grad + row * vp;
  const bool zero = !live || all_inf;
  const float scale = scale_by_count ? __int_as_float(ws[3]) : 1.f;
  const float inv_s = 1.f / acc.s;
  const int64_t nvec = vp / E;
  for (int64_t i0 = threadIdx.x; i0 < nvec; i0 += step) {
    Pack<T, E> p[kUnroll];
    if (!zero) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = i0 + int64_t{u} * blockDim.x;
        if (i < nvec_real) {
          if constexpr (kStage) {
            p[u] = from_raw<T, E>(stage[i]);
          } else {
            p[u] = load<T, E, true>(x + i * E);
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = i0 + int64_t{u} * blockDim.x;
      if (i >= nvec) continue;
      Pack<T, E> out;
#pragma unroll
      for (int k = 0; k < E; ++k) {
        const int64_t col = i * E + k;
        float d = 0.f;
        if (!zero && col < v) {
          d = __expf(to_float(p[u].v[k]) - acc.m) * inv_s;
          if (col == t) d -= 1.f;
          d *= scale;
        }
        out.v[k] = from_float<T>(d);
      }
      store<T, E>(g + i * E, out);
    }
  }
}

// One block: the total of the row losses (double, fixed order); the mean when `mean`.
__global__ void ce_finish_kernel(const float* __restrict__ row_loss, int64_t n, const int* __restrict__ ws,
                                 bool mean, float* __restrict__ out) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += row_loss[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[0] = static_cast<float>(mean ? acc / max(ws[2], 1) : acc);
}

// x *= *s, unless *s == 1 (then every block returns at once).
template <typename T, int E>
__global__ void scale_kernel(T* x, int64_t nvec, const float* __restrict__ s) {
  const float k = *s;
  if (k == 1.f) return;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < nvec; i += int64_t{gridDim.x} * blockDim.x) {
    Pack<T, E> p = load<T, E, true>(x + i * E);
#pragma unroll
    for (int j = 0; j < E; ++j) p.v[j] = from_float<T>(to_float(p.v[j]) * k);
    store<T, E>(x + i * E, p);
  }
}

#define GPT2K_INSTANTIATE(T, E, STAGE)                                                                     \
  template __global__ void ce_row_kernel<T, E, STAGE>(const T*, T*, const int64_t*, float*, int*, int64_t,   \
                                                      int64_t, int64_t, bool);
GPT2K_INSTANTIATE(float, 4, true)
GPT2K_INSTANTIATE(float, 4, false)
GPT2K_INSTANTIATE(float, 1, false)
GPT2K_INSTANTIATE(__half, 8, true)
GPT2K_INSTANTIATE(__half, 8, false)
GPT2K_INSTANTIATE(__half, 1, false)
GPT2K_INSTANTIATE(__nv_bfloat16, 8, true)
GPT2K_INSTANTIATE(__nv_bfloat16, 8, false)
GPT2K_INSTANTIATE(__nv_bfloat16, 1, false)
#undef GPT2K_INSTANTIATE
template __global__ void scale_kernel<float, 4>(float*, int64_t, const float*);
template __global__ void scale_kernel<float, 1>(float*, int64_t, const float*);
template __global__ void scale_kernel<__half, 8>(__half*, int64_t, const float*);
template __global__ void scale_kernel<__half, 1>(__half*, int64_t, const float*);
template __global__ void scale_kernel<__nv_bfloat16, 8>(__nv_bfloat16*, int64_t, const float*);
template __global__ void scale_kernel<__nv_bfloat16, 1>(__nv_bfloat16*, int64_t, const float*);

}  // namespace
}  // namespace gpt2k

// ---- host side: torch op wrappers (host compilation pass only) --------------------------------------
#ifndef __CUDA_ARCH__
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <tuple>

namespace gpt2k {

// From classifier.cpp.
void check_inputs(const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_size, const char* op);
void raise_invalid(int64_t bad_target_row, int64_t bad_row, const at::Tensor& targets, int64_t vocab_size,
                   int64_t ignore_index, const char* op);

namespace {

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

constexpr int kMaxDevices = 64;

// The most dynamic shared memory a staged row of ce_row_kernel<T, E, true> may take on `device` (the
// current one) so that two blocks still fit on one SM (the kernel's __launch_bounds__ minimum): half the
// SM's shared memory less the 1 KB the hardware reserves per block, and at most the per-block opt-in
// limit; less the kernel's static shared memory. Computed once per device, which is also when the
// kernel is allowed that much dynamic shared memory (needed above 48 KB) and asked for the largest
// shared-memory carveout (a hint the driver otherwise sizes per launch).
template <typename T, int E>
int64_t stage_limit(int device) {
  static std::once_flag once[kMaxDevices];
  static int64_t limit[kMaxDevices];
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "cross_entropy: device index ", device, " out of range");
  std::call_once(once[device], [device] {
    int per_sm = 0, per_block = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    cudaFuncAttributes attr;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, ce_row_kernel<T, E, true>));
    constexpr int64_t kReserved = 1024;  // per block, by the hardware (sm_80 and later)
    const int64_t bytes = std::min<int64_t>(per_sm / 2 - kReserved, per_block) - int64_t(attr.sharedSizeBytes);
    if (bytes > 0) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(ce_row_kernel<T, E, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(bytes)));
      C10_CUDA_CHECK(cudaFuncSetAttribute(ce_row_kernel<T, E, true>, cudaFuncAttributePreferredSharedMemoryCarveout,
                                          cudaSharedmemCarveoutMaxShared));
    }
    limit[device] = std::max<int64_t>(0, bytes);
  });
  return limit[device];
}

// GPT2K_CE_STAGE=0 turns the staged row off (bench/ce_tune.py compares both; any other value, or none,
// leaves it on); read at each call.
bool stage_enabled() {
  const char* env = std::getenv("GPT2K_CE_STAGE");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

template <typename T>
void launch_rows(const at::Tensor& logits, T* grad, const at::Tensor& targets, const at::Tensor& row_loss,
                 const at::Tensor& ws, int64_t ignore_index, int64_t vocab_size, bool scale_by_count,
                 cudaStream_t stream) {
  constexpr int E = 16 / sizeof(T);
  const int64_t n = logits.size(0), vp = logits.size(1);
  if (n == 0) return;
  const T* x = static_cast<const T*>(logits.const_data_ptr());
  const bool vec = vp % E == 0 && aligned16(x) && (grad == nullptr || aligned16(grad));
  const int64_t nvec = vec ? vp / E : vp;
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, (nvec + 31) / 32 * 32));
  auto args = std::make_tuple(x, grad, targets.const_data_ptr<int64_t>(), row_loss.mutable_data_ptr<float>(),
                              ws.mutable_data_ptr<int>(), vp, vocab_size, ignore_index, scale_by_count);
  const int device = logits.get_device();
  const int64_t stage_bytes = (vocab_size + E - 1) / E * 16;  // the real columns' vectors
  if (vec && grad != nullptr && stage_enabled() && stage_bytes <= stage_limit<T, E>(device)) {
    std::apply([&](auto... a) { ce_row_kernel<T, E, true><<<n, threads, stage_bytes, stream>>>(a...); }, args);
  } else if (vec) {
    std::apply([&](auto... a) { ce_row_kernel<T, E, false><<<n, threads, 0, stream>>>(a...); }, args);
  } else {
    std::apply([&](auto... a) { ce_row_kernel<T, 1, false><<<n, threads, 0, stream>>>(a...); }, args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// prep, rows, finish; raises for invalid rows when `check`. Returns the loss (0-d fp32).
at::Tensor run_cuda(const at::Tensor& logits, void* grad, const at::Tensor& targets, int64_t ignore_index,
                    int64_t vocab_size, bool mean, bool check, const char* op) {
  const int64_t n = logits.size(0);
  TORCH_CHECK_VALUE(n < INT_MAX, op, ": at most ", INT_MAX - 1, " rows, got ", n);
  c10::cuda::CUDAGuard guard(logits.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto f32 = logits.options().dtype(at::kFloat);
  auto ws = at::empty({4}, logits.options().dtype(at::kInt));
  auto row_loss = at::empty({n}, f32);
  auto loss = at::empty({}, f32);
  ce_prep_kernel<<<1, 1024, 0, stream>>>(targets.const_data_ptr<int64_t>(), n, ignore_index,
                                         ws.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  switch (logits.scalar_type()) {
    case at::kFloat:
      launch_rows<float>(logits, static_cast<float*>(grad), targets, row_loss, ws, ignore_index, vocab_size, mean,
                         stream);
      break;
    case at::kHalf:
      launch_rows<__half>(logits, static_cast<__half*>(grad), targets, row_loss, ws, ignore_index, vocab_size, mean,
                          stream);
      break;
    case at::kBFloat16:
      launch_rows<__nv_bfloat16>(logits, static_cast<__nv_bfloat16*>(grad), targets, row_loss, ws, ignore_index,
                                 vocab_size, mean, stream);
      break;
    default:
      TORCH_CHECK_VALUE(false, op, ": unsupported dtype ", logits.scalar_type());
  }
  ce_finish_kernel<<<1, 1024, 0, stream>>>(row_loss.const_data_ptr<float>(), n, ws.const_data_ptr<int>(), mean,
                                           loss.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (check) {
    cudaStreamCaptureStatus capturing;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capturing));
    if (capturing == cudaStreamCaptureStatusNone) {
      int bad[2];  // PyTorch's copy + sync (as .item() does): torch.cuda.set_sync_debug_mode sees it
      c10::cuda::memcpy_and_sync(bad, ws.const_data_ptr<int>(), sizeof(bad), cudaMemcpyDeviceToHost, stream);
      raise_invalid(bad[0] == kNone ? -1 : bad[0], bad[1] == kNone ? -1 : bad[1], targets, vocab_size,
                    ignore_index, op);
    }
  }
  return loss;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                                          int64_t ignore_index, int64_t vocab_size,
                                                          bool compute_grad, bool check) {
  check_inputs(logits, targets, vocab_size, "cross_entropy");
  at::Tensor dlogits = compute_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  auto loss = run_cuda(logits, compute_grad ? dlogits.data_ptr() : nullptr, targets, ignore_index, vocab_size,
                       /*mean=*/true, check, "cross_entropy");
  return {loss, dlogits};
}

at::Tensor cross_entropy_grad_inplace_cuda(at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                                           int64_t vocab_size, bool check) {
  check_inputs(logits, targets, vocab_size, "fused_ce_");
  return run_cuda(logits, logits.data_ptr(), targets, ignore_index, vocab_size, /*mean=*/false, check, "fused_ce_");
}

template <typename T>
void launch_scale(at::Tensor& x, const float* s, cudaStream_t stream) {
  constexpr int E = 16 / sizeof(T);
  T* p = static_cast<T*>(x.data_ptr());
  const int64_t n = x.numel();
  const bool vec = n % E == 0 && aligned16(p);
  const int64_t nvec = vec ? n / E : n;
  const int blocks = static_cast<int>(std::min<int64_t>((nvec + 255) / 256, 8192));
  if (vec) {
    scale_kernel<T, E><<<blocks, 256, 0, stream>>>(p, nvec, s);
  } else {
    scale_kernel<T, 1><<<blocks, 256, 0, stream>>>(p, nvec, s);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void scale_grad_cuda(at::Tensor& x, const at::Tensor& s) {
  TORCH_CHECK_VALUE(s.numel() == 1 && s.device() == x.device(), "scale_grad_: scale must be one element on ",
                    x.device());
  TORCH_CHECK_VALUE(x.is_contiguous(), "scale_grad_: x must be contiguous");
  if (x.numel() == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor k = s.scalar_type() == at::kFloat ? s : s.to(at::kFloat);
  const float* kp = k.const_data_ptr<float>();
  switch (x.scalar_type()) {
    case at::kFloat: launch_scale<float>(x, kp, stream); break;
    case at::kHalf: launch_scale<__half>(x, kp, stream); break;
    case at::kBFloat16: launch_scale<__nv_bfloat16>(x, kp, stream); break;
    default: TORCH_CHECK_VALUE(false, "scale_grad_: unsupported dtype ", x.scalar_type());
  }
}

}  // namespace
}  // namespace gpt2k

TORCH_LIBRARY_IMPL(gpt2k_cuda, CUDA, m) {
  m.impl("cross_entropy_fwd", &gpt2k::cross_entropy_fwd_cuda);
  m.impl("cross_entropy_grad_", &gpt2k::cross_entropy_grad_inplace_cuda);
  m.impl("scale_grad_", &gpt2k::scale_grad_cuda);
}
#endif  // __CUDA_ARCH__
