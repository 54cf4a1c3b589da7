// oneDNN's convolutions as XLA FFI targets for the CPU backend (see onednn_conv.py).
//
// XLA:CPU runs a 3x3 convolution of the CIFAR nets at about 55 GFLOP/s; oneDNN's JIT kernels run
// the same one, and both of its backward convolutions, at 200-270 GFLOP/s on the same two cores,
// provided the weights are in oneDNN's own blocked layout. So activations stay NHWC (JAX's
// layout, no copies) for its direct kernels, and only the weights, which are tiny, are reordered
// from/to HWIO per call; its Winograd kernels (WantsWinograd) are faster still where they apply,
// even with their activations reordered from and to NHWC around each call.
//
// Three convolution targets, f32 only, NHWC activations and HWIO weights:
//   resnet_jax_conv_forward          (x, w)  -> y
//   resnet_jax_conv_backward_data    (dy, w) -> dx   (the shape of dx comes from the result)
//   resnet_jax_conv_backward_weights (x, dy) -> dw
// with attributes `strides` (2) and `padding` (top, bottom, left, right); and
//   resnet_jax_materialize           (x)     -> x   (aliased; see Materialize below)
//   resnet_jax_image_moments         (x)     -> (mean, m2)   (see ImageMoments)

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

enum class Kind : int64_t { kForward, kBackwardData, kBackwardWeights };

// n, h, w, c | kh, kw, o | oh, ow | strides (2) | padding (4) | kind
using Key = std::array<int64_t, 16>;

// A primitive and what it needs, built once per geometry: building one costs milliseconds
// (oneDNN JIT-compiles its kernel), running one about as much as the convolution.
// x names the input side (src, or diff_src), y the output side (dst, or diff_dst).
struct Plan {
  dnnl::primitive conv;
  memory::desc weights_user;  // HWIO, as JAX holds them
  memory::desc weights_conv;  // the layout the kernel wants
  dnnl::reorder reorder;      // user -> conv (forward, backward data) or conv -> user (weights)
  bool needs_reorder = false;
  // Activations as XLA holds them (NHWC; x a strided view of them where SubsamplesX), and as the
  // kernel wants them: NHWC for the direct kernels (no copies), blocked by 16 channels for
  // Winograd's, reordered from and to NHWC around the call.
  memory::desc x_user, y_user;
  memory::desc x_conv, y_conv;
  dnnl::reorder x_in, x_out, y_in, y_out;  // NHWC -> kernel (in), kernel -> NHWC (out)
  memory::desc scratchpad;
};

