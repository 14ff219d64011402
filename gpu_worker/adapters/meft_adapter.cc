#include "gpu_worker/adapters/meft_adapter.h"

#include <torch/cuda.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <exception>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "gpu_worker/model/status_error.h"

namespace meft::worker {
namespace {

using Clock = std::chrono::steady_clock;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Runs `fn` on a new thread (or, if no thread can be created, when first waited for). `fn` must
// not throw: it returns a Status.
template <typename Fn>
auto Background(Fn fn) -> std::shared_future<decltype(fn())> {
  return std::async(std::launch::async | std::launch::deferred, std::move(fn)).share();
}

// A client call that reports an exception from a substitute client as a Status, so none crosses
// a thread.
template <typename Call>
auto Guarded(const char* method, Call call) -> decltype(call()) {
  try {
    return call();
  } catch (...) {
    return StatusFromCurrentException(method);
  }
}

// The rows of a lookup moved to `device` as fp32, with slot indices made safe for gather.
struct DeviceRows {
  torch::Tensor keys, values, router;    // [S, d], [S, d], [n_e, d] (router undefined if ungated)
  torch::Tensor pos, valid, expert_pos;  // [N, k] int64 clamped >= 0, bool, int64 clamped >= 0
};

// Float rows cross to the device in the dtype they arrived in and are widened there: a blocking
// to(device, kFloat32) of bf16 rows would convert on the host into a fresh pageable buffer (twice
// the bytes, and not the pinned arena the rows lie in), so the copy could not be one DMA. The
// values are the same either way (bf16 -> fp32 is exact). On the CPU the first to() is a no-op.
torch::Tensor FloatRowsOn(const torch::Tensor& rows, torch::Device device) {
  return rows.to(device).to(torch::kFloat32);
}

DeviceRows ToDevice(const LookupReply& r, torch::Device device, bool per_token, bool gated) {
  DeviceRows d;
  d.keys = FloatRowsOn(r.keys, device);
  d.values = FloatRowsOn(r.values, device);
  if (per_token) {
    const torch::Tensor rows = r.token_rows.to(device);
    d.valid = rows.ge(0);
    d.pos = rows.clamp_min(0);
    if (gated) {
      d.router = FloatRowsOn(r.router_rows, device);
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
  // `fetched`: the answer of a lookup already made (overlap), or null to look up here.
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, torch::Tensor q,
                               torch::Tensor mask, torch::Tensor /*anchor*/, MeftAdapter* adapter,
                               int64_t layer, const LookupReply* fetched) {
    const ServerInfo& server = adapter->server();
    const RequestHeader h = adapter->header(layer);
    const LookupReply r =
        fetched != nullptr ? *fetched : adapter->Fetch(h, q, mask, /*training=*/true);
    const auto transfer_start = Clock::now();
    const DeviceRows rows = ToDevice(r, x.device(), server.per_token, server.gated);
    adapter->AddTransferSeconds(SecondsSince(transfer_start));
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
    const ServerInfo& server = adapter->server();
    const RequestHeader h{static_cast<uint64_t>(ctx->saved_data["step"].toInt()),
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
      const LookupReply r = adapter->Fetch(h, q, mask, /*training=*/true);
      const auto transfer_start = Clock::now();
      rows = ToDevice(r, x.device(), server.per_token, server.gated);
      adapter->AddTransferSeconds(SecondsSince(transfer_start));
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
    adapter->SendGradients(h, dkeys, dvalues, gate_grads);

    const torch::Tensor dx = dscore_full.matmul(rows.keys).to(x.scalar_type());
    return {dx,
            dq.defined() ? dq.to(q.scalar_type()) : torch::Tensor(),
            torch::Tensor(),
            torch::Tensor(),
            torch::Tensor(),
            torch::Tensor(),
            torch::Tensor()};
  }
};

}  // namespace

torch::Tensor MeftOutputReference(const LookupReply& r, const torch::Tensor& x,
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

MeftAdapter::MeftAdapter(ParamClient* client, const ServerInfo& server,
                         const MeftAdapterOptions& options)
    : client_(client), server_(server), options_(options) {}

MeftAdapter::~MeftAdapter() {
  DropPendingLookups();
  for (const SentGradients& s : sent_gradients_) s.done.wait();
  if (pending_step_.has_value()) pending_step_->wait();
}

void MeftAdapter::BeginMicroBatch(uint64_t step, uint32_t micro_step, bool training) {
  DropPendingLookups();
  if (!training && pending_step_.has_value()) {
    // Evaluation lookups do not wait for steps on the server: wait here. The reply stays for
    // WaitForStep or GradNorm to report.
    const auto start = Clock::now();
    pending_step_->wait();
    RecordWait(SecondsSince(start));
  }
  step_ = step;
  micro_step_ = micro_step;
  training_ = training;
  recent_inputs_.clear();
  ready_layer_ = -1;
  ready_input_ = ready_token_mask_ = ready_x_ = ready_mask_ = torch::Tensor();
}

bool MeftAdapter::Owns(int64_t layer) const {
  return std::find(server_.layers.begin(), server_.layers.end(), static_cast<uint32_t>(layer)) !=
         server_.layers.end();
}

std::pair<torch::Tensor, torch::Tensor> MeftAdapter::Flatten(int64_t layer,
                                                             const torch::Tensor& ffn_input,
                                                             const torch::Tensor& token_mask) {
  if (layer == ready_layer_ && ffn_input.is_same(ready_input_) &&
      token_mask.is_same(ready_token_mask_)) {
    return {ready_x_, ready_mask_};
  }
  const int64_t d = ffn_input.size(-1);
  ready_layer_ = layer;
  ready_input_ = ffn_input;
  ready_token_mask_ = token_mask;
  ready_x_ = ffn_input.reshape({-1, d});
  ready_mask_ = token_mask.defined()
                    ? token_mask.reshape({-1}).ne(0)
                    : torch::ones({ready_x_.size(0)}, ready_x_.options().dtype(torch::kBool));
  return {ready_x_, ready_mask_};
}

void MeftAdapter::FfnInputReady(int64_t layer, const torch::Tensor& ffn_input,
                                const torch::Tensor& token_mask) {
  // Lookups still pending from an earlier pass (one that failed) are stale.
  if (layer <= ready_layer_) DropPendingLookups();
  const auto [x, mask] = Flatten(layer, ffn_input, token_mask);
  if (!options_.overlap) return;
  // The lookup of layer l uses the input of layer l - p; layers below p use their own.
  const int64_t p = options_.prefetch_layers;
  if ((p == 0 || layer < p) && Owns(layer)) Launch(layer, x, mask);
  if (p > 0 && Owns(layer + p)) Launch(layer + p, x, mask);
}

void MeftAdapter::Launch(int64_t layer, const torch::Tensor& q, const torch::Tensor& mask) {
  if (auto it = pending_lookups_.find(layer); it != pending_lookups_.end()) {
    it->second.result.wait();
    pending_lookups_.erase(it);
  }
  {
    std::lock_guard lock(timings_mu_);
    ++timings_.lookups;
  }
  const RequestHeader h = header(layer);
  const bool training = training_;
  auto result = Background([this, h, q = q.detach(), mask, training] {
    const auto start = Clock::now();
    absl::StatusOr<LookupReply> r =
        Guarded("Lookup", [&] { return client_->Lookup(h, q, mask, training); });
    RecordCall(SecondsSince(start));
    return r;
  });
  pending_lookups_[layer] = {q, mask, std::move(result)};
}

void MeftAdapter::DropPendingLookups() {
  if (pending_lookups_.empty()) return;
  const auto start = Clock::now();
  for (const auto& [layer, pending] : pending_lookups_) pending.result.wait();
  pending_lookups_.clear();
  RecordWait(SecondsSince(start));
}

torch::Tensor MeftAdapter::FfnDelta(int64_t layer, const torch::Tensor& ffn_input,
                                    const torch::Tensor& token_mask) {
  const auto [x, mask] = Flatten(layer, ffn_input, token_mask);
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
  if (!Owns(layer)) return {};

  // On CUDA the rows' copy to the device below is blocking and so waits for every kernel queued
  // before it anyway; draining the stream first charges those kernels to compute instead of to
  // the wait for the server or to the transfer (MeftTimings). It costs no time: the copy could
  // not start earlier, an overlapped lookup runs on its own thread meanwhile, and a synchronous
  // one's copy of the query to the host would wait for the same kernels.
  if (x.is_cuda()) torch::cuda::synchronize(x.device().index());

  // With overlap the lookup was started by FfnInputReady (of this layer or of layer - p).
  std::optional<LookupReply> fetched;
  if (auto it = pending_lookups_.find(layer); it != pending_lookups_.end()) {
    const PendingLookup pending = std::move(it->second);
    pending_lookups_.erase(it);
    q = pending.query;
    const auto start = Clock::now();
    const absl::StatusOr<LookupReply>& r = pending.result.get();
    RecordWait(SecondsSince(start));
    ThrowIfError(r.status());
    fetched = *r;
  }

  torch::Tensor y;
  if (training_) {
    if (!anchor_.defined()) anchor_ = torch::zeros({}, torch::requires_grad());
    y = MeftFunction::apply(x, q, mask, anchor_, this, layer,
                            fetched.has_value() ? &*fetched : nullptr);
  } else {
    torch::NoGradGuard no_grad;
    const LookupReply r =
        fetched.has_value() ? *fetched : Fetch(header(layer), q, mask, /*training=*/false);
    const auto transfer_start = Clock::now();
    const DeviceRows rows = ToDevice(r, x.device(), server_.per_token, server_.gated);
    AddTransferSeconds(SecondsSince(transfer_start));
    y = Coefficients(rows, x.to(torch::kFloat32), q.to(torch::kFloat32), mask, server_.per_token,
                     server_.gated)
            .matmul(rows.values)
            .to(x.scalar_type());
  }
  return y.reshape(ffn_input.sizes());
}

LookupReply MeftAdapter::Fetch(const RequestHeader& h, const torch::Tensor& q,
                                const torch::Tensor& mask, bool training) {
  {
    std::lock_guard lock(timings_mu_);
    ++timings_.lookups;
  }
  const auto start = Clock::now();
  absl::StatusOr<LookupReply> r = client_->Lookup(h, q, mask, training);
  const double seconds = SecondsSince(start);
  RecordCall(seconds);
  RecordWait(seconds);
  ThrowIfError(r.status());
  return *std::move(r);
}

void MeftAdapter::SendGradients(const RequestHeader& h, const torch::Tensor& key_grads,
                                const torch::Tensor& value_grads, const torch::Tensor& gate_grads) {
  {
    std::lock_guard lock(timings_mu_);
    ++timings_.gradient_sends;
  }
  if (!options_.overlap) {
    const auto start = Clock::now();
    const absl::Status sent = client_->Gradients(h, key_grads, value_grads, gate_grads);
    const double seconds = SecondsSince(start);
    RecordCall(seconds);
    RecordWait(seconds);
    ThrowIfError(sent);
    return;
  }
  std::shared_future<absl::Status> previous;
  if (auto it = last_send_.find(h.layer); it != last_send_.end()) previous = it->second;
  auto done =
      Background([this, h, k = key_grads.detach(), v = value_grads.detach(),
                  g = gate_grads.defined() ? gate_grads.detach() : torch::Tensor(), previous] {
        if (previous.valid()) previous.wait();
        const auto start = Clock::now();
        absl::Status sent = Guarded("Gradients", [&] { return client_->Gradients(h, k, v, g); });
        RecordCall(SecondsSince(start));
        return sent;
      });
  last_send_[h.layer] = done;
  sent_gradients_.push_back({h, std::move(done)});
}

absl::Status MeftAdapter::FinishBackward() {
  absl::Status first;
  if (sent_gradients_.empty()) return first;
  const auto start = Clock::now();
  for (const SentGradients& s : sent_gradients_) {
    const absl::Status& sent = s.done.get();
    if (!sent.ok() && first.ok()) first = sent;
  }
  RecordWait(SecondsSince(start));
  sent_gradients_.clear();
  last_send_.clear();
  return first;
}

absl::StatusOr<double> MeftAdapter::GradNorm(uint64_t step) {
  if (absl::Status s = WaitForStep(); !s.ok()) return s;
  const auto start = Clock::now();
  absl::StatusOr<double> norm = client_->GradNorm(step);
  const double seconds = SecondsSince(start);
  RecordCall(seconds);
  RecordWait(seconds);
  return norm;
}

absl::Status MeftAdapter::Step(uint64_t step, double lr, double clip_factor) {
  if (absl::Status s = WaitForStep(); !s.ok()) return s;
  {
    std::lock_guard lock(timings_mu_);
    ++timings_.steps;
  }
  if (!options_.overlap) {
    const auto start = Clock::now();
    absl::Status s = client_->Step(step, lr, clip_factor);
    const double seconds = SecondsSince(start);
    RecordCall(seconds);
    RecordWait(seconds);
    return s;
  }
  pending_step_ = Background([this, step, lr, clip_factor] {
    const auto start = Clock::now();
    absl::Status s = Guarded("Step", [&] { return client_->Step(step, lr, clip_factor); });
    RecordCall(SecondsSince(start));
    return s;
  });
  return absl::OkStatus();
}

absl::Status MeftAdapter::WaitForStep() {
  if (!pending_step_.has_value()) return absl::OkStatus();
  const auto start = Clock::now();
  absl::Status s = pending_step_->get();
  RecordWait(SecondsSince(start));
  pending_step_.reset();
  return s;
}

MeftTimings MeftAdapter::TakeTimings() {
  std::lock_guard lock(timings_mu_);
  return std::exchange(timings_, MeftTimings{});
}

void MeftAdapter::AddTransferSeconds(double seconds) {
  std::lock_guard lock(timings_mu_);
  timings_.transfer_seconds += seconds;
}

void MeftAdapter::RecordCall(double seconds) {
  std::lock_guard lock(timings_mu_);
  timings_.call_seconds += seconds;
}

void MeftAdapter::RecordWait(double seconds) {
  std::lock_guard lock(timings_mu_);
  timings_.wait_seconds += seconds;
}

}  // namespace meft::worker
