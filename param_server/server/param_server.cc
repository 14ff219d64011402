#include "param_server/server/param_server.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <set>
#include <tuple>
#include <type_traits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "common/wire/lookup_layout.h"
#include "param_server/server/memory_budget.h"
#include "spdlog/spdlog.h"

namespace meft::server {
namespace {

using Clock = std::chrono::steady_clock;
using CacheKey = std::pair<uint64_t, uint32_t>;  // (step, micro_step)

std::string Where(const RequestHeader& h) {
  return absl::StrCat("(step ", h.step, ", micro_step ", h.micro_step, ", layer ", h.layer, ")");
}

// FNV-1a, 64 bit.
struct Hasher {
  uint64_t h = 0xcbf29ce484222325ull;
  void Add(const void* data, size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  }
  template <typename T>
  void AddVec(const std::vector<T>& v) {
    const uint64_t n = v.size();
    Add(&n, sizeof(n));
    Add(v.data(), v.size() * sizeof(T));
  }
  template <typename T>
  void AddPod(const T& v) {
    // Padding bytes are indeterminate: hashing them makes equal states hash differently.
    static_assert(std::has_unique_object_representations_v<T>, "T has padding; hash its members");
    Add(&v, sizeof(v));
  }
};

void HashBlock(const store::ParamBlock& b, Hasher* h) {
  h->AddVec(b.param);
  h->AddVec(b.exp_avg);
  h->AddVec(b.exp_avg_sq);
  h->AddVec(b.touched);
  h->AddVec(b.touched_rows);
  h->AddPod(b.adam_step);
  // Only touched rows of the accumulator carry meaning.
  for (int32_t r : b.touched_rows)
    h->Add(b.grad.data() + int64_t{r} * b.dim, b.dim * sizeof(float));
}

// Where the tensors of one answer go: into the call's AnswerSink when it takes the whole layout,
// else into each tensor's own bytes.
class AnswerWriter {
 public:
  AnswerWriter(AnswerSink* sink, std::vector<wire::AnswerTensorLayout> layout)
      : layout_(std::move(layout)) {
    if (sink != nullptr && sink->Reserve(layout_)) sink_ = sink;
  }

  bool placed() const { return sink_ != nullptr; }

  // Makes `t` a present tensor of `dtype` and `shape` and returns where its `bytes` bytes go.
  char* Start(wire::Tensor* t, wire::DType dtype, std::vector<int64_t> shape, uint64_t bytes) {
    *t = wire::Tensor{true, dtype, std::move(shape), {}};
    if (sink_ == nullptr) {
      t->data.resize(bytes);
      return t->data.data();
    }
    // The layout the sink accepted is the only thing that keeps these writes inside memory
    // another process offered: a tensor it did not size is a bug, never written.
    if (index_ >= layout_.size() || bytes != layout_[index_].bytes) {
      spdlog::critical("AnswerWriter: tensor {} of {} bytes was not in the reserved layout", index_,
                       bytes);
      std::abort();
    }
    uint64_t offset = 0;
    char* dst = sink_->Place(index_++, &offset);
    t->placed_offset = offset;
    t->placed_bytes = bytes;
    return dst;
  }

  void Int32(wire::Tensor* t, std::span<const int32_t> values, std::vector<int64_t> shape) {
    char* dst = Start(t, wire::DType::kInt32, std::move(shape), values.size_bytes());
    if (!values.empty()) std::memcpy(dst, values.data(), values.size_bytes());
  }

