#pragma once

// SmolLM2-135M-Instruct for the tests on the real model: the converted folder named by the
// environment variable MEFT_SMOLLM2_DIR (scripts/test.sh sets it through the CMake cache variable
// of the same name), and a fixture that loads it once per suite. An error, never a skip, when it
// is unset or the folder has no config.json.

#include <torch/torch.h>

#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "gpu_worker/model/llama.h"
#include "gtest/gtest.h"

namespace meft::worker::test_models {

inline absl::StatusOr<std::string> SmolLM2Dir() {
  const char* dir = std::getenv("MEFT_SMOLLM2_DIR");
  if (dir == nullptr || *dir == '\0') {
    return absl::FailedPreconditionError(
        "MEFT_SMOLLM2_DIR is not set: run scripts/fetch-model.sh smollm2-135m and set it to the "
        "folder it prints (scripts/test.sh does both, through the CMake cache variable "
        "MEFT_SMOLLM2_DIR)");
  }
  if (!std::filesystem::exists(std::string(dir) + "/config.json")) {
    return absl::NotFoundError(absl::StrCat("MEFT_SMOLLM2_DIR=", dir,
                                            " has no config.json: run scripts/fetch-model.sh "
                                            "smollm2-135m"));
  }
  return std::string(dir);
}

// Loads the model once per suite (fp32, CPU) into model_; when that fails every test of the suite
// fails with the reason.
class SmolLM2Suite : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::string> dir = SmolLM2Dir();
    if (!dir.ok()) {
      *load_status_ = dir.status();
      return;
    }
    *model_dir_ = *dir;
    absl::StatusOr<std::unique_ptr<LlamaModel>> model =
        LlamaModel::Load(*dir, torch::Device(torch::kCPU), torch::kFloat32);
    if (!model.ok()) {
      *load_status_ = model.status();
      return;
    }
    model_ = model->release();
  }
  static void TearDownTestSuite() {
    delete model_;
    model_ = nullptr;
  }

  void SetUp() override { ASSERT_NE(model_, nullptr) << *load_status_; }

  static inline LlamaModel* model_ = nullptr;
  static inline absl::Status* load_status_ = new absl::Status();
  static inline std::string* model_dir_ = new std::string();  // MEFT_SMOLLM2_DIR
};

}  // namespace meft::worker::test_models
