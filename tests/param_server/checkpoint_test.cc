#include "param_server/checkpoint/checkpoint.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "common/io/file_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "param_server/server/param_server.h"

namespace meft {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::path(::testing::TempDir()) /
            ("meft_ckpt_" + std::to_string(::getpid()) + "_" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(root_);
    fs::create_directories(root_);
  }
  void TearDown() override { fs::remove_all(root_); }

  static server::ServerOptions Options() {
    server::ServerOptions o;
    o.layers = {1, 4};
    o.rows = 96;
    o.dim = 12;
    o.experts = 8;
    o.selector.n_probe = 3;
    o.selector.top_k = 6;
    o.init.seed = 77;
    return o;
  }

  // One lookup -> gradients -> step cycle on every layer, driven through the domain API with
  // inputs derived from `seed`, so two servers given the same seed see the same requests.
  static void TrainStep(server::ParamServer* s, uint64_t step, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal;
    const int64_t T = 7, d = 12, k = 6;
    for (uint32_t layer : {1u, 4u}) {
      std::vector<float> x(T * d);
      for (auto& v : x) v = normal(rng);
      const std::string x_bytes(reinterpret_cast<const char*>(x.data()), x.size() * 4);
      server::LookupCall call{
          {step, 0, layer}, {wire::DType::kFp32, {T, d}, x_bytes}, {}, true, wire::DType::kFp32};
      auto reply = s->Lookup(call);
      ASSERT_TRUE(reply.ok()) << reply.status();
      const int64_t n = reply->row_ids.shape[0];
      std::vector<float> kg(n * d), vg(n * d), gg(T * k, 0.0f);
      for (auto& v : kg) v = normal(rng);
      for (auto& v : vg) v = normal(rng);
      std::vector<int32_t> slots(T * k);
      std::memcpy(slots.data(), reply->token_rows.data.data(), slots.size() * 4);
      for (int64_t i = 0; i < T * k; ++i) gg[i] = slots[i] >= 0 ? normal(rng) : 0.0f;
      const std::string kb(reinterpret_cast<const char*>(kg.data()), kg.size() * 4);
      const std::string vb(reinterpret_cast<const char*>(vg.data()), vg.size() * 4);
      const std::string gb(reinterpret_cast<const char*>(gg.data()), gg.size() * 4);
      server::GradientsCall grads{{step, 0, layer},
                                  {wire::DType::kFp32, {n, d}, kb},
                                  {wire::DType::kFp32, {n, d}, vb},
                                  wire::TensorView{wire::DType::kFp32, {T, k}, gb}};
      auto g = s->Gradients(grads);
      ASSERT_TRUE(g.ok()) << g.status();
    }
    auto st = s->Step({step, 1e-2, 0.8, {}});
    ASSERT_TRUE(st.ok()) << st.status();
  }

