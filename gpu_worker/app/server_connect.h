#pragma once

// Connecting the worker to its parameter server(s): `meft.server` (one server) or
// `meft.servers` (shards owning disjoint layers, behind a ShardedParamClient).

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "gpu_worker/app/worker_config.h"
#include "gpu_worker/client/param_client.h"
#include "gpu_worker/client/retry.h"
#include "gpu_worker/rpc/grpc_param_client.h"

namespace meft::worker {

struct ConnectedServers {
  std::unique_ptr<ParamClient> client;  // one server's client, or a ShardedParamClient
  ServerInfo description;        // merged over the shards
  std::string key;                      // "meft.server" or "meft.servers", for messages
  std::string addresses;                // comma-separated, for messages
};

// The addresses configured: meft.servers, or meft.server alone. INVALID_ARGUMENT when both are
// set (meft.server differs from its default) or meft.servers names an address twice.
absl::StatusOr<std::vector<std::string>> ServerAddresses(const WorkerConfig& config);

// Backoff for waiting on the servers, bounded by meft.reconnect_timeout_seconds.
BackoffOptions ReconnectBackoff(const WorkerConfig& config);

// Connects to every configured server with `base` (its address replaced) and describes it.
// A server that answers but is still loading its store is waited for with backoff; one that
// cannot be reached fails at once with a hint to start it. Errors name the key and address.
absl::StatusOr<ConnectedServers> ConnectParamServers(const WorkerConfig& config,
                                                     const GrpcClientOptions& base);

}  // namespace meft::worker
