// Fused classifier: softmax + cross-entropy + its gradient in one pass over the logits.
// This file: the op schemas (TORCH_LIBRARY) and the CPU implementation. The CUDA kernels are in
// classifier.cu; the Python side (build on first use, register_fake, register_autograd) is
// kernels/classifier.py.
//
// What is fused: per row, one sweep computes the running max and sum of exp (online softmax, fp32
// max, the sum in fp32 per chunk and double across chunks on the CPU) and picks logit[target];
// loss = logsumexp - logit[target]. When a gradient is wanted, a second sweep over the same row
// (still in cache) writes dlogits = (softmax - onehot(target)) * scale, into a new buffer or in place
// over the logits, so backward is only a scale by grad_output (skipped when it is 1).
// Floor (forward + backward): read the logits once, write dlogits once: N * Vp * 2 bytes each for
// bf16 (1.65 GB each at N = 16384, Vp = 50304).
//
// Rows: target == ignore_index -> loss 0, gradient 0, not counted in the mean; vocab padding: only
// columns [0, vocab_size) are real, columns [vocab_size, Vp) get probability 0 and gradient 0.
// Invalid rows (target outside [0, vocab_size), or every real logit -inf) get loss NaN and gradient
// 0; with check=true the op raises a ValueError naming the first such row (the CUDA version then
// reads 16 bytes back from the GPU: one sync per call).
//
// Test:  pytest tests/test_classifier.py        Bench: python bench/run.py cross_entropy (GPU)
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>

namespace gpt2k {

// Shared with classifier.cu (declared there).
void check_inputs(const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_size, const char* op) {
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be 2-D (N, V), got ", logits.sizes());
  auto dt = logits.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op, ": logits dtype ", dt,
                    " is not supported (float32, bfloat16, float16)");
  TORCH_CHECK_VALUE(logits.is_contiguous(), op, ": logits must be contiguous");
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == logits.size(0), op, ": targets must have shape (",
                    logits.size(0), ",), got ", targets.sizes());
  TORCH_CHECK_VALUE(targets.scalar_type() == at::kLong, op, ": targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK_VALUE(targets.is_contiguous(), op, ": targets must be contiguous");
  TORCH_CHECK_VALUE(targets.device() == logits.device(), op, ": targets on ", targets.device(), " but logits on ",
                    logits.device());
  TORCH_CHECK_VALUE(vocab_size >= 1 && vocab_size <= logits.size(1), op, ": vocab_size ", vocab_size,
                    " must be in [1, ", logits.size(1), "] (the logits' width)");
}

// Raise a ValueError for the first invalid row (a row index of -1 means none).
void raise_invalid(int64_t bad_target_row, int64_t bad_row, const at::Tensor& targets, int64_t vocab_size,
                   int64_t ignore_index, const char* op) {
  if (bad_target_row >= 0) {
    int64_t t = targets.select(0, bad_target_row).item<int64_t>();
    TORCH_CHECK_VALUE(false, op, ": row ", bad_target_row, " has target ", t, ", outside [0, ", vocab_size,
                      ") and not ignore_index (", ignore_index, ")");
  }
  TORCH_CHECK_VALUE(bad_row < 0, op, ": row ", bad_row,
                    " has every real logit -inf or NaN: its softmax and loss are undefined");
}

namespace {

constexpr int64_t kNone = std::numeric_limits<int64_t>::max();  // "no invalid row seen"

void atomic_min(std::atomic<int64_t>& a, int64_t v) {
  int64_t cur = a.load();
  while (v < cur && !a.compare_exchange_weak(cur, v)) {
  }
}

// One row at a time, rows in parallel. grad may be null (no gradient) or equal to logits (in place).
template <typename T>
void ce_rows_cpu(const T* logits, T* grad, const int64_t* targets, float* row_loss, int64_t n, int64_t vp,
                 int64_t v, int64_t ignore_index, float scale, std::atomic<int64_t>& bad_target,
                 std::atomic<int64_t>& bad_row) {
  constexpr int64_t kChunk = 64;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / vp);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    float buf[kChunk];
    for (int64_t r = begin; r < end; ++r) {
      const T* x = logits + r * vp;
      T* g = grad ? grad + r * vp : nullptr;
      const int64_t t = targets[r];
      const bool ignored = t == ignore_index;
      const bool bad_t = !ignored && (t < 0 || t >= v);
      float m = -INFINITY;
      double s = 0.0;
      if (!ignored && !bad_t) {
        // Online softmax: per chunk, its max, one rescale of the running sum, then the chunk's exps.
        for (int64_t c0 = 0; c0 < v; c0 += kChunk) {
          const int64_t len = std::min(kChunk, v - c0);
          float cm = -INFINITY;
          for (int64_t k = 0; k < len; ++k) {
            buf[k] = static_cast<float>(x[c0 + k]);
            cm = std::max(cm, buf[k]);
          }
          if (cm > m) {  // (max skips a NaN logit; its exp below makes s and the loss NaN, as in torch)
            if (m != -INFINITY) s *= std::exp(static_cast<double>(m) - cm);
            m = cm;
          }
          // Everything so far -inf or NaN: subtract 0, so a -inf adds 0 and a NaN still reaches s.
          const float ms = m == -INFINITY ? 0.f : m;
          float cs = 0.f;
          for (int64_t k = 0; k < len; ++k) cs += std::exp(buf[k] - ms);
          s += cs;
        }
      }
      const bool all_inf = !ignored && !bad_t && m == -INFINITY;
      if (bad_t) atomic_min(bad_target, r);
      if (all_inf) atomic_min(bad_row, r);
      if (ignored) {
        row_loss[r] = 0.f;
      } else if (bad_t || all_inf) {
        row_loss[r] = NAN;
      } else {
        row_loss[r] = static_cast<float>((static_cast<double>(m) - static_cast<float>(x[t])) + std::log(s));
      }
      if (!g) continue;
      if (ignored || bad_t || all_inf) {
        std::fill(g, g + vp, static_cast<T>(0.f));
        continue;
      }
      const float inv_s = static_cast<float>(1.0 / s);
      for (int64_t k = 0; k < v; ++k) {
        float p = std::exp(static_cast<float>(x[k]) - m) * inv_s;
        g[k] = static_cast<T>((k == t ? p - 1.f : p) * scale);
      }
      std::fill(g + v, g + vp, static_cast<T>(0.f));
    }
  });
}