  static std::string ReadAll(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

  fs::path root_;
};

TEST_F(CheckpointTest, RoundTripIsBitIdenticalAndContinuesIdentically) {
  auto a = server::ParamServer::Create(Options(), nullptr);
  ASSERT_TRUE(a.ok());
  for (uint64_t step = 0; step < 3; ++step) TrainStep(a->get(), step, 100 + step);
  auto saved = (*a)->SaveCheckpoint(root_.string());
  ASSERT_TRUE(saved.ok()) << saved.status();
  EXPECT_EQ(saved->step, 3u);
  EXPECT_EQ(saved->path, (root_ / "checkpoint-3").string());
  for (const char* f : {"adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors",
                        "trainer_state.json"}) {
    EXPECT_TRUE(fs::exists(root_ / "checkpoint-3" / f)) << f;
  }

  // A fresh server (different init seed) restored from it is the same state, byte for byte.
  server::ServerOptions other = Options();
  other.init.seed = 5;
  auto b = server::ParamServer::Create(other, nullptr);
  ASSERT_TRUE(b.ok());
  EXPECT_NE((*a)->StateDigest(), (*b)->StateDigest());
  auto restored = (*b)->RestoreCheckpoint(root_.string());  // a root: newest wins
  ASSERT_TRUE(restored.ok()) << restored.status();
  EXPECT_EQ(restored->step, 3u);
  EXPECT_EQ((*a)->StateDigest(), (*b)->StateDigest());
  EXPECT_EQ((*b)->Info().step, 3u);

  // Both continue identically...
  for (uint64_t step = 3; step < 5; ++step) {
    TrainStep(a->get(), step, 200 + step);
    TrainStep(b->get(), step, 200 + step);
    ASSERT_EQ((*a)->StateDigest(), (*b)->StateDigest()) << "after step " << step;
  }
  // ...and write byte-identical checkpoints.
  const fs::path ra = root_ / "a", rb = root_ / "b";
  ASSERT_TRUE((*a)->SaveCheckpoint(ra.string()).ok());
  ASSERT_TRUE((*b)->SaveCheckpoint(rb.string()).ok());
  for (const char* f : {"adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors",
                        "trainer_state.json"}) {
    EXPECT_EQ(ReadAll(ra / "checkpoint-5" / f), ReadAll(rb / "checkpoint-5" / f)) << f;
  }
}

TEST_F(CheckpointTest, PendingGradientsAreNotPartOfACheckpoint) {
  auto a = server::ParamServer::Create(Options(), nullptr);
  TrainStep(a->get(), 0, 1);
  ASSERT_TRUE((*a)->SaveCheckpoint(root_.string()).ok());
  auto b = server::ParamServer::Create(Options(), nullptr);
  ASSERT_TRUE((*b)->RestoreCheckpoint((root_ / "checkpoint-1").string()).ok());
  EXPECT_EQ((*a)->StateDigest(), (*b)->StateDigest());
}

// Writes a checkpoint in a child process that SIGKILLs itself at `kill_stage`; returns after
// the child died.
void WriteAndDie(const std::string& root, uint64_t step, const checkpoint::AdapterConfig& config,
                 const std::vector<const store::LayerStore*>& layers,
                 const std::string& kill_stage) {
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    checkpoint::WriteOptions options;
    options.on_stage = [&](absl::string_view stage) {
      if (stage == kill_stage) ::raise(SIGKILL);
    };
    (void)checkpoint::Write(root, step, config, layers, options);
    ::_exit(0);  // only reached if the stage never came
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(status)) << "child was not killed at stage " << kill_stage;
  ASSERT_EQ(WTERMSIG(status), SIGKILL);
}

TEST_F(CheckpointTest, KilledMidWriteNeverReplacesTheLastGoodOne) {
  checkpoint::AdapterConfig config;
  config.rows = 40;
  config.dim = 6;
  config.experts = 4;
  config.n_probe = 2;
  config.top_k = 3;
  config.mode = "per_token";
  config.layers = {0};
  config.router_init = "mean_keys";
  config.beta1 = 0.9;
  config.beta2 = 0.999;
  config.eps = 1e-8;
  auto good = store::LayerStore::Create(0, 40, 6, 4, {});
  ASSERT_TRUE(good.ok());
  ASSERT_TRUE(checkpoint::Write(root_.string(), 5, config, {&*good}).ok());
  const fs::path good_dir = root_ / "checkpoint-5";
  const std::string good_model = ReadAll(good_dir / "adapter_model.safetensors");

  store::InitOptions init;
  init.seed = 99;
  auto changed = store::LayerStore::Create(0, 40, 6, 4, init);
  for (const char* stage : {"adapter_model.safetensors", "optimizer.safetensors",
                            "adapter_config.json", "trainer_state.json", "rename"}) {
    SCOPED_TRACE(stage);
    // Overwriting the same step, and writing the next one: neither may damage checkpoint-5.
    WriteAndDie(root_.string(), 5, config, {&*changed}, stage);
    WriteAndDie(root_.string(), 6, config, {&*changed}, stage);
    EXPECT_EQ(ReadAll(good_dir / "adapter_model.safetensors"), good_model);
    EXPECT_FALSE(fs::exists(root_ / "checkpoint-6"));
    auto latest = checkpoint::FindLatest(root_.string());
    ASSERT_TRUE(latest.ok()) << latest.status();
    EXPECT_EQ(*latest, good_dir.string());
    auto loaded = checkpoint::Read(*latest);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    EXPECT_EQ(loaded->layers[0].keys.param, good->keys.param);
  }
  // Without a crash the new one lands, and a later write replaces it atomically.
  ASSERT_TRUE(checkpoint::Write(root_.string(), 6, config, {&*changed}).ok());
  EXPECT_EQ(*checkpoint::FindLatest(root_.string()), (root_ / "checkpoint-6").string());
  ASSERT_TRUE(checkpoint::Write(root_.string(), 5, config, {&*changed}).ok());
  EXPECT_EQ(checkpoint::Read(good_dir.string())->layers[0].keys.param, changed->keys.param);
}

