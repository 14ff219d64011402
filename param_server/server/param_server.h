#pragma once

// The parameter server's domain logic on plain structs: validation of every request field,
// selection, the per-step lookup cache, gradient accumulation, the squared-norm query, the
// lazy Adam step, and checkpoints. rpc/ translates protobuf messages to and from these types.
//
// Thread safety: every public method may be called concurrently. Per layer, a shared mutex
// guards the parameters and Adam state (shared by lookups and checkpoint writes, exclusive for
// Step and restore) and a mutex guards the accumulators, the lookup cache and the layer's
// optimizer step. Lock order: within a layer, parameters before state; across layers, a thread
// holding locks of some layers only takes locks of higher layers. Checkpoint saves are
// serialised by their own mutex, taken before any layer lock.
//
// Ordering rule (DESIGN §3): a training lookup of step s is answered only when the layer's
// optimizer step is s; a lookup that arrives early waits (up to step_wait_seconds) for Step(s-1)
// to finish, so all lookups of one optimizer step see one parameter version. Step updates the
// layers one at a time in ascending order (the order the next forward needs them) and answers a
// layer's waiting lookups as soon as that layer is done, while it updates the later ones.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <shared_mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/metrics/metrics.h"
#include "common/wire/tensor_codec.h"
#include "param_server/checkpoint/checkpoint.h"
#include "param_server/server/answer_sink.h"
#include "param_server/kernels/dot.h"
#include "param_server/optim/sparse_adam.h"
#include "param_server/routing/selector.h"
#include "param_server/store/layer_store.h"

namespace meft::server {

enum class Mode { kPerToken, kUnion };

struct ServerOptions {
  std::vector<uint32_t> layers = {0, 1};  // decoder layers this server owns
  int64_t rows = 4096;                    // r: key-value pairs per layer
  int64_t dim = 64;                       // d: hidden size of the model
  int64_t experts = 0;                    // E; 0 = store::DefaultExperts(rows)
  routing::SelectorOptions selector;
  Mode mode = Mode::kPerToken;
  wire::DType wire_dtype = wire::DType::kBf16;  // dtype of rows sent when the request says none
  store::InitOptions init;
  optim::AdamOptions adam;
  int64_t max_tokens = 8192;       // largest T of one lookup
  // Largest lookup answer sent inside a message (the transport's limit); 0 = any. Answers
  // written into LookupCall::output do not count.
  int64_t max_response_bytes = 0;
  // Where SaveCheckpoint writes by default. When set, every checkpoint path a request names must
  // lie inside it (relative paths are taken relative to it). "" = none: requests must name a path.
  std::string checkpoint_dir;
  double step_wait_seconds = 30.0;    // how long an early lookup waits for the previous Step
  int64_t max_pending_lookups = 256;  // per layer: training lookups awaiting their gradients
  // All layers: bytes training lookups awaiting their gradients may hold (each is charged
  // LookupCacheBytesBound of its tokens); 0 = auto, two micro-batches of max_tokens per layer
  // (server/memory_budget.h).
  int64_t lookup_cache_bytes = 0;
  std::optional<kernels::Isa> isa;    // kernels to use; unset = the best the CPU supports
  // Called by Step after each layer's update is applied and its waiting lookups are woken, with no
  // lock held (layer id, the step applied). For tests and tracing; may be empty.
  std::function<void(uint32_t layer, uint64_t step)> on_layer_stepped;
};

struct RequestHeader {
  uint64_t step = 0;
  uint32_t micro_step = 0;
  uint32_t layer = 0;
};

struct LookupCall {
  RequestHeader header;
  wire::TensorView x;                          // [T, d] fp32 or bf16
  std::optional<wire::TensorView> token_mask;  // [T] uint8 of 0/1
  bool training = false;
  std::optional<wire::DType> row_dtype;  // fp32 or bf16
  // Polled while the lookup waits for the previous Step; true abandons the wait (CANCELLED).
  std::function<bool()> is_cancelled;
  // Memory of the caller's that the answer may be written into (may be null): when the sink
  // takes the whole layout, each tensor is encoded straight into it and the reply's tensors carry
  // placed_offset instead of bytes, and the server's message limit does not apply. Otherwise the
  // answer is built in the reply's own bytes.
  std::shared_ptr<AnswerSink> answer_sink;
};

struct LookupReply {
  wire::Tensor row_ids;        // [|S|] int32
  wire::Tensor keys;           // [|S|, d]
  wire::Tensor values;         // [|S|, d]
  wire::Tensor token_rows;     // [T, top_k] int32 (per_token)
  wire::Tensor token_gates;    // [T, top_k] fp32 (per_token)
  wire::Tensor token_experts;  // [T, top_k] int32 (gated per_token)
  wire::Tensor expert_ids;     // [n_e] int32 (gated per_token)
  wire::Tensor router_rows;    // [n_e, d] (gated per_token)
  uint32_t rows_dropped = 0;
  bool replayed = false;
};

struct GradientsCall {
  RequestHeader header;
  wire::TensorView key_grads;                  // [|S|, d] fp32 or bf16
  wire::TensorView value_grads;                // [|S|, d] fp32 or bf16
  std::optional<wire::TensorView> gate_grads;  // [T, top_k] fp32, gated per_token only
};

struct GradientsReply {
  bool duplicate = false;
  uint64_t rows_accumulated = 0;
};

struct GradNormReply {
  double squared_norm = 0.0;
  std::vector<uint32_t> layers;
  std::vector<double> layer_squared_norms;
};

struct StepCall {
  uint64_t step = 0;
  double lr = 0.0;
  double clip_factor = 1.0;
  std::vector<uint32_t> layers;  // empty = all, ascending
};

struct StepReply {
  bool already_applied = false;
  uint64_t rows_updated = 0;
  uint64_t router_rows_updated = 0;
  uint64_t server_step = 0;
};

struct CheckpointReply {
  std::string path;
  uint64_t step = 0;
  uint64_t bytes_written = 0;
};

struct ServerInfo {
  std::vector<uint32_t> layers;
  int64_t rows = 0, dim = 0, experts = 0, n_probe = 0, top_k = 0, max_rows = 0, max_tokens = 0;
  Mode mode = Mode::kPerToken;
  bool gated = true;
  wire::DType wire_dtype = wire::DType::kBf16;
  uint64_t step = 0;
  optim::AdamOptions adam;
  std::string isa;
};

struct CachedLookup;  // a training lookup kept for its gradients (param_server.cc)

class ParamServer {
 public:
  // Validates `options`, allocates and initialises every owned layer. `registry` (may be null)
  // receives the server's meft_ps_* metrics and must outlive the server.
  static absl::StatusOr<std::unique_ptr<ParamServer>> Create(const ServerOptions& options,
                                                             metrics::Registry* registry);
  ~ParamServer();
  ParamServer(const ParamServer&) = delete;
  ParamServer& operator=(const ParamServer&) = delete;

