#include "param_server/server/memory_budget.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace meft::server {
namespace {

int64_t Experts(const ServerOptions& o) {
  return o.experts > 0 ? o.experts : store::DefaultExperts(o.rows);
}

}  // namespace

int64_t LookupCacheBytesBound(const ServerOptions& o, int64_t num_tokens) {
  const int64_t slots = num_tokens * o.selector.top_k;
  const int64_t rows = std::min(slots, o.rows);
  const int64_t experts = Experts(o);
  return num_tokens * o.dim * 4 + num_tokens + rows * 4 + slots * 16 + experts * 8 + 512;
}

int64_t LookupCacheBudget(const ServerOptions& o) {
  if (o.lookup_cache_bytes > 0) return o.lookup_cache_bytes;
  return 2 * static_cast<int64_t>(o.layers.size()) * LookupCacheBytesBound(o, o.max_tokens);
}

MemoryPrediction PredictMemory(const ServerOptions& o, bool restoring) {
  const int64_t experts = Experts(o);
  const int64_t params_per_layer = (2 * o.rows + experts) * o.dim;
  const int64_t row_bytes_per_layer = (2 * o.rows + experts) * (1 + 4);  // touched flag, row id
  const int64_t layers = static_cast<int64_t>(o.layers.size());
  MemoryPrediction p;
  p.store_bytes = layers * (16 * params_per_layer + row_bytes_per_layer);
  p.lookup_cache_bytes = LookupCacheBudget(o);
  if (restoring) p.restore_bytes = layers * 12 * params_per_layer;
  return p;
}

absl::Status CheckMemoryAdmission(const MemoryPrediction& need, const HostMemory& host) {
  if (need.total() <= host.bytes) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat(
      "host memory: the store needs ", FormatBytes(need.total()), " (adapter with Adam state ",
      FormatBytes(need.store_bytes), ", lookup cache ", FormatBytes(need.lookup_cache_bytes),
      need.restore_bytes > 0 ? absl::StrCat(", checkpoint being restored ",
                                            FormatBytes(need.restore_bytes))
                             : "",
      ") but this host can give ", FormatBytes(host.bytes), " (", host.source,
      "); lower adapter_rows or serve fewer adapter_layers per server (shard them), lower "
      "max_tokens or lookup_cache_mb, or set memory_limit_mb / memory_check: false to override"));
}

}  // namespace meft::server
