// `meft-worker export` and the python/ package against meft's own evaluation: an adapter is
// trained for a few steps (MEFT through a real parameter server in-process on port 0, or the
// parallel baseline), checkpointed, exported, and restored into a fresh server/adapter as
// `meft-worker eval --checkpoint` does; meft's logits for fixed left-padded prompts are then
// compared by python/tests/compare_logits.py with transformers + meft_adapter on the exported
// folder (an independent implementation of DESIGN §2). The script also checks that the adapter
// moves the logits by far more than the tolerance, so a do-nothing adapter cannot pass.
//
// Needs the Python environment (MEFT_VENV) and, for SmolLM2, MEFT_SMOLLM2_DIR: the environment
// variables, else the CMake cache variables of the same names. Missing ones fail the test.

#include "gpu_worker/app/export.h"

#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/safetensors/safetensors.h"
#include "gmock/gmock.h"
#include "gpu_worker/adapters/baselines.h"
#include "gpu_worker/adapters/meft_adapter.h"
#include "gpu_worker/model/llama.h"
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
namespace st = ::meft::safetensors;
using ::testing::HasSubstr;

// The configured value of a path setting: the environment variable, else the CMake cache value.
std::string Setting(const char* name, const char* configured) {
  const char* env = std::getenv(name);
  return env != nullptr && *env != '\0' ? env : configured;
}

std::string Venv() { return Setting("MEFT_VENV", MEFT_VENV_CONFIGURED); }
std::string SmolLM2Dir() { return Setting("MEFT_SMOLLM2_DIR", MEFT_SMOLLM2_CONFIGURED); }