  absl::StatusOr<LookupReply> Lookup(const LookupCall& call);
  absl::StatusOr<GradientsReply> Gradients(const GradientsCall& call);
  absl::StatusOr<GradNormReply> GradNorm(uint64_t step, const std::vector<uint32_t>& layers);
  absl::StatusOr<StepReply> Step(const StepCall& call);
  // Writes checkpoint-<step>/ under `directory` (or options.checkpoint_dir when empty).
  // FAILED_PRECONDITION when the owned layers are at different steps (a Step is half done).
  absl::StatusOr<CheckpointReply> SaveCheckpoint(const std::string& directory);
  // Loads a checkpoint folder (or the newest under a root folder) after checking it matches this
  // server's layers and shapes; all or nothing. Clears every cache and accumulator. With
  // `confine` (requests), the path must lie inside checkpoint_dir when one is configured; the
  // operator's --restore passes false.
  absl::StatusOr<CheckpointReply> RestoreCheckpoint(const std::string& path, bool confine = true);
  ServerInfo Info() const;

  // Wakes every lookup waiting for a Step and makes it (and later waits) fail with UNAVAILABLE,
  // so a shutting-down gRPC server is not held up by them. Irreversible.
  void BeginShutdown();

  // A hash of every byte of server state (parameters, Adam state, accumulators, caches, steps).
  // For tests: a rejected request must leave it unchanged.
  uint64_t StateDigest() const;

 private:
  struct Layer;
  struct Metrics;
  class CacheCharge;
  ParamServer(const ServerOptions& options, const kernels::Kernels& kernels,
              metrics::Registry* registry);

