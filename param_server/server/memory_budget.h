#pragma once

// What the server's host memory will hold (DESIGN §4), what the host can give, and the start-up
// admission that compares them, so a store that cannot fit is refused with one clear line instead
// of dying in std::bad_alloc or the kernel's OOM killer an hour into allocation.

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "common/io/host_memory.h"
#include "param_server/server/param_server.h"

namespace meft::server {

using io::DetectHostMemory;
using io::FormatBytes;
using io::HostMemory;

// Bytes one cached training lookup of `num_tokens` tokens can hold at most: x in fp32, the mask,
// the selection (rows, four int32/fp32 values per slot, experts, per-expert load), bookkeeping.
int64_t LookupCacheBytesBound(const ServerOptions& options, int64_t num_tokens);

// The lookup cache's byte budget: options.lookup_cache_bytes, or when that is 0 (auto) enough for
// two micro-batches of max_tokens on every owned layer (one in flight while the previous one's
// gradients still arrive).
int64_t LookupCacheBudget(const ServerOptions& options);

struct MemoryPrediction {
  // K, V and router of every owned layer: fp32 parameter, Adam's two moments, the gradient
  // accumulator (16 bytes per parameter), and a touched flag and row id per row.
  int64_t store_bytes = 0;
  int64_t lookup_cache_bytes = 0;  // LookupCacheBudget
  // Restoring a checkpoint reads it whole (parameters and moments, 12 bytes per parameter) before
  // it replaces the store; counted only when the server starts with --restore.
  int64_t restore_bytes = 0;
  int64_t total() const { return store_bytes + lookup_cache_bytes + restore_bytes; }
};

MemoryPrediction PredictMemory(const ServerOptions& options, bool restoring);

// OK when `need` fits in `host`; otherwise RESOURCE_EXHAUSTED with one line naming the need (and
// its parts), the limit and the settings that change either.
absl::Status CheckMemoryAdmission(const MemoryPrediction& need, const HostMemory& host);

}  // namespace meft::server