 private:
  const std::vector<wire::AnswerTensorLayout> layout_;
  AnswerSink* sink_ = nullptr;
  size_t index_ = 0;  // tensors started so far
};

const char* ModeName(Mode m) { return m == Mode::kPerToken ? "per_token" : "union"; }

}  // namespace

// What a training lookup leaves behind for its gradients.
struct CachedLookup {
  int64_t num_tokens = 0;
  std::vector<float> x;       // [T, d] as decoded
  std::vector<uint8_t> mask;  // [T] or empty
  routing::Selection selection;
  int64_t charged_bytes = 0;  // against the lookup cache budget while cached
};

struct ParamServer::Layer {
  uint32_t id = 0;
  // Guards store.{keys,values,router}.{param,exp_avg,exp_avg_sq,adam_step}.
  mutable std::shared_mutex params_mu;
  // Guards the accumulators (grad, touched, touched_rows), store.step, cache, done, last_step.
  mutable std::mutex state_mu;
  std::condition_variable step_cv;  // signalled when store.step changes
  store::LayerStore store;
  std::map<CacheKey, std::shared_ptr<const CachedLookup>> cache;  // lookups awaiting gradients
  std::set<CacheKey> done;  // lookups of the current step whose gradients were applied
  StepReply last_step;      // this layer's part of the latest Step, for replays
};

struct ParamServer::Metrics {
  metrics::Histogram* lookup_seconds = nullptr;
  metrics::Counter* lookups = nullptr;
  metrics::Counter* lookups_replayed = nullptr;
  metrics::Counter* rows_served = nullptr;
  metrics::Histogram* unique_rows = nullptr;
  metrics::Counter* rows_dropped = nullptr;
  metrics::Gauge* expert_imbalance = nullptr;
  metrics::Counter* gradient_calls = nullptr;
  metrics::Histogram* step_seconds = nullptr;
  metrics::Counter* rows_updated = nullptr;
  metrics::Counter* router_rows_updated = nullptr;
  metrics::Gauge* optimizer_step = nullptr;
  metrics::Counter* lookups_discarded = nullptr;
  metrics::Histogram* checkpoint_seconds = nullptr;
  metrics::Gauge* lookup_cache_bytes = nullptr;
};

ParamServer::ParamServer(const ServerOptions& options, const kernels::Kernels& kernels,
                         metrics::Registry* registry)
    : options_(options),
      kernels_(kernels),
      adapter_seed_(options.init.seed),
      lookup_cache_budget_(LookupCacheBudget(options)),
      metrics_(std::make_unique<Metrics>()) {
  if (registry == nullptr) return;
  Metrics& m = *metrics_;
  m.lookup_seconds = &registry->AddHistogram("meft_ps_lookup_seconds",
                                             "Time to select and gather rows for one lookup",
                                             metrics::ExponentialBuckets(1e-4, 2.0, 18));
  m.lookups = &registry->AddCounter("meft_ps_lookups_total", "Lookups answered");
  m.lookups_replayed = &registry->AddCounter("meft_ps_lookups_replayed_total",
                                             "Lookups answered from the per-step cache");
  m.rows_served =
      &registry->AddCounter("meft_ps_rows_served_total", "Key-value rows sent to workers");
  m.unique_rows = &registry->AddHistogram("meft_ps_unique_rows_per_lookup",
                                          "|S|, unique rows selected per lookup",
                                          metrics::ExponentialBuckets(16, 2.0, 16));
  m.rows_dropped = &registry->AddCounter("meft_ps_rows_dropped_total",
                                         "Rows removed from lookups by the max_rows cap");
  m.expert_imbalance =
      &registry->AddGauge("meft_ps_expert_load_imbalance",
                          "Max over mean of tokens per expert in the latest lookup (1 = balanced)");
  m.gradient_calls =
      &registry->AddCounter("meft_ps_gradient_calls_total", "Gradient requests applied");
  m.step_seconds = &registry->AddHistogram("meft_ps_optimizer_step_seconds",
                                           "Time of one Adam step over the requested layers",
                                           metrics::ExponentialBuckets(1e-4, 2.0, 18));
  m.rows_updated =
      &registry->AddCounter("meft_ps_rows_updated_total", "Key-value rows updated by Adam");
  m.router_rows_updated =
      &registry->AddCounter("meft_ps_router_rows_updated_total", "Router rows updated by Adam");
  m.optimizer_step = &registry->AddGauge("meft_ps_optimizer_step",
                                         "Optimizer steps applied (lowest over owned layers)");
  m.lookups_discarded =
      &registry->AddCounter("meft_ps_lookups_discarded_total",
                            "Training lookups whose gradients never arrived before their Step");
  m.lookup_cache_bytes = &registry->AddGauge(
      "meft_ps_lookup_cache_bytes",
      "Bytes charged by training lookups awaiting their gradients, against lookup_cache_mb");
  m.checkpoint_seconds =
      &registry->AddHistogram("meft_ps_checkpoint_seconds", "Time to write one checkpoint",
                              metrics::ExponentialBuckets(1e-3, 2.0, 16));
}

ParamServer::~ParamServer() = default;

absl::StatusOr<std::unique_ptr<ParamServer>> ParamServer::Create(const ServerOptions& options,
                                                                 metrics::Registry* registry) {
  if (options.layers.empty()) return absl::InvalidArgumentError("layers: empty");
  std::vector<uint32_t> sorted = options.layers;
  std::sort(sorted.begin(), sorted.end());
  if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) {
    return absl::InvalidArgumentError("layers: duplicate layer id");
  }
  if (options.rows <= 0) return absl::InvalidArgumentError("rows: must be positive");
  if (options.dim <= 0) return absl::InvalidArgumentError("dim: must be positive");
  ServerOptions opts = options;
  opts.layers = sorted;
  if (opts.experts == 0) {
    opts.experts = store::DefaultExperts(opts.rows);
    if (opts.experts == 1 && opts.rows > 1) {
      spdlog::warn(
          "rows = {} has no divisor near 4*ceil(sqrt(r)): E = 1, so every lookup scans "
          "all keys (the brute-force ablation); pick r with a divisor near {} or set "
          "experts",
          opts.rows, 4 * static_cast<int64_t>(std::ceil(std::sqrt(opts.rows))));
    }
  }
  if (opts.experts < 0 || opts.rows % opts.experts != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("experts: ", opts.experts, " does not divide rows (", opts.rows, ")"));
  }
  if (opts.selector.n_probe <= 0) return absl::InvalidArgumentError("n_probe: must be positive");
  if (opts.selector.top_k <= 0) return absl::InvalidArgumentError("top_k: must be positive");
  if (opts.selector.max_rows < 0) return absl::InvalidArgumentError("max_rows: must be >= 0");
  if (opts.max_tokens <= 0) return absl::InvalidArgumentError("max_tokens: must be positive");
  if (opts.wire_dtype != wire::DType::kFp32 && opts.wire_dtype != wire::DType::kBf16) {
    return absl::InvalidArgumentError("wire_dtype: must be fp32 or bf16");
  }
  const optim::AdamOptions& a = opts.adam;
  if (!(a.beta1 >= 0 && a.beta1 < 1)) return absl::InvalidArgumentError("beta1: must be in [0, 1)");
  if (!(a.beta2 >= 0 && a.beta2 < 1)) return absl::InvalidArgumentError("beta2: must be in [0, 1)");
  if (!(a.eps > 0)) return absl::InvalidArgumentError("eps: must be positive");
  if (!(a.weight_decay >= 0)) return absl::InvalidArgumentError("weight_decay: must be >= 0");
  if (opts.isa.has_value() && !kernels::IsaSupported(*opts.isa)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "isa: ", std::string(kernels::ForIsa(*opts.isa).name), " is not supported by this CPU"));
  }
  const kernels::Kernels& k = opts.isa.has_value() ? kernels::ForIsa(*opts.isa) : kernels::Best();

  std::unique_ptr<ParamServer> server(new ParamServer(opts, k, registry));
  for (uint32_t id : opts.layers) {
    auto layer = std::make_unique<Layer>();
    layer->id = id;
    MEFT_ASSIGN_OR_RETURN(
        layer->store, store::LayerStore::Create(id, opts.rows, opts.dim, opts.experts, opts.init));
    server->layers_.push_back(std::move(layer));
  }
  if (server->metrics_->optimizer_step) server->metrics_->optimizer_step->Set(0);
  return server;
}

