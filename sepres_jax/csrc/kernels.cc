// 3x3 depthwise convolution (stride 1, SAME) and its kernel gradient, the kernel gradient of a
// small dense convolution (the stem's), float32 NHWC, and the per-image Lovasz-softmax loss with
// its gradient, as XLA FFI handlers for the CPU backend. sepres_jax/native.py builds this file
// with the system C++ compiler at first use and registers the handlers; ops.py and metrics.py
// call them through jax.ffi.ffi_call.
//
// The work is split into tasks (whole rows of one image; the Lovasz kernel's, whole images),
// spread over XLA's intra-op thread pool; the calling thread takes tasks too, so the call
// finishes even when the pool runs nothing.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Runs fn(task) for task in [0, num_tasks) on the pool and the calling thread; returns when all
// have finished.
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t num_tasks, Fn fn) {
  struct State {
    std::atomic<int64_t> next{0};
    int64_t done = 0;  // Guarded by mu.
    int64_t total = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  state->total = num_tasks;
  // Runs tasks until none is left unclaimed. The caller's stack outlives every task that runs
  // fn: it waits for all claimed tasks to finish before it returns.
  auto work = [state, &fn]() {
    int64_t finished = 0;
    for (int64_t t; (t = state->next.fetch_add(1)) < state->total;) {
      fn(t);
      ++finished;
    }
    if (finished > 0) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->done += finished;
      if (state->done == state->total) state->cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), num_tasks - 1);
  for (int64_t i = 0; i < helpers; ++i) {
    // A helper that starts after all tasks are claimed touches only `state`, which it shares.
    pool.Schedule([state, work]() { work(); });
  }
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == state->total; });
}

// Rows of one image per task: enough work per task to amortise scheduling, at least
// 4 tasks per thread for balance.
int64_t RowsPerTask(int64_t b, int64_t h, int64_t w, int64_t c, int64_t threads) {
  const int64_t target_tasks = std::max<int64_t>(1, 4 * threads);
  int64_t rows = std::max<int64_t>(1, (b * h + target_tasks - 1) / target_tasks);
  rows = std::min<int64_t>(rows, h);
  // At least ~64 KB of output per task.
  while (rows < h && rows * w * c < 16384) rows *= 2;
  return std::min<int64_t>(rows, h);
}

// out[e] = sum over tasks of partial[t * n + e], added in float64 in task order: the result does
// not depend on which thread ran which task.
void SumPartials(const std::vector<float>& partial, int64_t tasks, int64_t n, float* out) {
  std::vector<double> sum(n, 0.0);
  for (int64_t t = 0; t < tasks; ++t) {
    const float* p = partial.data() + t * n;
    for (int64_t e = 0; e < n; ++e) sum[e] += p[e];
  }
  for (int64_t e = 0; e < n; ++e) out[e] = static_cast<float>(sum[e]);
}

// y[b, r, :, :] for r in [r0, r1): sum over the 9 taps, zero padding at the borders.
void DepthwiseRows(const float* x, const float* k, float* y, int64_t h, int64_t w, int64_t c,
                   int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float* yr = y + r * w * c;
    std::memset(yr, 0, sizeof(float) * w * c);
    for (int64_t i = 0; i < 3; ++i) {
      const int64_t src = r + i - 1;
      if (src < 0 || src >= h) continue;
      const float* xr = x + src * w * c;
      for (int64_t j = 0; j < 3; ++j) {
        const float* kij = k + (i * 3 + j) * c;
        const int64_t w0 = std::max<int64_t>(0, 1 - j), w1 = std::min<int64_t>(w, w + 1 - j);
        for (int64_t col = w0; col < w1; ++col) {
          const float* xp = xr + (col + j - 1) * c;
          float* yp = yr + col * c;
#pragma omp simd
          for (int64_t ch = 0; ch < c; ++ch) yp[ch] += xp[ch] * kij[ch];
        }
      }
    }
  }
}