// Runs a shell command; returns its exit code and output (stdout and stderr).
std::pair<int, std::string> Shell(const std::string& command) {
  std::string out;
  FILE* p = ::popen((command + " 2>&1").c_str(), "r");
  if (p == nullptr) return {-1, "popen failed"};
  char buf[4096];
  while (size_t n = std::fread(buf, 1, sizeof(buf), p)) out.append(buf, n);
  const int status = ::pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

std::string Quote(const std::string& s) { return "'" + s + "'"; }

// One scenario: model, server settings, worker settings, tolerance on fp32 logits.
struct Case {
  std::string name;
  std::string model_dir;  // "" = SmolLM2
  std::string adapter = "meft";
  std::vector<uint32_t> layers = {0, 1};
  int64_t rows = 256;
  int64_t top_k = 16;
  int64_t n_probe = 4;
  int64_t max_rows = 0;
  server::Mode mode = server::Mode::kPerToken;
  bool gated = true;
  int64_t prefetch = 0;
  bool bf16_rows = true;
  bool use_cli = false;  // export through the meft-worker binary instead of ExportAdapter
  double atol = 1e-4;
};

class ExportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::path(::testing::TempDir()) /
            absl::StrCat("meft_export_", ::getpid(), "_",
                         ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(root_);
    fs::create_directories(root_);
  }
  void TearDown() override { fs::remove_all(root_); }

  // An in-process server for `c`, a gRPC client and the MEFT adapter as a TrainTarget.
  struct Meft {
    std::unique_ptr<server::ParamServer> server;
    std::unique_ptr<rpc::RunningServer> running;
    std::unique_ptr<ParamClient> client;
    std::unique_ptr<MeftAdapter> adapter;
    TrainTarget target;
  };
  Meft StartMeft(const Case& c, int64_t dim) {
    Meft m;
    server::ServerOptions o;
    o.layers = c.layers;
    o.rows = c.rows;
    o.dim = dim;
    o.selector.top_k = c.top_k;
    o.selector.n_probe = c.n_probe;
    o.selector.max_rows = c.max_rows;
    o.selector.gated = c.gated;
    o.mode = c.mode;
    o.checkpoint_dir = (root_ / "server").string();
    m.server = *server::ParamServer::Create(o, nullptr);
    m.running = *rpc::StartServer({.listen = "127.0.0.1:0"}, m.server.get(), nullptr);
    GrpcClientOptions co;
    co.address = "127.0.0.1:" + std::to_string(m.running->port());
    co.bf16_rows = c.bf16_rows;
    m.client = *CreateGrpcParamClient(co);
    m.adapter = std::make_unique<MeftAdapter>(m.client.get(), *m.client->Describe(),
                                              MeftAdapterOptions{.prefetch_layers = c.prefetch});
    m.target = {.adapter = "meft",
                .hooks = m.adapter.get(),
                .meft = m.adapter.get(),
                .server = m.client.get()};
    return m;
  }

  // Trains `steps` optimizer steps of a tiny next-token task and returns checkpoint-<steps>/.
  std::string Train(const LlamaModel& model, const TrainTarget& target, int64_t steps) {
    auto loader = *DataLoader::Create(test_data::TinyDataset(12), 0,
                                      {.micro_batch_size = 4, .shuffle = true, .seed = 3});
    TrainerOptions o;
    o.max_steps = steps;
    o.lr = 5e-2;
    o.warmup_ratio = 0.0;
    o.progress = false;
    o.output_dir = (root_ / "run").string();
    auto trainer = Trainer::Create(&model, target, loader.get(), o);
    EXPECT_TRUE(trainer.ok()) << trainer.status();
    auto history = (*trainer)->Run();
    EXPECT_TRUE(history.ok()) << history.status();
    return (root_ / "run" / absl::StrCat("checkpoint-", steps)).string();
  }

  // Three prompts, left-padded to 9 positions, ids in [3, 60).
  static std::pair<torch::Tensor, torch::Tensor> Prompts() {
    const std::vector<std::vector<int64_t>> prompts = {
        {1, 17, 23, 41, 5, 9, 33, 12, 50}, {1, 44, 8, 30}, {1, 3, 59, 21, 27, 14}};
    torch::Tensor ids = torch::zeros({3, 9}, torch::kInt64);
    torch::Tensor mask = torch::zeros({3, 9}, torch::kInt64);
    for (int64_t b = 0; b < 3; ++b) {
      const int64_t n = static_cast<int64_t>(prompts[b].size());
      for (int64_t i = 0; i < n; ++i) {
        ids[b][9 - n + i] = prompts[b][i];
        mask[b][9 - n + i] = 1;
      }
    }
    return {ids, mask};
  }

  // Writes meft's logits for Prompts(), then runs the Python comparison on `export_dir`.
  void CompareWithPython(const LlamaModel& model, AdapterHooks* hooks, const std::string& model_dir,
                         const std::string& export_dir, double atol) {
    const auto [ids, mask] = Prompts();
    torch::Tensor logits;
    {
      torch::NoGradGuard no_grad;
      logits = model.Forward(ids, mask, nullptr, hooks).contiguous();
    }
    const std::string expected = (root_ / "expected.safetensors").string();
    auto bytes = [](const torch::Tensor& t) {
      return std::span<const uint8_t>(static_cast<const uint8_t*>(t.data_ptr()), t.nbytes());
    };
    auto shape = [](const torch::Tensor& t) {
      return std::vector<int64_t>(t.sizes().begin(), t.sizes().end());
    };
    ASSERT_TRUE(st::Write(expected, {{"input_ids", st::DType::kI64, shape(ids), bytes(ids)},
                                     {"attention_mask", st::DType::kI64, shape(mask), bytes(mask)},
                                     {"logits", st::DType::kF32, shape(logits), bytes(logits)}})
                    .ok());
    const std::string venv = Venv();
    ASSERT_TRUE(fs::exists(venv + "/bin/python"))
        << "MEFT_VENV='" << venv << "' is not a Python environment: run scripts/python-env.sh and "
        << "configure with -DMEFT_VENV=<the path it prints> (scripts/test.sh does)";
    const std::string src = MEFT_SOURCE_DIR;
    const auto [code, out] = Shell(absl::StrCat(
        "PYTHONPATH=", Quote(src + "/python"), " ", Quote(venv + "/bin/python"), " ",
        Quote(src + "/python/tests/compare_logits.py"), " --model-dir ", Quote(model_dir),
        " --export ", Quote(export_dir), " --expected ", Quote(expected), " --atol ", atol));
    std::cout << out;
    EXPECT_EQ(code, 0) << out;
  }

  // The MEFT scenario end to end.
  void RunMeft(const Case& c) {
    const std::string model_dir = c.model_dir.empty() ? SmolLM2Dir() : c.model_dir;
    ASSERT_TRUE(fs::exists(model_dir + "/config.json"))
        << "'" << model_dir << "' has no config.json (SmolLM2: run scripts/fetch-model.sh "
        << "smollm2-135m and set MEFT_SMOLLM2_DIR)";
    auto model = *LlamaModel::Load(model_dir, torch::kCPU, torch::kFloat32);
    const int64_t d = model->config().hidden_size;
    std::string checkpoint;
    {
      Meft trained = StartMeft(c, d);
      checkpoint = Train(*model, trained.target, 3);
    }
    const std::string export_dir = (root_ / "export").string();
    if (c.use_cli) {
      const auto [code, out] =
          Shell(absl::StrCat(Quote(MEFT_WORKER_BIN), " export --checkpoint ", Quote(checkpoint),
                             " --output ", Quote(export_dir), " --meft-prefetch-layers ",
                             c.prefetch, " --meft-bf16-rows=", c.bf16_rows ? "true" : "false"));
      ASSERT_EQ(code, 0) << out;
      EXPECT_THAT(out, HasSubstr("exported meft adapter of step 3"));
    } else {
      auto summary = ExportAdapter({.checkpoint = checkpoint,
                                    .output = export_dir,
                                    .prefetch_layers = c.prefetch,
                                    .bf16_rows = c.bf16_rows});
      ASSERT_TRUE(summary.ok()) << summary.status();
      EXPECT_EQ(summary->step, 3u);
      EXPECT_EQ(summary->layers, c.layers);
    }
    // meft's evaluation of the same checkpoint: a fresh server restores it.
    Meft eval = StartMeft(c, d);
    ASSERT_TRUE(LoadAdapterCheckpoint(checkpoint, eval.target).ok());
    eval.adapter->BeginMicroBatch(3, 0, /*training=*/false);
    CompareWithPython(*model, eval.adapter.get(), model_dir, export_dir, c.atol);
  }

  fs::path root_;
};