absl::StatusOr<ParamServer::Layer*> ParamServer::FindLayer(uint32_t id,
                                                           absl::string_view field) const {
  auto it = std::lower_bound(layers_.begin(), layers_.end(), id,
                             [](const std::unique_ptr<Layer>& l, uint32_t v) { return l->id < v; });
  if (it == layers_.end() || (*it)->id != id) {
    return absl::NotFoundError(absl::StrCat(field, ": layer ", id,
                                            " is not served here (this server owns layers ",
                                            absl::StrJoin(options_.layers, ","), ")"));
  }
  return it->get();
}

absl::StatusOr<std::vector<ParamServer::Layer*>> ParamServer::ResolveLayers(
    const std::vector<uint32_t>& ids, absl::string_view field) const {
  std::vector<Layer*> out;
  if (ids.empty()) {
    for (const auto& l : layers_) out.push_back(l.get());
    return out;
  }
  std::set<uint32_t> seen;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (!seen.insert(ids[i]).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, "[", i, "]: layer ", ids[i], " listed twice"));
    }
    MEFT_ASSIGN_OR_RETURN(Layer * l, FindLayer(ids[i], absl::StrCat(field, "[", i, "]")));
    out.push_back(l);
  }
  return out;
}

absl::StatusOr<LookupReply> ParamServer::Lookup(const LookupCall& call) {
  const auto start = Clock::now();
  const RequestHeader& h = call.header;
  MEFT_ASSIGN_OR_RETURN(Layer * layer, FindLayer(h.layer, "header.layer"));
  // Validate and decode everything before touching state.
  wire::DType row_dtype = options_.wire_dtype;
  MEFT_ASSIGN_OR_RETURN(const std::shared_ptr<CachedLookup> cached, DecodeLookup(call, &row_dtype));

  const CacheKey key{h.step, h.micro_step};
  CacheCharge cache_charge(this);  // returned unless the lookup is cached
  std::shared_ptr<const CachedLookup> replay;  // the lookup served before, for a replay
  std::shared_lock params_lock(layer->params_mu, std::defer_lock);
  if (call.training) {
    const auto deadline =
        Clock::now() + std::chrono::duration_cast<Clock::duration>(
                           std::chrono::duration<double>(options_.step_wait_seconds));
    for (;;) {
      MEFT_RETURN_IF_ERROR(AwaitStep(layer, call, deadline));
      params_lock.lock();
      std::lock_guard state_lock(layer->state_mu);
      if (layer->store.step != h.step) {
        if (layer->store.step > h.step) {
          return absl::FailedPreconditionError(absl::StrCat(
              "header.step: lookup ", Where(h),
              " is for a step already applied; the server is at step ", layer->store.step));
        }
        params_lock.unlock();
        continue;  // a restore moved the layer back; wait again
      }
      MEFT_ASSIGN_OR_RETURN(replay, AdmitToCache(layer, h, cached.get(), &cache_charge));
      break;
    }
  } else {
    params_lock.lock();
  }

  const store::LayerStore& st = layer->store;
  const bool replayed = replay != nullptr;
  if (!replayed) {
    cached->selection = routing::Select(st, cached->x.data(), cached->num_tokens,
                                        cached->mask.empty() ? nullptr : cached->mask.data(),
                                        options_.selector, kernels_);
  }
  const routing::Selection& sel = replayed ? replay->selection : cached->selection;
  MEFT_ASSIGN_OR_RETURN(LookupReply reply,
                        EncodeAnswer(st, sel, call, row_dtype, cached->num_tokens));
  reply.replayed = replayed;
  params_lock.unlock();

  if (call.training && !replayed) {
    std::lock_guard state_lock(layer->state_mu);
    // A concurrent identical lookup may have inserted first (either answer is the same), or even
    // had its gradients applied already: then there is nothing left to keep.
    if (layer->store.step == h.step && !layer->done.count(key) &&
        layer->cache.emplace(key, cached).second) {
      cache_charge.Keep();
    }
  }
  RecordLookup(sel, st.experts, replayed, start);
  return reply;
}

