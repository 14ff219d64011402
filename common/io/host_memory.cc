#include "common/io/host_memory.h"

#include <algorithm>
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

namespace meft::io {
namespace {

// Reads one non-negative integer (or "max": none) from a cgroup file; nullopt when absent.
absl::StatusOr<std::optional<int64_t>> ReadCgroupValue(const std::string& path) {
  if (!PathExists(path)) return std::optional<int64_t>();
  MEFT_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
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

absl::StatusOr<HostMemory> DetectHostMemory(const std::string& proc,
                                            const std::string& cgroup_root) {
  const std::string meminfo_path = absl::StrCat(proc, "/meminfo");
  MEFT_ASSIGN_OR_RETURN(const std::string meminfo, ReadFile(meminfo_path));
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
  if (!PathExists(self_path)) return host;
  MEFT_ASSIGN_OR_RETURN(const std::string self, ReadFile(self_path));
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

std::string FormatBytes(int64_t bytes) {
  const double b = static_cast<double>(bytes);
  if (bytes >= (int64_t{1} << 30)) return absl::StrFormat("%.2f GiB", b / (1 << 30));
  if (bytes >= (int64_t{1} << 20)) return absl::StrFormat("%.1f MiB", b / (1 << 20));
  if (bytes >= (int64_t{1} << 10)) return absl::StrFormat("%.1f KiB", b / (1 << 10));
  return absl::StrCat(bytes, " B");
}

}  // namespace meft::io