const std::string kLlamaTiny = std::string(MEFT_GOLDEN_DIR) + "/transformers/llama_tiny";
const std::string kMistralTiny = std::string(MEFT_GOLDEN_DIR) + "/transformers/mistral_tiny";

TEST_F(ExportTest, TinyLlamaPerTokenGatedThroughTheCli) {
  RunMeft({.name = "llama", .model_dir = kLlamaTiny, .use_cli = true});
}

TEST_F(ExportTest, TinyMistralUnionUngatedWithPrefetchAndRowCap) {
  RunMeft({.name = "mistral",
           .model_dir = kMistralTiny,
           .max_rows = 40,
           .mode = server::Mode::kUnion,
           .gated = false,
           .prefetch = 1});
}

TEST_F(ExportTest, TinyLlamaPerTokenFp32RowsPrefetchAndRowCap) {
  RunMeft({.name = "llama_fp32",
           .model_dir = kLlamaTiny,
           .max_rows = 48,
           .prefetch = 1,
           .bf16_rows = false});
}

// The real pretrained model, two layers adapted: logits within the bound meft's decoder keeps
// against transformers on this model (smollm2_test.cc).
TEST_F(ExportTest, SmolLM2PerTokenGated) {
  RunMeft({.name = "smollm2",
           .model_dir = "",
           .layers = {3, 17},
           .rows = 1024,
           .top_k = 32,
           .n_probe = 4,
           .atol = 1e-3});
}

TEST_F(ExportTest, TinyLlamaParallel) {
  auto model = *LlamaModel::Load(kLlamaTiny, torch::kCPU, torch::kFloat32);
  const int64_t d = model->config().hidden_size;
  const ParallelAdapterOptions po{.rows = 64, .layers = {0, 1}, .seed = 4};
  auto trained = *ParallelAdapter::Create(po, d, torch::kCPU);
  const std::string checkpoint = Train(
      *model, {.adapter = "parallel", .hooks = trained.get(), .local = trained->named_parameters()},
      3);
  const std::string export_dir = (root_ / "export").string();
  auto summary = ExportAdapter({.checkpoint = checkpoint, .output = export_dir});
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->adapter, "parallel");
  EXPECT_EQ(summary->parameters, 2 * 2 * 64 * d);
  // meft's evaluation: a fresh adapter loads the checkpoint.
  auto eval = *ParallelAdapter::Create({.rows = 64, .layers = {0, 1}, .seed = 99}, d, torch::kCPU);
  ASSERT_TRUE(LoadAdapterCheckpoint(
                  checkpoint,
                  {.adapter = "parallel", .hooks = eval.get(), .local = eval->named_parameters()})
                  .ok());
  CompareWithPython(*model, eval.get(), kLlamaTiny, export_dir, 1e-4);
}