ffi::Error Depthwise3x3(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                        ffi::ResultBuffer<ffi::F32> y) {
  const auto dims = x.dimensions();
  if (dims.size() != 4 || k.element_count() != 9 * dims[3]) {
    return ffi::Error::InvalidArgument("sepres depthwise: x must be [B,H,W,C], k [3,3,1,C]");
  }
  const int64_t b = dims[0], h = dims[1], w = dims[2], c = dims[3];
  const int64_t rows = RowsPerTask(b, h, w, c, pool.num_threads() + 1);
  const int64_t per_image = (h + rows - 1) / rows;
  const float* xd = x.typed_data();
  const float* kd = k.typed_data();
  float* yd = y->typed_data();
  ParallelFor(pool, b * per_image, [&](int64_t t) {
    const int64_t n = t / per_image, r0 = (t % per_image) * rows;
    DepthwiseRows(xd + n * h * w * c, kd, yd + n * h * w * c, h, w, c, r0,
                  std::min<int64_t>(h, r0 + rows));
  });
  return ffi::Error::Success();
}

// acc[9, c] += sum over rows [r0, r1) of one image of pad(x)[r+i-1, col+j-1] * g[r, col].
void KernelGradRows(const float* x, const float* g, float* acc, int64_t h, int64_t w, int64_t c,
                    int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* gr = g + r * w * c;
    for (int64_t i = 0; i < 3; ++i) {
      const int64_t src = r + i - 1;
      if (src < 0 || src >= h) continue;
      const float* xr = x + src * w * c;
      for (int64_t j = 0; j < 3; ++j) {
        float* a = acc + (i * 3 + j) * c;
        const int64_t w0 = std::max<int64_t>(0, 1 - j), w1 = std::min<int64_t>(w, w + 1 - j);
        for (int64_t col = w0; col < w1; ++col) {
          const float* xp = xr + (col + j - 1) * c;
          const float* gp = gr + col * c;
#pragma omp simd
          for (int64_t ch = 0; ch < c; ++ch) a[ch] += xp[ch] * gp[ch];
        }
      }
    }
  }
}

ffi::Error Depthwise3x3KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                  ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dk) {
  const auto dims = x.dimensions();
  if (dims.size() != 4 || g.element_count() != x.element_count() ||
      dk->element_count() != 9 * dims[3]) {
    return ffi::Error::InvalidArgument("sepres depthwise kernel grad: x, g [B,H,W,C], dk [3,3,1,C]");
  }
  const int64_t b = dims[0], h = dims[1], w = dims[2], c = dims[3];
  const int64_t rows = RowsPerTask(b, h, w, c, pool.num_threads() + 1);
  const int64_t per_image = (h + rows - 1) / rows;
  const int64_t tasks = b * per_image;
  std::vector<float> partial(tasks * 9 * c, 0.0f);
  const float* xd = x.typed_data();
  const float* gd = g.typed_data();
  ParallelFor(pool, tasks, [&](int64_t t) {
    const int64_t n = t / per_image, r0 = (t % per_image) * rows;
    KernelGradRows(xd + n * h * w * c, gd + n * h * w * c, partial.data() + t * 9 * c, h, w, c,
                   r0, std::min<int64_t>(h, r0 + rows));
  });
  SumPartials(partial, tasks, 9 * c, dk->typed_data());
  return ffi::Error::Success();
}

