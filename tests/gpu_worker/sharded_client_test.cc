// Sharded parameter servers and recovery from a lost server: two real ParamServers (each owning
// one layer) behind loopback gRPC servers train bit-identically to one server owning both; shard
// descriptions that disagree or overlap are clear errors; a shard killed and restarted from its
// last checkpoint mid-training is waited for and training resumes to the same final adapter.

#include <torch/torch.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include "common/safetensors/safetensors.h"
#include "gmock/gmock.h"
#include "gpu_worker/client/retry.h"
#include "gpu_worker/client/sharded_param_client.h"
#include "gpu_worker/rpc/grpc_param_client.h"
#include "gpu_worker/train/trainer.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "param_server/checkpoint/checkpoint.h"
#include "param_server/rpc/service.h"
#include "param_server/server/param_server.h"
#include "tests/gpu_worker/tiny_dataset.h"

namespace meft::worker {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

TEST(RetryTest, BacksOffExponentiallyUpToTheTimeout) {
  std::vector<double> slept;
  BackoffOptions o{.initial_seconds = 0.5, .max_seconds = 4, .timeout_seconds = 12};
  o.sleep = [&](double s) { slept.push_back(s); };
  int calls = 0;
  absl::Status s = RetryWhileUnavailable(
      [&] {
        ++calls;
        return absl::UnavailableError("down");
      },
      o);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(s.message(), HasSubstr("gave up after 11.5 s"));
  EXPECT_THAT(slept, ElementsAre(0.5, 1, 2, 4, 4));
  EXPECT_EQ(calls, 6);

  slept.clear();
  calls = 0;
  s = RetryWhileUnavailable(
      [&] { return ++calls < 3 ? absl::UnavailableError("down") : absl::NotFoundError("other"); },
      o);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);  // anything but UNAVAILABLE ends the wait
  EXPECT_THAT(slept, ElementsAre(0.5, 1));

  o.timeout_seconds = 0;  // disabled: one try
  calls = 0;
  s = RetryWhileUnavailable(
      [&] {
        ++calls;
        return absl::UnavailableError("down");
      },
      o);
  EXPECT_EQ(s.message(), "down");
  EXPECT_EQ(calls, 1);
}

ServerInfo Describe(std::vector<uint32_t> layers) {
  ServerInfo d;
  d.layers = std::move(layers);
  d.rows = 256;
  d.dim = 32;
  d.experts = 16;
  d.n_probe = 4;
  d.top_k = 16;
  d.max_tokens = 100;
  d.step = 7;
  return d;
}

TEST(MergeShardDescriptionsTest, UnionOfDisjointLayersAndClearErrors) {
  auto merged = MergeShardDescriptions({"a:1", "b:2"}, {Describe({2, 0}), Describe({1, 3})});
  ASSERT_TRUE(merged.ok()) << merged.status();
  EXPECT_THAT(merged->layers, ElementsAre(0, 1, 2, 3));
  EXPECT_EQ(merged->step, 7u);

  ServerInfo other = Describe({1});
  other.top_k = 8;
  auto bad = MergeShardDescriptions({"a:1", "b:2"}, {Describe({0}), other});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(bad.status().message(), HasSubstr("a:1 and b:2 disagree on top_k: 16 vs 8"));

  // A shard restarted from an older checkpoint is behind: the lowest step, for --resume.
  other = Describe({1});
  other.step = 6;
  merged = MergeShardDescriptions({"a:1", "b:2"}, {Describe({0}), other});
  ASSERT_TRUE(merged.ok()) << merged.status();
  EXPECT_EQ(merged->step, 6u);

  bad = MergeShardDescriptions({"a:1", "b:2", "c:3"},
                               {Describe({0, 1}), Describe({2}), Describe({3, 1})});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(bad.status().message(), HasSubstr("layer 1 is owned by both a:1 and c:3"));
}

TEST(ShardCheckpointsTest, JoinAndSplit) {
  EXPECT_EQ(JoinShardCheckpoints({"/x/checkpoint-3"}), "/x/checkpoint-3");
  EXPECT_THAT(SplitShardCheckpoints(JoinShardCheckpoints({"/a/c-1", "/b/c-1"})),
              ElementsAre("/a/c-1", "/b/c-1"));
}

