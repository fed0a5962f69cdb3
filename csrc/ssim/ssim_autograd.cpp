// Autograd of the fused SSIM ops, in C++ (the Autograd dispatch key), as torchvision's
// csrc/ops/autograd does: the backward runs inside the autograd engine without a trip
// through Python, which would be most of a small call's host time.
//
// Both forward ops save the inputs only (the backward recomputes the moments) and share
// one backward op, which takes the upstream gradient as given: (B,) or the map's shape,
// with any strides. The backward op itself has no derivative (no double backward).
//
// ssim_per_image_one_pass is the training path for reductions mean/none: its forward runs
// ssim_per_image_and_grad, one pass that gives the value and d value[b] / d input (the
// moments are computed once instead of in a forward and again in the backward), and its
// backward only scales those gradients by the upstream gradient, in place (ssim_scale_gradient_),
// so no second image-sized buffer is made. A second backward through the same graph (retain_graph)
// finds them consumed and runs the same pass again (bit-identical gradients).
// ssim_mean_one_pass is the same Function returning the batch mean (reduction "mean"): the
// pass itself gives the mean (one sum over the batch's blocks) and its gradients (an upstream
// gradient of 1 / B per image), so a training step records one autograd node instead of two
// and launches no mean and no division of the upstream gradient: the backward is one
// in-place multiply, as for the per-image values.
// Both take a scale (the value and gradients of scale x the SSIM): epban.ssim_loss computes
// w (1 - SSIM) as w + (-w SSIM), so that a loss's backward reaches the op with an upstream
// gradient of exactly 1 and ssim_scale_gradient_ writes nothing (tested on the device on
// CUDA): the backward costs a launch instead of a read and a write of each gradient.
// ssim_l1_one_pass is the same Function with an L1 term (l1 x mean |x - y|, its gradient added in
// the same pass; ssim_l1_and_grad) and a second output, the L1 mean alone (no gradient), for logging.
// No backward here is differentiable: each refuses create_graph=True with a clear error instead
// of returning a gradient detached from the graph.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

namespace epban {
namespace ssim {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_forward(const at::Tensor& x, const at::Tensor& y, double c1, double c2, bool same_padding,
                        bool want_map) {
  using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, double, double, bool);
  static const auto per_image =
      c10::Dispatcher::singleton().findSchemaOrThrow("epban::ssim_per_image", "").typed<Sig>();
  static const auto map = c10::Dispatcher::singleton().findSchemaOrThrow("epban::ssim_map", "").typed<Sig>();
  return (want_map ? map : per_image).call(x, y, c1, c2, same_padding);
}

std::tuple<at::Tensor, at::Tensor> call_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y,
                                                 double c1, double c2, bool same_padding, bool grad_x, bool grad_y) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("epban::ssim_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                                    double, bool, bool, bool)>();
  return op.call(grad, x, y, c1, c2, same_padding, grad_x, grad_y);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_per_image_and_grad(const at::Tensor& x, const at::Tensor& y,
                                                                       double c1, double c2, bool same_padding,
                                                                       bool grad_x, bool grad_y, bool batch_mean,
                                                                       double scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("epban::ssim_per_image_and_grad", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, double, double, bool, bool, bool, bool, double)>();
  return op.call(x, y, c1, c2, same_padding, grad_x, grad_y, batch_mean, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_l1_and_grad(const at::Tensor& x, const at::Tensor& y,
                                                                           double c1, double c2, bool same_padding,
                                                                           bool grad_x, bool grad_y, bool batch_mean,
                                                                           double scale, double l1) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("epban::ssim_l1_and_grad", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, double, double, bool, bool, bool, bool, double,
                                 double)>();
  return op.call(x, y, c1, c2, same_padding, grad_x, grad_y, batch_mean, scale, l1);
}

// The value, the L1 mean ((0,) without an L1 term) and the gradients of one pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_pass(const at::Tensor& x, const at::Tensor& y,
                                                                    double c1, double c2, bool same_padding,
                                                                    bool grad_x, bool grad_y, bool batch_mean,
                                                                    double scale, double l1) {
  if (l1 != 0.0) return call_l1_and_grad(x, y, c1, c2, same_padding, grad_x, grad_y, batch_mean, scale, l1);
  auto [value, gx, gy] = call_per_image_and_grad(x, y, c1, c2, same_padding, grad_x, grad_y, batch_mean, scale);
  return {value, at::empty({0}, value.options()), gx, gy};
}

// A backward run with create_graph=True (grad mode on) would return gradients detached from the graph.
void refuse_double_backward() {
  TORCH_CHECK(!at::GradMode::is_enabled(),
              "the fused SSIM has no double backward (create_graph=True); use backend='reference'");
}

void call_scale_gradient(at::Tensor& grad, const at::Tensor& upstream) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("epban::ssim_scale_gradient_", "")
                             .typed<void(at::Tensor&, const at::Tensor&)>();
  op.call(grad, upstream);
}