// The parameters without the optimizer state, mapped: the bytes Read copies, for every layer.
TEST_F(CheckpointTest, OpenParametersMapsWhatReadLoads) {
  checkpoint::AdapterConfig config;
  config.rows = 40;
  config.dim = 6;
  config.experts = 4;
  config.mode = "union";
  config.layers = {2, 7};
  auto a = store::LayerStore::Create(2, 40, 6, 4, {.seed = 1});
  auto b = store::LayerStore::Create(7, 40, 6, 4, {.seed = 2});
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(checkpoint::Write(root_.string(), 3, config, {&*a, &*b}).ok());
  const std::string dir = (root_ / "checkpoint-3").string();
  fs::remove(root_ / "checkpoint-3" / "optimizer.safetensors");  // not needed
  auto view = checkpoint::OpenParameters(dir);
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_EQ(view->step, 3u);
  EXPECT_EQ(view->config.mode, "union");
  ASSERT_EQ(view->layers.size(), 2u);
  const store::LayerStore* stores[] = {&*a, &*b};
  for (size_t i = 0; i < 2; ++i) {
    const auto& l = view->layers[i];
    EXPECT_EQ(l.layer, stores[i]->layer);
    auto floats = [](std::span<const uint8_t> bytes) {
      std::vector<float> out(bytes.size() / sizeof(float));
      std::memcpy(out.data(), bytes.data(), bytes.size());
      return out;
    };
    EXPECT_EQ(floats(l.keys), stores[i]->keys.param);
    EXPECT_EQ(floats(l.values), stores[i]->values.param);
    EXPECT_EQ(floats(l.router), stores[i]->router.param);
  }
  // A missing config field names the file and the field.
  std::ofstream(root_ / "checkpoint-3" / "adapter_config.json") << R"({"format": "meft-adapter"})";
  auto bad = checkpoint::OpenParameters(dir);
  EXPECT_THAT(bad.status().message(), HasSubstr("adapter_config.json: missing field \"rows\""));
}

TEST_F(CheckpointTest, CorruptCheckpointsFailNamingFileAndTensor) {
  auto a = server::ParamServer::Create(Options(), nullptr);
  ASSERT_TRUE((*a)->SaveCheckpoint(root_.string()).ok());
  const fs::path dir = root_ / "checkpoint-0";
  const std::string model = ReadAll(dir / "adapter_model.safetensors");
  const std::string config = ReadAll(dir / "adapter_config.json");
  auto write = [](const fs::path& p, const std::string& s) {
    std::ofstream(p, std::ios::binary) << s;
  };
  auto restore_fails_with = [&](const std::string& needle) {
    const uint64_t before = (*a)->StateDigest();
    auto r = (*a)->RestoreCheckpoint(dir.string());
    EXPECT_FALSE(r.ok());
    EXPECT_THAT(r.status().message(), HasSubstr(needle));
    EXPECT_EQ((*a)->StateDigest(), before) << "a failed restore changed state";
  };

  write(dir / "adapter_model.safetensors", model.substr(0, model.size() / 2));
  restore_fails_with("adapter_model.safetensors");
  write(dir / "adapter_model.safetensors", model);

  // Rename one tensor in the header (same length keeps offsets valid).
  std::string renamed = model;
  const size_t at = renamed.find("layers.4.values");
  ASSERT_NE(at, std::string::npos);
  renamed.replace(at, 15, "layers.4.valuez");
  write(dir / "adapter_model.safetensors", renamed);
  restore_fails_with("layers.4.values");
  write(dir / "adapter_model.safetensors", model);

  write(dir / "adapter_config.json", "{ not json");
  restore_fails_with("adapter_config.json");
  std::string bad_rows = config;
  bad_rows.replace(bad_rows.find("\"rows\": 96"), 10, "\"rows\": 48");
  write(dir / "adapter_config.json", bad_rows);
  restore_fails_with("rows");
  std::string bad_type = config;
  bad_type.replace(bad_type.find("\"gated\": true"), 13, "\"gated\": 1");
  write(dir / "adapter_config.json", bad_type);
  restore_fails_with("gated");
  write(dir / "adapter_config.json", config);

  fs::remove(dir / "optimizer.safetensors");
  restore_fails_with("optimizer.safetensors");
}

}  // namespace
}  // namespace meft