// A parameter server owning `layers`, behind a loopback gRPC server; Restart() simulates a
// crash and a restart from the latest checkpoint (`restore: latest`) on the same port.
struct ServerProcessInProcess {
  server::ServerOptions options;
  std::unique_ptr<server::ParamServer> server;
  std::unique_ptr<rpc::RunningServer> running;
  int port = 0;

  void Start() {
    server = *server::ParamServer::Create(options, nullptr);
    const std::string listen = "127.0.0.1:" + std::to_string(port);
    auto r = rpc::StartServer({.listen = listen}, server.get(), nullptr);
    ASSERT_TRUE(r.ok()) << r.status();
    running = *std::move(r);
    port = running->port();
  }
  void Stop() {
    running.reset();
    server.reset();
  }
  void StartFromLatest() {
    server = *server::ParamServer::Create(options, nullptr);
    auto latest = checkpoint::FindLatest(options.checkpoint_dir);
    ASSERT_TRUE(latest.ok()) << latest.status();
    ASSERT_TRUE(server->RestoreCheckpoint(*latest, false).ok());
    auto r =
        rpc::StartServer({.listen = "127.0.0.1:" + std::to_string(port)}, server.get(), nullptr);
    ASSERT_TRUE(r.ok()) << r.status();
    running = *std::move(r);
  }
  std::string address() const { return "127.0.0.1:" + std::to_string(port); }
};

using test_data::TinyDataset;

// The worker side of one run: model, data, client (one server or sharded), adapter, trainer.
struct Run {
  std::vector<std::unique_ptr<ServerProcessInProcess>> servers;
  std::unique_ptr<LlamaModel> model;
  std::unique_ptr<DataLoader> loader;
  std::unique_ptr<ParamClient> client;
  std::unique_ptr<MeftAdapter> meft;
  TrainTarget target;
  std::unique_ptr<Trainer> trainer;
};

std::unique_ptr<DataLoader> TinyLoader() {
  return *DataLoader::Create(TinyDataset(12), 0,
                             {.micro_batch_size = 4, .shuffle = true, .seed = 3});
}

// One server per entry of `layer_sets`, all with the same seed and shapes; checkpoints under
// root/server-<i>, worker checkpoints under root/worker.
std::unique_ptr<Run> MakeRun(const std::vector<std::vector<uint32_t>>& layer_sets,
                             const fs::path& root, TrainerOptions o) {
  auto run = std::make_unique<Run>();
  run->model =
      *LlamaModel::Load(MEFT_GOLDEN_DIR "/transformers/llama_tiny", torch::kCPU, torch::kFloat32);
  run->loader = TinyLoader();
  std::vector<ParamShard> shards;
  for (size_t i = 0; i < layer_sets.size(); ++i) {
    auto s = std::make_unique<ServerProcessInProcess>();
    s->options.layers = layer_sets[i];
    s->options.rows = 256;
    s->options.dim = run->model->config().hidden_size;
    s->options.selector.top_k = 16;
    s->options.selector.n_probe = 4;
    s->options.checkpoint_dir = (root / ("server-" + std::to_string(i))).string();
    s->Start();
    GrpcClientOptions co;
    co.address = s->address();
    co.deadline_seconds = 30;
    shards.push_back({co.address, *CreateGrpcParamClient(co)});
    run->servers.push_back(std::move(s));
  }
  if (shards.size() == 1) {
    run->client = std::move(shards[0].client);
  } else {
    auto sharded = ShardedParamClient::Create(std::move(shards));
    EXPECT_TRUE(sharded.ok()) << sharded.status();
    run->client = *std::move(sharded);
  }
  run->meft = std::make_unique<MeftAdapter>(run->client.get(), *run->client->Describe(),
                                            MeftAdapterOptions{});
  run->target.adapter = "meft";
  run->target.hooks = run->meft.get();
  run->target.meft = run->meft.get();
  run->target.server = run->client.get();
  o.output_dir = (root / "worker").string();
  run->trainer = *Trainer::Create(run->model.get(), run->target, run->loader.get(), o);
  return run;
}

TrainerOptions SmallTraining() {
  TrainerOptions o;
  o.max_steps = 6;
  o.grad_accum = 2;
  o.lr = 1e-2;
  o.warmup_ratio = 0.2;
  o.max_grad_norm = 0.05;  // clipping active, so the summed norm matters to the bit
  o.save_every = 3;
  o.progress = false;
  return o;
}

