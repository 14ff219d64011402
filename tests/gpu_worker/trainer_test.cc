// The training loop: the loss against a reference, loss going down for every
// adapter (MEFT through a real parameter server on port 0), and bit-identical resume.

#include "gpu_worker/train/trainer.h"

#include <torch/torch.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <span>
#include <sstream>

#include "common/safetensors/safetensors.h"
#include "gmock/gmock.h"
#include "gpu_worker/adapters/baselines.h"
#include "gpu_worker/rpc/grpc_param_client.h"
#include "gpu_worker/train/run_folder.h"
#include "gpu_worker/train/train_log.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "param_server/rpc/service.h"
#include "param_server/server/param_server.h"
#include "tests/gpu_worker/tiny_dataset.h"

namespace meft::worker {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using nlohmann::json;

TEST(LossTest, CausalShiftAndIgnoreIndex) {
  // Two positions predict labels at t+1; one label ignored.
  const torch::Tensor logits = torch::tensor({{{2.0f, 0.0f}, {0.0f, 3.0f}, {1.0f, 1.0f}}});
  const torch::Tensor labels = torch::tensor({{-100L, 1L, -100L}});
  auto [loss, count] = CausalLmLoss(logits, labels);
  EXPECT_EQ(count, 1);
  EXPECT_NEAR(loss.item<double>(), std::log(1 + std::exp(2.0)), 1e-6);  // -log softmax([2,0])[1]
}

using test_data::TinyDataset;

struct World {
  std::unique_ptr<LlamaModel> model;
  std::unique_ptr<DataLoader> loader;
  // meft
  std::unique_ptr<server::ParamServer> server;
  std::unique_ptr<rpc::RunningServer> running;
  std::unique_ptr<ParamClient> client;
  std::unique_ptr<MeftAdapter> meft;
  // baselines
  std::unique_ptr<ParallelAdapter> parallel;
  std::unique_ptr<LoraAdapter> lora;
  TrainTarget target;
};

std::unique_ptr<World> MakeWorld(const std::string& adapter,
                                 const std::string& server_ckpt_dir = "") {
  auto w = std::make_unique<World>();
  auto model =
      LlamaModel::Load(MEFT_GOLDEN_DIR "/transformers/llama_tiny", torch::kCPU, torch::kFloat32);
  EXPECT_TRUE(model.ok()) << model.status();
  w->model = *std::move(model);
  auto loader =
      DataLoader::Create(TinyDataset(12), 0, {.micro_batch_size = 4, .shuffle = true, .seed = 3});
  EXPECT_TRUE(loader.ok()) << loader.status();
  w->loader = *std::move(loader);
  w->target.adapter = adapter;
  const int64_t d = w->model->config().hidden_size;
  if (adapter == "meft") {
    server::ServerOptions o;
    o.layers = {0, 1};
    o.rows = 256;
    o.dim = d;
    o.selector.top_k = 16;
    o.selector.n_probe = 4;
    o.checkpoint_dir = server_ckpt_dir;
    w->server = *server::ParamServer::Create(o, nullptr);
    w->running = *rpc::StartServer({.listen = "127.0.0.1:0"}, w->server.get(), nullptr);
    GrpcClientOptions co;
    co.address = "127.0.0.1:" + std::to_string(w->running->port());
    w->client = *CreateGrpcParamClient(co);
    w->meft = std::make_unique<MeftAdapter>(w->client.get(), *w->client->Describe(),
                                            MeftAdapterOptions{});
    w->target.hooks = w->meft.get();
    w->target.meft = w->meft.get();
    w->target.server = w->client.get();
  } else if (adapter == "parallel") {
    w->parallel =
        *ParallelAdapter::Create({.rows = 64, .layers = {0, 1}, .seed = 4}, d, torch::kCPU);
    w->target.hooks = w->parallel.get();
    w->target.local = w->parallel->named_parameters();
  } else {
    const auto& c = w->model->config();
    const int64_t kv = c.num_key_value_heads * c.head_dim;
    w->lora = *LoraAdapter::Create(
        {.rank = 4, .layers = {0, 1}},
        {{"q_proj", {d, c.num_attention_heads * c.head_dim}}, {"v_proj", {d, kv}}}, torch::kCPU);
    w->target.hooks = w->lora.get();
    w->target.local = w->lora->named_parameters();
    w->target.lora = w->lora.get();
    w->target.base_model = "llama_tiny";
  }
  return w;
}

class TrainLossTest : public ::testing::TestWithParam<std::string> {};

TEST_P(TrainLossTest, LossGoesDown) {
  auto w = MakeWorld(GetParam());
  TrainerOptions o;
  o.max_steps = 24;
  o.lr = GetParam() == "lora" ? 3e-2 : 1e-2;
  o.warmup_ratio = 0.0;
  o.progress = false;
  auto trainer = Trainer::Create(w->model.get(), w->target, w->loader.get(), o);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  auto history = (*trainer)->Run();
  ASSERT_TRUE(history.ok()) << history.status();
  ASSERT_EQ(history->size(), 24u);
  double first = 0, last = 0;
  for (int i = 0; i < 3; ++i) first += (*history)[i].loss;
  for (int i = 21; i < 24; ++i) last += (*history)[i].loss;
  EXPECT_LT(last, 0.7 * first) << "first " << first / 3 << " last " << last / 3;
  for (const auto& s : *history) EXPECT_TRUE(std::isfinite(s.grad_norm));
}

INSTANTIATE_TEST_SUITE_P(Adapters, TrainLossTest, ::testing::Values("meft", "parallel", "lora"));

class ResumeTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    root_ = fs::path(::testing::TempDir()) /
            ("meft_resume_" + std::to_string(::getpid()) + "_" + GetParam());
    fs::remove_all(root_);
    fs::create_directories(root_);
  }
  void TearDown() override { fs::remove_all(root_); }
  fs::path root_;
};

