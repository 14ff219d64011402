#pragma once

// The gRPC face of the parameter server: the meft.v1.ParamServer service plus the standard
// grpc.health.v1 health service, on an address that must be loopback unless TLS and a token are
// configured or insecure is set.

#include <grpcpp/server.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/metrics/metrics.h"
#include "common/rpc/address.h"  // IsLoopback
#include "param_server/server/param_server.h"

namespace meft::rpc {

// Whether workers may attach a shared-memory arena (AttachArena, the same-host transport).
enum class ShmAttach {
  kAuto,  // only when the listener is a loopback address
  kOn,    // on any listener (the nonce check still proves the worker shares this host)
  kOff,   // never: workers use tensors inline in gRPC messages
};

struct RpcOptions {
  std::string listen = "127.0.0.1:50051";  // HOST:PORT; port 0 picks a free port
  int max_message_bytes = 1024 << 20;      // larger messages get RESOURCE_EXHAUSTED
  bool insecure = false;                   // allow a non-loopback listener without TLS/token
  // TLS: PEM files. With cert and key set the listener speaks TLS only; with client_ca also set,
  // clients must present a certificate signed by that CA (mutual TLS). "" = not set.
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_client_ca_file;
  // File holding the bearer token (surrounding whitespace ignored). When set, every
  // meft.v1.ParamServer call must carry the metadata `authorization: Bearer <token>` or gets
  // UNAUTHENTICATED; the grpc.health.v1 service stays open. "" = no token.
  std::string token_file;
  ShmAttach shm_attach = ShmAttach::kAuto;
};

// Whether AttachArena is allowed under `options` (see ShmAttach).
bool ShmAttachAllowed(const RpcOptions& options);

// OK for a loopback listener, for a non-loopback one with TLS (cert and key) and a token, or
// with `insecure`. Otherwise INVALID_ARGUMENT naming `listen` and each missing setting. Also
// rejects half a TLS configuration (a cert without a key, a client CA without both).
absl::Status CheckListenAddress(const RpcOptions& options);

class RunningServer {
 public:
  ~RunningServer();
  int port() const { return port_; }
  // Stops accepting calls and waits for in-flight calls to finish (at most `grace_seconds`).
  void Shutdown(double grace_seconds);
  // Blocks until Shutdown.
  void Wait();
  // Starts answering with `domain` (not null; it must outlive the server) and reports SERVING.
  // Before, every meft.v1.ParamServer call gets UNAVAILABLE "store loading" and health says
  // NOT_SERVING. Call once.
  void SetReady(server::ParamServer* domain);
  // Unmaps shared-memory arenas whose workers are gone (ArenaRegistry::ReleaseUnlinked); call it
  // now and then. Returns how many.
  size_t ReleaseUnlinkedArenas();

 private:
  friend absl::StatusOr<std::unique_ptr<RunningServer>> StartServer(const RpcOptions&,
                                                                    server::ParamServer*,
                                                                    metrics::Registry*);
  class Service;
  RunningServer() = default;
  std::unique_ptr<Service> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

// Starts serving `domain` (which must outlive the returned server); health reports SERVING for
// "" and "meft.v1.ParamServer". With `domain` null the server listens but is not ready (health
// NOT_SERVING, calls UNAVAILABLE) until SetReady: start it before a long store load.
// `registry` may be null. Reads the TLS and token files named in `options` once, here; errors
// name the file.
absl::StatusOr<std::unique_ptr<RunningServer>> StartServer(const RpcOptions& options,
                                                           server::ParamServer* domain,
                                                           metrics::Registry* registry);

}  // namespace meft::rpc