absl::StatusOr<std::shared_ptr<CachedLookup>> ParamServer::DecodeLookup(
    const LookupCall& call, wire::DType* row_dtype) const {
  MEFT_RETURN_IF_ERROR(wire::CheckTensor(
      call.x, "x",
      {{wire::DType::kFp32, wire::DType::kBf16}, {-1, options_.dim}, int64_t{1} << 40}));
  const int64_t num_tokens = call.x.shape[0];
  if (num_tokens == 0) return absl::InvalidArgumentError("x.shape: no tokens (T = 0)");
  if (num_tokens > options_.max_tokens) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "x.shape: ", num_tokens, " tokens exceed max_tokens (", options_.max_tokens, ")"));
  }
  auto cached = std::make_shared<CachedLookup>();
  cached->num_tokens = num_tokens;
  MEFT_RETURN_IF_ERROR(wire::DecodeFloats(call.x, "x", /*require_finite=*/true, &cached->x));
  if (call.token_mask.has_value()) {
    MEFT_RETURN_IF_ERROR(
        wire::CheckTensor(*call.token_mask, "token_mask", {{wire::DType::kUint8}, {num_tokens}}));
    cached->mask.assign(call.token_mask->data.begin(), call.token_mask->data.end());
    for (int64_t t = 0; t < num_tokens; ++t) {
      if (cached->mask[t] > 1) {
        return absl::InvalidArgumentError(absl::StrCat("token_mask.data: value ",
                                                       int{cached->mask[t]}, " at element ", t,
                                                       ", expected 0 or 1"));
      }
    }
  }
  *row_dtype = call.row_dtype.value_or(options_.wire_dtype);
  if (*row_dtype != wire::DType::kFp32 && *row_dtype != wire::DType::kBf16) {
    return absl::InvalidArgumentError(
        absl::StrCat("row_dtype: expected fp32 or bf16, got ", wire::DTypeName(*row_dtype)));
  }
  return cached;
}

absl::Status ParamServer::AwaitStep(Layer* layer, const LookupCall& call,
                                    std::chrono::steady_clock::time_point deadline) const {
  const RequestHeader& h = call.header;
  std::unique_lock state_lock(layer->state_mu);
  // Wake up periodically to notice cancellation; Step and shutdown notify at once.
  while (layer->store.step < h.step) {
    // Only Step(h.step - 1) can be in flight: a lookup further ahead would hold a server thread
    // until step_wait_seconds for nothing.
    if (h.step > layer->store.step + 1) {
      return absl::FailedPreconditionError(absl::StrCat(
          "header.step: lookup ", Where(h), " is more than one step ahead of the server, "
          "which is at step ", layer->store.step));
    }
    if (shutting_down_) {
      return absl::UnavailableError(
          absl::StrCat("lookup ", Where(h), ": the server is shutting down"));
    }
    if (call.is_cancelled && call.is_cancelled()) {
      return absl::CancelledError(absl::StrCat("lookup ", Where(h), ": cancelled"));
    }
    if (Clock::now() >= deadline) {
      return absl::FailedPreconditionError(absl::StrCat(
          "header.step: lookup ", Where(h), " is ahead of the server, which is at step ",
          layer->store.step, " (timed out waiting for Step(", layer->store.step, "))"));
    }
    layer->step_cv.wait_until(state_lock,
                              std::min(deadline, Clock::now() + std::chrono::milliseconds(100)));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const CachedLookup>> ParamServer::AdmitToCache(
    Layer* layer, const RequestHeader& h, CachedLookup* lookup, CacheCharge* charge) {
  const CacheKey key{h.step, h.micro_step};
  if (layer->done.count(key)) {
    return absl::FailedPreconditionError(
        absl::StrCat("header: gradients for lookup ", Where(h), " were already applied"));
  }
  auto it = layer->cache.find(key);
  if (it != layer->cache.end()) {
    if (it->second->x != lookup->x || it->second->mask != lookup->mask) {
      return absl::AlreadyExistsError(
          absl::StrCat("header: lookup ", Where(h), " was already served with a different x"));
    }
    return it->second;
  }
  if (static_cast<int64_t>(layer->cache.size()) >= options_.max_pending_lookups) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "header: layer ", h.layer, " already holds ", layer->cache.size(),
        " training lookups awaiting gradients (max_pending_lookups); send their gradients or "
        "Step first"));
  }
  MEFT_RETURN_IF_ERROR(charge->Reserve(LookupCacheBytesBound(options_, lookup->num_tokens)));
  lookup->charged_bytes = charge->bytes();
  return nullptr;
}

