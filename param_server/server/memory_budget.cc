#include "param_server/server/memory_budget.h"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <optional>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/io/file_util.h"
#include "common/status.h"

namespace meft::server {
namespace {

int64_t Experts(const ServerOptions& o) {
  return o.experts > 0 ? o.experts : store::DefaultExperts(o.rows);
}

// Reads one non-negative integer (or "max": none) from a cgroup file; nullopt when absent.
absl::StatusOr<std::optional<int64_t>> ReadCgroupValue(const std::string& path) {
  if (!io::PathExists(path)) return std::optional<int64_t>();
  MEFT_ASSIGN_OR_RETURN(std::string text, io::ReadFile(path));
  const absl::string_view value = absl::StripAsciiWhitespace(text);
  if (value == "max") return std::optional<int64_t>();
  uint64_t v = 0;
  if (!absl::SimpleAtoi(value, &v)) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": expected a byte count, got \"",
                                                   value.substr(0, 40), "\""));
  }
  // cgroup v1 writes "no limit" as a page-rounded 2^63-1.
  if (v >= static_cast<uint64_t>(std::numeric_limits<int64_t>::max() / 2)) {
    return std::optional<int64_t>();
  }
  return std::optional<int64_t>(static_cast<int64_t>(v));
}

// The cgroup path and its ancestors, deepest first: "/a/b" -> "/a/b", "/a", "".
std::vector<std::string> SelfAndAncestors(absl::string_view path) {
  std::vector<std::string> out;
  std::string p(absl::StripSuffix(path, "/"));
  while (true) {
    out.push_back(p);
    if (p.empty()) break;
    const size_t slash = p.rfind('/');
    p = slash == std::string::npos ? "" : p.substr(0, slash);
  }
  return out;
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

absl::StatusOr<HostMemory> DetectHostMemory(const std::string& proc,
                                            const std::string& cgroup_root) {
  const std::string meminfo_path = absl::StrCat(proc, "/meminfo");
  MEFT_ASSIGN_OR_RETURN(const std::string meminfo, io::ReadFile(meminfo_path));
  HostMemory host;
  bool found = false;
  for (absl::string_view line : absl::StrSplit(meminfo, '\n')) {
    if (!absl::ConsumePrefix(&line, "MemAvailable:")) continue;
    line = absl::StripAsciiWhitespace(line);
    uint64_t kib = 0;
    if (!absl::ConsumeSuffix(&line, " kB") ||
        !absl::SimpleAtoi(absl::StripAsciiWhitespace(line), &kib)) {
      return absl::InvalidArgumentError(
          absl::StrCat(meminfo_path, ": MemAvailable is not \"<n> kB\""));
    }
    host.bytes = static_cast<int64_t>(kib) * 1024;
    host.source = "MemAvailable in " + meminfo_path;
    found = true;
  }
  if (!found) {
    return absl::InvalidArgumentError(absl::StrCat(meminfo_path, ": no MemAvailable line"));
  }

  const std::string self_path = absl::StrCat(proc, "/self/cgroup");
  if (!io::PathExists(self_path)) return host;
  MEFT_ASSIGN_OR_RETURN(const std::string self, io::ReadFile(self_path));
  for (absl::string_view line : absl::StrSplit(self, '\n', absl::SkipEmpty())) {
    // "<id>:<controllers>:<path>"; v2 is "0::<path>", v1's memory controller "<id>:memory:<path>".
    const std::vector<absl::string_view> f = absl::StrSplit(line, absl::MaxSplits(':', 2));
    if (f.size() != 3) continue;
    std::string dir_root, limit_file, usage_file;
    if (f[0] == "0" && f[1].empty()) {
      dir_root = cgroup_root;
      limit_file = "memory.max";
      usage_file = "memory.current";
    } else if (const std::vector<absl::string_view> controllers = absl::StrSplit(f[1], ',');
               std::find(controllers.begin(), controllers.end(), "memory") != controllers.end()) {
      dir_root = absl::StrCat(cgroup_root, "/memory");
      limit_file = "memory.limit_in_bytes";
      usage_file = "memory.usage_in_bytes";
    } else {
      continue;
    }
    // Every ancestor's limit applies too.
    for (const std::string& p : SelfAndAncestors(f[2])) {
      const std::string dir = absl::StrCat(dir_root, p);
      MEFT_ASSIGN_OR_RETURN(std::optional<int64_t> limit,
                            ReadCgroupValue(absl::StrCat(dir, "/", limit_file)));
      if (!limit.has_value()) continue;
      MEFT_ASSIGN_OR_RETURN(std::optional<int64_t> usage,
                            ReadCgroupValue(absl::StrCat(dir, "/", usage_file)));
      const int64_t left = std::max<int64_t>(0, *limit - usage.value_or(0));
      if (left < host.bytes) {
        host.bytes = left;
        host.source = absl::StrCat("cgroup ", dir, "/", limit_file, " (", FormatBytes(*limit),
                                   ") minus ", usage_file, " (", FormatBytes(usage.value_or(0)),
                                   ")");
      }
    }
  }
  return host;
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

std::string FormatBytes(int64_t bytes) {
  const double b = static_cast<double>(bytes);
  if (bytes >= (int64_t{1} << 30)) return absl::StrFormat("%.2f GiB", b / (1 << 30));
  if (bytes >= (int64_t{1} << 20)) return absl::StrFormat("%.1f MiB", b / (1 << 20));
  if (bytes >= (int64_t{1} << 10)) return absl::StrFormat("%.1f KiB", b / (1 << 10));
  return absl::StrCat(bytes, " B");
}

}  // namespace meft::server
