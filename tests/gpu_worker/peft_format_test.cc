// The LoRA checkpoint layout of Hugging Face PEFT (gpu_worker/adapters/peft_format.h): tensor
// names both ways, adapter_config.json as PEFT 0.21.2's LoraConfig.save_pretrained writes it, and
// clear errors for configs and names that describe another LoRA. That PEFT itself loads the
// result is checked in smollm2_peft_test.cc.

#include "gpu_worker/adapters/peft_format.h"

#include <torch/torch.h>

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace meft::worker {
namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;

TEST(PeftFormatTest, TensorNamesBothWays) {
  const std::pair<std::string, std::string> cases[] = {
      {"layers.0.q_proj.lora_A", "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"},
      {"layers.3.k_proj.lora_B", "base_model.model.model.layers.3.self_attn.k_proj.lora_B.weight"},
      {"layers.12.v_proj.lora_A",
       "base_model.model.model.layers.12.self_attn.v_proj.lora_A.weight"},
      {"layers.29.o_proj.lora_B",
       "base_model.model.model.layers.29.self_attn.o_proj.lora_B.weight"},
      {"layers.1.gate_proj.lora_A", "base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight"},
      {"layers.1.up_proj.lora_B", "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"},
      {"layers.7.down_proj.lora_A", "base_model.model.model.layers.7.mlp.down_proj.lora_A.weight"},
  };
  for (const auto& [meft, peft] : cases) {
    absl::StatusOr<std::string> to = PeftLoraTensorName(meft);
    ASSERT_TRUE(to.ok()) << to.status();
    EXPECT_EQ(*to, peft);
    absl::StatusOr<std::string> back = MeftLoraTensorName(peft);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(*back, meft);
  }
}

TEST(PeftFormatTest, OtherNamesAreRefused) {
  for (const char* name :
       {"layers.0.q_proj.lora_C", "layers.x.q_proj.lora_A", "layers.0.lm_head.lora_A",
        "layers.0.q_proj.lora_A.weight", "layers.-1.q_proj.lora_A", "layers.0.keys", ""}) {
    EXPECT_EQ(PeftLoraTensorName(name).status().code(), absl::StatusCode::kInvalidArgument) << name;
  }
  for (const char* name : {
           "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",           // wrong module
           "base_model.model.model.layers.0.self_attn.down_proj.lora_A.weight",  // wrong module
           "base_model.model.model.layers.0.self_attn.q_proj.lora_A.bias",
           "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
           "base_model.model.model.embed_tokens.lora_embedding_A",
           "base_model.model.layers.0.self_attn.q_proj.lora_A.weight",  // not a CausalLM
           "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
           "layers.0.q_proj.lora_A",
       }) {
    absl::Status s = MeftLoraTensorName(name).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << name;
    EXPECT_THAT(s.message(), HasSubstr(name));
  }
}

LoraOptions Options() {
  LoraOptions o;
  o.rank = 4;
  o.alpha = 8.0;
  o.targets = {"q_proj", "down_proj"};
  o.layers = {28, 1};
  return o;
}

// The fields and values PEFT 0.21.2 writes for
// LoraConfig(r=4, lora_alpha=8, target_modules=[...], layers_to_transform=[1, 28],
//            layers_pattern="layers", task_type="CAUSAL_LM").save_pretrained(...).
TEST(PeftFormatTest, ConfigHasPeftsFields) {
  const json c = PeftLoraConfig(Options(), /*num_layers=*/30, "/models/smollm2");
  EXPECT_EQ(c["peft_type"], "LORA");
  EXPECT_EQ(c["task_type"], "CAUSAL_LM");
  EXPECT_EQ(c["base_model_name_or_path"], "/models/smollm2");
  EXPECT_EQ(c["r"], 4);
  EXPECT_TRUE(c["lora_alpha"].is_number_integer());
  EXPECT_EQ(c["lora_alpha"], 8);
  EXPECT_EQ(c["target_modules"], json({"q_proj", "down_proj"}));
  EXPECT_EQ(c["layers_to_transform"], json({1, 28}));
  EXPECT_EQ(c["layers_pattern"], "layers");
  EXPECT_EQ(c["use_rslora"], false);
  EXPECT_EQ(c["use_dora"], false);
  EXPECT_EQ(c["fan_in_fan_out"], false);
  EXPECT_EQ(c["bias"], "none");
  EXPECT_EQ(c["lora_dropout"], 0.0);
  EXPECT_FALSE(c.contains("adapter"));  // PEFT warns about keys LoraConfig does not know
  EXPECT_TRUE(CheckPeftLoraConfig(c, Options(), "adapter_config.json").ok());

  // Every layer: no layer filter at all.
  LoraOptions all = Options();
  all.layers = {2, 0, 1};
  const json every = PeftLoraConfig(all, 3, "");
  EXPECT_TRUE(every["layers_to_transform"].is_null());
  EXPECT_TRUE(every["layers_pattern"].is_null());
  EXPECT_TRUE(every["base_model_name_or_path"].is_null());
  EXPECT_TRUE(CheckPeftLoraConfig(every, all, "adapter_config.json").ok());

  LoraOptions fractional = Options();
  fractional.alpha = 2.5;
  EXPECT_EQ(PeftLoraConfig(fractional, 30, "")["lora_alpha"], 2.5);
}

TEST(PeftFormatTest, ConfigWrittenByPeftIsAccepted) {
  // As PEFT 0.21.2 saves it (trimmed to the fields that matter and a few neutral ones).
  const json c = json::parse(R"({
    "alpha_pattern": {}, "auto_mapping": null, "base_model_name_or_path": "x", "bias": "none",
    "exclude_modules": null, "fan_in_fan_out": false, "inference_mode": false,
    "init_lora_weights": true, "layer_replication": null, "layers_pattern": "layers",
    "layers_to_transform": [1, 28], "loftq_config": {}, "lora_alpha": 8, "lora_bias": false,
    "lora_dropout": 0.05, "megatron_config": null, "megatron_core": "megatron.core",
    "modules_to_save": null, "peft_type": "LORA", "peft_version": "0.21.2", "r": 4,
    "rank_pattern": {}, "revision": null, "target_modules": ["down_proj", "q_proj"],
    "target_parameters": null, "task_type": "CAUSAL_LM", "trainable_token_indices": null,
    "use_dora": false, "use_qalora": false, "use_rslora": false, "velora_config": null})");
  EXPECT_TRUE(CheckPeftLoraConfig(c, Options(), "adapter_config.json").ok());
}

