#include "common/io/file_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/status.h"

namespace meft::io {
namespace {

// The message reads "<what> '<path>': <strerror(error_number)>".
absl::Status ErrnoError(int error_number, absl::string_view what, const std::string& path) {
  return absl::ErrnoToStatus(error_number, absl::StrCat(what, " '", path, "'"));
}

absl::Status ErrorCodeError(const std::error_code& ec, absl::string_view what,
                            const std::string& path) {
  // libstdc++ reports filesystem errors in the generic or system category, both errno values.
  return absl::Status(absl::ErrnoToStatusCode(ec.value()),
                      absl::StrCat(what, " '", path, "': ", ec.message()));
}

// Closes `fd`, retrying nothing: after EINTR the descriptor state is unspecified on Linux and it
// must not be closed again.
absl::Status CloseFd(int fd, const std::string& path) {
  if (::close(fd) != 0) return ErrnoError(errno, "close", path);
  return absl::OkStatus();
}

absl::Status FsyncFd(int fd, const std::string& path) {
  while (::fsync(fd) != 0) {
    if (errno != EINTR) return ErrnoError(errno, "fsync", path);
  }
  return absl::OkStatus();
}

absl::Status WriteAll(int fd, std::string_view data, const std::string& path) {
  while (!data.empty()) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(errno, "write", path);
    }
    data.remove_prefix(static_cast<size_t>(n));
  }
  return absl::OkStatus();
}

// Removes trailing slashes so that "a/b/" and "a/b" name the same directory for rename(2) and
// parent computation. "/" stays "/".
std::string StripTrailingSlashes(const std::string& path) {
  std::string result = path;
  while (result.size() > 1 && result.back() == '/') result.pop_back();
  return result;
}

std::string ParentDirectory(const std::string& path) {
  std::string parent = std::filesystem::path(StripTrailingSlashes(path)).parent_path().string();
  return parent.empty() ? std::string(".") : parent;
}

}  // namespace

absl::Status WriteFileDurably(const std::string& path,
                              const std::vector<std::string_view>& chunks) {
  int fd;
  do {
    fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) return ErrnoError(errno, "open for writing", path);

  absl::Status status;
  for (std::string_view chunk : chunks) {
    status = WriteAll(fd, chunk, path);
    if (!status.ok()) break;
  }
  if (status.ok()) status = FsyncFd(fd, path);
  absl::Status close_status = CloseFd(fd, path);
  if (status.ok()) status = close_status;
  return status;
}

absl::Status FsyncDirectory(const std::string& dir) {
  int fd;
  do {
    fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) return ErrnoError(errno, "open directory", dir);
  absl::Status status = FsyncFd(fd, dir);
  absl::Status close_status = CloseFd(fd, dir);
  return status.ok() ? close_status : status;
}

absl::Status CreateDirectories(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  // The result is checked with stat below: create_directories reports an existing non-directory
  // differently across library versions.
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0) {
    if (ec) return ErrorCodeError(ec, "create directories", dir);
    return ErrnoError(errno, "create directories", dir);
  }
  if (!S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat("create directories '", dir, "': exists and is not a directory"));
  }
  return absl::OkStatus();
}

absl::Status RemoveAll(const std::string& path) {
  std::error_code ec;
  std::filesystem::remove_all(path, ec);
  if (ec && ec != std::errc::no_such_file_or_directory) {
    return ErrorCodeError(ec, "remove", path);
  }
  return absl::OkStatus();
}

absl::Status ReplaceDirectoryAtomically(const std::string& tmp_dir, const std::string& final_dir) {
  const std::string tmp = StripTrailingSlashes(tmp_dir);
  const std::string final_path = StripTrailingSlashes(final_dir);
  const std::string parent = ParentDirectory(final_path);

  struct stat st;
  if (::lstat(tmp.c_str(), &st) != 0) return ErrnoError(errno, "stat", tmp);
  if (!S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat("replace directory: '", tmp, "' is not a directory"));
  }

  if (::lstat(final_path.c_str(), &st) != 0) {
    if (errno != ENOENT) return ErrnoError(errno, "stat", final_path);
    if (::rename(tmp.c_str(), final_path.c_str()) != 0) {
      const int error_number = errno;
      return ErrnoError(error_number, absl::StrCat("rename '", tmp, "' to"), final_path);
    }
    return FsyncDirectory(parent);
  }

  // Swap the two names in one step: final_path names the old or the new directory at every
  // instant, never neither. Then the old content (now under tmp) is removed.
  if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, final_path.c_str(), RENAME_EXCHANGE) != 0) {
    const int error_number = errno;
    return ErrnoError(error_number, absl::StrCat("exchange '", tmp, "' with"), final_path);
  }
  MEFT_RETURN_IF_ERROR(FsyncDirectory(parent));
  return RemoveAll(tmp);
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  int fd;
  do {
    fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) return ErrnoError(errno, "open for reading", path);

  std::string content;
  absl::Status status;
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    status = ErrnoError(errno, "stat", path);
  } else if (!S_ISREG(st.st_mode)) {
    status = absl::FailedPreconditionError(absl::StrCat("read '", path, "': not a regular file"));
  } else {
    content.reserve(static_cast<size_t>(st.st_size));
    // The size from fstat is only a hint: read until end of file.
    char buffer[64 * 1024];
    while (true) {
      ssize_t n = ::read(fd, buffer, sizeof(buffer));
      if (n < 0) {
        if (errno == EINTR) continue;
        status = ErrnoError(errno, "read", path);
        break;
      }
      if (n == 0) break;
      content.append(buffer, static_cast<size_t>(n));
    }
  }
  ::close(fd);  // Read-only descriptor: a close error cannot lose data.
  if (!status.ok()) return status;
  return content;
}

bool PathExists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

absl::StatusOr<std::vector<std::string>> ListDirectory(const std::string& dir) {
  std::error_code ec;
  std::filesystem::directory_iterator it(dir, ec);
  if (ec) return ErrorCodeError(ec, "list directory", dir);
  std::vector<std::string> names;
  for (const std::filesystem::directory_iterator end; it != end; it.increment(ec)) {
    if (ec) break;
    names.push_back(it->path().filename().string());
  }
  if (ec) return ErrorCodeError(ec, "list directory", dir);
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace meft::io
