#pragma once

// The gRPC face of the parameter server: the meft.v1.ParamServer service plus the standard
// grpc.health.v1 health service, on an address that must be loopback unless insecure is set.

#include <grpcpp/server.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/metrics/metrics.h"
#include "param_server/server/param_server.h"

namespace meft::rpc {

struct RpcOptions {
  std::string listen = "127.0.0.1:50051";  // HOST:PORT; port 0 picks a free port
  int max_message_bytes = 1024 << 20;      // larger messages get RESOURCE_EXHAUSTED
  bool insecure = false;                   // allow a non-loopback listener without TLS
};

// True for 127.0.0.0/8, ::1 and "localhost" hosts.
bool IsLoopback(const std::string& listen);

// INVALID_ARGUMENT naming `listen` when it is not loopback and `insecure` is not set.
absl::Status CheckListenAddress(const RpcOptions& options);

class RunningServer {
 public:
  ~RunningServer();
  int port() const { return port_; }
  // Stops accepting calls and waits for in-flight calls to finish (at most `grace_seconds`).
  void Shutdown(double grace_seconds);
  // Blocks until Shutdown.
  void Wait();

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
// "" and "meft.v1.ParamServer". `registry` may be null.
absl::StatusOr<std::unique_ptr<RunningServer>> StartServer(const RpcOptions& options,
                                                           server::ParamServer* domain,
                                                           metrics::Registry* registry);

}  // namespace meft::rpc