struct BadConfig {
  std::string patch;  // JSON merged into a good config
  absl::StatusCode code;
  std::string field;
};

TEST(PeftFormatTest, MismatchedOrUnsupportedConfigsNameTheField) {
  const BadConfig cases[] = {
      {R"({"peft_type": "IA3"})", absl::StatusCode::kFailedPrecondition, "peft_type"},
      {R"({"task_type": "SEQ_CLS"})", absl::StatusCode::kFailedPrecondition, "task_type"},
      {R"({"r": 8})", absl::StatusCode::kFailedPrecondition, "\"r\""},
      {R"({"r": "4"})", absl::StatusCode::kInvalidArgument, "\"r\""},
      {R"({"r": null})", absl::StatusCode::kInvalidArgument, "\"r\""},
      {R"({"lora_alpha": 16})", absl::StatusCode::kFailedPrecondition, "lora_alpha"},
      {R"({"lora_alpha": "8"})", absl::StatusCode::kInvalidArgument, "lora_alpha"},
      {R"({"target_modules": ["q_proj"]})", absl::StatusCode::kFailedPrecondition,
       "target_modules"},
      {R"({"target_modules": ".*proj"})", absl::StatusCode::kFailedPrecondition, "target_modules"},
      {R"({"target_modules": [1]})", absl::StatusCode::kInvalidArgument, "target_modules"},
      {R"({"target_modules": null})", absl::StatusCode::kInvalidArgument, "target_modules"},
      {R"({"layers_to_transform": [1]})", absl::StatusCode::kFailedPrecondition,
       "layers_to_transform"},
      {R"({"layers_to_transform": ["a"]})", absl::StatusCode::kInvalidArgument,
       "layers_to_transform"},
      {R"({"layers_pattern": "h"})", absl::StatusCode::kFailedPrecondition, "layers_pattern"},
      {R"({"bias": "all"})", absl::StatusCode::kFailedPrecondition, "bias"},
      {R"({"use_rslora": true})", absl::StatusCode::kFailedPrecondition, "use_rslora"},
      {R"({"use_dora": true})", absl::StatusCode::kFailedPrecondition, "use_dora"},
      {R"({"fan_in_fan_out": true})", absl::StatusCode::kFailedPrecondition, "fan_in_fan_out"},
      {R"({"rank_pattern": {"q_proj": 8}})", absl::StatusCode::kFailedPrecondition, "rank_pattern"},
      {R"({"alpha_pattern": {"q_proj": 8}})", absl::StatusCode::kFailedPrecondition,
       "alpha_pattern"},
      {R"({"modules_to_save": ["lm_head"]})", absl::StatusCode::kFailedPrecondition,
       "modules_to_save"},
  };
  for (const BadConfig& bad : cases) {
    json c = PeftLoraConfig(Options(), 30, "");
    c.merge_patch(json::parse(bad.patch));
    if (json::parse(bad.patch).begin().value().is_null()) {
      c[json::parse(bad.patch).begin().key()] = nullptr;  // merge_patch would delete it
    }
    absl::Status s = CheckPeftLoraConfig(c, Options(), "ckpt/adapter_config.json");
    EXPECT_EQ(s.code(), bad.code) << bad.patch << ": " << s;
    EXPECT_THAT(s.message(), HasSubstr("ckpt/adapter_config.json")) << bad.patch;
    EXPECT_THAT(s.message(), HasSubstr(bad.field)) << bad.patch;
  }
  json missing = PeftLoraConfig(Options(), 30, "");
  missing.erase("r");
  EXPECT_THAT(CheckPeftLoraConfig(missing, Options(), "a.json").message(), HasSubstr("\"r\""));
}

