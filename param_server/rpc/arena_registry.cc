#include "param_server/rpc/arena_registry.h"

#include <random>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace meft::rpc {
namespace {

constexpr uint64_t kMaxArenaBytes = uint64_t{1} << 40;

}  // namespace

absl::StatusOr<uint64_t> ArenaRegistry::Attach(const std::string& name, uint64_t size,
                                               std::string_view nonce) {
  if (nonce.size() != shm::kNonceBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("nonce: ", nonce.size(), " bytes, expected ", shm::kNonceBytes));
  }
  if (size > kMaxArenaBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("size: ", size, " bytes is over the limit of ", kMaxArenaBytes));
  }
  MEFT_ASSIGN_OR_RETURN(std::unique_ptr<shm::Arena> arena, shm::Arena::Open(name, size));
  if (arena->Nonce() != nonce) {
    return absl::FailedPreconditionError(
        absl::StrCat("nonce: ", name,
                     " does not hold the nonce sent; the worker and the server do not share "
                     "this memory (not the same host, or another object of that name)"));
  }
  // Ids are random so that an id from before a server restart is not valid after it.
  std::random_device rd;
  std::lock_guard lock(mu_);
  uint64_t id = 0;
  while (id == 0 || by_id_.count(id)) id = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  // Drop arenas attached under this name and those whose name is gone (the worker unlinked it on
  // exit, or a later worker removed it as orphaned): no request can name them any more, and
  // keeping them mapped would pin their pages in /dev/shm.
  for (auto it = by_id_.begin(); it != by_id_.end();) {
    const bool stale = it->second.arena->name() == name || it->second.arena->Unlinked();
    it = stale ? by_id_.erase(it) : std::next(it);
  }
  while (!by_id_.empty() && by_id_.size() >= max_arenas_) {
    auto oldest = by_id_.begin();
    for (auto it = by_id_.begin(); it != by_id_.end(); ++it) {
      if (it->second.serial < oldest->second.serial) oldest = it;
    }
    by_id_.erase(oldest);
  }
  by_id_.emplace(id, Entry{std::move(arena), next_serial_++});
  return id;
}

absl::StatusOr<std::shared_ptr<const shm::Arena>> ArenaRegistry::Find(uint64_t id) const {
  std::lock_guard lock(mu_);
  auto it = by_id_.find(id);
  if (it == by_id_.end()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "arena_id: arena not attached (id ", id, " is unknown to this server; attach it again)"));
  }
  return it->second.arena;
}

size_t ArenaRegistry::ReleaseUnlinked() {
  std::lock_guard lock(mu_);
  return std::erase_if(by_id_, [](const auto& entry) { return entry.second.arena->Unlinked(); });
}

size_t ArenaRegistry::size() const {
  std::lock_guard lock(mu_);
  return by_id_.size();
}

}  // namespace meft::rpc
