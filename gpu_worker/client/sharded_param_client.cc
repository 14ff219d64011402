#include "gpu_worker/client/sharded_param_client.h"

#include <algorithm>
#include <exception>
#include <functional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/status.h"

namespace meft::worker {
namespace {

// The fields every shard must agree on, by name, for error messages. Not the step: a shard
// restarted from an older checkpoint is behind until the worker resumes and rolls them all back.
std::vector<std::pair<const char*, int64_t>> SharedFields(const ServerInfo& d) {
  return {{"rows (r)", d.rows},         {"dim (d)", d.dim},
          {"experts (E)", d.experts},   {"n_probe", d.n_probe},
          {"top_k", d.top_k},           {"max_rows", d.max_rows},
          {"max_tokens", d.max_tokens}, {"mode (per_token)", d.per_token ? 1 : 0},
          {"gated", d.gated ? 1 : 0}};
}

}  // namespace

absl::StatusOr<ServerInfo> MergeShardDescriptions(
    const std::vector<std::string>& addresses, const std::vector<ServerInfo>& descriptions) {
  if (descriptions.empty() || descriptions.size() != addresses.size()) {
    return absl::InvalidArgumentError("meft.servers: no parameter server given");
  }
  ServerInfo merged = descriptions[0];
  std::map<uint32_t, size_t> owner;
  for (size_t i = 0; i < descriptions.size(); ++i) {
    const auto want = SharedFields(descriptions[0]);
    const auto got = SharedFields(descriptions[i]);
    for (size_t f = 0; f < want.size(); ++f) {
      if (want[f].second != got[f].second) {
        return absl::FailedPreconditionError(absl::StrCat(
            "meft.servers: the parameter servers ", addresses[0], " and ", addresses[i],
            " disagree on ", want[f].first, ": ", want[f].second, " vs ", got[f].second));
      }
    }
    merged.step = std::min(merged.step, descriptions[i].step);
    for (uint32_t l : descriptions[i].layers) {
      const auto [it, inserted] = owner.emplace(l, i);
      if (!inserted) {
        return absl::FailedPreconditionError(
            absl::StrCat("meft.servers: layer ", l, " is owned by both ", addresses[it->second],
                         " and ", addresses[i], "; give each server a disjoint adapter.layers"));
      }
    }
  }
  merged.layers.clear();
  for (const auto& [l, i] : owner) merged.layers.push_back(l);
  return merged;
}

std::string JoinShardCheckpoints(const std::vector<std::string>& paths) {
  return absl::StrJoin(paths, "\n");
}

std::vector<std::string> SplitShardCheckpoints(const std::string& joined) {
  return absl::StrSplit(joined, '\n');
}

absl::StatusOr<std::unique_ptr<ShardedParamClient>> ShardedParamClient::Create(
    std::vector<ParamShard> shards) {
  if (shards.empty()) return absl::InvalidArgumentError("meft.servers: no parameter server given");
  std::unique_ptr<ShardedParamClient> c(new ShardedParamClient(std::move(shards)));
  for (const ParamShard& s : c->shards_) c->addresses_.push_back(s.address);
  MEFT_ASSIGN_OR_RETURN(const std::vector<ServerInfo> all, c->DescribeAll());
  MEFT_ASSIGN_OR_RETURN(const ServerInfo merged, MergeShardDescriptions(c->addresses_, all));
  for (size_t i = 0; i < all.size(); ++i) {
    for (uint32_t l : all[i].layers) c->owner_[l] = i;
  }
  c->layers_ = merged.layers;
  return c;
}

absl::StatusOr<std::vector<ServerInfo>> ShardedParamClient::DescribeAll() const {
  std::vector<ServerInfo> out(shards_.size());
  MEFT_RETURN_IF_ERROR(ForEachShard([&](size_t i) -> absl::Status {
    MEFT_ASSIGN_OR_RETURN(out[i], shards_[i].client->Describe());
    return absl::OkStatus();
  }));
  return out;
}

absl::Status ShardedParamClient::ForEachShard(const std::function<absl::Status(size_t)>& fn) const {
  std::vector<absl::Status> results(shards_.size());
  // No exception leaves a shard's call (that would terminate the process), and every
  // started thread is joined even when starting the next one throws.
  const auto run = [&results, &fn](size_t i) {
    try {
      results[i] = fn(i);
    } catch (const std::exception& e) {
      results[i] = absl::InternalError(absl::StrCat("parameter server shard ", i, ": ", e.what()));
    } catch (...) {
      results[i] = absl::InternalError(absl::StrCat("parameter server shard ", i, ": exception"));
    }
  };
  struct JoinAll {
    std::vector<std::thread> threads;
    ~JoinAll() {
      for (std::thread& t : threads) t.join();
    }
  };
  {
    JoinAll started;
    try {
      started.threads.reserve(shards_.size());
      for (size_t i = 1; i < shards_.size(); ++i) started.threads.emplace_back(run, i);
    } catch (const std::exception& e) {
      return absl::ResourceExhaustedError(
          absl::StrCat("starting a thread per parameter server shard: ", e.what()));
    }
    run(0);
  }  // joins every started thread
  for (const absl::Status& s : results) MEFT_RETURN_IF_ERROR(s);
  return absl::OkStatus();
}

absl::StatusOr<ParamClient*> ShardedParamClient::Owner(uint32_t layer) const {
  const auto it = owner_.find(layer);
  if (it == owner_.end()) {
    return absl::NotFoundError(absl::StrCat("layer ", layer, ": no parameter server in [",
                                            absl::StrJoin(addresses_, ", "), "] owns it"));
  }
  return shards_[it->second].client.get();
}

absl::StatusOr<LookupReply> ShardedParamClient::Lookup(const RequestHeader& header,
                                                        const torch::Tensor& x,
                                                        const torch::Tensor& token_mask,
                                                        bool training) {
  MEFT_ASSIGN_OR_RETURN(ParamClient * owner, Owner(header.layer));
  return owner->Lookup(header, x, token_mask, training);
}

absl::Status ShardedParamClient::Gradients(const RequestHeader& header, const torch::Tensor& key_grads,
                                           const torch::Tensor& value_grads,
                                           const torch::Tensor& gate_grads) {
  MEFT_ASSIGN_OR_RETURN(ParamClient * owner, Owner(header.layer));
  return owner->Gradients(header, key_grads, value_grads, gate_grads);
}

absl::StatusOr<std::vector<std::pair<uint32_t, double>>> ShardedParamClient::LayerGradNorms(
    uint64_t step) {
  std::vector<std::vector<std::pair<uint32_t, double>>> per_shard(shards_.size());
  MEFT_RETURN_IF_ERROR(ForEachShard([&](size_t i) -> absl::Status {
    MEFT_ASSIGN_OR_RETURN(per_shard[i], shards_[i].client->LayerGradNorms(step));
    return absl::OkStatus();
  }));
  std::vector<std::pair<uint32_t, double>> all;
  for (const auto& norms : per_shard) all.insert(all.end(), norms.begin(), norms.end());
  std::sort(all.begin(), all.end());
  return all;
}

absl::StatusOr<double> ShardedParamClient::GradNorm(uint64_t step) {
  if (shards_.size() == 1) return shards_[0].client->GradNorm(step);
  MEFT_ASSIGN_OR_RETURN(const auto norms, LayerGradNorms(step));
  // Ascending layer order from 0.0, exactly as one server sums its layers.
  double total = 0.0;
  for (const auto& [layer, norm] : norms) total += norm;
  return total;
}

absl::Status ShardedParamClient::Step(uint64_t step, double lr, double clip_factor) {
  return ForEachShard([&](size_t i) { return shards_[i].client->Step(step, lr, clip_factor); });
}

absl::StatusOr<std::string> ShardedParamClient::SaveCheckpoint(const std::string& directory) {
  std::vector<std::string> paths(shards_.size());
  MEFT_RETURN_IF_ERROR(ForEachShard([&](size_t i) -> absl::Status {
    MEFT_ASSIGN_OR_RETURN(paths[i], shards_[i].client->SaveCheckpoint(directory));
    return absl::OkStatus();
  }));
  return JoinShardCheckpoints(paths);
}

absl::Status ShardedParamClient::RestoreCheckpoint(const std::string& path) {
  const std::vector<std::string> paths = SplitShardCheckpoints(path);
  if (paths.size() != shards_.size()) {
    return absl::FailedPreconditionError(
        absl::StrCat("the checkpoint records ", paths.size(), " server checkpoint(s) but ",
                     shards_.size(), " parameter servers are configured (meft.servers)"));
  }
  return ForEachShard([&](size_t i) { return shards_[i].client->RestoreCheckpoint(paths[i]); });
}

absl::StatusOr<ServerInfo> ShardedParamClient::Describe() {
  MEFT_ASSIGN_OR_RETURN(const std::vector<ServerInfo> all, DescribeAll());
  MEFT_ASSIGN_OR_RETURN(ServerInfo merged, MergeShardDescriptions(addresses_, all));
  for (size_t i = 1; i < all.size(); ++i) {
    if (all[i].step != all[0].step) {
      return absl::FailedPreconditionError(absl::StrCat(
          "meft.servers: the parameter server ", addresses_[0], " is at optimizer step ",
          all[0].step, " but ", addresses_[i], " is at step ", all[i].step,
          ": restart them from checkpoints of the same step, or resume the worker from a "
          "checkpoint (--resume), which rolls every server back to it"));
    }
  }
  if (merged.layers != layers_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "meft.servers: the servers now own layers [", absl::StrJoin(merged.layers, ","), "], not [",
        absl::StrJoin(layers_, ","), "] as when the worker connected"));
  }
  for (size_t i = 0; i < all.size(); ++i) {
    for (uint32_t l : all[i].layers) {
      const size_t was = owner_.at(l);  // present: the layer sets are equal
      if (was != i) {
        return absl::FailedPreconditionError(absl::StrCat("meft.servers: layer ", l, " moved from ",
                                                          addresses_[was], " to ", addresses_[i],
                                                          " since the worker connected"));
      }
    }
  }
  return merged;
}

absl::StatusOr<uint64_t> ShardedParamClient::RestartStep() {
  MEFT_ASSIGN_OR_RETURN(const std::vector<ServerInfo> all, DescribeAll());
  uint64_t lowest = all[0].step;
  for (const ServerInfo& d : all) lowest = std::min(lowest, d.step);
  return lowest;
}

}  // namespace meft::worker
