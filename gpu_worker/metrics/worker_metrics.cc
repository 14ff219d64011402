#include "gpu_worker/metrics/worker_metrics.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>

namespace meft::worker {
namespace {

using Clock = std::chrono::steady_clock;

int64_t NanosSince(Clock::time_point start) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count();
}

}  // namespace

int64_t TensorBytes(const torch::Tensor& t) {
  return t.defined() ? t.numel() * static_cast<int64_t>(t.element_size()) : 0;
}

int64_t LookupBytes(const LookupReply& r) {
  int64_t total = 0;
  for (const torch::Tensor* t : {&r.row_ids, &r.keys, &r.values, &r.token_rows, &r.token_gates,
                                 &r.token_experts, &r.expert_ids, &r.router_rows}) {
    total += TensorBytes(*t);
  }
  return total;
}

// --------------------------------------------------------------------------------------------
// MeteredParamClient

MeteredParamClient::MeteredParamClient(std::unique_ptr<ParamClient> inner, ClientMeter* meter)
    : inner_(std::move(inner)), meter_(meter) {}

template <typename F>
auto MeteredParamClient::Timed(F&& call) {
  const auto start = Clock::now();
  auto result = call();
  meter_->wait_nanos.fetch_add(NanosSince(start), std::memory_order_relaxed);
  meter_->calls.fetch_add(1, std::memory_order_relaxed);
  return result;
}

torch::Tensor MeteredParamClient::Stage(const torch::Tensor& t) {
  if (!t.defined() || t.device().is_cpu()) return t;
  const auto start = Clock::now();
  torch::Tensor host = t.to(torch::kCPU);
  meter_->transfer_nanos.fetch_add(NanosSince(start), std::memory_order_relaxed);
  return host;
}

absl::StatusOr<LookupReply> MeteredParamClient::Lookup(const RequestHeader& header,
                                                        const torch::Tensor& x,
                                                        const torch::Tensor& token_mask,
                                                        bool training) {
  const torch::Tensor host_x = Stage(x);
  const torch::Tensor host_mask = Stage(token_mask);
  meter_->bytes_sent.fetch_add(TensorBytes(host_x) + TensorBytes(host_mask),
                               std::memory_order_relaxed);
  absl::StatusOr<LookupReply> result =
      Timed([&] { return inner_->Lookup(header, host_x, host_mask, training); });
  if (result.ok())
    meter_->bytes_received.fetch_add(LookupBytes(*result), std::memory_order_relaxed);
  return result;
}

absl::Status MeteredParamClient::Gradients(const RequestHeader& header, const torch::Tensor& key_grads,
                                           const torch::Tensor& value_grads,
                                           const torch::Tensor& gate_grads) {
  const torch::Tensor k = Stage(key_grads), v = Stage(value_grads), g = Stage(gate_grads);
  meter_->bytes_sent.fetch_add(TensorBytes(k) + TensorBytes(v) + TensorBytes(g),
                               std::memory_order_relaxed);
  return Timed([&] { return inner_->Gradients(header, k, v, g); });
}

absl::StatusOr<double> MeteredParamClient::GradNorm(uint64_t step) {
  return Timed([&] { return inner_->GradNorm(step); });
}

absl::StatusOr<std::vector<std::pair<uint32_t, double>>> MeteredParamClient::LayerGradNorms(
    uint64_t step) {
  return Timed([&] { return inner_->LayerGradNorms(step); });
}

absl::Status MeteredParamClient::Step(uint64_t step, double lr, double clip_factor) {
  return Timed([&] { return inner_->Step(step, lr, clip_factor); });
}

absl::StatusOr<std::string> MeteredParamClient::SaveCheckpoint(const std::string& directory) {
  return Timed([&] { return inner_->SaveCheckpoint(directory); });
}

absl::Status MeteredParamClient::RestoreCheckpoint(const std::string& path) {
  return Timed([&] { return inner_->RestoreCheckpoint(path); });
}

absl::StatusOr<ServerInfo> MeteredParamClient::Describe() {
  return Timed([&] { return inner_->Describe(); });
}

absl::StatusOr<uint64_t> MeteredParamClient::RestartStep() {
  return Timed([&] { return inner_->RestartStep(); });
}

// --------------------------------------------------------------------------------------------
// MeterReader

MeterReader::MeterReader(const ClientMeter* meter) : meter_(meter) { Take(); }

