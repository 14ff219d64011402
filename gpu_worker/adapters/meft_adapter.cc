#include "gpu_worker/adapters/meft_adapter.h"

#include <torch/torch.h>

#include <string>

namespace meft::worker {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

LookupResult LookupOrThrow(ParamClient* client, const StepHeader& h, const torch::Tensor& q,
                           const torch::Tensor& mask, bool training) {
  auto r = client->Lookup(h, q, mask, training);
  TORCH_CHECK(r.ok(), std::string(r.status().message()));
  return *std::move(r);
}

// The rows of a lookup moved to `device` as fp32, with slot indices made safe for gather.
struct DeviceRows {
  torch::Tensor keys, values, router;    // [S, d], [S, d], [n_e, d] (router undefined if ungated)
  torch::Tensor pos, valid, expert_pos;  // [N, k] int64 clamped >= 0, bool, int64 clamped >= 0
};

DeviceRows ToDevice(const LookupResult& r, torch::Device device, bool per_token, bool gated) {
  DeviceRows d;
  d.keys = r.keys.to(device, torch::kFloat32);
  d.values = r.values.to(device, torch::kFloat32);
  if (per_token) {
    const torch::Tensor rows = r.token_rows.to(device);
    d.valid = rows.ge(0);
    d.pos = rows.clamp_min(0);
    if (gated) {
      d.router = r.router_rows.to(device, torch::kFloat32);
      d.expert_pos = r.token_experts.to(device).clamp_min(0);
    }
  }
  return d;
}

// coeff [N, S] such that the adapter output is coeff @ V[S]: ReLU of the (gated) scores placed
// at each token's slots (per_token), or ReLU(x K[S]^T) on real tokens (union).
torch::Tensor Coefficients(const DeviceRows& rows, const torch::Tensor& xf, const torch::Tensor& qf,
                           const torch::Tensor& mask, bool per_token, bool gated) {
  const torch::Tensor scores = xf.matmul(rows.keys.t());
  if (!per_token) return torch::relu(scores) * mask.unsqueeze(1);
  torch::Tensor a = scores.gather(1, rows.pos);
  if (gated) a = a * qf.matmul(rows.router.t()).gather(1, rows.expert_pos);
  return torch::zeros_like(scores).scatter_add_(1, rows.pos, torch::relu(a) * rows.valid);
}

// Forward and the hand-written backward of one layer's adapter. Inputs x (the FFN input) and q
// (the lookup query: x itself, or an earlier layer's FFN input with prefetch), both [N, d].
class MeftFunction : public torch::autograd::Function<MeftFunction> {
 public:
  // `anchor` is a scalar that requires grad, so backward runs (and gradients reach the server)
  // even when nothing upstream of x is trainable.
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, torch::Tensor q,
                               torch::Tensor mask, torch::Tensor /*anchor*/, MeftAdapter* adapter,
                               int64_t layer) {
    const ServerDescription& server = adapter->server();
    const StepHeader h = adapter->header(layer);
    const LookupResult r = LookupOrThrow(adapter->client(), h, q, mask, /*training=*/true);
    const DeviceRows rows = ToDevice(r, x.device(), server.per_token, server.gated);
    const torch::Tensor y = Coefficients(rows, x.to(torch::kFloat32), q.to(torch::kFloat32), mask,
                                         server.per_token, server.gated)
                                .matmul(rows.values);

    ctx->saved_data["adapter"] = reinterpret_cast<int64_t>(adapter);
    ctx->saved_data["layer"] = layer;
    ctx->saved_data["step"] = static_cast<int64_t>(h.step);
    ctx->saved_data["micro_step"] = static_cast<int64_t>(h.micro_step);
    if (adapter->options().refetch_in_backward) {
      ctx->save_for_backward({x, q, mask});
    } else {
      ctx->save_for_backward(
          {x, q, mask, rows.keys, rows.values, rows.router, rows.pos, rows.valid, rows.expert_pos});
    }
    return y.to(x.scalar_type());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto* adapter = reinterpret_cast<MeftAdapter*>(ctx->saved_data["adapter"].toInt());
    const ServerDescription& server = adapter->server();
    const StepHeader h{static_cast<uint64_t>(ctx->saved_data["step"].toInt()),
                       static_cast<uint32_t>(ctx->saved_data["micro_step"].toInt()),
                       static_cast<uint32_t>(ctx->saved_data["layer"].toInt())};
    const variable_list saved = ctx->get_saved_variables();
    const torch::Tensor& x = saved[0];
    const torch::Tensor& q = saved[1];
    const torch::Tensor& mask = saved[2];
    DeviceRows rows;
    if (saved.size() > 3) {
      rows = {saved[3], saved[4], saved[5], saved[6], saved[7], saved[8]};
    } else {
      const LookupResult r = LookupOrThrow(adapter->client(), h, q, mask, /*training=*/true);
      rows = ToDevice(r, x.device(), server.per_token, server.gated);
    }
    const torch::Tensor xf = x.to(torch::kFloat32);
    const torch::Tensor qf = q.to(torch::kFloat32);
    const torch::Tensor dy = grad_outputs[0].to(torch::kFloat32);
    const int64_t n = xf.size(0);
    const int64_t s_rows = rows.keys.size(0);

    const torch::Tensor s_full = xf.matmul(rows.keys.t());    // [N, S]
    const torch::Tensor dcoeff = dy.matmul(rows.values.t());  // dL/dcoeff, [N, S]
    torch::Tensor coeff, dscore_full, gate_grads, dq;
    if (server.per_token) {
      const torch::Tensor s = s_full.gather(1, rows.pos);
      torch::Tensor g;
      torch::Tensor a = s;
      if (server.gated) {
        g = qf.matmul(rows.router.t()).gather(1, rows.expert_pos);
        a = s * g;
      }
      const torch::Tensor h_act = torch::relu(a) * rows.valid;
      coeff = torch::zeros({n, s_rows}, xf.options()).scatter_add_(1, rows.pos, h_act);
      const torch::Tensor da = dcoeff.gather(1, rows.pos) * a.gt(0) * rows.valid;
      const torch::Tensor ds = server.gated ? da * g : da;
      dscore_full = torch::zeros({n, s_rows}, xf.options()).scatter_add_(1, rows.pos, ds);
      if (server.gated) {
        gate_grads = da * s;  // zero on empty slots (da is)
        const torch::Tensor dgate = torch::zeros({n, rows.router.size(0)}, xf.options())
                                        .scatter_add_(1, rows.expert_pos, gate_grads);
        dq = dgate.matmul(rows.router);
      }
    } else {
      const torch::Tensor m = mask.unsqueeze(1).to(torch::kFloat32);
      coeff = torch::relu(s_full) * m;
      dscore_full = dcoeff * s_full.gt(0) * m;
    }
    const torch::Tensor dkeys = dscore_full.t().matmul(xf);
    const torch::Tensor dvalues = coeff.t().matmul(dy);
    const absl::Status sent = adapter->client()->Gradients(h, dkeys, dvalues, gate_grads);
    TORCH_CHECK(sent.ok(), std::string(sent.message()));

    const torch::Tensor dx = dscore_full.matmul(rows.keys).to(x.scalar_type());
    return {dx,
            dq.defined() ? dq.to(q.scalar_type()) : torch::Tensor(),
            torch::Tensor(),
            torch::Tensor(),
            torch::Tensor(),
            torch::Tensor()};
  }
};

}  // namespace

