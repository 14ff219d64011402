#include "gpu_worker/rpc/arena_session.h"

#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/rpc/address.h"
#include "common/status.h"
#include "spdlog/spdlog.h"

namespace meft::worker {

bool MayStillRun(const absl::Status& s) {
  switch (s.code()) {
    case absl::StatusCode::kOk:
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kResourceExhausted:
    case absl::StatusCode::kUnauthenticated:
    case absl::StatusCode::kPermissionDenied:
    case absl::StatusCode::kAlreadyExists:
      return false;
    default:
      return true;
  }
}

void ArenaHold::Release() {
  if (shm_ != nullptr) shm_->Free(regions_);
  regions_.clear();
}

void ArenaSession::Leak(std::shared_ptr<ResponseLease> lease) {
  if (!lease) return;
  std::lock_guard lock(leaked_mu_);
  leaked_.push_back(std::move(lease));
}

absl::StatusOr<std::shared_ptr<ResponseLease>> ArenaSession::AllocateResponse(ShmTransport* shm,
                                                                              int64_t tokens) {
  const uint64_t bound = ResponseBytesBound(server_, tokens, options_.bf16_rows ? 2 : 4);
  if (bound > shm->capacity()) {
    if (options_.transport == GrpcClientOptions::Transport::kShm) {
      return absl::ResourceExhaustedError(
          absl::StrCat("meft.shm_arena_mb: the shared-memory arena (", shm->capacity() >> 20,
                       " MiB) is too small for the answer to ", tokens, " tokens (up to ",
                       bound >> 20, " MiB); raise meft.shm_arena_mb"));
    }
    return std::shared_ptr<ResponseLease>();
  }
  return shm->AllocateResponse(bound);
}

absl::StatusOr<ShmTransport*> ArenaSession::Transport() {
  std::lock_guard lock(transport_mu_);
  if (transport_decided_) {
    if (!transport_error_.ok()) return transport_error_;
    return shm_.get();
  }
  if (options_.transport == GrpcClientOptions::Transport::kGrpc) {
    transport_decided_ = true;
    spdlog::info("transport to {}: gRPC (meft.transport: grpc)", options_.address);
    return nullptr;
  }
  const bool required = options_.transport == GrpcClientOptions::Transport::kShm;
  absl::Status status;
  // With auto, only loopback addresses try the arena. With shm, any address does (a compose
  // service name, say): AttachArena's nonce check proves that both share the host.
  if (!required && !rpc::IsLoopback(options_.address)) {
    status = absl::FailedPreconditionError(
        absl::StrCat(options_.address, " is not a loopback address"));
  } else {
    status = SetUp();
  }
  const bool transient = absl::IsUnavailable(status) || absl::IsDeadlineExceeded(status) ||
                         absl::IsCancelled(status) || absl::IsAborted(status);
  transport_decided_ = !transient;
  if (status.ok()) {
    spdlog::info("transport to {}: shared memory (arena {}, {} MiB{})", options_.address,
                 shm_->arena().name(), shm_->arena().size() >> 20,
                 shm_->pinned() ? ", pinned for CUDA" : "");
    return shm_.get();
  }
  shm_.reset();
  if (required) {
    const absl::Status error = absl::Status(
        status.code(),
        absl::StrCat("meft.transport: shm, but the shared-memory arena cannot be used: ",
                     status.message()));
    if (!transient) transport_error_ = error;
    return error;
  }
  if (transient) {
    spdlog::debug("transport to {}: gRPC for now (shared memory not set up yet: {})",
                  options_.address, std::string(status.message()));
    return nullptr;
  }
  spdlog::info("transport to {}: gRPC (shared memory not used: {})", options_.address,
               std::string(status.message()));
  return nullptr;
}

absl::Status ArenaSession::SetUp() {
  MEFT_ASSIGN_OR_RETURN(server_, rpcs_.describe());
  uint64_t bytes = options_.shm_arena_bytes;
  if (bytes == 0) bytes = DefaultArenaBytes(server_, options_.bf16_rows ? 2 : 4);
  MEFT_ASSIGN_OR_RETURN(shm_, ShmTransport::Create(bytes, options_.shm_pin));
  return Attach(shm_.get());
}

absl::Status ArenaSession::Attach(ShmTransport* shm) {
  MEFT_ASSIGN_OR_RETURN(const uint64_t id, rpcs_.attach(shm->AttachRequest()));
  shm->set_arena_id(id);
  return absl::OkStatus();
}

absl::Status ArenaSession::Reattach(ShmTransport* shm, uint64_t lost_id) {
  {
    std::lock_guard lock(attach_mu_);
    // Another thread may have attached again already.
    if (shm->arena_id() == lost_id) MEFT_RETURN_IF_ERROR(Attach(shm));
  }
  spdlog::info("parameter server {} had lost the shared-memory arena; attached it again",
               options_.address);
  return absl::OkStatus();
}

}  // namespace meft::worker
