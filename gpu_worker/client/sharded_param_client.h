#pragma once

// A ParamClient over several parameter-server shards, each owning a disjoint set of decoder
// layers (DESIGN §3: "several server shards, each owning a set of layers, are one config
// line"). Lookups and gradients go to the layer's owner; the squared gradient norm is the sum
// over every shard's layers (in layer order, so it is bit-identical to one server owning them
// all); Step, SaveCheckpoint and RestoreCheckpoint go to every shard.

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "gpu_worker/client/param_client.h"

namespace meft::worker {

struct ParamShard {
  std::string address;  // for error messages
  std::unique_ptr<ParamClient> client;
};

// The description of the shards together: every field but `layers` and `step` must agree (error
// naming both shard addresses and the field), owned layers must be disjoint (error naming the
// layer and both shards); `layers` is their sorted union and `step` the lowest shard step.
// `descriptions[i]` belongs to `addresses[i]`.
absl::StatusOr<ServerInfo> MergeShardDescriptions(
    const std::vector<std::string>& addresses, const std::vector<ServerInfo>& descriptions);

// Several shard checkpoint paths travel through ParamClient's single-string checkpoint API
// joined by '\n' (shard order); one shard's path is itself.
std::string JoinShardCheckpoints(const std::vector<std::string>& paths);
std::vector<std::string> SplitShardCheckpoints(const std::string& joined);

class ShardedParamClient final : public ParamClient {
 public:
  // Describes every shard (errors as MergeShardDescriptions; an unreachable shard's error names
  // its address) and fixes the layer routing. At least one shard. The shards may be at different
  // steps (RestoreCheckpoint brings them together).
  static absl::StatusOr<std::unique_ptr<ShardedParamClient>> Create(std::vector<ParamShard> shards);

  // Thread-safe for concurrent calls on different layers (the routing never changes after
  // Create; each shard's client is thread-safe). A layer no shard owns gets NOT_FOUND.
  absl::StatusOr<LookupReply> Lookup(const RequestHeader& header, const torch::Tensor& x,
                                      const torch::Tensor& token_mask, bool training) override;
  absl::Status Gradients(const RequestHeader& header, const torch::Tensor& key_grads,
                         const torch::Tensor& value_grads,
                         const torch::Tensor& gate_grads) override;
  absl::StatusOr<double> GradNorm(uint64_t step) override;
  absl::StatusOr<std::vector<std::pair<uint32_t, double>>> LayerGradNorms(uint64_t step) override;
  // Runs on every shard in parallel; fails (with the first failing shard's error) if any fails.
  absl::Status Step(uint64_t step, double lr, double clip_factor) override;
  // Saves on every shard; returns JoinShardCheckpoints of their paths, in shard order.
  absl::StatusOr<std::string> SaveCheckpoint(const std::string& directory) override;
  // `path` holds one path per shard (JoinShardCheckpoints); each shard restores its own.
  absl::Status RestoreCheckpoint(const std::string& path) override;
  // Describes every shard again; the layers must still be the ones routed at Create and every
  // shard must be at the same step (FAILED_PRECONDITION naming two shards and their steps).
  absl::StatusOr<ServerInfo> Describe() override;
  // The lowest step over the shards (a restarted shard is behind the others).
  absl::StatusOr<uint64_t> RestartStep() override;

  size_t num_shards() const { return shards_.size(); }

 private:
  explicit ShardedParamClient(std::vector<ParamShard> shards) : shards_(std::move(shards)) {}
  absl::StatusOr<ParamClient*> Owner(uint32_t layer) const;
  // Runs fn(i) for every shard, shards after the first on their own threads; the first error in
  // shard order, or OK.
  absl::Status ForEachShard(const std::function<absl::Status(size_t)>& fn) const;
  absl::StatusOr<std::vector<ServerInfo>> DescribeAll() const;

  std::vector<ParamShard> shards_;
  std::vector<std::string> addresses_;
  std::map<uint32_t, size_t> owner_;  // layer -> shard index; fixed after Create
  std::vector<uint32_t> layers_;      // the union at Create
};

}  // namespace meft::worker
