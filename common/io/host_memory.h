#pragma once

// What this process may still allocate on its host: /proc/meminfo's MemAvailable, or under a
// cgroup with a memory limit (a container, a systemd slice) that limit minus the cgroup's use,
// whichever is smaller. The parameter server's start-up admission (param_server/server/
// memory_budget.h) and the worker's shared-memory arena (common/shm/arena.h) check against it.

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace meft::io {

struct HostMemory {
  int64_t bytes = 0;
  std::string source;  // where `bytes` comes from, for messages
};

// The smaller of MemAvailable and, for the cgroup of this process and every ancestor with a
// limit, the limit minus the current use (cgroup v2 memory.max and memory.current, or v1's memory
// controller memory.limit_in_bytes and memory.usage_in_bytes). `proc` and `cgroup_root` are /proc
// and /sys/fs/cgroup except in tests. Errors name an unreadable or malformed file.
absl::StatusOr<HostMemory> DetectHostMemory(const std::string& proc = "/proc",
                                            const std::string& cgroup_root = "/sys/fs/cgroup");

// "1.50 GiB", "12.0 MiB", "3.0 KiB", "512 B".
std::string FormatBytes(int64_t bytes);

}  // namespace meft::io
