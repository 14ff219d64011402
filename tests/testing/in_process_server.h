#pragma once

// A real parameter server in this process: the domain ParamServer behind its gRPC face on a
// loopback port the kernel picks, for tests that talk to it as a worker would.

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/metrics/metrics.h"
#include "param_server/rpc/service.h"
#include "param_server/server/param_server.h"
#include "tests/testing/test_certs.h"

namespace meft::testing {

// A store small enough for any test: layer 0, 64 rows of dim 8 in 8 experts, n_probe 3, top_k 5,
// seed 3; every other field at its default. Tests change what they need.
server::ServerOptions SmallServerOptions();

// RpcOptions that listen on 127.0.0.1:0 (a free port), everything else at its default.
rpc::RpcOptions LoopbackRpcOptions();

// A ParamServer and its gRPC face. Members are declared in destruction order: the gRPC server
// stops before the domain it serves goes away, and the registry outlives both. Tests may derive
// from it to add their own client or helpers. Start is not thread-safe; the started servers are.
struct InProcessServer {
  metrics::Registry registry;                   // the server's metrics
  std::unique_ptr<server::ParamServer> domain;  // set by Start
  std::unique_ptr<rpc::RunningServer> running;  // set by Start; serves `domain`

  // Creates a ParamServer with `options` (metrics into `registry`) and serves it with
  // `rpc_options` (the default listens on 127.0.0.1:0). Errors are those of
  // ParamServer::Create and rpc::StartServer. Call once.
  absl::Status Start(const server::ServerOptions& options,
                     const rpc::RpcOptions& rpc_options = LoopbackRpcOptions());

  // The port the server listens on. Requires a successful Start.
  int port() const { return running->port(); }
  // "127.0.0.1:<port>", for a client. Requires a successful Start.
  std::string address() const;
};

// Serves `domain` (which must outlive the server; `registry` may be null) on 127.0.0.1:0 over TLS
// with the certificates and token of `certs`; `mutual` also requires client certificates signed
// by the test CA.
absl::StatusOr<std::unique_ptr<rpc::RunningServer>> StartTlsServer(const TestCerts& certs,
                                                                   bool mutual,
                                                                   server::ParamServer* domain,
                                                                   metrics::Registry* registry);

}  // namespace meft::testing