TEST_P(ResumeTest, ContinuesBitIdentically) {
  const std::string adapter = GetParam();
  TrainerOptions o;
  o.max_steps = 6;
  o.lr = 1e-2;
  o.warmup_ratio = 0.2;
  o.grad_accum = 2;
  o.progress = false;
  o.save_every = 3;
  // Straight through, saving checkpoint-3 on the way.
  auto a = MakeWorld(adapter, (root_ / "server").string());
  o.output_dir = (root_ / "a").string();
  auto ta = *Trainer::Create(a->model.get(), a->target, a->loader.get(), o);
  ASSERT_TRUE(ta->Run().ok());
  ASSERT_TRUE(fs::exists(root_ / "a" / "checkpoint-3" / "trainer_state.json"));

  // A fresh world resumed from checkpoint-3.
  auto b = MakeWorld(adapter, (root_ / "server").string());
  o.output_dir = (root_ / "b").string();
  auto tb = *Trainer::Create(b->model.get(), b->target, b->loader.get(), o);
  ASSERT_TRUE(tb->Resume((root_ / "a" / "checkpoint-3").string()).ok());
  EXPECT_EQ(tb->step(), 3);
  ASSERT_TRUE(tb->Run().ok());

  if (adapter == "meft") {
    EXPECT_EQ(a->server->StateDigest(), b->server->StateDigest());
  } else {
    for (size_t i = 0; i < a->target.local.size(); ++i) {
      EXPECT_TRUE(torch::equal(a->target.local[i].second, b->target.local[i].second))
          << a->target.local[i].first;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Adapters, ResumeTest, ::testing::Values("meft", "parallel", "lora"));

TEST(TrainerErrorTest, MismatchedServerStepAndBadCheckpointAreClearErrors) {
  auto w = MakeWorld("meft");
  TrainerOptions o;
  o.max_steps = 2;
  o.progress = false;
  auto t = *Trainer::Create(w->model.get(), w->target, w->loader.get(), o);
  // The server moves on behind the trainer's back.
  ASSERT_TRUE(w->client->Step(0, 0.0, 1.0).ok());
  auto r = t->Run();
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), HasSubstr("optimizer step 1"));

  const fs::path dir =
      fs::path(::testing::TempDir()) / ("meft_badckpt_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::ofstream(dir / "trainer_state.json") << "{\"global_step\": -1}";
  auto s = t->Resume(dir.string());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("trainer_state.json"));
  EXPECT_THAT(s.message(), HasSubstr("global_step"));
  fs::remove_all(dir);
}

TEST(TrainerErrorTest, StopRequestEndsTheWaitForALostServer) {
  auto w = MakeWorld("meft");
  TrainerOptions o;
  o.max_steps = 4;
  o.progress = false;
  o.reconnect_timeout_seconds = 600;
  bool crashed = false;
  int polls_after_crash = 0;
  // False at the poll before the next step, true from the recovery's wait on.
  o.stop_requested = [&] { return crashed && polls_after_crash++ > 0; };
  auto t = *Trainer::Create(w->model.get(), w->target, w->loader.get(), o);
  auto r = t->Run([&](const StepStats& stats) -> absl::Status {
    if (stats.step == 1) {
      EXPECT_TRUE(w->meft->WaitForStep().ok());
      w->running.reset();  // the server goes away and does not come back
      crashed = true;
    }
    return absl::OkStatus();
  });
  EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled) << r.status();
  EXPECT_THAT(r.status().message(), HasSubstr("stop requested at step 1"));
}