TEST_F(ExportTest, BadInputNamesTheFile) {
  // No checkpoint at all.
  auto r = ExportAdapter({.checkpoint = (root_ / "nope").string(), .output = "x"});
  EXPECT_THAT(r.status().message(), HasSubstr("nope/trainer_state.json"));
  // A meft worker checkpoint whose server checkpoint is gone.
  fs::create_directories(root_ / "w");
  std::ofstream(root_ / "w" / "trainer_state.json")
      << R"({"adapter": "meft", "global_step": 2, "server_checkpoint": "gone/checkpoint-2"})";
  r = ExportAdapter({.checkpoint = (root_ / "w").string(), .output = (root_ / "o").string()});
  EXPECT_THAT(r.status().message(), HasSubstr("gone/checkpoint-2/adapter_config.json"));
  // LoRA is refused.
  std::ofstream(root_ / "w" / "trainer_state.json") << R"({"adapter": "lora", "global_step": 2})";
  r = ExportAdapter({.checkpoint = (root_ / "w").string(), .output = (root_ / "o").string()});
  EXPECT_THAT(r.status().message(), HasSubstr("\"lora\""));
  // A parallel checkpoint with a truncated safetensors file.
  std::ofstream(root_ / "w" / "trainer_state.json")
      << R"({"adapter": "parallel", "global_step": 2})";
  std::ofstream(root_ / "w" / "adapter_model.safetensors") << "\x10\x00\x00\x00";
  r = ExportAdapter({.checkpoint = (root_ / "w").string(), .output = (root_ / "o").string()});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_THAT(r.status().message(), HasSubstr("w/adapter_model.safetensors"));
  EXPECT_FALSE(fs::exists(root_ / "o"));
}

// Two shards, each owning one layer: the worker checkpoint's server_checkpoints are merged (a
// relative path is taken from the run folder); a layer held twice is refused naming both.
TEST_F(ExportTest, ShardCheckpointsAreMerged) {
  auto shard = [&](uint32_t layer, const std::string& name) {
    server::ServerOptions o;
    o.layers = {layer};
    o.rows = 64;
    o.dim = 8;
    o.init.seed = 5;
    o.checkpoint_dir = (root_ / "run" / name).string();
    auto s = *server::ParamServer::Create(o, nullptr);
    auto saved = s->SaveCheckpoint("");
    EXPECT_TRUE(saved.ok()) << saved.status();
    return checkpoint::Read(saved->path);
  };
  auto a = shard(0, "ps0");
  auto b = shard(1, "ps1");
  ASSERT_TRUE(a.ok() && b.ok());
  fs::create_directories(root_ / "run" / "checkpoint-0");
  std::ofstream(root_ / "run" / "checkpoint-0" / "trainer_state.json")
      << R"({"adapter": "meft", "global_step": 0, "server_checkpoints": [")"
      << (root_ / "run" / "ps0" / "checkpoint-0").string() << R"(", "ps1/checkpoint-0"]})";
  const std::string out = (root_ / "export").string();
  auto r = ExportAdapter({.checkpoint = (root_ / "run" / "checkpoint-0").string(), .output = out});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->layers, (std::vector<uint32_t>{0, 1}));
  auto file = *st::File::Open(out + "/adapter_model.safetensors");
  const checkpoint::Loaded* loaded[] = {&*a, &*b};
  for (uint32_t l : {0u, 1u}) {
    const store::LayerStore& layer = loaded[l]->layers[0];
    for (const auto& [block, want] :
         {std::pair{"keys", &layer.keys.param}, std::pair{"router", &layer.router.param}}) {
      auto data = *file->Data(absl::StrCat("layers.", l, ".", block));
      ASSERT_EQ(data.size(), want->size() * sizeof(float));
      EXPECT_EQ(std::memcmp(data.data(), want->data(), data.size()), 0) << l << " " << block;
    }
  }
  // The same shard twice.
  std::ofstream(root_ / "run" / "checkpoint-0" / "trainer_state.json")
      << R"({"adapter": "meft", "global_step": 0, "server_checkpoints": ["ps0/checkpoint-0",)"
      << R"( "ps0/checkpoint-0"]})";
  r = ExportAdapter({.checkpoint = (root_ / "run" / "checkpoint-0").string(), .output = out});
  EXPECT_THAT(r.status().message(), HasSubstr("layer 0 is also held by"));
}