NamedTensors Tensors(const std::vector<std::string>& names) {
  NamedTensors out;
  for (const std::string& n : names) out.emplace_back(n, torch::zeros({2, 2}));
  return out;
}

TEST(PeftFormatTest, CheckpointTensorsInEitherLayout) {
  const std::string peft_config = PeftLoraConfig(Options(), 30, "").dump();
  absl::StatusOr<NamedTensors> peft = LoraTensorsFromCheckpoint(
      peft_config, "c/adapter_config.json",
      Tensors({"base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight",
               "base_model.model.model.layers.28.mlp.down_proj.lora_B.weight"}),
      "c/adapter_model.safetensors", Options());
  ASSERT_TRUE(peft.ok()) << peft.status();
  EXPECT_EQ((*peft)[0].first, "layers.1.q_proj.lora_A");
  EXPECT_EQ((*peft)[1].first, "layers.28.down_proj.lora_B");

  // meft's older layout: {"adapter": "lora"} and LoraAdapter's names.
  absl::StatusOr<NamedTensors> old =
      LoraTensorsFromCheckpoint(R"({"adapter": "lora"})", "c/adapter_config.json",
                                Tensors({"layers.1.q_proj.lora_A", "layers.28.down_proj.lora_B"}),
                                "c/adapter_model.safetensors", Options());
  ASSERT_TRUE(old.ok()) << old.status();
  EXPECT_EQ((*old)[1].first, "layers.28.down_proj.lora_B");

  // Names of the other layout, a corrupt config, a config of another adapter, a bad config.
  absl::Status s = LoraTensorsFromCheckpoint(peft_config, "c/adapter_config.json",
                                             Tensors({"layers.1.q_proj.lora_A"}),
                                             "c/adapter_model.safetensors", Options())
                       .status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("c/adapter_model.safetensors: tensor \"layers.1.q_proj"));
  s = LoraTensorsFromCheckpoint(
          R"({"adapter": "lora"})", "c/adapter_config.json",
          Tensors({"base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"}),
          "c/adapter_model.safetensors", Options())
          .status();
  EXPECT_THAT(s.message(), HasSubstr("c/adapter_model.safetensors: tensor \"base_model"));
  s = LoraTensorsFromCheckpoint("{\"peft_type\": ", "c/adapter_config.json", {}, "m", Options())
          .status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("c/adapter_config.json: not a JSON object"));
  s = LoraTensorsFromCheckpoint(R"({"adapter": "parallel"})", "c/adapter_config.json", {}, "m",
                                Options())
          .status();
  EXPECT_THAT(s.message(), HasSubstr("c/adapter_config.json: neither"));
  json wrong_rank = PeftLoraConfig(Options(), 30, "");
  wrong_rank["r"] = 16;
  s = LoraTensorsFromCheckpoint(wrong_rank.dump(), "c/adapter_config.json", {}, "m", Options())
          .status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("\"r\" is 16"));
}

}  // namespace
}  // namespace meft::worker
