#include "gpu_worker/app/server_connect.h"

#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "gpu_worker/client/sharded_param_client.h"
#include "spdlog/spdlog.h"

namespace meft::worker {
namespace {

// What the parameter server answers (UNAVAILABLE) until its store is initialised or restored.
constexpr char kStoreLoading[] = "store loading";

// Describes the server at `address`, waiting while it loads its store.
absl::StatusOr<ServerInfo> DescribeWhenReady(ParamClient& client, const std::string& key,
                                                    const std::string& address,
                                                    const BackoffOptions& backoff) {
  absl::StatusOr<ServerInfo> described;
  const absl::Status waited = RetryWhileUnavailable(
      [&]() -> absl::Status {
        described = client.Describe();
        if (absl::IsUnavailable(described.status()) &&
            !absl::StrContains(described.status().message(), kStoreLoading)) {
          return absl::FailedPreconditionError("unreachable");  // not worth waiting for
        }
        return described.status();
      },
      backoff,
      [&](const absl::Status&, double seconds) {
        spdlog::info("parameter server {} is loading its store; retrying in {} s", address,
                     seconds);
      });
  if (absl::IsUnavailable(described.status()) || absl::IsDeadlineExceeded(described.status())) {
    return absl::UnavailableError(absl::StrCat(
        key, ": cannot reach the parameter server at ", address,
        " (start meft-param-server first): ",
        absl::IsUnavailable(waited) ? waited.message() : described.status().message()));
  }
  if (!described.ok()) {
    return absl::Status(described.status().code(),
                        absl::StrCat(key, ": ", described.status().message()));
  }
  return described;
}

}  // namespace

absl::StatusOr<std::vector<std::string>> ServerAddresses(const WorkerConfig& c) {
  if (c.servers.empty()) return std::vector<std::string>{c.server};
  if (c.server != WorkerConfig().server) {
    return absl::InvalidArgumentError(
        "meft.server and meft.servers are both set: use meft.servers alone for several "
        "parameter servers, or meft.server for one");
  }
  std::set<std::string> seen;
  for (const std::string& a : c.servers) {
    if (!seen.insert(a).second) {
      return absl::InvalidArgumentError(absl::StrCat("meft.servers: ", a, " is listed twice"));
    }
  }
  return c.servers;
}

BackoffOptions ReconnectBackoff(const WorkerConfig& c) {
  BackoffOptions b;
  b.timeout_seconds = c.reconnect_timeout_seconds;
  return b;
}

absl::StatusOr<ConnectedServers> ConnectParamServers(const WorkerConfig& c,
                                                     const GrpcClientOptions& base) {
  MEFT_ASSIGN_OR_RETURN(const std::vector<std::string> addresses, ServerAddresses(c));
  ConnectedServers out;
  out.key = c.servers.empty() ? "meft.server" : "meft.servers";
  out.addresses = absl::StrJoin(addresses, ",");
  const BackoffOptions backoff = ReconnectBackoff(c);
  std::vector<ParamShard> shards;
  std::vector<ServerInfo> descriptions;
  for (const std::string& address : addresses) {
    GrpcClientOptions o = base;
    o.address = address;
    MEFT_ASSIGN_OR_RETURN(std::unique_ptr<ParamClient> client, CreateGrpcParamClient(o));
    MEFT_ASSIGN_OR_RETURN(ServerInfo d,
                          DescribeWhenReady(*client, out.key, address, backoff));
    descriptions.push_back(std::move(d));
    shards.push_back({address, std::move(client)});
  }
  if (shards.size() == 1) {
    out.description = std::move(descriptions[0]);
    out.client = std::move(shards[0].client);
    return out;
  }
  MEFT_ASSIGN_OR_RETURN(auto sharded, ShardedParamClient::Create(std::move(shards)));
  // Not sharded->Describe(): it insists on one step, and shards restarted from different
  // checkpoints are only brought together by --resume after this (Trainer::Run checks the step).
  MEFT_ASSIGN_OR_RETURN(out.description, MergeShardDescriptions(addresses, descriptions));
  out.client = std::move(sharded);
  return out;
}

}  // namespace meft::worker
