#pragma once

// meft-worker's configuration as users write it (YAML keys and --flags) and the objects built
// from it. Reads no files itself except what the config names; main() owns the sources.

#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/config/config.h"
#include "gpu_worker/adapters/baselines.h"
#include "gpu_worker/adapters/meft_adapter.h"
#include "gpu_worker/eval/evaluate.h"
#include "gpu_worker/metrics/worker_metrics.h"
#include "gpu_worker/model/llama.h"
#include "gpu_worker/tokenizer/tokenizer.h"
#include "gpu_worker/train/trainer.h"

namespace meft::worker {

// The defaults are the quick start's: the synthetic facts made by `meft-worker make-facts
// --output runs/facts`, the MEFT adapter on a local parameter server, CPU.
struct WorkerConfig {
  std::string model_dir = "runs/facts/model";
  std::string output_dir = "runs/quickstart";
  std::string device = "auto";  // auto | cpu | cuda
  std::string log_level = "info";
  std::string metrics_listen;         // HOST:PORT of train's /metrics endpoint; "" = none
  double metrics_linger_seconds = 0;  // keep the endpoint up this long after training
  // data
  std::string train_file = "runs/facts/train.jsonl";
  std::string eval_file = "runs/facts/eval.jsonl";
  int64_t max_length = 128;
  bool train_on_inputs = false;
  std::string prompt_template = "alpaca";            // alpaca | chatml
  std::string system_prompt = kSmolLM2SystemPrompt;  // chatml's system turn; "" = none
  std::string template_with_input;                   // "" = the preset's
  std::string template_without_input;                // "" = the preset's
  // adapter
  std::string adapter = "meft";  // meft | parallel | lora
  std::vector<uint32_t> layers;  // empty = every layer (meft: the server's layers)
  int64_t parallel_rows = 4096;
  int64_t lora_rank = 8;
  double lora_alpha = 16.0;
  std::string lora_targets = "q_proj,v_proj";
  uint64_t adapter_seed = 0;
  // meft
  std::string server = "127.0.0.1:50051";
  std::vector<std::string> servers;        // shards owning disjoint layers; empty = `server` alone
  double reconnect_timeout_seconds = 300;  // waiting for a restarted server; 0 = fail at once
  int64_t prefetch_layers = 0;
  bool refetch_in_backward = false;
  bool overlap = true;  // server calls overlap compute (see MeftAdapterOptions::overlap)
  bool bf16_rows = true;
  double server_timeout_seconds = 600;
  std::string tls_ca;              // PEM CA that signed the server's certificate; "" = plaintext
  std::string tls_cert;            // PEM client certificate for mutual TLS; "" = none
  std::string tls_key;             // its private key
  std::string token_file;          // file holding the server's bearer token; "" = none
  std::string transport = "auto";  // auto | shm | grpc: how tensors travel to the server
  uint32_t shm_arena_mb = 0;       // shared-memory arena in MiB; 0 = derived from the server
  bool shm_pin = true;             // pin the arena for CUDA copies when CUDA is present
  // training
  int64_t max_steps = 1500;
  int64_t micro_batch_size = 16;
  int64_t grad_accum = 1;
  double lr = 2e-2;
  double warmup_ratio = 0.02;
  double max_grad_norm = 1.0;
  double weight_decay = 0.0;
  uint64_t seed = 0;
  int64_t log_every = 25;
  int64_t save_every = 0;
  int64_t eval_every = 0;
  int64_t eval_limit = 64;
  // evaluation
  std::string metrics = "nq_substring_em";
  int64_t max_new_tokens = 8;
  int64_t num_beams = 1;
  int64_t eval_batch_size = 32;
};

void RegisterWorkerFields(WorkerConfig* config, config::FieldSet* fields);

// Everything a subcommand needs, built from a WorkerConfig.
struct WorkerSession {
  ClientMeter client_meter;  // meft: time and bytes of every server call (outlives `client`)
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<LlamaModel> model;
  std::unique_ptr<ParamClient> client;  // meft only
  std::unique_ptr<MeftAdapter> meft;
  std::unique_ptr<ParallelAdapter> parallel;
  std::unique_ptr<LoraAdapter> lora;
  TrainTarget target;
  PromptFormatter formatter;
};

// Loads the tokenizer and model, connects to the server (meft) and builds the adapter. Errors
// name the config key, file or server address at fault.
absl::StatusOr<std::unique_ptr<WorkerSession>> OpenSession(const WorkerConfig& config);

absl::StatusOr<EvaluateOptions> MakeEvaluateOptions(const WorkerConfig& config);
TrainerOptions MakeTrainerOptions(const WorkerConfig& config);

}  // namespace meft::worker