const dnnl::engine& Engine() {
  static const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Winograd's F(4x4, 3x3) does a stride-1 3x3 convolution in a quarter of the multiplications.
// oneDNN's AVX-512 kernels for it, reorders to and from NHWC included, take 68 % (32 channels)
// and 51 % (64) of the direct kernels' time for a forward + both backward convolutions at the
// CIFAR nets' stage-2 and stage-3 shapes, batch 128, and 60, 46, 56 and 71 % at the ImageNet
// nets' 56x56x64, 28x28x128, 14x14x256 and 7x7x512 (batch 16); they differ from the direct ones
// by ~1e-6 relative (float32 rounding). With 16 channels they are slower. Where oneDNN has no
// such kernel (no AVX-512) building the plan fails and the direct one is used.
bool WantsWinograd(const Key& k) {
  return k[4] == 3 && k[5] == 3 && k[9] == 1 && k[10] == 1 && std::min(k[3], k[6]) >= 32;
}

// A strided 1x1 convolution without padding reads only every stride-th pixel. Where the input is
// a whole number of strides, oneDNN 2.6's 1x1 kernels (jit_1x1, AVX2 and AVX-512) first copy
// those pixels into per-thread scratch space ("reduce to unit stride"), and their backward
// weights over NHWC gets that copy wrong: each thread's run of pixels starts at pixel * (the
// kernel's channel block: 8 floats for AVX2, 16 for AVX-512) but is packed at pixel * c, and each
// thread's space holds pixels * c. With fewer channels than a block, a thread's copy overruns its
// space: into the next thread's, which is reading its own copy there (wrong weight gradients),
// or past the end of the scratchpad (a corrupted heap). So backward weights takes those pixels
// itself, a reorder from a strided view of x, and asks oneDNN for the stride-1 convolution of
// them: the same products and sums, and no such copy. (Other sizes get a kernel that reads the
// strides itself, and oneDNN would not take the view: its last row would reach past the image.)
bool SubsamplesX(const Key& k) {
  return static_cast<Kind>(k[15]) == Kind::kBackwardWeights && k[4] == 1 && k[5] == 1 &&
         (k[9] > 1 || k[10] > 1) && k[1] % k[9] == 0 && k[2] % k[10] == 0 && k[11] == 0 &&
         k[12] == 0 && k[13] == 0 && k[14] == 0;
}

std::shared_ptr<const Plan> BuildPlan(const Key& k, dnnl::algorithm algorithm) {
  const auto& eng = Engine();
  const int64_t n = k[0], h = k[1], w = k[2], c = k[3], kh = k[4], kw = k[5], o = k[6],
                oh = k[7], ow = k[8];
  const auto kind = static_cast<Kind>(k[15]);
  using tag = memory::format_tag;
  const auto f32 = memory::data_type::f32;
  // The convolution oneDNN runs: x's own, or the stride-1 one of its subsampled pixels.
  const bool subsample = SubsamplesX(k);
  const memory::dims x_dims = subsample ? memory::dims{n, c, oh, ow} : memory::dims{n, c, h, w};
  const memory::dims strides = subsample ? memory::dims{1, 1} : memory::dims{k[9], k[10]};
  const memory::dims pad_l = {k[11], k[13]}, pad_r = {k[12], k[14]};
  const memory::desc x_user =
      subsample ? memory::desc(x_dims, f32, memory::dims{h * w * c, 1, k[9] * w * c, k[10] * c})
                : memory::desc(x_dims, f32, tag::nhwc);
  const memory::desc y_user({n, o, oh, ow}, f32, tag::nhwc);
  const auto activations = algorithm == dnnl::algorithm::convolution_winograd ? tag::any : tag::nhwc;
  const memory::desc src(x_dims, f32, activations);
  const memory::desc dst({n, o, oh, ow}, f32, activations);
  const memory::desc weights_any({o, c, kh, kw}, f32, tag::any);

  dnnl::primitive_attr attr;
  // A scratchpad per call (below) lets several XLA threads run one primitive at once.
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);

  auto plan = std::make_shared<Plan>();
  plan->weights_user = memory::desc({o, c, kh, kw}, f32, tag::hwio);
  plan->x_user = x_user;
  plan->y_user = y_user;
  const dnnl::convolution_forward::primitive_desc forward(
      dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training, algorithm, src,
                                      weights_any, dst, strides, pad_l, pad_r),
      attr, eng);
  if (kind == Kind::kForward) {
    plan->conv = dnnl::convolution_forward(forward);
    plan->weights_conv = forward.weights_desc();
    plan->x_conv = forward.src_desc();
    plan->y_conv = forward.dst_desc();
    plan->scratchpad = forward.scratchpad_desc();
  } else {
    // Both backward convolutions are built alike, from the forward one as their hint.
    auto backward = [&](auto conv) {
      using Conv = decltype(conv);
      const typename Conv::primitive_desc pd(
          typename Conv::desc(algorithm, src, weights_any, dst, strides, pad_l, pad_r), attr,
          eng, forward);
      plan->conv = Conv(pd);
      plan->scratchpad = pd.scratchpad_desc();
      return pd;
    };
    if (kind == Kind::kBackwardData) {
      const auto pd = backward(dnnl::convolution_backward_data());
      plan->weights_conv = pd.weights_desc();
      plan->x_conv = pd.diff_src_desc();
      plan->y_conv = pd.diff_dst_desc();
    } else {
      const auto pd = backward(dnnl::convolution_backward_weights());
      plan->weights_conv = pd.diff_weights_desc();
      plan->x_conv = pd.src_desc();
      plan->y_conv = pd.diff_dst_desc();
    }
  }
  plan->needs_reorder = plan->weights_conv != plan->weights_user;
  if (plan->needs_reorder) {
    const bool to_user = kind == Kind::kBackwardWeights;
    plan->reorder = dnnl::reorder(dnnl::reorder::primitive_desc(
        eng, to_user ? plan->weights_conv : plan->weights_user, eng,
        to_user ? plan->weights_user : plan->weights_conv));
  }
  auto between = [&](const memory::desc& from, const memory::desc& to) {
    return dnnl::reorder(dnnl::reorder::primitive_desc(eng, from, eng, to));
  };
  // Only the reorders this direction runs (Run): it reads x unless it computes dx, reads y
  // unless it computes y, and writes the one it computes.
  if (plan->x_conv != x_user) {
    if (kind == Kind::kBackwardData) plan->x_out = between(plan->x_conv, x_user);
    else plan->x_in = between(x_user, plan->x_conv);
  }
  if (plan->y_conv != y_user) {
    if (kind == Kind::kForward) plan->y_out = between(plan->y_conv, y_user);
    else plan->y_in = between(y_user, plan->y_conv);
  }
  return plan;
}