// The LoRA checkpoint is in PEFT's layout (names and adapter_config.json as PEFT 0.21.2 writes
// them for LlamaForCausalLM; that PEFT loads it is smollm2_peft_test.cc's check), and a
// checkpoint in meft's older layout (LoraAdapter's names, {"adapter": "lora"}), written here the
// way earlier versions wrote it, still resumes bit-identically.
class LoraCheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::path(::testing::TempDir()) / ("meft_lora_ckpt_" + std::to_string(::getpid()));
    fs::remove_all(root_);
    fs::create_directories(root_);
    o_.max_steps = 6;
    o_.lr = 1e-2;
    o_.warmup_ratio = 0.2;
    o_.progress = false;
    o_.save_every = 3;
  }
  void TearDown() override { fs::remove_all(root_); }

  // Trains run "a" straight through, saving checkpoint-3 and checkpoint-6.
  std::unique_ptr<World> TrainStraight() {
    auto a = MakeWorld("lora");
    o_.output_dir = (root_ / "a").string();
    auto t = *Trainer::Create(a->model.get(), a->target, a->loader.get(), o_);
    EXPECT_TRUE(t->Run().ok());
    return a;
  }

  static std::span<const uint8_t> AsBytes(const torch::Tensor& t) {
    return {static_cast<const uint8_t*>(t.data_ptr()), static_cast<size_t>(t.nbytes())};
  }
  static std::string Peft(int layer, const std::string& proj, const std::string& m) {
    return "base_model.model.model.layers." + std::to_string(layer) + ".self_attn." + proj +
           ".lora_" + m + ".weight";
  }
  static std::string Old(int layer, const std::string& proj, const std::string& m) {
    return "layers." + std::to_string(layer) + "." + proj + ".lora_" + m;
  }

  fs::path root_;
  TrainerOptions o_;
};

TEST_F(LoraCheckpointTest, WritesPeftLayout) {
  auto a = TrainStraight();
  const fs::path ckpt = root_ / "a" / "checkpoint-6";
  auto file = *safetensors::File::Open((ckpt / "adapter_model.safetensors").string());
  EXPECT_EQ(file->tensors().size(), 8u);
  for (int l : {0, 1}) {
    for (const std::string proj : {"q_proj", "v_proj"}) {
      // A is [rank, in], B is [out, rank], as PEFT's nn.Linear weights.
      EXPECT_TRUE(file->CheckTensor(Peft(l, proj, "A"), safetensors::DType::kF32, {4, 32}).ok());
      EXPECT_TRUE(file->CheckTensor(Peft(l, proj, "B"), safetensors::DType::kF32,
                                    {proj == "q_proj" ? 32 : 16, 4})
                      .ok());
    }
  }
  std::ifstream in(ckpt / "adapter_config.json");
  const nlohmann::json config = nlohmann::json::parse(in);
  EXPECT_EQ(config["peft_type"], "LORA");
  EXPECT_EQ(config["task_type"], "CAUSAL_LM");
  EXPECT_EQ(config["r"], 4);
  EXPECT_EQ(config["lora_alpha"], 16);
  EXPECT_EQ(config["target_modules"], nlohmann::json({"q_proj", "v_proj"}));
  EXPECT_TRUE(config["layers_to_transform"].is_null());  // both layers of llama_tiny
  EXPECT_EQ(config["base_model_name_or_path"], "llama_tiny");
  EXPECT_FALSE(config.contains("adapter"));
  std::ifstream state_in(ckpt / "trainer_state.json");
  EXPECT_EQ(nlohmann::json::parse(state_in)["adapter"], "lora");
}