class SsimFunction : public torch::autograd::Function<SsimFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& y, double c1, double c2,
                            bool same_padding, bool want_map) {
    ctx->save_for_backward({x, y});
    ctx->saved_data["c1"] = c1;
    ctx->saved_data["c2"] = c2;
    ctx->saved_data["same_padding"] = same_padding;
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_forward(x, y, c1, c2, same_padding, want_map);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    refuse_double_backward();
    const auto saved = ctx->get_saved_variables();
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_y = ctx->needs_input_grad(1);
    auto [gx, gy] = call_backward(grads[0], saved[0], saved[1], ctx->saved_data["c1"].toDouble(),
                                  ctx->saved_data["c2"].toDouble(), ctx->saved_data["same_padding"].toBool(), need_x,
                                  need_y);
    return {need_x ? gx : at::Tensor(), need_y ? gy : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

class SsimOnePassFunction : public torch::autograd::Function<SsimOnePassFunction> {
 public:
  // batch_mean: return the mean over the batch (0-dim) instead of the per-image values.
  // Returns the value and the L1 mean alone ((0,) when l1 is 0), which has no gradient.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& y, double c1, double c2,
                               bool same_padding, bool batch_mean, double scale, double l1) {
    ctx->save_for_backward({x, y});
    ctx->saved_data["c1"] = c1;
    ctx->saved_data["c2"] = c2;
    ctx->saved_data["same_padding"] = same_padding;
    ctx->saved_data["batch_mean"] = batch_mean;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["l1"] = l1;
    const bool grad_x = x.requires_grad();
    const bool grad_y = y.requires_grad();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [value, l1_value, gx, gy] = call_pass(x, y, c1, c2, same_padding, grad_x, grad_y, batch_mean, scale, l1);
    ctx->saved_data["gx"] = grad_x ? c10::IValue(gx) : c10::IValue();
    ctx->saved_data["gy"] = grad_y ? c10::IValue(gy) : c10::IValue();
    ctx->mark_non_differentiable({l1_value});
    return {value, l1_value};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    refuse_double_backward();
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_y = ctx->needs_input_grad(1);
    c10::IValue kept_x = ctx->saved_data["gx"];
    c10::IValue kept_y = ctx->saved_data["gy"];
    ctx->saved_data["gx"] = c10::IValue();  // consumed: scaled in place and handed over below
    ctx->saved_data["gy"] = c10::IValue();
    const bool batch_mean = ctx->saved_data["batch_mean"].toBool();
    if ((need_x && !kept_x.isTensor()) || (need_y && !kept_y.isTensor())) {
      // Consumed by an earlier backward (retain_graph): the same one pass again, so that
      // every backward gives bit-identical gradients.
      const auto saved = ctx->get_saved_variables();
      at::AutoDispatchBelowADInplaceOrView guard;
      auto [value, l1_value, gx, gy] =
          call_pass(saved[0], saved[1], ctx->saved_data["c1"].toDouble(), ctx->saved_data["c2"].toDouble(),
                    ctx->saved_data["same_padding"].toBool(), need_x, need_y, batch_mean,
                    ctx->saved_data["scale"].toDouble(), ctx->saved_data["l1"].toDouble());
      kept_x = gx;
      kept_y = gy;
    }
    // The upstream gradient: (B,), one per image, or the batch mean's (0-dim; the pass already
    // divided by the batch). The op leaves images whose factor is exactly 1 untouched.
    at::AutoDispatchBelowADInplaceOrView guard;
    const auto scale = [&](const c10::IValue& kept) {
      at::Tensor g = kept.toTensor();
      call_scale_gradient(g, grads[0]);
      return g;
    };
    at::Tensor gx = need_x ? scale(kept_x) : at::Tensor();
    at::Tensor gy = need_y ? scale(kept_y) : at::Tensor();
    return {gx, gy, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor ssim_per_image_one_pass_autograd(const at::Tensor& x, const at::Tensor& y, double c1, double c2,
                                            bool same_padding, double scale) {
  return SsimOnePassFunction::apply(x, y, c1, c2, same_padding, false, scale, 0.0)[0];
}

at::Tensor ssim_mean_one_pass_autograd(const at::Tensor& x, const at::Tensor& y, double c1, double c2,
                                       bool same_padding, double scale) {
  return SsimOnePassFunction::apply(x, y, c1, c2, same_padding, true, scale, 0.0)[0];
}

std::tuple<at::Tensor, at::Tensor> ssim_l1_one_pass_autograd(const at::Tensor& x, const at::Tensor& y, double c1,
                                                             double c2, bool same_padding, bool batch_mean,
                                                             double scale, double l1) {
  const auto out = SsimOnePassFunction::apply(x, y, c1, c2, same_padding, batch_mean, scale, l1);
  return {out[0], out[1]};
}

at::Tensor ssim_per_image_autograd(const at::Tensor& x, const at::Tensor& y, double c1, double c2, bool same_padding) {
  return SsimFunction::apply(x, y, c1, c2, same_padding, false);
}

at::Tensor ssim_map_autograd(const at::Tensor& x, const at::Tensor& y, double c1, double c2, bool same_padding) {
  return SsimFunction::apply(x, y, c1, c2, same_padding, true);
}

}  // namespace
}  // namespace ssim
}  // namespace epban

TORCH_LIBRARY_IMPL(epban, Autograd, m) {
  m.impl("ssim_per_image", &epban::ssim::ssim_per_image_autograd);
  m.impl("ssim_map", &epban::ssim::ssim_map_autograd);
  m.impl("ssim_per_image_one_pass", &epban::ssim::ssim_per_image_one_pass_autograd);
  m.impl("ssim_mean_one_pass", &epban::ssim::ssim_mean_one_pass_autograd);
  m.impl("ssim_l1_one_pass", &epban::ssim::ssim_l1_one_pass_autograd);
}