// Every tensor of `file` in the server checkpoint folders `dirs`, by name.
std::map<std::string, std::vector<uint8_t>> CheckpointTensors(const std::vector<fs::path>& dirs,
                                                              const std::string& file) {
  std::map<std::string, std::vector<uint8_t>> out;
  for (const fs::path& dir : dirs) {
    auto f = safetensors::File::Open((dir / file).string());
    EXPECT_TRUE(f.ok()) << f.status();
    if (!f.ok()) continue;
    for (const auto& info : (*f)->tensors()) {
      auto data = (*f)->Data(info.name);
      out[info.name].assign(data->begin(), data->end());
    }
  }
  return out;
}

class ShardedTrainingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::path(::testing::TempDir()) / ("meft_sharded_" + std::to_string(::getpid()));
    fs::remove_all(root_);
  }
  void TearDown() override { fs::remove_all(root_); }
  fs::path root_;
};

TEST_F(ShardedTrainingTest, TwoShardsTrainBitIdenticallyToOneServer) {
  auto one = MakeRun({{0, 1}}, root_ / "one", SmallTraining());
  auto two = MakeRun({{1}, {0}}, root_ / "two", SmallTraining());
  EXPECT_EQ(two->client->Describe()->layers, (std::vector<uint32_t>{0, 1}));
  auto h1 = one->trainer->Run();
  auto h2 = two->trainer->Run();
  ASSERT_TRUE(h1.ok()) << h1.status();
  ASSERT_TRUE(h2.ok()) << h2.status();
  ASSERT_EQ(h1->size(), 6u);
  ASSERT_EQ(h2->size(), 6u);
  for (size_t i = 0; i < h1->size(); ++i) {
    EXPECT_EQ((*h1)[i].loss, (*h2)[i].loss) << "step " << i;
    EXPECT_EQ((*h1)[i].grad_norm, (*h2)[i].grad_norm) << "step " << i;
  }
  EXPECT_LT(h1->back().grad_norm, 1e9);
  for (const char* file : {"adapter_model.safetensors", "optimizer.safetensors"}) {
    const auto a = CheckpointTensors({root_ / "one/server-0/checkpoint-6"}, file);
    const auto b = CheckpointTensors(
        {root_ / "two/server-0/checkpoint-6", root_ / "two/server-1/checkpoint-6"}, file);
    ASSERT_FALSE(a.empty());
    EXPECT_EQ(a, b) << file;
  }
  // The worker checkpoint records both shard checkpoints, in meft.servers order (the shard
  // owning layer 1 first here), and a second trainer resumed from it reaches the same adapter.
  std::ifstream in(root_ / "two/worker/checkpoint-3/trainer_state.json");
  const auto state = nlohmann::json::parse(in);
  EXPECT_FALSE(state.contains("server_checkpoint"));
  ASSERT_EQ(state["server_checkpoints"].size(), 2u);
  EXPECT_THAT(state["server_checkpoints"][0].get<std::string>(), HasSubstr("server-0"));
  EXPECT_THAT(state["server_checkpoints"][1].get<std::string>(), HasSubstr("server-1"));
  const std::vector<fs::path> final_dirs = {root_ / "two/server-0/checkpoint-6",
                                            root_ / "two/server-1/checkpoint-6"};
  const auto straight = CheckpointTensors(final_dirs, "adapter_model.safetensors");
  auto loader = TinyLoader();
  TrainerOptions o = SmallTraining();
  o.output_dir = (root_ / "two/again").string();
  auto again = *Trainer::Create(two->model.get(), two->target, loader.get(), o);
  ASSERT_TRUE(again->Resume((root_ / "two/worker/checkpoint-3").string()).ok());
  EXPECT_EQ(again->step(), 3);
  ASSERT_TRUE(again->Run().ok());
  EXPECT_EQ(CheckpointTensors(final_dirs, "adapter_model.safetensors"), straight);
}