std::shared_ptr<const Plan> BuildPlan(const Key& key) {
  if (WantsWinograd(key)) {
    try {
      return BuildPlan(key, dnnl::algorithm::convolution_winograd);
    } catch (const dnnl::error&) {  // no Winograd kernel for this CPU: the direct one below
    }
  }
  return BuildPlan(key, dnnl::algorithm::convolution_direct);
}

std::shared_ptr<const Plan> GetPlan(const Key& key) {
  static std::mutex mu;
  static std::map<Key, std::shared_ptr<const Plan>> plans;
  std::lock_guard<std::mutex> lock(mu);
  auto it = plans.find(key);
  if (it == plans.end()) it = plans.emplace(key, BuildPlan(key)).first;
  return it->second;
}

ffi::Error Check(bool ok, const std::string& what) {
  return ok ? ffi::Error::Success() : ffi::Error::InvalidArgument("resnet_jax onednn conv: " + what);
}

// x: NHWC input, w: HWIO weights, y: NHWC output, whichever of them is the result.
ffi::Error Run(Kind kind, float* x, ffi::Span<const int64_t> x_dims, float* w,
               ffi::Span<const int64_t> w_dims, float* y, ffi::Span<const int64_t> y_dims,
               ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding) {
  if (auto e = Check(x_dims.size() == 4 && w_dims.size() == 4 && y_dims.size() == 4,
                     "expects rank-4 NHWC activations and HWIO weights");
      e.failure()) return e;
  if (auto e = Check(strides.size() == 2 && padding.size() == 4,
                     "expects 2 strides and 4 paddings");
      e.failure()) return e;
  const Key key = {x_dims[0], x_dims[1], x_dims[2], x_dims[3], w_dims[0], w_dims[1], w_dims[3],
                   y_dims[1], y_dims[2], strides[0], strides[1], padding[0], padding[1],
                   padding[2], padding[3], static_cast<int64_t>(kind)};
  try {
    const auto plan = GetPlan(key);
    const auto& eng = Engine();
    dnnl::stream stream(eng);
    memory x_mem(plan->x_user, eng, x), y_mem(plan->y_user, eng, y);
    memory w_user(plan->weights_user, eng, w);
    memory w_conv = plan->needs_reorder ? memory(plan->weights_conv, eng) : w_user;
    memory x_conv = plan->x_conv == plan->x_user ? x_mem : memory(plan->x_conv, eng);
    memory y_conv = plan->y_conv == plan->y_user ? y_mem : memory(plan->y_conv, eng);
    memory scratchpad(plan->scratchpad, eng);
    // What the kernel reads: x (forward, backward weights), y (both backward), w (not weights).
    if (kind != Kind::kBackwardData && x_conv != x_mem) plan->x_in.execute(stream, x_mem, x_conv);
    if (kind != Kind::kForward && y_conv != y_mem) plan->y_in.execute(stream, y_mem, y_conv);
    if (kind != Kind::kBackwardWeights && plan->needs_reorder)
      plan->reorder.execute(stream, w_user, w_conv);
    std::unordered_map<int, memory> args = {{DNNL_ARG_SCRATCHPAD, scratchpad}};
    if (kind == Kind::kForward) {
      args.insert({{DNNL_ARG_SRC, x_conv}, {DNNL_ARG_WEIGHTS, w_conv}, {DNNL_ARG_DST, y_conv}});
    } else if (kind == Kind::kBackwardData) {
      args.insert({{DNNL_ARG_DIFF_SRC, x_conv}, {DNNL_ARG_WEIGHTS, w_conv},
                   {DNNL_ARG_DIFF_DST, y_conv}});
    } else {
      args.insert({{DNNL_ARG_SRC, x_conv}, {DNNL_ARG_DIFF_WEIGHTS, w_conv},
                   {DNNL_ARG_DIFF_DST, y_conv}});
    }
    plan->conv.execute(stream, args);
    // What it wrote: y (forward), x (backward data), w (backward weights).
    if (kind == Kind::kForward && y_conv != y_mem) plan->y_out.execute(stream, y_conv, y_mem);
    if (kind == Kind::kBackwardData && x_conv != x_mem) plan->x_out.execute(stream, x_conv, x_mem);
    if (kind == Kind::kBackwardWeights && plan->needs_reorder)
      plan->reorder.execute(stream, w_conv, w_user);
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("resnet_jax onednn conv: oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;
using Ints = ffi::Span<const int64_t>;

ffi::Error Forward(F32 x, F32 w, ffi::ResultBuffer<ffi::F32> y, Ints strides, Ints padding) {
  return Run(Kind::kForward, x.typed_data(), x.dimensions(), w.typed_data(), w.dimensions(),
             y->typed_data(), y->dimensions(), strides, padding);
}

ffi::Error BackwardData(F32 dy, F32 w, ffi::ResultBuffer<ffi::F32> dx, Ints strides,
                        Ints padding) {
  return Run(Kind::kBackwardData, dx->typed_data(), dx->dimensions(), w.typed_data(),
             w.dimensions(), dy.typed_data(), dy.dimensions(), strides, padding);
}

ffi::Error BackwardWeights(F32 x, F32 dy, ffi::ResultBuffer<ffi::F32> dw, Ints strides,
                           Ints padding) {
  return Run(Kind::kBackwardWeights, x.typed_data(), x.dimensions(), dw->typed_data(),
             dw->dimensions(), dy.typed_data(), dy.dimensions(), strides, padding);
}

// The identity, as an op XLA cannot fuse through (onednn_conv.materialize says why). y normally
// aliases x and nothing moves; the copy is for where XLA gave y its own buffer.
ffi::Error Materialize(F32 x, ffi::ResultBuffer<ffi::F32> y) {
  if (y->typed_data() != x.typed_data())
    std::memcpy(y->typed_data(), x.typed_data(), x.element_count() * sizeof(float));
  return ffi::Error::Success();
}

// Per-channel mean and M2 (sum of squared deviations) of images [p, c], one image at a time, from
// sums shifted by the image's first pixel (the shifted-data algorithm: nothing large cancels).
// Rows of 64 floats tile 16, 32 or 64 channels exactly, so the inner loop is one contiguous
// vectorisable run for these c; partial sums move to double every 32 rows, so a large image
// loses nothing to float32 accumulation. The scratch rows live as long as the object: one
// allocation per share of a batch, not per image.
class ImageMoments1 {
 public:
  explicit ImageMoments1(int64_t c)
      : c_(c),
        width_((c < kLane && kLane % c == 0) ? kLane : c),
        shift_(width_),
        part1_(width_),
        part2_(width_),
        total1_(width_),
        total2_(width_) {}

  void operator()(const float* __restrict x, int64_t p, float* mean, float* m2) {
    const int64_t rows = p * c_ / width_;
    float* __restrict sh = shift_.data();
    float* __restrict u = part1_.data();
    float* __restrict v = part2_.data();
    for (int64_t k = 0; k < width_; ++k) sh[k] = x[k % c_];
    std::fill(total1_.begin(), total1_.end(), 0.0);
    std::fill(total2_.begin(), total2_.end(), 0.0);
    for (int64_t j0 = 0; j0 < rows; j0 += kFlush) {
      const int64_t j1 = std::min(j0 + kFlush, rows);
      std::fill(u, u + width_, 0.0f);
      std::fill(v, v + width_, 0.0f);
      for (int64_t j = j0; j < j1; ++j) {
        const float* __restrict xj = x + j * width_;
        for (int64_t k = 0; k < width_; ++k) {
          const float d = xj[k] - sh[k];
          u[k] += d;
          v[k] += d * d;
        }
      }
      for (int64_t k = 0; k < width_; ++k) {
        total1_[k] += u[k];
        total2_[k] += v[k];
      }
    }
    // What is left when p * c is no multiple of the row (9x9 pixels of 16 channels): whole pixels.
    const float* __restrict tail = x + rows * width_;
    for (int64_t k = 0; k < p * c_ - rows * width_; ++k) {
      const float d = tail[k] - sh[k];
      total1_[k] += d;
      total2_[k] += d * d;
    }
    for (int64_t k = 0; k < c_; ++k) {
      double a = 0.0, b = 0.0;
      for (int64_t r = k; r < width_; r += c_) {
        a += total1_[r];
        b += total2_[r];
      }
      mean[k] = static_cast<float>(sh[k] + a / p);
      m2[k] = static_cast<float>(std::max(b - a * a / p, 0.0));
    }
  }

 private:
  static constexpr int64_t kLane = 64, kFlush = 32;
  const int64_t c_, width_;
  std::vector<float> shift_, part1_, part2_;
  std::vector<double> total1_, total2_;
};

// Runs share(0) ... share(parts - 1) on this thread and XLA's intra-op pool (not a second pool,
// such as OpenMP's, competing with it for the cores). Shares go to whichever thread asks next,
// and this thread asks too: should every pool thread be busy (or itself waiting in a call like
// this one), it does them all, and a task the pool starts later finds nothing left to do. Only
// the shared counters outlive the call.
template <typename Share>
void RunShares(ffi::ThreadPool& pool, int64_t parts, const Share& share) {
  struct State {
    std::atomic<int64_t> next{0};
    std::mutex mutex;
    std::condition_variable finished;
    int64_t done = 0;
  };
  auto state = std::make_shared<State>();
  auto work = [state, parts, &share] {
    for (int64_t t; (t = state->next.fetch_add(1)) < parts;) {
      share(t);
      std::lock_guard<std::mutex> lock(state->mutex);
      if (++state->done == parts) state->finished.notify_all();
    }
  };
  for (int64_t t = 1; t < parts; ++t) {
    pool.Schedule([state, parts, work] {
      if (state->next.load() < parts) work();
    });
  }
  work();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->finished.wait(lock, [&] { return state->done == parts; });
}

// Per image and channel of x [n, ..., c], the mean and M2 ([n, c] each). Called on a conv's
// output right after oneDNN wrote it and before XLA's fused BN+ReLU reads it (onednn_conv.py
// orders it so): the moments of the paper's responses then cost a read of data still in cache,
// not a pass over the responses (responses.py).
ffi::Error ImageMoments(ffi::ThreadPool pool, F32 x, ffi::ResultBuffer<ffi::F32> mean,
                        ffi::ResultBuffer<ffi::F32> m2) {
  const auto dims = x.dimensions();
  const int64_t n = dims[0], c = dims[dims.size() - 1];
  float* out_mean = mean->typed_data();
  float* out_m2 = m2->typed_data();
  if (x.element_count() == 0) {  // no pixels: nothing to measure
    std::fill(out_mean, out_mean + n * c, 0.0f);
    std::fill(out_m2, out_m2 + n * c, 0.0f);
    return ffi::Error::Success();
  }
  const int64_t p = x.element_count() / (n * c);
  const float* data = x.typed_data();
  const int64_t parts = std::max<int64_t>(1, std::min(n, pool.num_threads()));
  RunShares(pool, parts, [&](int64_t t) {
    ImageMoments1 moments(c);
    for (int64_t i = n * t / parts; i < n * (t + 1) / parts; ++i)
      moments(data + i * p * c, p, out_mean + i * c, out_m2 + i * c);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxImageMoments, ImageMoments,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxMaterialize, Materialize,
                              ffi::Ffi::Bind().Arg<F32>().Ret<F32>());

#define RESNET_JAX_CONV_HANDLER(symbol, impl)                 \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, impl,                 \
                                ffi::Ffi::Bind()              \
                                    .Arg<F32>()               \
                                    .Arg<F32>()               \
                                    .Ret<F32>()               \
                                    .Attr<Ints>("strides")    \
                                    .Attr<Ints>("padding"));

RESNET_JAX_CONV_HANDLER(ResnetJaxConvForward, Forward)
RESNET_JAX_CONV_HANDLER(ResnetJaxConvBackwardData, BackwardData)
RESNET_JAX_CONV_HANDLER(ResnetJaxConvBackwardWeights, BackwardWeights)
