#include "tests/testing/in_process_server.h"

#include <string>
#include <utility>

namespace meft::testing {

server::ServerOptions SmallServerOptions() {
  server::ServerOptions o;
  o.layers = {0};
  o.rows = 64;
  o.dim = 8;
  o.experts = 8;
  o.selector.n_probe = 3;
  o.selector.top_k = 5;
  o.init.seed = 3;
  return o;
}

rpc::RpcOptions LoopbackRpcOptions() {
  rpc::RpcOptions o;
  o.listen = "127.0.0.1:0";
  return o;
}

std::string InProcessServer::address() const { return "127.0.0.1:" + std::to_string(port()); }

absl::Status InProcessServer::Start(const server::ServerOptions& options,
                                    const rpc::RpcOptions& rpc_options) {
  absl::StatusOr<std::unique_ptr<server::ParamServer>> created =
      server::ParamServer::Create(options, &registry);
  if (!created.ok()) return created.status();
  domain = *std::move(created);
  absl::StatusOr<std::unique_ptr<rpc::RunningServer>> started =
      rpc::StartServer(rpc_options, domain.get(), &registry);
  if (!started.ok()) return started.status();
  running = *std::move(started);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<rpc::RunningServer>> StartTlsServer(const TestCerts& certs,
                                                                   bool mutual,
                                                                   server::ParamServer* domain,
                                                                   metrics::Registry* registry) {
  rpc::RpcOptions o = LoopbackRpcOptions();
  o.tls_cert_file = certs.server_cert;
  o.tls_key_file = certs.server_key;
  if (mutual) o.tls_client_ca_file = certs.ca;
  o.token_file = certs.token_file;
  return rpc::StartServer(o, domain, registry);
}

}  // namespace meft::testing