absl::StatusOr<LookupReply> ParamServer::EncodeAnswer(const store::LayerStore& st,
                                                      const routing::Selection& sel,
                                                      const LookupCall& call,
                                                      wire::DType row_dtype,
                                                      int64_t num_tokens) const {
  const int64_t n_rows = static_cast<int64_t>(sel.rows.size());
  const int64_t d = options_.dim;
  const uint64_t row_bytes = wire::DTypeSize(row_dtype) * static_cast<uint64_t>(d);
  const bool per_token = options_.mode == Mode::kPerToken;
  const bool gated = per_token && options_.selector.gated;
  const int64_t k = options_.selector.top_k;
  const int64_t n_experts = gated ? static_cast<int64_t>(sel.experts.size()) : 0;
  const uint64_t rows = static_cast<uint64_t>(n_rows), experts = static_cast<uint64_t>(n_experts);
  // The answer's layout (common/wire/lookup_layout.h); a sink checks that all of it fits before
  // any tensor is written, and the writer that every tensor written has its size.
  const std::vector<wire::AnswerTensorLayout> layout =
      wire::LookupAnswerLayout({.rows = rows,
                                .row_bytes = row_bytes,
                                .tokens = static_cast<uint64_t>(num_tokens),
                                .top_k = static_cast<uint64_t>(k),
                                .experts = experts,
                                .per_token = per_token,
                                .gated = gated});
  AnswerWriter writer(call.answer_sink.get(), layout);
  // Refuse, before anything is cached or counted, an answer the transport could not send.
  uint64_t reply_bytes = 4096;
  for (const wire::AnswerTensorLayout& t : layout) reply_bytes += t.bytes;
  if (!writer.placed() && options_.max_response_bytes > 0 &&
      reply_bytes > static_cast<uint64_t>(options_.max_response_bytes)) {
    return absl::ResourceExhaustedError(
        absl::StrCat("x.shape: the answer to ", num_tokens, " tokens (", n_rows, " rows of ", d,
                     " ", wire::DTypeName(row_dtype), ") would be about ", reply_bytes,
                     " bytes, over the server's message limit of ", options_.max_response_bytes,
                     "; send fewer tokens, use bf16 rows, or raise max_message_mb"));
  }

  // Each tensor is encoded once, straight to where it is sent from.
  LookupReply reply;
  reply.rows_dropped = static_cast<uint32_t>(sel.rows_dropped);
  writer.Int32(&reply.row_ids, sel.rows, {n_rows});
  wire::EncodeRowsTo(st.keys.param.data(), d, sel.rows, row_dtype,
                     writer.Start(&reply.keys, row_dtype, {n_rows, d}, rows * row_bytes));
  wire::EncodeRowsTo(st.values.param.data(), d, sel.rows, row_dtype,
                     writer.Start(&reply.values, row_dtype, {n_rows, d}, rows * row_bytes));
  if (per_token) {
    writer.Int32(&reply.token_rows, sel.slot_pos, {num_tokens, k});
    wire::EncodeFloatsTo(sel.slot_gates, wire::DType::kFp32,
                         writer.Start(&reply.token_gates, wire::DType::kFp32, {num_tokens, k},
                                      sel.slot_gates.size() * 4));
  }
  if (gated) {
    std::vector<int32_t> expert_pos(sel.slot_experts.size(), -1);
    for (size_t s = 0; s < sel.slot_experts.size(); ++s) {
      if (sel.slot_experts[s] < 0) continue;
      expert_pos[s] = static_cast<int32_t>(
          std::lower_bound(sel.experts.begin(), sel.experts.end(), sel.slot_experts[s]) -
          sel.experts.begin());
    }
    writer.Int32(&reply.token_experts, expert_pos, {num_tokens, k});
    writer.Int32(&reply.expert_ids, sel.experts, {n_experts});
    wire::EncodeRowsTo(st.router.param.data(), d, sel.experts, row_dtype,
                       writer.Start(&reply.router_rows, row_dtype, {n_experts, d},
                                    experts * row_bytes));
  }
  return reply;
}

void ParamServer::RecordLookup(const routing::Selection& sel, int64_t experts, bool replayed,
                               std::chrono::steady_clock::time_point start) const {
  if (!metrics_->lookups) return;
  const Metrics& m = *metrics_;
  const double n_rows = static_cast<double>(sel.rows.size());
  m.lookups->Increment();
  if (replayed) m.lookups_replayed->Increment();
  m.rows_served->Increment(n_rows);
  m.unique_rows->Observe(n_rows);
  m.rows_dropped->Increment(static_cast<double>(sel.rows_dropped));
  int64_t total = 0, peak = 0;
  for (int32_t load : sel.expert_load) {
    total += load;
    peak = std::max<int64_t>(peak, load);
  }
  if (total > 0) {
    m.expert_imbalance->Set(static_cast<double>(peak) * static_cast<double>(experts) /
                            static_cast<double>(total));
  }
  m.lookup_seconds->Observe(std::chrono::duration<double>(Clock::now() - start).count());
}