TEST_F(LoraCheckpointTest, ResumesFromOlderMeftLayout) {
  auto a = TrainStraight();
  // checkpoint-3 rewritten as meft wrote LoRA checkpoints before PEFT's layout.
  const fs::path ckpt = root_ / "a" / "checkpoint-3";
  const std::string model_path = (ckpt / "adapter_model.safetensors").string();
  std::vector<torch::Tensor> keep;
  std::vector<safetensors::TensorToWrite> old;
  {
    auto file = *safetensors::File::Open(model_path);
    for (int l : {0, 1}) {
      for (const std::string proj : {"q_proj", "v_proj"}) {
        for (const std::string m : {"A", "B"}) {
          const safetensors::TensorInfo* info = file->Find(Peft(l, proj, m));
          ASSERT_NE(info, nullptr) << Peft(l, proj, m);
          auto data = *file->Data(info->name);
          keep.push_back(torch::empty(info->shape, torch::kFloat32));
          std::memcpy(keep.back().data_ptr(), data.data(), data.size());
          old.push_back(
              {Old(l, proj, m), safetensors::DType::kF32, info->shape, AsBytes(keep.back())});
        }
      }
    }
  }
  ASSERT_TRUE(safetensors::Write(model_path, old).ok());
  std::ofstream(ckpt / "adapter_config.json") << "{\n  \"adapter\": \"lora\"\n}\n";

  auto b = MakeWorld("lora");
  o_.output_dir = (root_ / "b").string();
  auto tb = *Trainer::Create(b->model.get(), b->target, b->loader.get(), o_);
  const absl::Status resumed = tb->Resume(ckpt.string());
  ASSERT_TRUE(resumed.ok()) << resumed;
  EXPECT_EQ(tb->step(), 3);
  ASSERT_TRUE(tb->Run().ok());
  for (size_t i = 0; i < a->target.local.size(); ++i) {
    EXPECT_TRUE(torch::equal(a->target.local[i].second, b->target.local[i].second))
        << a->target.local[i].first;
  }
}

TEST_F(LoraCheckpointTest, MismatchedCheckpointsAreClearErrors) {
  auto a = TrainStraight();
  const fs::path ckpt = root_ / "a" / "checkpoint-6";
  const std::string config_path = (ckpt / "adapter_config.json").string();
  std::ifstream in(config_path);
  std::stringstream text;
  text << in.rdbuf();
  const nlohmann::json good = nlohmann::json::parse(text.str());
  auto resume = [&](const nlohmann::json& config) {
    std::ofstream(config_path) << config.dump();
    auto b = MakeWorld("lora");
    return LoadAdapterCheckpoint(ckpt.string(), b->target);
  };
  ASSERT_TRUE(resume(good).ok());

  nlohmann::json alpha = good;
  alpha["lora_alpha"] = 32;
  absl::Status s = resume(alpha);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr(config_path + ": field \"lora_alpha\" is 32"));

  nlohmann::json layers = good;
  layers["layers_to_transform"] = {0};
  layers["layers_pattern"] = "layers";
  s = resume(layers);
  EXPECT_THAT(s.message(), HasSubstr("\"layers_to_transform\" is [0]"));

  std::ofstream(config_path) << "{\"peft_type\": \"LORA\", ";
  auto b = MakeWorld("lora");
  s = LoadAdapterCheckpoint(ckpt.string(), b->target);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr(config_path + ": not a JSON object"));

  // A LoRA on one layer only loaded by a run with two: the second layer's tensors are missing.
  std::ofstream(config_path) << good.dump();
  const std::string model_path = (ckpt / "adapter_model.safetensors").string();
  std::vector<torch::Tensor> keep;
  std::vector<safetensors::TensorToWrite> one_layer;
  {
    auto file = *safetensors::File::Open(model_path);
    for (const safetensors::TensorInfo& info : file->tensors()) {
      if (info.name.find("layers.1.") != std::string::npos) continue;
      auto data = *file->Data(info.name);
      keep.push_back(torch::empty(info.shape, torch::kFloat32));
      std::memcpy(keep.back().data_ptr(), data.data(), data.size());
      one_layer.push_back({info.name, info.dtype, info.shape, AsBytes(keep.back())});
    }
  }
  ASSERT_TRUE(safetensors::Write(model_path, one_layer).ok());
  s = LoadAdapterCheckpoint(ckpt.string(), b->target);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr(model_path + ": tensor \"layers.1."));
  EXPECT_THAT(s.message(), HasSubstr("is missing"));

  // A run with the LoRA on layer 0 alone does not silently drop the checkpoint's layer 1.
  auto layer0 = *LoraAdapter::Create({.rank = 4, .layers = {0}},
                                     {{"q_proj", {32, 32}}, {"v_proj", {32, 16}}}, torch::kCPU);
  TrainTarget target;
  target.adapter = "lora";
  target.local = layer0->named_parameters();
  target.lora = layer0.get();
  s = LoadAdapterCheckpoint((root_ / "a" / "checkpoint-3").string(), target);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("tensor \"layers.1.q_proj.lora_A\" is not a parameter"));
}

