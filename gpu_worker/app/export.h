#pragma once

// `meft-worker export`: turns a trained adapter into a self-contained folder that the `python/`
// package (meft_adapter) attaches to a Hugging Face transformers model (DESIGN §5), without a
// running parameter server:
//   adapter_model.safetensors  fp32 tensors "layers.<l>.keys" and "layers.<l>.values" [r, d], and
//                              for meft "layers.<l>.router" [E, d]
//   adapter_config.json        everything needed to reproduce the adapter's output (see
//                              ExportAdapter)
// For meft the tensors come from the parameter server's checkpoint(s) on disk (the worker's
// trainer_state.json names them; several shards are merged); for parallel from the worker's own
// adapter_model.safetensors. Optimizer state is never read or written.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace meft::worker {

struct ExportOptions {
  // A worker checkpoint-<step>/ (meft or parallel), or a parameter server's checkpoint-<step>/.
  std::string checkpoint;
  // The folder to write (created; files in it are replaced).
  std::string output;
  // The worker settings that shape the adapter's output at evaluation, as in the worker config:
  // meft only. `layers` empty = every layer the checkpoint holds, else only these of them
  // (adapter.layers); prefetch_layers (meft.prefetch_layers); bf16_rows (meft.bf16_rows: the
  // worker computes with rows rounded to bf16).
  std::vector<uint32_t> layers;
  int64_t prefetch_layers = 0;
  bool bf16_rows = true;
};

struct ExportSummary {
  std::string adapter;  // "meft" | "parallel"
  uint64_t step = 0;
  std::vector<uint32_t> layers;
  int64_t parameters = 0;  // adapter parameters written
  uint64_t bytes = 0;      // bytes of adapter_model.safetensors
};

// Writes the export folder. adapter_config.json holds "format": "meft-export",
// "format_version": 1, "adapter", "step", "source" (the checkpoint), "layers", "r", "d",
// "activation": "relu", "dtype": "float32"; for meft also "E", "n_probe", "top_k", "max_rows",
// "mode" (per_token | union), "gating" (gated | ungated), "prefetch_layers" and "row_dtype"
// (bf16 | fp32: the precision of K, V and router rows in the adapter output; selection always
// uses the fp32 parameters). Errors name the file and field or tensor at fault; LoRA checkpoints
// are refused.
absl::StatusOr<ExportSummary> ExportAdapter(const ExportOptions& options);

// The `meft-worker export` command line (argv[0] = "export"): --checkpoint, --output, and the
// worker's --config / flags for the settings above. Returns the exit code.
int RunExportCommand(int argc, char** argv);

}  // namespace meft::worker