torch::Tensor MeftOutputReference(const LookupResult& r, const torch::Tensor& x,
                                  const torch::Tensor& q, const torch::Tensor& mask, bool per_token,
                                  bool gated, const torch::Tensor& keys,
                                  const torch::Tensor& values, const torch::Tensor& router) {
  const int64_t n = x.size(0);
  std::vector<torch::Tensor> out;
  for (int64_t t = 0; t < n; ++t) {
    torch::Tensor y = torch::zeros({x.size(1)}, x.options());
    if (per_token) {
      for (int64_t j = 0; j < r.token_rows.size(1); ++j) {
        const int64_t p = r.token_rows[t][j].item<int64_t>();
        if (p < 0) continue;
        torch::Tensor a = keys[p].dot(x[t]);
        if (gated) a = a * router[r.token_experts[t][j].item<int64_t>()].dot(q[t]);
        y = y + torch::relu(a) * values[p];
      }
    } else if (mask[t].item<bool>()) {
      for (int64_t p = 0; p < keys.size(0); ++p) y = y + torch::relu(keys[p].dot(x[t])) * values[p];
    }
    out.push_back(y);
  }
  return torch::stack(out);
}

MeftAdapter::MeftAdapter(ParamClient* client, const ServerDescription& server,
                         const MeftAdapterOptions& options)
    : client_(client), server_(server), options_(options) {}

void MeftAdapter::BeginMicroBatch(uint64_t step, uint32_t micro_step, bool training) {
  step_ = step;
  micro_step_ = micro_step;
  training_ = training;
  recent_inputs_.clear();
}

torch::Tensor MeftAdapter::FfnDelta(int64_t layer, const torch::Tensor& ffn_input,
                                    const torch::Tensor& token_mask) {
  const int64_t d = ffn_input.size(-1);
  const torch::Tensor x = ffn_input.reshape({-1, d});
  const torch::Tensor mask = token_mask.defined()
                                 ? token_mask.reshape({-1}).ne(0)
                                 : torch::ones({x.size(0)}, x.options().dtype(torch::kBool));
  // The query: this layer's input, or that of layer - p when the window holds it.
  torch::Tensor q = x;
  const int64_t p = options_.prefetch_layers;
  if (p > 0) {
    for (const auto& [l, input] : recent_inputs_) {
      if (l == layer - p) q = input;
    }
    recent_inputs_.emplace_back(layer, x);
    while (static_cast<int64_t>(recent_inputs_.size()) > p) recent_inputs_.pop_front();
  }
  const bool owned = std::find(server_.layers.begin(), server_.layers.end(),
                               static_cast<uint32_t>(layer)) != server_.layers.end();
  if (!owned) return {};

  torch::Tensor y;
  if (training_) {
    if (!anchor_.defined()) anchor_ = torch::zeros({}, torch::requires_grad());
    y = MeftFunction::apply(x, q, mask, anchor_, this, layer);
  } else {
    torch::NoGradGuard no_grad;
    const LookupResult r = LookupOrThrow(client_, header(layer), q, mask, /*training=*/false);
    const DeviceRows rows = ToDevice(r, x.device(), server_.per_token, server_.gated);
    y = Coefficients(rows, x.to(torch::kFloat32), q.to(torch::kFloat32), mask, server_.per_token,
                     server_.gated)
            .matmul(rows.values)
            .to(x.scalar_type());
  }
  return y.reshape(ffn_input.sizes());
}

}  // namespace meft::worker
