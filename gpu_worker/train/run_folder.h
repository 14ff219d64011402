#pragma once

// A run folder (output_dir) as training leaves it (DESIGN §5): checkpoint-<step>/ folders, and
// the paths they record (a MEFT run's server checkpoints), which are relative to the run folder
// when they lie under it so that the folder can move.

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace meft::worker {

// The checkpoint-<step>/ folder directly in `run_dir` with the highest step that holds a
// trainer_state.json; "" when there is none or `run_dir` does not exist. Other names, such as
// folders still being written (checkpoint-<step>.tmp-<pid>), are ignored. Errors: `run_dir`
// cannot be listed. `at_most` >= 0 leaves out checkpoints of later steps.
absl::StatusOr<std::string> NewestCheckpoint(const std::string& run_dir, int64_t at_most = -1);

// How a checkpoint in `run_dir` records `path`: relative to `run_dir` when `path` lies under it
// (both made absolute against the current directory and normalized); unchanged otherwise (e.g. a
// remote parameter server's folder).
std::string RecordPath(const std::string& path, const std::string& run_dir);

// The path that the checkpoint folder `checkpoint_dir` means by `recorded`: an absolute one as
// it is; a relative one resolved against the checkpoint's run folder (the parent of
// `checkpoint_dir`), made absolute so that another process (the parameter server) can use it.
std::string ResolveRecordedPath(const std::string& recorded, const std::string& checkpoint_dir);

}  // namespace meft::worker