// A scratch folder per test, removed afterwards.
class ScratchTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    root_ = fs::path(::testing::TempDir()) /
            (std::string("meft_") + info->test_suite_name() + "_" + info->name() + "_" +
             std::to_string(::getpid()));
    fs::remove_all(root_);
    fs::create_directories(root_);
  }
  void TearDown() override { fs::remove_all(root_); }
  fs::path root_;
};

// Every line of a JSONL file, parsed (a test failure for a line that is not JSON).
json ReadJsonLines(const fs::path& path) {
  json lines = json::array();
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    json parsed = json::parse(line, nullptr, /*allow_exceptions=*/false);
    EXPECT_FALSE(parsed.is_discarded()) << path << ": " << line;
    lines.push_back(parsed);
  }
  return lines;
}

json ReadJson(const fs::path& path) {
  std::ifstream in(path);
  return json::parse(in, nullptr, /*allow_exceptions=*/false);
}

std::vector<int64_t> Steps(const json& records) {
  std::vector<int64_t> steps;
  for (const json& r : records) steps.push_back(r.value("step", int64_t{-1}));
  return steps;
}

// Training into `output_dir` with a checkpoint every 3 steps.
TrainerOptions LoggedRun(int64_t max_steps, int64_t log_every, const fs::path& output_dir) {
  TrainerOptions o;
  o.max_steps = max_steps;
  o.log_every = log_every;
  o.save_every = 3;
  o.lr = 1e-2;
  o.progress = false;
  o.output_dir = output_dir.string();
  return o;
}

class TrainLogTest : public ScratchTest {};

TEST_F(TrainLogTest, LinesMatchTheReturnedStepStatsAndTheCheckpoints) {
  auto w = MakeWorld("parallel");
  const TrainerOptions o = LoggedRun(7, 3, root_ / "run");
  auto t = *Trainer::Create(w->model.get(), w->target, w->loader.get(), o);
  // Evaluation results at step 2 (not a logging step) and the time split at every step.
  auto history = t->Run([](StepStats& stats) -> absl::Status {
    stats.extra["wait_seconds"] = 0.5 * stats.seconds;
    if (stats.step == 2) stats.extra["eval_nq_substring_em"] = 0.25;
    return absl::OkStatus();
  });
  ASSERT_TRUE(history.ok()) << history.status();
  ASSERT_EQ(history->size(), 7u);

  const json lines = ReadJsonLines(root_ / "run" / "train_log.jsonl");
  ASSERT_EQ(Steps(lines), (std::vector<int64_t>{2, 3, 6, 7}));
  for (const json& line : lines) {
    const StepStats& s = (*history)[line["step"].get<int64_t>() - 1];
    ASSERT_EQ(s.step, line["step"].get<int64_t>());
    for (const char* key : {"loss", "learning_rate", "grad_norm", "epoch", "step_seconds",
                            "tokens_per_second", "wait_seconds"}) {
      ASSERT_TRUE(line.contains(key) && line[key].is_number()) << key << " in " << line;
      EXPECT_TRUE(std::isfinite(line[key].get<double>())) << key << " in " << line;
    }
    EXPECT_EQ(line["loss"].get<double>(), s.loss);
    EXPECT_EQ(line["learning_rate"].get<double>(), s.lr);
    EXPECT_EQ(line["grad_norm"].get<double>(), s.grad_norm);
    EXPECT_EQ(line["tokens"].get<int64_t>(), s.tokens);
    EXPECT_EQ(line["step_seconds"].get<double>(), s.seconds);
    EXPECT_DOUBLE_EQ(line["tokens_per_second"].get<double>(),
                     static_cast<double>(s.tokens) / s.seconds);
    EXPECT_EQ(line["wait_seconds"].get<double>(), 0.5 * s.seconds);
    // 12 examples in micro-batches of 4: 3 optimizer steps per epoch.
    EXPECT_DOUBLE_EQ(line["epoch"].get<double>(), static_cast<double>(s.step) / 3.0);
    EXPECT_EQ(line.contains("eval_nq_substring_em"), s.step == 2) << line;
    EXPECT_EQ(s.extra.count("eval_nq_substring_em") == 1, s.step == 2);
  }
  EXPECT_EQ(lines[0]["eval_nq_substring_em"].get<double>(), 0.25);
  EXPECT_GT(lines[0]["loss"].get<double>(), 0.0);

  // Each checkpoint carries the file's lines up to its step.
  for (int64_t step : {3, 6, 7}) {
    const json state =
        ReadJson(root_ / "run" / ("checkpoint-" + std::to_string(step)) / "trainer_state.json");
    json want = json::array();
    for (const json& line : lines) {
      if (line["step"].get<int64_t>() <= step) want.push_back(line);
    }
    EXPECT_EQ(state["log_history"], want) << "checkpoint-" << step;
  }
}