ServerTimings MeterReader::Take() {
  const int64_t wait = meter_->wait_nanos.load(std::memory_order_relaxed);
  const int64_t transfer = meter_->transfer_nanos.load(std::memory_order_relaxed);
  const int64_t sent = meter_->bytes_sent.load(std::memory_order_relaxed);
  const int64_t received = meter_->bytes_received.load(std::memory_order_relaxed);
  ServerTimings out;
  out.wait_seconds = static_cast<double>(wait - wait_nanos_) * 1e-9;
  out.transfer_seconds = static_cast<double>(transfer - transfer_nanos_) * 1e-9;
  out.bytes_sent = sent - sent_;
  out.bytes_received = received - received_;
  wait_nanos_ = wait;
  transfer_nanos_ = transfer;
  sent_ = sent;
  received_ = received;
  return out;
}

// --------------------------------------------------------------------------------------------
// WorkerMetrics

WorkerMetrics::WorkerMetrics(metrics::Registry* r, torch::Device device)
    : device_(device),
      steps_(r->AddCounter("meft_worker_steps_total", "Optimizer steps finished by this process")),
      step_(r->AddGauge("meft_worker_step", "Optimizer step reached (counts resumed steps)")),
      tokens_(r->AddCounter("meft_worker_tokens_total",
                            "Non-padding tokens in the micro-batches trained on")),
      tokens_per_second_(r->AddGauge("meft_worker_tokens_per_second",
                                     "Tokens per second of the last optimizer step")),
      loss_(r->AddGauge("meft_worker_loss", "Mean training loss of the last optimizer step")),
      grad_norm_(r->AddGauge("meft_worker_grad_norm",
                             "Global adapter gradient norm of the last step, before clipping")),
      learning_rate_(r->AddGauge("meft_worker_learning_rate", "Learning rate of the last step")),
      step_seconds_(r->AddHistogram("meft_worker_step_seconds", "Wall time of one optimizer step",
                                    metrics::ExponentialBuckets(0.001, 2, 20))),
      compute_seconds_(r->AddCounter("meft_worker_step_phase_seconds_total",
                                     "Optimizer step wall time by phase: compute on the device, "
                                     "wait for the parameter server, host/device transfer",
                                     {{"phase", "compute"}})),
      wait_seconds_(r->AddCounter("meft_worker_step_phase_seconds_total", "", {{"phase", "wait"}})),
      transfer_seconds_(
          r->AddCounter("meft_worker_step_phase_seconds_total", "", {{"phase", "transfer"}})),
      bytes_sent_(r->AddCounter("meft_worker_bytes_total",
                                "Tensor payload bytes exchanged with the parameter server",
                                {{"direction", "sent"}})),
      bytes_received_(r->AddCounter("meft_worker_bytes_total", "", {{"direction", "received"}})),
      gpu_allocated_(r->AddGauge("meft_worker_gpu_memory_bytes",
                                 "CUDA caching allocator: bytes allocated now and the peak "
                                 "(0 on a CPU device)",
                                 {{"kind", "allocated"}})),
      gpu_peak_(r->AddGauge("meft_worker_gpu_memory_bytes", "", {{"kind", "peak"}})) {}

void WorkerMetrics::RecordStep(const StepStats& stats, const ServerTimings& server) {
  const double wait = std::max(0.0, server.wait_seconds);
  const double transfer = std::max(0.0, server.transfer_seconds);
  steps_.Increment();
  step_.Set(static_cast<double>(stats.step));
  tokens_.Increment(static_cast<double>(stats.tokens));
  tokens_per_second_.Set(stats.seconds > 0 ? static_cast<double>(stats.tokens) / stats.seconds
                                           : 0.0);
  loss_.Set(stats.loss);
  grad_norm_.Set(stats.grad_norm);
  learning_rate_.Set(stats.lr);
  step_seconds_.Observe(stats.seconds);
  compute_seconds_.Increment(std::max(0.0, stats.seconds - wait - transfer));
  wait_seconds_.Increment(wait);
  transfer_seconds_.Increment(transfer);
  bytes_sent_.Increment(static_cast<double>(server.bytes_sent));
  bytes_received_.Increment(static_cast<double>(server.bytes_received));
  const std::optional<DeviceMemory> memory = CudaAllocatorMemory(device_);
  gpu_allocated_.Set(memory ? static_cast<double>(memory->allocated_bytes) : 0.0);
  gpu_peak_.Set(memory ? static_cast<double>(memory->peak_bytes) : 0.0);
}

}  // namespace meft::worker
