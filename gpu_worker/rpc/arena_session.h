#pragma once

// The shared-memory side of one gRPC parameter-server client (DESIGN §3): deciding, at the first
// call that gets a definite answer, whether tensors travel through an arena (meft.transport);
// creating and attaching it, and attaching it again after a server restart; sizing the region an
// answer is written into; and keeping regions the server may still use out of the allocator.

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/shm/arena.h"
#include "gpu_worker/client/param_client.h"
#include "gpu_worker/rpc/grpc_param_client.h"
#include "gpu_worker/rpc/shm_transport.h"
#include "meft/v1/param_server.pb.h"

namespace meft::worker {

// Whether the server's handler may still be running after a call ended with `s` (the deadline
// passed, the connection broke, or the outcome is unknown), and so may still read the request's
// arena regions or write its answer into the response region. Such regions must not be handed
// out again; only OK and definite rejections prove that the handler is done with them.
bool MayStillRun(const absl::Status& s);

// Regions holding one request's tensors; freed by Release or on destruction.
class ArenaHold {
 public:
  explicit ArenaHold(ShmTransport* shm) : shm_(shm) {}  // null: nothing is ever held
  ~ArenaHold() { Release(); }
  ArenaHold(const ArenaHold&) = delete;
  ArenaHold& operator=(const ArenaHold&) = delete;
  void Release();
  // Forgets the regions without returning them to the allocator (see MayStillRun).
  void Leak() { regions_.clear(); }
  std::vector<shm::Region>* regions() { return &regions_; }

 private:
  ShmTransport* const shm_;
  std::vector<shm::Region> regions_;
};

// Thread-safe: every method may be called from several threads at once.
class ArenaSession {
 public:
  // The calls to the server the session makes, bound by the client (thread-safe).
  struct Rpcs {
    std::function<absl::StatusOr<ServerInfo>()> describe;
    // AttachArena; returns the arena id the server gave it.
    std::function<absl::StatusOr<uint64_t>(const v1::AttachArenaRequest&)> attach;
  };

  ArenaSession(const GrpcClientOptions& options, Rpcs rpcs)
      : options_(options), rpcs_(std::move(rpcs)) {}

  // The shared-memory transport, or null for inline tensors; decided at the first call that gets
  // a definite answer (a transient failure, such as the server being down or still loading, is
  // decided again at the next call). With meft.transport: shm, an arena that cannot be used is an
  // error.
  absl::StatusOr<ShmTransport*> Transport();

  // A region for the answer to `tokens` tokens; null (answer inline) when the arena is busy. An
  // answer that could never fit is an error with meft.transport: shm, inline with auto.
  absl::StatusOr<std::shared_ptr<ResponseLease>> AllocateResponse(ShmTransport* shm,
                                                                  int64_t tokens);

  // After the server answered that it does not know arena `lost_id` (it restarted): attaches the
  // arena again, unless another thread already has.
  absl::Status Reattach(ShmTransport* shm, uint64_t lost_id);

  // Keeps the response region of a call the server may still be answering out of the allocator
  // until the session is destroyed: a deliberate leak (rare: timeouts and broken connections),
  // bounded by the arena, which a new client's arena replaces.
  void Leak(std::shared_ptr<ResponseLease> lease);

 private:
  absl::Status SetUp();
  absl::Status Attach(ShmTransport* shm);

  const GrpcClientOptions options_;
  const Rpcs rpcs_;
  std::mutex transport_mu_;            // guards the four members below until decided
  bool transport_decided_ = false;     // Transport() reached a lasting decision
  absl::Status transport_error_;       // why meft.transport: shm cannot work
  std::shared_ptr<ShmTransport> shm_;  // null = inline tensors; fixed once decided
  ServerInfo server_;           // the server's description when shm_ was set up
  std::mutex attach_mu_;               // serialises re-attaching
  std::mutex leaked_mu_;
  std::vector<std::shared_ptr<ResponseLease>> leaked_;  // see Leak; guarded by leaked_mu_
};

}  // namespace meft::worker
