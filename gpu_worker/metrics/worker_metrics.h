#pragma once

// The worker's Prometheus metrics (DESIGN §6): step time split into compute, waiting for the
// parameter server and host staging of tensors, tokens per second, loss, bytes moved, and device
// memory (CUDA allocator) next to the registry's host RSS (meft_process_resident_memory_bytes).
//
// Two pieces: MeteredParamClient, a ParamClient decorator that measures every server call (time
// blocked in it, time staging tensors on the host, payload bytes both ways) into a ClientMeter;
// and WorkerMetrics, which turns the trainer's per-step StepStats plus the meter's readings into
// meft_worker_* series.

#include <torch/types.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/metrics/metrics.h"
#include "gpu_worker/client/param_client.h"
#include "gpu_worker/train/trainer.h"

namespace meft::worker {

// Payload bytes of a tensor: numel * element size; 0 when undefined.
int64_t TensorBytes(const torch::Tensor& t);
// Payload bytes of a lookup answer (every defined tensor in it).
int64_t LookupBytes(const LookupReply& result);

// Totals since construction, updated by MeteredParamClient from any thread.
struct ClientMeter {
  std::atomic<int64_t> calls{0};
  std::atomic<int64_t> bytes_sent{0};      // tensors sent (queries, gradients)
  std::atomic<int64_t> bytes_received{0};  // tensors received (rows, gates, router rows)
  std::atomic<int64_t> wait_nanos{0};      // inside the wrapped client's calls
  std::atomic<int64_t> transfer_nanos{0};  // copying device tensors to the host before a call
};

// Forwards every call to `inner` and adds to `meter`: the call's duration, the time to stage
// device tensors on the host (done here so it can be told apart; a no-op for CPU tensors), and
// payload bytes. `meter` must outlive this client. As thread-safe as `inner`.
class MeteredParamClient : public ParamClient {
 public:
  MeteredParamClient(std::unique_ptr<ParamClient> inner, ClientMeter* meter);

  absl::StatusOr<LookupReply> Lookup(const RequestHeader& header, const torch::Tensor& x,
                                      const torch::Tensor& token_mask, bool training) override;
  absl::Status Gradients(const RequestHeader& header, const torch::Tensor& key_grads,
                         const torch::Tensor& value_grads,
                         const torch::Tensor& gate_grads) override;
  absl::StatusOr<double> GradNorm(uint64_t step) override;
  absl::StatusOr<std::vector<std::pair<uint32_t, double>>> LayerGradNorms(uint64_t step) override;
  absl::Status Step(uint64_t step, double lr, double clip_factor) override;
  absl::StatusOr<std::string> SaveCheckpoint(const std::string& directory) override;
  absl::Status RestoreCheckpoint(const std::string& path) override;
  absl::StatusOr<ServerInfo> Describe() override;
  absl::StatusOr<uint64_t> RestartStep() override;

 private:
  // Host copy of `t` (itself when undefined or already on the CPU), timed into the meter.
  torch::Tensor Stage(const torch::Tensor& t);
  template <typename F>
  auto Timed(F&& call);

  std::unique_ptr<ParamClient> inner_;
  ClientMeter* meter_;
};

// How the training thread spent one optimizer step on the server's account.
struct ServerTimings {
  double wait_seconds = 0.0;      // blocked on the parameter server
  double transfer_seconds = 0.0;  // moving tensors between device and host
  int64_t bytes_sent = 0;
  int64_t bytes_received = 0;
};

// Reads a ClientMeter as per-step differences: each Take() returns what was added since the
// previous one. Not thread-safe (one training thread).
class MeterReader {
 public:
  explicit MeterReader(const ClientMeter* meter);
  ServerTimings Take();

 private:
  const ClientMeter* meter_;
  int64_t wait_nanos_ = 0, transfer_nanos_ = 0, sent_ = 0, received_ = 0;
};

// Current and peak bytes of the CUDA caching allocator on `device`; nullopt when this LibTorch
// has no CUDA or `device` is not a CUDA device. Defined in gpu_memory_cuda.cc / gpu_memory_none.cc.
struct DeviceMemory {
  int64_t allocated_bytes = 0;
  int64_t peak_bytes = 0;
};
std::optional<DeviceMemory> CudaAllocatorMemory(const torch::Device& device);
// Makes the peak of CudaAllocatorMemory(device) restart from the bytes allocated now, so a later
// reading is the peak of what ran in between (benchmarks measure one configuration at a time).
// Returns false, doing nothing, when this LibTorch has no CUDA or `device` is not a CUDA device.
bool ResetCudaAllocatorPeak(const torch::Device& device);

// The meft_worker_* series in `registry`, which must outlive this object. Thread-safety: one
// caller of RecordStep at a time; scrapes may run concurrently.
class WorkerMetrics {
 public:
  WorkerMetrics(metrics::Registry* registry, torch::Device device);

  // One finished optimizer step. compute = stats.seconds - wait - transfer (at least 0); the
  // tokens-per-second gauge is this step's stats.tokens / stats.seconds.
  void RecordStep(const StepStats& stats, const ServerTimings& server);

 private:
  torch::Device device_;
  metrics::Counter& steps_;
  metrics::Gauge& step_;
  metrics::Counter& tokens_;
  metrics::Gauge& tokens_per_second_;
  metrics::Gauge& loss_;
  metrics::Gauge& grad_norm_;
  metrics::Gauge& learning_rate_;
  metrics::Histogram& step_seconds_;
  metrics::Counter& compute_seconds_;
  metrics::Counter& wait_seconds_;
  metrics::Counter& transfer_seconds_;
  metrics::Counter& bytes_sent_;
  metrics::Counter& bytes_received_;
  metrics::Gauge& gpu_allocated_;
  metrics::Gauge& gpu_peak_;
};

}  // namespace meft::worker