  // Lookup's stages, in order: DecodeLookup checks and decodes the request without touching
  // state; a training lookup then waits at the step gate (AwaitStep) and is admitted to the
  // layer's lookup cache (AdmitToCache); the rows are selected (routing::Select) unless the lookup
  // is a replay; EncodeAnswer writes the answer; the lookup is cached for its gradients; and
  // RecordLookup counts it.
  //
  // The decoded x and mask, in the form the cache keeps them; `*row_dtype` gets the answer's row
  // dtype.
  absl::StatusOr<std::shared_ptr<CachedLookup>> DecodeLookup(const LookupCall& call,
                                                             wire::DType* row_dtype) const;
  // Waits, holding only the layer's state_mu (so Step can run), until `layer` reaches the
  // lookup's step. FAILED_PRECONDITION for a lookup more than one step ahead or past `deadline`,
  // UNAVAILABLE after BeginShutdown, CANCELLED when call.is_cancelled says so.
  absl::Status AwaitStep(Layer* layer, const LookupCall& call,
                         std::chrono::steady_clock::time_point deadline) const;
  // With the layer at the lookup's step and its state_mu held: the lookup served before under
  // the same (step, micro_step), to replay (ALREADY_EXISTS if its x differed); or null after
  // reserving the new lookup's cache charge in `charge` (RESOURCE_EXHAUSTED when the layer holds
  // max_pending_lookups or the budget is spent). FAILED_PRECONDITION when its gradients were
  // already applied.
  absl::StatusOr<std::shared_ptr<const CachedLookup>> AdmitToCache(Layer* layer,
                                                                   const RequestHeader& header,
                                                                   CachedLookup* lookup,
                                                                   CacheCharge* charge);
  // The answer for `selection` from `store` (its params_mu held shared), into the call's answer
  // sink when it takes the layout; RESOURCE_EXHAUSTED for an inline answer over
  // max_response_bytes.
  absl::StatusOr<LookupReply> EncodeAnswer(const store::LayerStore& store,
                                           const routing::Selection& selection,
                                           const LookupCall& call, wire::DType row_dtype,
                                           int64_t num_tokens) const;
  void RecordLookup(const routing::Selection& selection, int64_t experts, bool replayed,
                    std::chrono::steady_clock::time_point start) const;

  absl::StatusOr<Layer*> FindLayer(uint32_t id, absl::string_view field) const;
  absl::StatusOr<std::vector<Layer*>> ResolveLayers(const std::vector<uint32_t>& ids,
                                                    absl::string_view field) const;
  // Resolves a checkpoint path named by a request (see ServerOptions::checkpoint_dir).
  absl::StatusOr<std::string> ResolveCheckpointPath(const std::string& path,
                                                    absl::string_view field) const;
  checkpoint::AdapterConfig MakeAdapterConfig() const;
  // The lookup cache's byte budget (ServerOptions::lookup_cache_bytes): a charge taken before a
  // training lookup is selected and returned when it leaves the cache, or at once when it is not
  // cached after all.
  class CacheCharge {
   public:
    explicit CacheCharge(ParamServer* server) : server_(server) {}
    ~CacheCharge() {
      if (bytes_ > 0) server_->ReleaseCacheBytes(bytes_);
    }
    CacheCharge(const CacheCharge&) = delete;
    CacheCharge& operator=(const CacheCharge&) = delete;
    absl::Status Reserve(int64_t bytes);
    void Keep() { bytes_ = 0; }
    int64_t bytes() const { return bytes_; }

   private:
    ParamServer* server_;
    int64_t bytes_ = 0;
  };
  void ReleaseCacheBytes(int64_t bytes);
  // Empties a layer's lookup cache and returns its charges; the caller holds its state_mu.
  void ClearCache(Layer* layer);

  const ServerOptions options_;
  const kernels::Kernels& kernels_;
  std::vector<std::unique_ptr<Layer>> layers_;  // ascending layer id; fixed after Create
  // Seed that initialised the current parameters (the checkpoint's after a restore).
  std::atomic<uint64_t> adapter_seed_;
  std::atomic<bool> shutting_down_{false};
  const int64_t lookup_cache_budget_;
  std::atomic<int64_t> lookup_cache_bytes_{0};  // charged by cached lookups, all layers
  std::mutex save_mu_;  // serialises checkpoint writes
  std::unique_ptr<Metrics> metrics_;
};

}  // namespace meft::server