class TrainLogResumeTest : public ResumeTest {};

// The figures that do not depend on timing.
json WithoutTimings(json records) {
  for (json& r : records) {
    for (const char* key : {"step_seconds", "tokens_per_second"}) r.erase(key);
  }
  return records;
}

TEST_P(TrainLogResumeTest, ResumeDropsLinesPastTheCheckpointAndContinuesTheFile) {
  const std::string adapter = GetParam();
  const TrainerOptions o = LoggedRun(6, 1, root_ / "run");
  const fs::path log = root_ / "run" / "train_log.jsonl";
  // A run that went on to step 6 after checkpoint-3 (as if it died after its last checkpoint).
  auto a = MakeWorld(adapter, (root_ / "server").string());
  auto ta = *Trainer::Create(a->model.get(), a->target, a->loader.get(), o);
  ASSERT_TRUE(ta->Run().ok());
  const json straight = ReadJsonLines(log);
  ASSERT_EQ(Steps(straight), (std::vector<int64_t>{1, 2, 3, 4, 5, 6}));

  auto b = MakeWorld(adapter, (root_ / "server").string());
  auto tb = *Trainer::Create(b->model.get(), b->target, b->loader.get(), o);
  ASSERT_TRUE(tb->Resume((root_ / "run" / "checkpoint-3").string()).ok());
  const json resumed = ReadJsonLines(log);
  ASSERT_EQ(Steps(resumed), (std::vector<int64_t>{1, 2, 3}));
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(resumed[i], straight[i]) << i;

  ASSERT_TRUE(tb->Run().ok());
  const json continued = ReadJsonLines(log);
  ASSERT_EQ(Steps(continued), (std::vector<int64_t>{1, 2, 3, 4, 5, 6}));
  // Resume is bit-identical, so are the logged figures.
  EXPECT_EQ(WithoutTimings(continued), WithoutTimings(straight));
  const json state = ReadJson(root_ / "run" / "checkpoint-6" / "trainer_state.json");
  EXPECT_EQ(state["log_history"], continued);
}

INSTANTIATE_TEST_SUITE_P(Adapters, TrainLogResumeTest, ::testing::Values("meft", "parallel"));

TEST_F(TrainLogTest, BadLogHistoryIsAClearError) {
  auto w = MakeWorld("parallel");
  TrainerOptions o;
  o.progress = false;
  auto t = *Trainer::Create(w->model.get(), w->target, w->loader.get(), o);
  const fs::path dir = root_ / "checkpoint-2";
  fs::create_directories(dir);
  for (const std::string history : {R"("log_history": {})", R"("log_history": [{"loss": 1.0}])",
                                    R"("log_history": [{"step": 3}])"}) {
    std::ofstream(dir / "trainer_state.json")
        << R"({"global_step": 2, "epoch": 0, "batch_index": 2, "adapter": "parallel", )"
        << history << "}";
    const absl::Status s = t->Resume(dir.string());
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << history;
    EXPECT_THAT(s.message(), HasSubstr("trainer_state.json: field \"log_history\"")) << history;
  }
}

class RunFolderTest : public ScratchTest {};