// dk[t, o] += sum over rows [r0, r1) of one image of pad(x)[r + i - ph, col + j - pw, ci] * g[r,
// col, o], t = (i * kw + j) * cin + ci: one pass over g, each x value broadcast over the outputs.
void DenseKernelGradRows(const float* x, const float* g, float* acc, int64_t h, int64_t w,
                         int64_t cin, int64_t cout, int64_t kh, int64_t kw, int64_t r0,
                         int64_t r1, bool border_only = false) {
  const int64_t ph = (kh - 1) / 2, pw = (kw - 1) / 2;
  for (int64_t r = r0; r < r1; ++r) {
    const bool inner_row = r >= ph && r < h - (kh - 1 - ph);
    for (int64_t col = 0; col < w; ++col) {
      if (border_only && inner_row && col >= pw && col < w - (kw - 1 - pw)) {
        col = w - (kw - 1 - pw) - 1;  // Skip to the right border.
        continue;
      }
      const float* gp = g + (r * w + col) * cout;
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t src = r + i - ph;
        if (src < 0 || src >= h) continue;
        for (int64_t j = 0; j < kw; ++j) {
          const int64_t sc = col + j - pw;
          if (sc < 0 || sc >= w) continue;
          const float* xp = x + (src * w + sc) * cin;
          for (int64_t ci = 0; ci < cin; ++ci) {
            const float v = xp[ci];
            float* a = acc + ((i * kw + j) * cin + ci) * cout;
#pragma omp simd
            for (int64_t o = 0; o < cout; ++o) a[o] += v * gp[o];
          }
        }
      }
    }
  }
}

// The same sums for a KHxKW kernel over CIN input channels (the stem's 3x3x3), over the pixels
// whose every tap lies inside the image, 16 output channels at a time: the KH*KW*CIN partial sums
// of a block stay in vector registers across the pixels (27 of them for the stem), where the
// general loop above loads and stores them for every pixel (4-9x slower). Border pixels are left
// to DenseKernelGradRows(..., border_only=true).
typedef float Vec16 __attribute__((vector_size(64)));

template <int KH, int KW, int CIN>
void DenseKernelGradInterior(const float* x, const float* g, float* acc, int64_t h, int64_t w,
                             int64_t cout, int64_t r0, int64_t r1) {
  constexpr int kTaps = KH * KW * CIN, ph = (KH - 1) / 2, pw = (KW - 1) / 2;
  const int64_t rlo = std::max<int64_t>(r0, ph), rhi = std::min<int64_t>(r1, h - (KH - 1 - ph));
  const int64_t clo = pw, chi = w - (KW - 1 - pw);
  if (rlo >= rhi || clo >= chi) return;
  for (int64_t o0 = 0; o0 < cout; o0 += 16) {
    const int64_t nv = std::min<int64_t>(16, cout - o0);
    Vec16 sums[kTaps];
    for (int t = 0; t < kTaps; ++t) sums[t] = Vec16{};
    for (int64_t r = rlo; r < rhi; ++r) {
      for (int64_t col = clo; col < chi; ++col) {
        const float* gp = g + (r * w + col) * cout + o0;
        Vec16 gv = Vec16{};
        if (nv == 16) {
          std::memcpy(&gv, gp, sizeof(gv));
        } else {
          for (int64_t o = 0; o < nv; ++o) gv[o] = gp[o];
        }
        const float* xb = x + ((r - ph) * w + (col - pw)) * CIN;
#pragma GCC unroll 64
        for (int i = 0; i < KH; ++i) {
#pragma GCC unroll 64
          for (int j = 0; j < KW; ++j) {
#pragma GCC unroll 64
            for (int ci = 0; ci < CIN; ++ci) {
              sums[(i * KW + j) * CIN + ci] += xb[(i * w + j) * CIN + ci] * gv;
            }
          }
        }
      }
    }
    for (int t = 0; t < kTaps; ++t) {
      for (int64_t o = 0; o < nv; ++o) acc[t * cout + o0 + o] += sums[t][o];
    }
  }
}

