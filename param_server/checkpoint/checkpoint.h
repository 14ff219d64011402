#pragma once

// Checkpoints of the parameter server's state (DESIGN §5): a folder checkpoint-<step>/ with
//   adapter_config.json        shapes and method settings,
//   adapter_model.safetensors  layers.<l>.{keys,values,router} (fp32),
//   optimizer.safetensors      layers.<l>.{keys,values,router}.{exp_avg,exp_avg_sq,step},
//   trainer_state.json         the server's optimizer step.
// A checkpoint is the state at an optimizer-step boundary: gradients accumulated for the step in
// progress are not part of it. Written under a temporary name, every file fsynced, then renamed
// into place, so a crash never leaves a half-written checkpoint-<step>/.

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/safetensors/safetensors.h"
#include "param_server/store/layer_store.h"

namespace meft::checkpoint {

// The settings recorded in adapter_config.json.
struct AdapterConfig {
  int64_t rows = 0;
  int64_t dim = 0;
  int64_t experts = 0;
  int64_t n_probe = 0;
  int64_t top_k = 0;
  int64_t max_rows = 0;
  std::string mode;  // "per_token" | "union"
  bool gated = true;
  std::vector<uint32_t> layers;
  uint64_t seed = 0;
  std::string router_init;  // "mean_keys" | "normal"
  double beta1 = 0.0;
  double beta2 = 0.0;
  double eps = 0.0;
  double weight_decay = 0.0;
};

struct WriteOptions {
  // Test seam: called after each file is written into the temporary folder with the file's
  // name, and with "rename" just before the folder is renamed into place.
  std::function<void(absl::string_view stage)> on_stage;
};

inline constexpr absl::string_view kConfigFile = "adapter_config.json";
inline constexpr absl::string_view kModelFile = "adapter_model.safetensors";
inline constexpr absl::string_view kOptimizerFile = "optimizer.safetensors";
inline constexpr absl::string_view kStateFile = "trainer_state.json";

// "checkpoint-<step>".
std::string CheckpointName(uint64_t step);

// Writes checkpoint-<step>/ under `root` (created if missing) from `layers` (all at `step`),
// replacing an existing folder of that name atomically. Returns the bytes written.
// The caller keeps `layers` unchanged for the duration.
absl::StatusOr<uint64_t> Write(const std::string& root, uint64_t step, const AdapterConfig& config,
                               const std::vector<const store::LayerStore*>& layers,
                               const WriteOptions& options = {});

struct Loaded {
  AdapterConfig config;
  uint64_t step = 0;
  std::vector<store::LayerStore> layers;  // in config.layers order; gradients empty
};

// Reads and validates only adapter_config.json of a checkpoint folder.
absl::StatusOr<AdapterConfig> ReadConfig(const std::string& dir);

// Reads and validates a checkpoint folder. Every error names the file and, where there is
// one, the tensor or JSON field.
absl::StatusOr<Loaded> Read(const std::string& dir);

// The parameters of a checkpoint without its optimizer state, memory-mapped rather than copied
// (for exporting an adapter: 4 bytes per parameter instead of the 16 of Read).
struct ParameterView {
  struct Layer {
    uint32_t layer = 0;
    // Little-endian fp32, row-major, views into `model`: keys and values [rows, dim], router
    // [experts, dim]. No alignment guarantee.
    std::span<const uint8_t> keys, values, router;
  };
  AdapterConfig config;
  uint64_t step = 0;
  std::unique_ptr<safetensors::File> model;  // owns the mapping the spans point into
  std::vector<Layer> layers;                 // in config.layers order
};

// Reads adapter_config.json and trainer_state.json of a checkpoint folder and maps
// adapter_model.safetensors, checking every layer's three tensors (dtype F32 and shape). Does
// not open optimizer.safetensors. Errors name the file and the tensor or JSON field.
absl::StatusOr<ParameterView> OpenParameters(const std::string& dir);

// The newest complete checkpoint-<step>/ directly under `root`; NOT_FOUND if none.
absl::StatusOr<std::string> FindLatest(const std::string& root);

}  // namespace meft::checkpoint
