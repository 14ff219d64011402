#include "gpu_worker/train/run_folder.h"

#include <cstdint>
#include <filesystem>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/io/file_util.h"
#include "common/status.h"

namespace meft::worker {
namespace {

namespace fs = std::filesystem;

// Absolute and normalized, without a trailing separator.
fs::path Normalized(const std::string& path) {
  std::error_code ec;
  fs::path p = fs::weakly_canonical(fs::absolute(path), ec);
  if (ec) p = fs::absolute(path).lexically_normal();
  if (!p.has_filename() && p.has_parent_path()) p = p.parent_path();
  return p;
}

}  // namespace

absl::StatusOr<std::string> NewestCheckpoint(const std::string& run_dir, int64_t at_most) {
  if (run_dir.empty() || !io::PathExists(run_dir)) return std::string();
  MEFT_ASSIGN_OR_RETURN(const std::vector<std::string> names, io::ListDirectory(run_dir));
  constexpr absl::string_view kPrefix = "checkpoint-";
  int64_t newest = -1;
  for (const std::string& name : names) {
    int64_t step = 0;
    if (!absl::StartsWith(name, kPrefix) ||
        !absl::SimpleAtoi(absl::string_view(name).substr(kPrefix.size()), &step) ||
        absl::StrCat(kPrefix, step) != name) {
      continue;  // "checkpoint-3.tmp-12", "checkpoint-007", other files
    }
    if (step > newest && (at_most < 0 || step <= at_most) &&
        io::PathExists(absl::StrCat(run_dir, "/", name, "/trainer_state.json"))) {
      newest = step;
    }
  }
  return newest < 0 ? std::string() : absl::StrCat(run_dir, "/", kPrefix, newest);
}

std::string RecordPath(const std::string& path, const std::string& run_dir) {
  if (path.empty() || run_dir.empty()) return path;
  const fs::path rel = Normalized(path).lexically_relative(Normalized(run_dir));
  if (rel.empty() || *rel.begin() == ".." || rel == ".") return path;
  return rel.string();
}

std::string ResolveRecordedPath(const std::string& recorded, const std::string& checkpoint_dir) {
  if (recorded.empty() || fs::path(recorded).is_absolute()) return recorded;
  return (Normalized(checkpoint_dir).parent_path() / recorded).lexically_normal().string();
}

}  // namespace meft::worker