ffi::Error DenseKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                           ffi::ResultBuffer<ffi::F32> dk) {
  const auto xd = x.dimensions(), gd = g.dimensions(), kd = dk->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || kd.size() != 4 || xd[0] != gd[0] || xd[1] != gd[1] ||
      xd[2] != gd[2] || kd[2] != xd[3] || kd[3] != gd[3]) {
    return ffi::Error::InvalidArgument(
        "sepres dense kernel grad: x [B,H,W,Cin], g [B,H,W,Cout], dk [KH,KW,Cin,Cout]");
  }
  const int64_t b = xd[0], h = xd[1], w = xd[2], cin = xd[3], cout = gd[3];
  const int64_t kh = kd[0], kw = kd[1], taps = kh * kw * cin;
  const int64_t rows = RowsPerTask(b, h, w, cout, pool.num_threads() + 1);
  const int64_t per_image = (h + rows - 1) / rows;
  const int64_t tasks = b * per_image;
  std::vector<float> partial(tasks * taps * cout, 0.0f);
  const float* xp = x.typed_data();
  const float* gp = g.typed_data();
  ParallelFor(pool, tasks, [&](int64_t t) {
    const int64_t n = t / per_image, r0 = (t % per_image) * rows;
    const float* xn = xp + n * h * w * cin;
    const float* gn = gp + n * h * w * cout;
    float* acc = partial.data() + t * taps * cout;
    const int64_t r1 = std::min<int64_t>(h, r0 + rows);
    if (kh == 3 && kw == 3 && cin == 3) {
      DenseKernelGradInterior<3, 3, 3>(xn, gn, acc, h, w, cout, r0, r1);
      DenseKernelGradRows(xn, gn, acc, h, w, cin, cout, kh, kw, r0, r1, /*border_only=*/true);
    } else {
      DenseKernelGradRows(xn, gn, acc, h, w, cin, cout, kh, kw, r0, r1);
    }
  });
  SumPartials(partial, tasks, taps * cout, dk->typed_data());
  return ffi::Error::Success();
}

// The Lovasz-softmax loss of one image (metrics.lovasz_softmax's histogram form) and its gradient
// with respect to the logits. z: [pixels, k] logits, labels: [pixels] (counted where 0 <= label <
// k). Pass 1 writes the softmax into grad and fills each class's histograms of the errors
// |[label = c] - p_c| (bin 0 the largest: rank = bins - 1 - floor(error * bins)); the bins' Jaccard
// increments follow exactly as metrics._lovasz_weights forms them (integer counts, float32
// arithmetic in the same order); pass 2 sums error * weight per class and replaces each counted
// pixel's probabilities with d(loss)/d(logits): dp_c = -sign([label = c] - p_c) * weight /
// present classes for the classes present, then the softmax's backward pass.
void LovaszImage(const float* z, const int32_t* labels, int64_t pixels, int64_t k, int64_t bins,
                 float* grad, float* loss, float* counted) {
  std::vector<int32_t> count(k * bins, 0), hits(k * bins, 0);
  // Clipped before the cast, so that a NaN error (non-finite logits, which the loss then reports)
  // takes bin 0 instead of an undefined conversion.
  auto rank_of = [bins](float error) {
    const float scaled = error * static_cast<float>(bins);
    const int64_t b = scaled >= static_cast<float>(bins - 1) ? bins - 1
                      : scaled >= 1.0f                          ? static_cast<int64_t>(scaled)
                                                                : 0;
    return bins - 1 - b;
  };
  for (int64_t i = 0; i < pixels; ++i) {
    const float* zi = z + i * k;
    float* p = grad + i * k;
    const int32_t label = labels[i];
    if (label < 0 || label >= k) {
      std::fill(p, p + k, 0.0f);
      continue;
    }
    float top = zi[0];
    for (int64_t c = 1; c < k; ++c) top = std::max(top, zi[c]);
    float sum = 0.0f;
    for (int64_t c = 0; c < k; ++c) sum += (p[c] = std::exp(zi[c] - top));
    for (int64_t c = 0; c < k; ++c) p[c] /= sum;
    for (int64_t c = 0; c < k; ++c) {
      const bool fg = c == label;
      const int64_t at = c * bins + rank_of(std::fabs((fg ? 1.0f : 0.0f) - p[c]));
      ++count[at];
      hits[at] += fg;
    }
  }
  std::vector<float> steps(k * bins, 0.0f);
  std::vector<char> present(k, 0);
  int64_t num_present = 0;
  for (int64_t c = 0; c < k; ++c) {
    int64_t total = 0;
    for (int64_t r = 0; r < bins; ++r) total += hits[c * bins + r];
    if (total == 0) continue;
    present[c] = 1;
    ++num_present;
    int64_t cum_hits = 0, cum_misses = 0;
    float previous = 0.0f;
    for (int64_t r = 0; r < bins; ++r) {
      const int64_t at = c * bins + r;
      cum_hits += hits[at];
      cum_misses += count[at] - hits[at];
      const float intersection = static_cast<float>(total - cum_hits);
      const float union_ = static_cast<float>(total + cum_misses);
      const float jaccard = 1.0f - intersection / std::max(union_, 1.0f);
      steps[at] = (jaccard - previous) / std::max(static_cast<float>(count[at]), 1.0f);
      previous = jaccard;
    }
  }
  if (num_present == 0) {
    std::fill(grad, grad + pixels * k, 0.0f);
    *loss = 0.0f;
    *counted = 0.0f;
    return;
  }
  const float inv_present = 1.0f / static_cast<float>(num_present);
  std::vector<double> per_class(k, 0.0);
  std::vector<float> dp(k);
  for (int64_t i = 0; i < pixels; ++i) {
    const int32_t label = labels[i];
    if (label < 0 || label >= k) continue;
    float* p = grad + i * k;
    float dot = 0.0f;
    for (int64_t c = 0; c < k; ++c) {
      dp[c] = 0.0f;
      if (!present[c]) continue;
      const float diff = (c == label ? 1.0f : 0.0f) - p[c];
      const float error = std::fabs(diff);
      const float weight = steps[c * bins + rank_of(error)];
      per_class[c] += static_cast<double>(error * weight);
      dp[c] = (diff > 0.0f ? -weight : diff < 0.0f ? weight : 0.0f) * inv_present;
      dot += p[c] * dp[c];
    }
    for (int64_t c = 0; c < k; ++c) p[c] *= dp[c] - dot;
  }
  double total = 0.0;
  for (int64_t c = 0; c < k; ++c) total += present[c] ? static_cast<float>(per_class[c]) : 0.0;
  *loss = static_cast<float>(total / static_cast<double>(num_present));
  *counted = 1.0f;
}