TEST_F(ShardedTrainingTest, ConcurrentLookupsOnDifferentLayersRouteToTheirShard) {
  auto two = MakeRun({{0}, {1}}, root_ / "two", SmallTraining());
  torch::manual_seed(5);
  const torch::Tensor x = torch::randn({6, 32});
  std::vector<absl::StatusOr<LookupReply>> got(2, absl::UnknownError("not run"));
  std::vector<std::thread> threads;
  for (uint32_t l = 0; l < 2; ++l) {
    threads.emplace_back([&, l] {
      got[l] = two->client->Lookup({.step = 0, .micro_step = 0, .layer = l}, x, {}, false);
    });
  }
  for (auto& t : threads) t.join();
  for (uint32_t l = 0; l < 2; ++l) {
    ASSERT_TRUE(got[l].ok()) << got[l].status();
    GrpcClientOptions co;
    co.address = two->servers[l]->address();
    auto direct = *CreateGrpcParamClient(co);
    auto want = direct->Lookup({.step = 0, .micro_step = 0, .layer = l}, x, {}, false);
    ASSERT_TRUE(want.ok()) << want.status();
    EXPECT_TRUE(torch::equal(got[l]->row_ids, want->row_ids)) << "layer " << l;
    EXPECT_TRUE(torch::equal(got[l]->keys, want->keys)) << "layer " << l;
  }
  auto missing = two->client->Lookup({.step = 0, .micro_step = 0, .layer = 5}, x, {}, false);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("layer 5"));
}

TEST_F(ShardedTrainingTest, ShardsAtDifferentStepsConnectButAFreshRunFailsClearly) {
  auto two = MakeRun({{0}, {1}}, root_ / "two", SmallTraining());
  GrpcClientOptions co;
  co.address = two->servers[1]->address();
  ASSERT_TRUE((*CreateGrpcParamClient(co))->Step(0, 0.0, 1.0).ok());
  // Connecting works (a --resume would roll both back) and reports the lowest step.
  std::vector<ParamShard> shards;
  for (const auto& s : two->servers) {
    co.address = s->address();
    shards.push_back({co.address, *CreateGrpcParamClient(co)});
  }
  auto again = ShardedParamClient::Create(std::move(shards));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*(*again)->RestartStep(), 0u);
  auto described = (*again)->Describe();
  EXPECT_EQ(described.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(described.status().message(), HasSubstr("is at optimizer step 0 but"));
  EXPECT_THAT(described.status().message(), HasSubstr("is at step 1"));
  // Training from step 0 without resuming stops before the first step.
  auto history = two->trainer->Run();
  EXPECT_EQ(history.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(history.status().message(), HasSubstr("is at step 1"));
}

TEST_F(ShardedTrainingTest, ShardRestartedFromItsCheckpointIsWaitedForAndTrainingResumes) {
  auto reference = MakeRun({{0}, {1}}, root_ / "reference", SmallTraining());
  auto want = reference->trainer->Run();
  ASSERT_TRUE(want.ok()) << want.status();

  TrainerOptions o = SmallTraining();
  o.reconnect_timeout_seconds = 60;
  auto run = MakeRun({{0}, {1}}, root_ / "crash", o);
  std::thread restarter;
  bool crashed = false;
  auto history = run->trainer->Run([&](const StepStats& stats) -> absl::Status {
    if (stats.step == 4 && !crashed) {
      // Shard 1 dies after checkpoint-3 (its state of step 4 is lost) and comes back later.
      crashed = true;
      run->servers[1]->Stop();
      restarter = std::thread([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(1500));
        run->servers[1]->StartFromLatest();
      });
    }
    return absl::OkStatus();
  });
  restarter.join();
  ASSERT_TRUE(history.ok()) << history.status();
  ASSERT_TRUE(crashed);
  EXPECT_EQ(run->trainer->step(), 6);
  // Statistics of the steps after checkpoint-3 are those of the replayed steps only, and equal
  // the uninterrupted run's.
  ASSERT_EQ(history->size(), 6u);
  for (size_t i = 0; i < 6; ++i) {
    EXPECT_EQ((*history)[i].step, (*want)[i].step);
    EXPECT_EQ((*history)[i].loss, (*want)[i].loss) << "step " << i + 1;
  }
  for (const char* file : {"adapter_model.safetensors", "optimizer.safetensors"}) {
    for (const char* shard : {"server-0", "server-1"}) {
      const auto a = CheckpointTensors({root_ / "reference" / shard / "checkpoint-6"}, file);
      const auto b = CheckpointTensors({root_ / "crash" / shard / "checkpoint-6"}, file);
      ASSERT_FALSE(a.empty());
      EXPECT_EQ(a, b) << shard << " " << file;
    }
  }
}

}  // namespace
}  // namespace meft::worker