absl::StatusOr<GradientsReply> ParamServer::Gradients(const GradientsCall& call) {
  const RequestHeader& h = call.header;
  MEFT_ASSIGN_OR_RETURN(Layer * layer, FindLayer(h.layer, "header.layer"));
  std::lock_guard state_lock(layer->state_mu);
  if (layer->store.step != h.step) {
    return absl::FailedPreconditionError(absl::StrCat("header.step: gradients ", Where(h),
                                                      " do not match the server's step ",
                                                      layer->store.step));
  }
  const CacheKey key{h.step, h.micro_step};
  if (layer->done.count(key)) {
    return GradientsReply{true, layer->store.keys.touched_rows.size()};
  }
  auto it = layer->cache.find(key);
  if (it == layer->cache.end()) {
    return absl::FailedPreconditionError(
        absl::StrCat("header: no training lookup ", Where(h), " is waiting for gradients"));
  }
  const CachedLookup& c = *it->second;
  const routing::Selection& sel = c.selection;
  const int64_t n_rows = static_cast<int64_t>(sel.rows.size());
  const int64_t d = options_.dim;
  const wire::TensorSpec row_spec{{wire::DType::kFp32, wire::DType::kBf16}, {n_rows, d}};
  MEFT_RETURN_IF_ERROR(wire::CheckTensor(call.key_grads, "key_grads", row_spec));
  MEFT_RETURN_IF_ERROR(wire::CheckTensor(call.value_grads, "value_grads", row_spec));
  std::vector<float> key_grads, value_grads, gate_grads;
  MEFT_RETURN_IF_ERROR(wire::DecodeFloats(call.key_grads, "key_grads", true, &key_grads));
  MEFT_RETURN_IF_ERROR(wire::DecodeFloats(call.value_grads, "value_grads", true, &value_grads));
  const bool wants_gates = options_.mode == Mode::kPerToken && options_.selector.gated;
  if (wants_gates) {
    if (!call.gate_grads.has_value()) {
      return absl::InvalidArgumentError(
          "gate_grads: missing (the server is gated per_token; send dL/dgate per slot)");
    }
    MEFT_RETURN_IF_ERROR(wire::CheckTensor(*call.gate_grads, "gate_grads",
                                           {{wire::DType::kFp32}, {c.num_tokens, sel.top_k}}));
    MEFT_RETURN_IF_ERROR(wire::DecodeFloats(*call.gate_grads, "gate_grads", true, &gate_grads));
    for (size_t s = 0; s < gate_grads.size(); ++s) {
      if (sel.slot_rows[s] < 0 && gate_grads[s] != 0.0f) {
        return absl::InvalidArgumentError(
            absl::StrCat("gate_grads.data: element ", s, " is nonzero but its slot is empty"));
      }
    }
  } else if (call.gate_grads.has_value()) {
    return absl::InvalidArgumentError(absl::StrCat("gate_grads: not expected (the server is ",
                                                   options_.selector.gated ? "gated" : "ungated",
                                                   " ", ModeName(options_.mode), ")"));
  }

  // Valid: apply. Nothing below can fail.
  store::LayerStore& st = layer->store;
  optim::AccumulateRows(&st.keys, sel.rows, key_grads.data());
  optim::AccumulateRows(&st.values, sel.rows, value_grads.data());
  if (wants_gates) {
    // dG_e = sum_t (sum of dgate over t's slots of expert e) x_t, grouped by expert.
    std::vector<std::tuple<int32_t, int32_t, float>> contrib;  // (expert, token, coeff)
    for (int64_t t = 0; t < c.num_tokens; ++t) {
      for (int64_t j = 0; j < sel.top_k; ++j) {
        const int64_t s = t * sel.top_k + j;
        if (sel.slot_rows[s] < 0) continue;
        contrib.emplace_back(sel.slot_experts[s], static_cast<int32_t>(t), gate_grads[s]);
      }
    }
    std::stable_sort(contrib.begin(), contrib.end(), [](const auto& a, const auto& b) {
      return std::tie(std::get<0>(a), std::get<1>(a)) < std::tie(std::get<0>(b), std::get<1>(b));
    });
    std::vector<int32_t> experts, tokens;
    std::vector<int64_t> offsets;
    std::vector<float> coeffs;
    for (const auto& [e, t, g] : contrib) {
      if (experts.empty() || experts.back() != e) {
        experts.push_back(e);
        offsets.push_back(static_cast<int64_t>(tokens.size()));
      }
      if (!tokens.empty() && offsets.back() < static_cast<int64_t>(tokens.size()) &&
          tokens.back() == t) {
        coeffs.back() += g;  // same token, same expert: several slots
      } else {
        tokens.push_back(t);
        coeffs.push_back(g);
      }
    }
    offsets.push_back(static_cast<int64_t>(tokens.size()));
    optim::AccumulateOuter(&st.router, experts, offsets, tokens, coeffs, c.x.data());
  }
  ReleaseCacheBytes(it->second->charged_bytes);
  layer->cache.erase(it);
  layer->done.insert(key);
  if (metrics_->gradient_calls) metrics_->gradient_calls->Increment();
  return GradientsReply{false, st.keys.touched_rows.size()};
}

absl::StatusOr<GradNormReply> ParamServer::GradNorm(uint64_t step,
                                                    const std::vector<uint32_t>& layer_ids) {
  MEFT_ASSIGN_OR_RETURN(std::vector<Layer*> layers, ResolveLayers(layer_ids, "layers"));
  GradNormReply reply;
  for (Layer* layer : layers) {
    std::lock_guard state_lock(layer->state_mu);
    if (layer->store.step != step) {
      return absl::FailedPreconditionError(absl::StrCat("step: ", step, " does not match layer ",
                                                        layer->id, "'s step ", layer->store.step));
    }
    const double n = optim::SquaredNorm(layer->store.keys) +
                     optim::SquaredNorm(layer->store.values) +
                     optim::SquaredNorm(layer->store.router);
    reply.layers.push_back(layer->id);
    reply.layer_squared_norms.push_back(n);
    reply.squared_norm += n;
  }
  return reply;
}

absl::StatusOr<StepReply> ParamServer::Step(const StepCall& call) {
  const auto start = Clock::now();
  if (!std::isfinite(call.lr) || call.lr < 0) {
    return absl::InvalidArgumentError(absl::StrCat("lr: ", call.lr, " must be finite and >= 0"));
  }
  if (!std::isfinite(call.clip_factor) || call.clip_factor <= 0 || call.clip_factor > 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("clip_factor: ", call.clip_factor, " must be in (0, 1]"));
  }
  if (call.step == UINT64_MAX) {
    return absl::FailedPreconditionError(
        absl::StrCat("step: ", call.step, " is past any step this server can reach"));
  }
  MEFT_ASSIGN_OR_RETURN(std::vector<Layer*> layers, ResolveLayers(call.layers, "layers"));
  // Check every layer first so a bad request changes nothing.
  for (Layer* layer : layers) {
    std::lock_guard state_lock(layer->state_mu);
    const uint64_t at = layer->store.step;
    if (at != call.step && at != call.step + 1) {
      return absl::FailedPreconditionError(
          absl::StrCat("step: ", call.step, " does not match layer ", layer->id, "'s step ", at));
    }
  }
  // Decided while updating, so two concurrent Step(s) calls cannot both claim the work.
  bool all_applied = true;
  StepReply reply;
  for (Layer* layer : layers) {
    std::unique_lock params_lock(layer->params_mu);
    std::unique_lock state_lock(layer->state_mu);
    store::LayerStore& st = layer->store;
    if (st.step == call.step + 1) {  // replay
      reply.rows_updated += layer->last_step.rows_updated;
      reply.router_rows_updated += layer->last_step.router_rows_updated;
      continue;
    }
    if (st.step != call.step) {  // moved since the check (a concurrent restore)
      return absl::FailedPreconditionError(absl::StrCat(
          "step: ", call.step, " does not match layer ", layer->id, "'s step ", st.step));
    }
    all_applied = false;
    StepReply mine;
    mine.rows_updated = optim::SparseAdamStep(&st.keys, call.lr, call.clip_factor, options_.adam);
    optim::SparseAdamStep(&st.values, call.lr, call.clip_factor, options_.adam);
    mine.router_rows_updated =
        optim::SparseAdamStep(&st.router, call.lr, call.clip_factor, options_.adam);
    if (!layer->cache.empty()) {
      spdlog::warn("layer {}: {} training lookups of step {} got no gradients before Step",
                   layer->id, layer->cache.size(), call.step);
      if (metrics_->lookups_discarded) {
        metrics_->lookups_discarded->Increment(static_cast<double>(layer->cache.size()));
      }
    }
    ClearCache(layer);
    layer->done.clear();
    st.step = call.step + 1;
    layer->last_step = mine;
    reply.rows_updated += mine.rows_updated;
    reply.router_rows_updated += mine.router_rows_updated;
    layer->step_cv.notify_all();
    if (options_.on_layer_stepped) {
      state_lock.unlock();
      params_lock.unlock();
      options_.on_layer_stepped(layer->id, call.step);
    }
  }
  reply.already_applied = all_applied;
  reply.server_step = call.step + 1;
  if (metrics_->step_seconds) {
    const Metrics& m = *metrics_;
    if (!all_applied) {
      m.step_seconds->Observe(std::chrono::duration<double>(Clock::now() - start).count());
      m.rows_updated->Increment(static_cast<double>(reply.rows_updated));
      m.router_rows_updated->Increment(static_cast<double>(reply.router_rows_updated));
    }
    uint64_t lowest = UINT64_MAX;
    for (const auto& l : layers_) {
      std::lock_guard state_lock(l->state_mu);
      lowest = std::min(lowest, l->store.step);
    }
    m.optimizer_step->Set(static_cast<double>(lowest));
  }
  return reply;
}