// Runs the rows, raises for invalid rows when `check`; returns the per-row losses.
at::Tensor run_cpu(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index, int64_t vocab_size,
                   const at::Tensor* grad, float scale, bool check, const char* op) {
  const int64_t n = logits.size(0), vp = logits.size(1);
  auto row_loss = at::empty({n}, logits.options().dtype(at::kFloat));
  std::atomic<int64_t> bad_target{kNone}, bad_row{kNone};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "ce_rows_cpu", [&] {
    ce_rows_cpu<scalar_t>(logits.const_data_ptr<scalar_t>(), grad ? grad->mutable_data_ptr<scalar_t>() : nullptr,
                          targets.const_data_ptr<int64_t>(), row_loss.mutable_data_ptr<float>(), n, vp, vocab_size,
                          ignore_index, scale, bad_target, bad_row);
  });
  auto row_or_none = [](int64_t r) { return r == kNone ? int64_t{-1} : r; };
  if (check) {
    raise_invalid(row_or_none(bad_target.load()), row_or_none(bad_row.load()), targets, vocab_size, ignore_index, op);
  }
  return row_loss;
}

// Deterministic fp32 total of the per-row losses (accumulated in double, in row order).
double sum_rows(const at::Tensor& row_loss) {
  const float* p = row_loss.const_data_ptr<float>();
  double acc = 0.0;
  for (int64_t i = 0; i < row_loss.numel(); ++i) acc += p[i];
  return acc;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                                         int64_t ignore_index, int64_t vocab_size, bool compute_grad,
                                                         bool check) {
  check_inputs(logits, targets, vocab_size, "cross_entropy");
  const int64_t* t = targets.const_data_ptr<int64_t>();
  int64_t count = 0;
  for (int64_t i = 0; i < targets.numel(); ++i) count += t[i] != ignore_index;
  count = std::max<int64_t>(count, 1);
  at::Tensor dlogits = compute_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  auto row_loss = run_cpu(logits, targets, ignore_index, vocab_size, compute_grad ? &dlogits : nullptr,
                          static_cast<float>(1.0 / count), check, "cross_entropy");
  auto loss = at::empty({}, logits.options().dtype(at::kFloat));
  *loss.mutable_data_ptr<float>() = static_cast<float>(sum_rows(row_loss) / count);
  return {loss, dlogits};
}

at::Tensor cross_entropy_grad_inplace_cpu(at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                                          int64_t vocab_size, bool check) {
  check_inputs(logits, targets, vocab_size, "fused_ce_");
  auto row_loss = run_cpu(logits, targets, ignore_index, vocab_size, &logits, 1.f, check, "fused_ce_");
  auto loss = at::empty({}, logits.options().dtype(at::kFloat));
  *loss.mutable_data_ptr<float>() = static_cast<float>(sum_rows(row_loss));
  return loss;
}

void scale_grad_cpu(at::Tensor& x, const at::Tensor& s) {
  TORCH_CHECK_VALUE(s.numel() == 1 && s.device() == x.device(), "scale_grad_: scale must be one element on ",
                    x.device());
  TORCH_CHECK_VALUE(x.is_contiguous(), "scale_grad_: x must be contiguous");
  const float k = s.to(at::kFloat).item<float>();
  if (k == 1.f) return;  // the usual loss.backward(): nothing to do
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "scale_grad_cpu", [&] {
    scalar_t* p = x.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), 1 << 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) p[i] = static_cast<scalar_t>(static_cast<float>(p[i]) * k);
    });
  });
}

}  // namespace
}  // namespace gpt2k

// Namespace gpt2k_cuda: the `cuda` backend's ops ("gpt2k" holds the Python custom ops).
TORCH_LIBRARY(gpt2k_cuda, m) {
  // Mean loss (fp32, 0-d) over rows whose target != ignore_index (0 when there are none), and, when
  // compute_grad, dlogits = (softmax - onehot) / count in logits' dtype (else an empty tensor).
  m.def("cross_entropy_fwd(Tensor logits, Tensor targets, int ignore_index, int vocab_size, bool compute_grad, "
        "bool check) -> (Tensor loss, Tensor dlogits)");
  // Sum of the per-row losses (fp32, 0-d); overwrites logits with softmax - onehot (unscaled).
  m.def("cross_entropy_grad_(Tensor(a!) logits, Tensor targets, int ignore_index, int vocab_size, bool check) "
        "-> Tensor");
  // x *= s (s: one element), in place; a no-op when s == 1 (checked on the device on CUDA: no sync).
  m.def("scale_grad_(Tensor(a!) x, Tensor s) -> ()");
}

TORCH_LIBRARY_IMPL(gpt2k_cuda, CPU, m) {
  m.impl("cross_entropy_fwd", &gpt2k::cross_entropy_fwd_cpu);
  m.impl("cross_entropy_grad_", &gpt2k::cross_entropy_grad_inplace_cpu);
  m.impl("scale_grad_", &gpt2k::scale_grad_cpu);
}