TEST_F(RunFolderTest, NewestCheckpointIgnoresPartialAndForeignFolders) {
  EXPECT_EQ(*NewestCheckpoint((root_ / "missing").string()), "");
  EXPECT_EQ(*NewestCheckpoint(root_.string()), "");
  for (const char* name :
       {"checkpoint-3", "checkpoint-12", "checkpoint-40.tmp-99", "checkpoint-050", "eval"}) {
    fs::create_directories(root_ / name);
    std::ofstream(root_ / name / "trainer_state.json") << "{}";
  }
  fs::create_directories(root_ / "checkpoint-30");  // no trainer_state.json
  EXPECT_EQ(*NewestCheckpoint(root_.string()), (root_ / "checkpoint-12").string());
  EXPECT_EQ(*NewestCheckpoint(root_.string(), /*at_most=*/12), (root_ / "checkpoint-12").string());
  EXPECT_EQ(*NewestCheckpoint(root_.string(), /*at_most=*/11), (root_ / "checkpoint-3").string());
  EXPECT_EQ(*NewestCheckpoint(root_.string(), /*at_most=*/2), "");
}

TEST(RunFolderPathTest, RecordedPathsAreRelativeToTheRunFolderWhenUnderIt) {
  EXPECT_EQ(RecordPath("/data/run/server/checkpoint-5", "/data/run"), "server/checkpoint-5");
  EXPECT_EQ(RecordPath("/data/run/server/checkpoint-5", "/data/run/"), "server/checkpoint-5");
  EXPECT_EQ(RecordPath("/data/run2/checkpoint-5", "/data/run"), "/data/run2/checkpoint-5");
  EXPECT_EQ(RecordPath("/srv/meft/checkpoint-5", "/data/run"), "/srv/meft/checkpoint-5");
  EXPECT_EQ(RecordPath("/data/run", "/data/run"), "/data/run");
  EXPECT_EQ(RecordPath(fs::absolute("out/server/checkpoint-5").string(), "out"),
            "server/checkpoint-5");

  EXPECT_EQ(ResolveRecordedPath("server/checkpoint-5", "/moved/run/checkpoint-5"),
            "/moved/run/server/checkpoint-5");
  EXPECT_EQ(ResolveRecordedPath("server/checkpoint-5", "/moved/run/checkpoint-5/"),
            "/moved/run/server/checkpoint-5");
  EXPECT_EQ(ResolveRecordedPath("/srv/meft/checkpoint-5", "/moved/run/checkpoint-5"),
            "/srv/meft/checkpoint-5");
  EXPECT_EQ(ResolveRecordedPath("server/checkpoint-5", "run/checkpoint-5"),
            (fs::current_path() / "run" / "server" / "checkpoint-5").string());
}

class MovedRunTest : public ScratchTest {};

TEST_F(MovedRunTest, ServerCheckpointUnderTheRunFolderMovesWithIt) {
  TrainerOptions o;
  o.max_steps = 3;
  o.lr = 1e-2;
  o.progress = false;
  o.output_dir = (root_ / "run").string();
  auto a = MakeWorld("meft", (root_ / "run" / "server").string());
  auto ta = *Trainer::Create(a->model.get(), a->target, a->loader.get(), o);
  ASSERT_TRUE(ta->Run().ok());
  for (const char* file : {"trainer_state.json", "adapter_config.json"}) {
    EXPECT_EQ(ReadJson(root_ / "run" / "checkpoint-3" / file)["server_checkpoint"],
              "server/checkpoint-3")
        << file;
  }
  fs::rename(root_ / "run", root_ / "moved");
  // A fresh server confined to the moved folder restores the moved checkpoint.
  auto b = MakeWorld("meft", (root_ / "moved" / "server").string());
  ASSERT_NE(a->server->StateDigest(), b->server->StateDigest());
  const absl::Status loaded =
      LoadAdapterCheckpoint((root_ / "moved" / "checkpoint-3").string(), b->target);
  ASSERT_TRUE(loaded.ok()) << loaded;
  EXPECT_EQ(a->server->StateDigest(), b->server->StateDigest());
}

TEST_F(MovedRunTest, ServerCheckpointOutsideTheRunFolderStaysAbsolute) {
  TrainerOptions o;
  o.max_steps = 1;
  o.progress = false;
  o.output_dir = (root_ / "run").string();
  auto a = MakeWorld("meft", (root_ / "server").string());
  auto ta = *Trainer::Create(a->model.get(), a->target, a->loader.get(), o);
  ASSERT_TRUE(ta->Run().ok());
  const json state = ReadJson(root_ / "run" / "checkpoint-1" / "trainer_state.json");
  EXPECT_EQ(state["server_checkpoint"],
            fs::weakly_canonical(root_ / "server" / "checkpoint-1").string());
}

}  // namespace
}  // namespace meft::worker