checkpoint::AdapterConfig ParamServer::MakeAdapterConfig() const {
  checkpoint::AdapterConfig c;
  c.rows = options_.rows;
  c.dim = options_.dim;
  c.experts = options_.experts;
  c.n_probe = options_.selector.n_probe;
  c.top_k = options_.selector.top_k;
  c.max_rows = options_.selector.max_rows;
  c.mode = ModeName(options_.mode);
  c.gated = options_.selector.gated;
  c.layers = options_.layers;
  c.seed = adapter_seed_;
  c.router_init =
      options_.init.router_init == store::RouterInit::kMeanKeys ? "mean_keys" : "normal";
  c.beta1 = options_.adam.beta1;
  c.beta2 = options_.adam.beta2;
  c.eps = options_.adam.eps;
  c.weight_decay = options_.adam.weight_decay;
  return c;
}

absl::StatusOr<std::string> ParamServer::ResolveCheckpointPath(const std::string& path,
                                                               absl::string_view field) const {
  namespace fs = std::filesystem;
  const std::string& base = options_.checkpoint_dir;
  if (base.empty()) {
    if (path.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": empty, and the server has no checkpoint_dir configured"));
    }
    return path;
  }
  std::error_code ec;
  const fs::path root = fs::weakly_canonical(fs::absolute(base, ec), ec);
  const fs::path target = fs::weakly_canonical(path.empty()                   ? root
                                               : fs::path(path).is_absolute() ? fs::path(path)
                                                                              : root / path,
                                               ec);
  const fs::path rel = target.lexically_relative(root);
  if (ec || rel.empty() || *rel.begin() == "..") {
    return absl::PermissionDeniedError(absl::StrCat(
        field, ": \"", path, "\" is outside the server's checkpoint_dir ", root.string()));
  }
  return target.string();
}

absl::StatusOr<CheckpointReply> ParamServer::SaveCheckpoint(const std::string& directory) {
  const auto start = Clock::now();
  MEFT_ASSIGN_OR_RETURN(const std::string root, ResolveCheckpointPath(directory, "directory"));
  std::lock_guard save_lock(save_mu_);
  // Hold every layer's parameters shared (Step waits; lookups go on) and read the steps.
  std::vector<std::shared_lock<std::shared_mutex>> locks;
  std::vector<const store::LayerStore*> stores;
  uint64_t step = 0;
  for (size_t i = 0; i < layers_.size(); ++i) {
    locks.emplace_back(layers_[i]->params_mu);
    std::lock_guard state_lock(layers_[i]->state_mu);
    const uint64_t s = layers_[i]->store.step;
    if (i == 0) step = s;
    if (s != step) {
      return absl::FailedPreconditionError(absl::StrCat(
          "layers are at different steps (layer ", layers_[0]->id, " at ", step, ", layer ",
          layers_[i]->id, " at ", s, "): a Step is half applied; finish it first"));
    }
    stores.push_back(&layers_[i]->store);
  }
  MEFT_ASSIGN_OR_RETURN(uint64_t bytes, checkpoint::Write(root, step, MakeAdapterConfig(), stores));
  const std::string path = absl::StrCat(root, "/", checkpoint::CheckpointName(step));
  spdlog::info("checkpoint written: {} ({} bytes)", path, bytes);
  if (metrics_->checkpoint_seconds) {
    metrics_->checkpoint_seconds->Observe(
        std::chrono::duration<double>(Clock::now() - start).count());
  }
  return CheckpointReply{path, step, bytes};
}