// The Python side refuses a malformed export, naming the file and the field or tensor.
TEST_F(ExportTest, PythonNamesTheFileAndFieldOfABadExport) {
  const std::string venv = Venv();
  ASSERT_TRUE(fs::exists(venv + "/bin/python")) << "MEFT_VENV='" << venv << "' is not set up";
  const fs::path dir = root_ / "bad";
  fs::create_directories(dir);
  auto read = [&] {
    return Shell(absl::StrCat("PYTHONPATH=", Quote(std::string(MEFT_SOURCE_DIR) + "/python"), " ",
                              Quote(venv + "/bin/python"),
                              " -c 'import sys, meft_adapter as m; c = m.read_config(sys.argv[1]); "
                              "m.read_tensors(sys.argv[1], c)' ",
                              Quote(dir.string())));
  };
  std::ofstream(dir / "adapter_config.json")
      << R"({"format": "meft-export", "format_version": 1, "adapter": "meft", "r": 8, "d": 4,
             "layers": [0], "step": 1, "activation": "relu", "dtype": "float32", "E": 2,
             "top_k": 2, "max_rows": 0, "mode": "per_token", "gating": "gated",
             "prefetch_layers": 0, "row_dtype": "bf16"})";
  auto [code, out] = read();
  EXPECT_NE(code, 0);
  EXPECT_THAT(out, HasSubstr("bad/adapter_config.json: missing field \"n_probe\""));
  std::ofstream(dir / "adapter_config.json")
      << R"({"format": "meft-export", "format_version": 1, "adapter": "parallel", "r": 8, "d": 4,
             "layers": [0], "step": 1, "activation": "relu", "dtype": "float32"})";
  const std::vector<float> keys(8 * 4, 0.0f);
  ASSERT_TRUE(st::Write((dir / "adapter_model.safetensors").string(),
                        {{"layers.0.keys",
                          st::DType::kF32,
                          {8, 4},
                          {reinterpret_cast<const uint8_t*>(keys.data()), 8 * 4 * 4}}})
                  .ok());
  std::tie(code, out) = read();
  EXPECT_NE(code, 0);
  EXPECT_THAT(out,
              HasSubstr("bad/adapter_model.safetensors: tensor \"layers.0.values\" is missing"));
}

TEST_F(ExportTest, ServerCheckpointExportsDirectlyAndAMissingTensorIsNamed) {
  Case c{.name = "broken", .model_dir = kLlamaTiny};
  auto model = *LlamaModel::Load(kLlamaTiny, torch::kCPU, torch::kFloat32);
  std::string server_checkpoint;
  {
    Meft m = StartMeft(c, model->config().hidden_size);
    server_checkpoint = *m.client->SaveCheckpoint("");
  }
  // A server checkpoint exports directly; adapter.layers keeps only the layers named.
  auto ok = ExportAdapter(
      {.checkpoint = server_checkpoint, .output = (root_ / "direct").string(), .layers = {1}});
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->layers, std::vector<uint32_t>{1});
  std::ifstream config_file(root_ / "direct" / "adapter_config.json");
  const nlohmann::json config = nlohmann::json::parse(config_file);
  EXPECT_EQ(config["adapter"], "meft");
  EXPECT_EQ(config["r"], 256);
  EXPECT_EQ(config["top_k"], 16);
  EXPECT_EQ(config["n_probe"], 4);
  EXPECT_EQ(config["gating"], "gated");
  EXPECT_EQ(config["row_dtype"], "bf16");
  EXPECT_EQ(config["layers"], nlohmann::json::array({1}));
  auto st_file = *st::File::Open((root_ / "direct" / "adapter_model.safetensors").string());
  EXPECT_EQ(st_file->tensors().size(), 3u);
  EXPECT_NE(st_file->Find("layers.1.router"), nullptr);
  // A layer no checkpoint holds is an error naming the setting.
  auto missing = ExportAdapter(
      {.checkpoint = server_checkpoint, .output = (root_ / "o").string(), .layers = {5}});
  EXPECT_THAT(missing.status().message(), HasSubstr("adapter.layers: layer 5"));

  // Rewrite adapter_model.safetensors without layers.1.router.
  const std::string path = server_checkpoint + "/adapter_model.safetensors";
  std::vector<st::TensorToWrite> kept;
  {
    auto file = *st::File::Open(path);
    for (const st::TensorInfo& t : file->tensors()) {
      if (t.name != "layers.1.router")
        kept.push_back({t.name, t.dtype, t.shape, *file->Data(t.name)});
    }
    const std::string tmp = path + ".new";
    ASSERT_TRUE(st::Write(tmp, kept).ok());
    fs::rename(tmp, path);
  }
  auto r = ExportAdapter({.checkpoint = server_checkpoint, .output = (root_ / "o").string()});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound) << r.status();
  EXPECT_THAT(r.status().message(), HasSubstr("adapter_model.safetensors"));
  EXPECT_THAT(r.status().message(), HasSubstr("layers.1.router"));
}

}  // namespace
}  // namespace meft::worker