ffi::Error LovaszSoftmax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::S32> labels,
                         int64_t bins, ffi::ResultBuffer<ffi::F32> loss,
                         ffi::ResultBuffer<ffi::F32> counted, ffi::ResultBuffer<ffi::F32> grad) {
  const auto zd = z.dimensions(), ld = labels.dimensions();
  if (zd.size() != 3 || ld.size() != 2 || ld[0] != zd[0] || ld[1] != zd[1] || bins < 1 ||
      grad->element_count() != z.element_count() || loss->element_count() != zd[0]) {
    return ffi::Error::InvalidArgument(
        "sepres lovasz: z [N,P,K], labels [N,P], bins >= 1, grad like z, loss and counted [N]");
  }
  const int64_t n = zd[0], pixels = zd[1], k = zd[2];
  const float* zp = z.typed_data();
  const int32_t* lp = labels.typed_data();
  float* gp = grad->typed_data();
  float* lo = loss->typed_data();
  float* co = counted->typed_data();
  ParallelFor(pool, n, [&](int64_t i) {
    LovaszImage(zp + i * pixels * k, lp + i * pixels, pixels, k, bins, gp + i * pixels * k,
                lo + i, co + i);
  });
  return ffi::Error::Success();
}

// The identity, its result aliasing its operand: a call XLA cannot fuse through, so the operand
// is written to memory once and its consumers read it instead of recomputing it.
ffi::Error Materialize(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  if (y->untyped_data() != x.untyped_data()) {
    std::memcpy(y->untyped_data(), x.untyped_data(), x.size_bytes());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SepresDepthwise3x3, Depthwise3x3,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SepresDepthwise3x3KernelGrad, Depthwise3x3KernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SepresDenseKernelGrad, DenseKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SepresLovaszSoftmax, LovaszSoftmax,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("bins")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SepresMaterialize, Materialize,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
