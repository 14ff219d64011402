#pragma once

// Durable POSIX file primitives. The checkpoint writer builds a complete directory under a
// temporary name with WriteFileDurably, fsyncs it with FsyncDirectory, then publishes it with
// ReplaceDirectoryAtomically, so that a reader never sees a half-written checkpoint.
//
// Every function is safe to call from several threads as long as they work on different paths.
// Errors carry an absl::StatusCode derived from errno (NOT_FOUND for ENOENT, PERMISSION_DENIED
// for EACCES, ...) and a message naming the path and strerror(errno). Nothing here throws.

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace meft::io {

// Creates or truncates `path` (mode 0644 before umask), writes the concatenation of `chunks` in
// order, fsyncs the file and closes it. Short writes and EINTR are retried. The parent directory
// must exist; it is not fsynced (call FsyncDirectory on it once all files are written). On error
// the file may exist with partial content.
absl::Status WriteFileDurably(const std::string& path, const std::vector<std::string_view>& chunks);

// Fsyncs the directory `dir`, making the creation, removal and renaming of its entries durable.
absl::Status FsyncDirectory(const std::string& dir);

// Creates `dir` and any missing parents, like `mkdir -p`. OK if `dir` already is a directory;
// FAILED_PRECONDITION if it exists and is not a directory.
absl::Status CreateDirectories(const std::string& dir);

// Removes `path` and, if it is a directory, everything below it. Symbolic links are removed, not
// followed. OK if `path` does not exist.
absl::Status RemoveAll(const std::string& path);

// Publishes the directory `tmp_dir` under the name `final_dir`. Preconditions: `tmp_dir` is a
// complete directory whose files and entries have been fsynced, and it lies on the same file
// system as `final_dir` (rename(2) must work).
//
// If `final_dir` does not exist, renames `tmp_dir` to `final_dir` and fsyncs the parent of
// `final_dir`. Otherwise exchanges the two names atomically (renameat2 RENAME_EXCHANGE, Linux >=
// 3.15 on a file system that supports it; an error otherwise), fsyncs the parent and removes the
// old content, now under `tmp_dir`. `final_dir` therefore names, at every instant and after a
// crash at any point, either the previous complete directory or the new complete one. If the
// removal of the old content fails, the new directory is in place and `tmp_dir` is left behind.
//
// Not safe against concurrent writers of the same `final_dir`; callers serialize.
absl::Status ReplaceDirectoryAtomically(const std::string& tmp_dir, const std::string& final_dir);

// Returns the whole content of the regular file `path`. NOT_FOUND if it does not exist.
absl::StatusOr<std::string> ReadFile(const std::string& path);

// True if `path` names an existing file system object (following symbolic links). Any error,
// such as a permission problem on a parent directory, counts as "does not exist".
bool PathExists(const std::string& path);

// Returns the names (not paths) of the entries of directory `dir`, excluding "." and "..",
// sorted byte-wise. NOT_FOUND if `dir` does not exist.
absl::StatusOr<std::vector<std::string>> ListDirectory(const std::string& dir);

}  // namespace meft::io