absl::StatusOr<CheckpointReply> ParamServer::RestoreCheckpoint(const std::string& path,
                                                               bool confine) {
  if (path.empty()) return absl::InvalidArgumentError("path: empty");
  std::string dir = path;
  if (confine) {
    MEFT_ASSIGN_OR_RETURN(dir, ResolveCheckpointPath(path, "path"));
  }
  if (auto latest = checkpoint::FindLatest(dir); latest.ok()) {
    dir = *latest;  // `path` is a root holding checkpoint-<step> folders
  }
  // Check the shapes before reading tensors, so a mismatch names the setting that differs.
  MEFT_ASSIGN_OR_RETURN(const checkpoint::AdapterConfig got, checkpoint::ReadConfig(dir));
  const checkpoint::AdapterConfig want = MakeAdapterConfig();
  auto mismatch = [&](const char* field, auto a, auto b) {
    return absl::FailedPreconditionError(absl::StrCat(
        dir, "/", checkpoint::kConfigFile, ": \"", field, "\" is ", a, " but this server has ", b));
  };
  if (got.rows != want.rows) return mismatch("rows", got.rows, want.rows);
  if (got.dim != want.dim) return mismatch("dim", got.dim, want.dim);
  if (got.experts != want.experts) return mismatch("experts", got.experts, want.experts);
  if (got.layers != want.layers) {
    return mismatch("layers", absl::StrJoin(got.layers, ","), absl::StrJoin(want.layers, ","));
  }
  if (got.top_k != want.top_k || got.n_probe != want.n_probe || got.mode != want.mode ||
      got.gated != want.gated || got.max_rows != want.max_rows) {
    spdlog::warn("{}: selection settings differ from this server's; using the server's", dir);
  }
  MEFT_ASSIGN_OR_RETURN(checkpoint::Loaded loaded, checkpoint::Read(dir));

  std::vector<std::unique_lock<std::shared_mutex>> params_locks;
  std::vector<std::unique_lock<std::mutex>> state_locks;
  for (const auto& l : layers_) {
    params_locks.emplace_back(l->params_mu);
    state_locks.emplace_back(l->state_mu);
  }
  for (size_t i = 0; i < layers_.size(); ++i) {
    Layer& l = *layers_[i];
    l.store = std::move(loaded.layers[i]);
    ClearCache(&l);
    l.done.clear();
    l.last_step = StepReply{};
    l.step_cv.notify_all();
  }
  adapter_seed_ = loaded.config.seed;
  if (metrics_->optimizer_step) metrics_->optimizer_step->Set(static_cast<double>(loaded.step));
  spdlog::info("restored {} (step {})", dir, loaded.step);
  return CheckpointReply{dir, loaded.step, 0};
}

void ParamServer::BeginShutdown() {
  shutting_down_ = true;
  for (const auto& l : layers_) {
    std::lock_guard state_lock(l->state_mu);
    l->step_cv.notify_all();
  }
}

absl::Status ParamServer::CacheCharge::Reserve(int64_t bytes) {
  const int64_t before = server_->lookup_cache_bytes_.fetch_add(bytes);
  if (before + bytes > server_->lookup_cache_budget_) {
    server_->lookup_cache_bytes_.fetch_sub(bytes);
    return absl::ResourceExhaustedError(absl::StrCat(
        "x.shape: caching this lookup (up to ", FormatBytes(bytes), ") would take the lookup "
        "cache past its budget of ", FormatBytes(server_->lookup_cache_budget_), " (",
        FormatBytes(before), " held by lookups awaiting gradients; lookup_cache_mb); send their "
        "gradients or Step first"));
  }
  bytes_ = bytes;
  if (server_->metrics_->lookup_cache_bytes) {
    server_->metrics_->lookup_cache_bytes->Set(static_cast<double>(before + bytes));
  }
  return absl::OkStatus();
}

void ParamServer::ReleaseCacheBytes(int64_t bytes) {
  const int64_t after = lookup_cache_bytes_.fetch_sub(bytes) - bytes;
  if (metrics_->lookup_cache_bytes) metrics_->lookup_cache_bytes->Set(static_cast<double>(after));
}

void ParamServer::ClearCache(Layer* layer) {
  for (const auto& [key, cached] : layer->cache) ReleaseCacheBytes(cached->charged_bytes);
  layer->cache.clear();
}

ServerInfo ParamServer::Info() const {
  ServerInfo info;
  info.layers = options_.layers;
  info.rows = options_.rows;
  info.dim = options_.dim;
  info.experts = options_.experts;
  info.n_probe = options_.selector.n_probe;
  info.top_k = options_.selector.top_k;
  info.max_rows = options_.selector.max_rows;
  info.max_tokens = options_.max_tokens;
  info.mode = options_.mode;
  info.gated = options_.selector.gated;
  info.wire_dtype = options_.wire_dtype;
  info.adam = options_.adam;
  info.isa = std::string(kernels_.name);
  uint64_t lowest = UINT64_MAX;
  for (const auto& l : layers_) {
    std::lock_guard state_lock(l->state_mu);
    lowest = std::min(lowest, l->store.step);
  }
  info.step = lowest;
  return info;
}

uint64_t ParamServer::StateDigest() const {
  Hasher h;
  for (const auto& l : layers_) {
    std::shared_lock params_lock(l->params_mu);
    std::lock_guard state_lock(l->state_mu);
    h.AddPod(l->id);
    h.AddPod(l->store.step);
    HashBlock(l->store.keys, &h);
    HashBlock(l->store.values, &h);
    HashBlock(l->store.router, &h);
    for (const auto& [key, c] : l->cache) {
      h.AddPod(key.first);
      h.AddPod(key.second);
      h.AddVec(c->x);
      h.AddVec(c->mask);
      h.AddVec(c->selection.rows);
      h.AddVec(c->selection.slot_rows);
    }
    for (const CacheKey& key : l->done) {
      h.AddPod(key.first);
      h.AddPod(key.second);
    }
  }
  return h.h;
}

}  // namespace meft::server
