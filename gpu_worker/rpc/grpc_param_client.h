#pragma once

// ParamClient over gRPC (meft.v1.ParamServer): the only worker code that sees protobuf.

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "gpu_worker/client/param_client.h"

namespace meft::worker {

struct GrpcClientOptions {
  std::string address = "127.0.0.1:50051";
  int max_message_bytes = 1024 << 20;
  double deadline_seconds = 600.0;  // per call
  bool bf16_rows = true;            // ask for bf16 key/value/router rows (else fp32)
  bool bf16_grads = false;          // send key/value gradients as bf16 (else fp32)
  // TLS: PEM paths. tls_ca_file set = TLS, verifying the server against that CA; tls_cert_file
  // and tls_key_file (both or neither, only with tls_ca_file) = client certificate for mutual
  // TLS. "" = plaintext.
  std::string tls_ca_file;
  std::string tls_cert_file;
  std::string tls_key_file;
  // File holding the bearer token (surrounding whitespace ignored), sent on every call as
  // `authorization: Bearer <token>`. "" = none.
  std::string token_file;
  // Same-host transport (DESIGN §3). kAuto: when `address` is a loopback address, tensors go
  // through a shared-memory arena that the server attaches, else (or when attaching fails)
  // inline in gRPC messages; the choice is logged once. kShm: the arena is required at any
  // address (AttachArena's nonce proves the shared host; calls fail when it cannot be attached).
  // kGrpc: always inline. A transient set-up failure (server unavailable) is retried next call.
  enum class Transport { kAuto, kShm, kGrpc };
  Transport transport = Transport::kAuto;
  // Arena size in bytes; 0 = DefaultArenaBytes of the server's description. At least 1 MiB.
  uint64_t shm_arena_bytes = 0;
  // Register the arena as pinned CUDA memory when LibTorch has CUDA and a device is present.
  bool shm_pin = true;
};

// Parses "auto", "shm" or "grpc".
absl::StatusOr<GrpcClientOptions::Transport> ParseTransport(const std::string& name);

// Reads the TLS and token files once (errors name the option and file) and connects lazily;
// every call returns the server's status with the method named. The transport is chosen at the
// first Lookup or Gradients call that gets a definite answer from the server. Thread-safe: calls
// may run concurrently from several threads. Answer tensors may alias the shared-memory arena; they
// stay valid after the client is gone.
absl::StatusOr<std::unique_ptr<ParamClient>> CreateGrpcParamClient(
    const GrpcClientOptions& options);

}  // namespace meft::worker
