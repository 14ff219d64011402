// meft-worker: the GPU worker. Subcommands:
//   make-facts  write the built-in synthetic facts benchmark, tokenizer and tiny model
//   train       fine-tune an adapter (meft through the parameter server, parallel, lora)
//   eval        generate answers for data.eval and score them (predictions.jsonl, metrics.json)
//   generate    answer one prompt
//   export      write a trained adapter for the python/ package (gpu_worker/app/export.h)

#include <signal.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "common/config/config.h"
#include "common/logging/logging.h"
#include "common/metrics/exposer.h"
#include "common/metrics/metrics.h"
#include "common/rpc/message_memory.h"
#include "common/status.h"
#include "gpu_worker/app/export.h"
#include "gpu_worker/app/worker_config.h"
#include "gpu_worker/data/dataset.h"
#include "gpu_worker/eval/evaluate.h"
#include "gpu_worker/eval/generate.h"
#include "gpu_worker/facts/make_facts.h"
#include "gpu_worker/train/run_folder.h"
#include "spdlog/spdlog.h"

namespace {

using meft::worker::WorkerConfig;
using meft::worker::WorkerSession;

constexpr char kUsage[] =
    "usage: meft-worker <command> [options]   (meft-worker <command> --help for its options)\n"
    "commands:\n"
    "  make-facts  write the synthetic facts benchmark, a tiny tokenizer and a tiny LLaMA\n"
    "  train       fine-tune an adapter (--config run.yaml, --resume checkpoint-<step>)\n"
    "  eval        answer data.eval and score it (--checkpoint checkpoint-<step>; default: the\n"
    "              newest in output_dir)\n"
    "  generate    answer one prompt (--prompt TEXT)\n"
    "  export      write a meft or parallel adapter for python/ (--checkpoint DIR --output DIR)\n";

void PrintSummary(const meft::worker::MetricsSummary& summary, const std::string& label) {
  std::string line = absl::StrCat(label, ": ", summary.num_examples, " examples");
  for (const auto& [name, mean] : summary.means) absl::StrAppend(&line, ", ", name, " = ", mean);
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

// Puts the MEFT adapter (if any) in evaluation mode: lookups are not kept for gradients.
void EvaluationMode(WorkerSession& s, int64_t step) {
  if (s.meft) s.meft->BeginMicroBatch(static_cast<uint64_t>(step), 0, /*training=*/false);
}

// `checkpoint`: the one evaluated, for metrics.json ("" = none).
absl::StatusOr<meft::worker::EvaluateResult> RunEvaluation(
    WorkerSession& s, const WorkerConfig& c, const std::vector<meft::worker::Example>& examples,
    const std::string& output_dir, int64_t limit, int64_t step, const std::string& checkpoint) {
  MEFT_ASSIGN_OR_RETURN(meft::worker::EvaluateOptions options,
                        meft::worker::MakeEvaluateOptions(c));
  options.output_dir = output_dir;
  options.limit = limit;
  options.metadata = {{"model_dir", c.model_dir},
                      {"adapter", c.adapter},
                      {"data", c.eval_file},
                      {"checkpoint", checkpoint.empty() ? "none" : checkpoint},
                      {"step", absl::StrCat(step)}};
  EvaluationMode(s, step);
  return meft::worker::Evaluate(*s.model, *s.tokenizer, examples, s.formatter, options,
                                s.target.hooks, [](int64_t done, int64_t total) {
                                  std::fprintf(stderr, "\revaluating %lld/%lld",
                                               static_cast<long long>(done),
                                               static_cast<long long>(total));
                                  if (done == total) std::fprintf(stderr, "\n");
                                });
}

// Set by the first SIGTERM/SIGINT during training: the trainer writes a checkpoint and stops
// before the next optimizer step. A second signal terminates at once (SA_RESETHAND).
std::atomic<bool> stop_requested{false};

void InstallStopHandler() {
  struct sigaction action = {};
  action.sa_handler = [](int) { stop_requested.store(true); };
  action.sa_flags = SA_RESETHAND | SA_RESTART;
  sigemptyset(&action.sa_mask);
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);
}

// --checkpoint names an adapter to load, which the bare model does not have.
absl::Status CheckCheckpointWanted(const WorkerConfig& c, const std::string& checkpoint) {
  if (c.adapter == "none" && !checkpoint.empty() && checkpoint != "none") {
    return absl::InvalidArgumentError(absl::StrCat(
        "--checkpoint ", checkpoint,
        ": adapter.type is none (the bare model); set adapter.type to the checkpoint's adapter"));
  }
  return absl::OkStatus();
}

// What eval and generate run, said in a log line: the adapter of --checkpoint PATH; with
// --checkpoint none the untrained adapter (meft: the parameter server's current state); without
// --checkpoint the newest checkpoint-<step> in output_dir, or the untrained adapter when there is
// none. adapter.type none loads nothing. Returns the checkpoint loaded ("" = none).
absl::StatusOr<std::string> LoadEvaluatedAdapter(WorkerSession& s, const WorkerConfig& c,
                                                 const std::string& checkpoint) {
  if (c.adapter == "none") return std::string();
  const std::string untrained =
      c.adapter == "meft" ? "the parameter server's current state" : "the untrained adapter";
  std::string path = checkpoint;
  if (path == "none") {
    spdlog::info("--checkpoint none: using {}", untrained);
    return std::string();
  }
  if (path.empty()) {
    MEFT_ASSIGN_OR_RETURN(path, meft::worker::NewestCheckpoint(c.output_dir));
    if (path.empty()) {
      spdlog::info("no checkpoint-<step> in output_dir {}: using {}",
                   c.output_dir.empty() ? "(not set)" : c.output_dir, untrained);
      return std::string();
    }
    spdlog::info("using {}, the newest checkpoint in output_dir (--checkpoint none for {})", path,
                 untrained);
  } else {
    spdlog::info("using {}", path);
  }
  const absl::Status loaded = meft::worker::LoadAdapterCheckpoint(path, s.target);
  if (!loaded.ok()) {
    return absl::Status(loaded.code(), absl::StrCat("checkpoint ", path, ": ", loaded.message()));
  }
  return path;
}

absl::Status Train(const WorkerConfig& c, const std::string& resume) {
  if (c.adapter == "none") {
    return absl::InvalidArgumentError(
        "adapter.type: none trains nothing (the bare model has no parameters to train); use "
        "meft, parallel or lora. eval and generate run the bare model.");
  }
  InstallStopHandler();
  meft::metrics::Registry registry;
  std::unique_ptr<meft::metrics::Exposer> exposer;
  if (!c.metrics_listen.empty()) {
    auto started = meft::metrics::Exposer::Start(c.metrics_listen, registry);
    if (!started.ok()) {
      return absl::Status(started.status().code(),
                          absl::StrCat("metrics.listen: ", started.status().message()));
    }
    exposer = std::move(*started);
    // Scripts and tests parse this line: keep "metrics on URL" as it is.
    spdlog::info("worker metrics on http://{}:{}/metrics",
                 c.metrics_listen.substr(0, c.metrics_listen.rfind(':')), exposer->port());
  }
  MEFT_ASSIGN_OR_RETURN(auto s, meft::worker::OpenSession(c));
  meft::worker::WorkerMetrics worker_metrics(&registry, s->model->device());
  meft::worker::MeterReader server_meter(&s->client_meter);
  MEFT_ASSIGN_OR_RETURN(auto examples, meft::worker::LoadJsonl(c.train_file));
  MEFT_ASSIGN_OR_RETURN(auto tokenized,
                        meft::worker::TokenizeExamples(
                            examples, s->formatter, *s->tokenizer,
                            {.max_length = c.max_length, .train_on_inputs = c.train_on_inputs}));
  if (tokenized.num_truncated > 0) {
    spdlog::warn("{} of {} training examples were truncated to data.max_length = {}",
                 tokenized.num_truncated, tokenized.examples.size(), c.max_length);
  }
  MEFT_ASSIGN_OR_RETURN(
      auto loader, meft::worker::DataLoader::Create(
                       std::move(tokenized.examples), s->tokenizer->pad_id(),
                       {.micro_batch_size = c.micro_batch_size, .shuffle = true, .seed = c.seed}));
  meft::worker::TrainerOptions trainer_options = meft::worker::MakeTrainerOptions(c);
  trainer_options.stop_requested = [] { return stop_requested.load(); };
  MEFT_ASSIGN_OR_RETURN(auto trainer,
                        meft::worker::Trainer::Create(s->model.get(), s->target, loader.get(),
                                                      std::move(trainer_options)));
  if (!resume.empty()) {
    MEFT_RETURN_IF_ERROR(trainer->Resume(resume));
    spdlog::info("resumed from {} at step {}", resume, trainer->step());
  }
  std::vector<meft::worker::Example> eval_examples;
  if (c.eval_every > 0) {
    MEFT_ASSIGN_OR_RETURN(eval_examples, meft::worker::LoadJsonl(c.eval_file));
  }
  spdlog::info("training {} adapter: {} examples, {} micro-batches per epoch, {} steps of {} x {}",
               c.adapter, loader->num_examples(), loader->batches_per_epoch(), c.max_steps,
               c.micro_batch_size, c.grad_accum);
  MEFT_ASSIGN_OR_RETURN(
      auto history, trainer->Run([&](meft::worker::StepStats& stats) -> absl::Status {
        meft::worker::ServerTimings timings = server_meter.Take();
        if (s->meft) {
          // With overlap the client's calls run partly in the background; the adapter knows how
          // long the training thread was actually blocked, and its row transfers to the device.
          const meft::worker::MeftTimings adapter = s->meft->TakeTimings();
          timings.wait_seconds = adapter.wait_seconds;
          timings.transfer_seconds = adapter.transfer_seconds;
        }
        worker_metrics.RecordStep(stats, timings);
        // The same split as the meft_worker_*_seconds metrics, for train_log.jsonl.
        stats.extra["wait_seconds"] = timings.wait_seconds;
        stats.extra["transfer_seconds"] = timings.transfer_seconds;
        stats.extra["compute_seconds"] =
            std::max(0.0, stats.seconds - timings.wait_seconds - timings.transfer_seconds);
        if (c.eval_every == 0 || stats.step % c.eval_every != 0) return absl::OkStatus();
        MEFT_ASSIGN_OR_RETURN(
            auto result, RunEvaluation(*s, c, eval_examples, "", c.eval_limit, stats.step, ""));
        PrintSummary(result.summary, absl::StrCat("eval at step ", stats.step));
        for (const auto& [name, mean] : result.summary.means) stats.extra["eval_" + name] = mean;
        return absl::OkStatus();
      }));
  if (stop_requested.load()) spdlog::info("stopped by a signal at step {}", trainer->step());
  double seconds = 0;
  for (const auto& h : history) seconds += h.seconds;
  std::printf("trained %zu steps in %.1f s; final loss %.4f; checkpoints under %s\n",
              history.size(), seconds, history.empty() ? 0.0 : history.back().loss,
              c.output_dir.c_str());
  if (exposer && c.metrics_linger_seconds > 0) {
    std::fflush(stdout);
    std::this_thread::sleep_for(std::chrono::duration<double>(c.metrics_linger_seconds));
  }
  return absl::OkStatus();
}

absl::Status Eval(const WorkerConfig& c, const std::string& checkpoint, std::string output,
                  int64_t limit) {
  MEFT_RETURN_IF_ERROR(CheckCheckpointWanted(c, checkpoint));
  MEFT_ASSIGN_OR_RETURN(auto s, meft::worker::OpenSession(c));
  MEFT_ASSIGN_OR_RETURN(const std::string loaded, LoadEvaluatedAdapter(*s, c, checkpoint));
  MEFT_ASSIGN_OR_RETURN(auto examples, meft::worker::LoadJsonl(c.eval_file));
  if (output.empty()) output = absl::StrCat(c.output_dir, "/eval");
  int64_t step = 0;
  if (s->client) {
    MEFT_ASSIGN_OR_RETURN(auto server, s->client->Describe());
    step = static_cast<int64_t>(server.step);
  }
  MEFT_ASSIGN_OR_RETURN(auto result, RunEvaluation(*s, c, examples, output, limit, step, loaded));
  PrintSummary(result.summary, absl::StrCat("eval of ", c.eval_file));
  std::printf("predictions: %s/predictions.jsonl, metrics: %s/metrics.json\n", output.c_str(),
              output.c_str());
  return absl::OkStatus();
}

absl::Status Generate(const WorkerConfig& c, const std::string& checkpoint,
                      const std::string& prompt, const std::string& input) {
  MEFT_RETURN_IF_ERROR(CheckCheckpointWanted(c, checkpoint));
  MEFT_ASSIGN_OR_RETURN(auto s, meft::worker::OpenSession(c));
  MEFT_RETURN_IF_ERROR(LoadEvaluatedAdapter(*s, c, checkpoint).status());
  meft::worker::Example example;
  example.instruction = prompt;
  example.input = input;
  MEFT_ASSIGN_OR_RETURN(
      const std::vector<int64_t> ids,
      meft::worker::TokenizePrompt(example, s->formatter, *s->tokenizer, c.max_length));
  MEFT_ASSIGN_OR_RETURN(meft::worker::EvaluateOptions options,
                        meft::worker::MakeEvaluateOptions(c));
  EvaluationMode(*s, 0);
  MEFT_ASSIGN_OR_RETURN(
      auto out, meft::worker::Generate(*s->model, {ids}, s->tokenizer->eos_id(),
                                       s->tokenizer->pad_id(), options.generate, s->target.hooks));
  std::printf("%s\n", s->tokenizer->Decode(out[0]).c_str());
  return absl::OkStatus();
}

int Finish(const absl::Status& status) {
  if (status.ok()) return 0;
  std::fprintf(stderr, "meft-worker: error: %s\n", std::string(status.message()).c_str());
  return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
}

int MakeFacts(int argc, char** argv) {
  meft::worker::FactsOptions o;
  o.output_dir = "runs/facts";
  meft::config::FieldSet fields;
  fields.Add("output", &o.output_dir, "folder for train/eval/heldout JSONL, corpus and model/");
  fields.Add("seed", &o.seed, "seed of names, facts, templates and weights");
  fields.Add("entities", &o.num_entities, "invented countries");
  fields.Add("attributes", &o.attributes_per_entity, "facts per country");
  fields.Add("values_per_attribute", &o.values_per_attribute,
             "possible answers per attribute kind");
  fields.Add("vocab_size", &o.tokenizer_vocab_size, "SentencePiece pieces");
  fields.Add("hidden_size", &o.hidden_size, "tiny LLaMA hidden size");
  fields.Add("layers", &o.num_layers, "tiny LLaMA decoder layers");
  fields.Add("heads", &o.num_heads, "attention heads");
  fields.Add("kv_heads", &o.num_kv_heads, "key-value heads");
  fields.Add("intermediate_size", &o.intermediate_size, "FFN size");
  fields.Add("output_init_std", &o.output_init_std, "std of the random lm_head (see make_facts.h)");
  CLI::App app{"meft-worker make-facts: write the built-in synthetic closed-book benchmark"};
  fields.BindCli(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  absl::Status status = fields.registration_status();
  if (status.ok()) status = fields.ApplyCli();
  if (!status.ok()) return Finish(status);
  auto summary = meft::worker::MakeFacts(o);
  if (!summary.ok()) return Finish(summary.status());
  std::printf(
      "facts: %lld (train %lld, eval %lld, held-out %lld); model %s: %lld parameters, "
      "vocab %lld, %.2f tokens per answer\n",
      static_cast<long long>(summary->num_facts), static_cast<long long>(summary->train_examples),
      static_cast<long long>(summary->eval_examples),
      static_cast<long long>(summary->heldout_examples), summary->model_dir.c_str(),
      static_cast<long long>(summary->num_parameters), static_cast<long long>(summary->vocab_size),
      summary->mean_answer_tokens);
  return 0;
}

int RunWithConfig(const std::string& command, int argc, char** argv) {
  WorkerConfig config;
  meft::config::FieldSet fields;
  meft::worker::RegisterWorkerFields(&config, &fields);
  CLI::App app{
      absl::StrCat("meft-worker ", command,
                   ". Settings come from defaults, then --config FILE (YAML), then flags.")};
  std::string config_path, resume, checkpoint, output, prompt, input;
  int64_t limit = 0;
  app.add_option("--config", config_path, "YAML configuration file")->check(CLI::ExistingFile);
  if (command == "train") {
    app.add_option("--resume", resume, "continue from this checkpoint-<step> folder");
  } else {
    app.add_option("--checkpoint", checkpoint,
                   "load the adapter of this checkpoint-<step> folder (meft: the server restores "
                   "it); default: the newest in output_dir; none: the untrained adapter (meft: "
                   "the server's current state)");
  }
  if (command == "eval") {
    app.add_option("--output", output,
                   "folder for predictions.jsonl and metrics.json (default output_dir/eval)");
    app.add_option("--limit", limit, "evaluate only the first N examples");
  }
  if (command == "generate") {
    app.add_option("--prompt", prompt, "the instruction to answer")->required();
    app.add_option("--input", input, "optional input for the instruction");
  }
  fields.BindCli(app);
  app.footer("Every setting, with its YAML key, default and meaning:\n" + fields.HelpText());
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  absl::Status status = fields.registration_status();
  if (status.ok() && !config_path.empty()) status = fields.LoadYamlFile(config_path);
  if (status.ok()) status = fields.ApplyCli();
  if (status.ok()) status = meft::logging::Init(config.log_level, "worker");
  if (!status.ok()) return Finish(status);
  spdlog::info("{}",
               meft::rpc::KeepMessageBuffersInHeap(meft::config::AllocatorTunedByEnvironment()));
  if (command == "train") return Finish(Train(config, resume));
  if (command == "eval") return Finish(Eval(config, checkpoint, output, limit));
  return Finish(Generate(config, checkpoint, prompt, input));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "%s", kUsage);
    return 2;
  }
  const std::string command = argv[1];
  if (command == "-h" || command == "--help") {
    std::printf("%s", kUsage);
    return 0;
  }
  if (command == "make-facts") return MakeFacts(argc - 1, argv + 1);
  if (command == "export") return meft::worker::RunExportCommand(argc - 1, argv + 1);
  if (command == "train" || command == "eval" || command == "generate") {
    return RunWithConfig(command, argc - 1, argv + 1);
  }
  std::fprintf(stderr, "meft-worker: unknown command \"%s\"\n%s", command.c_str(), kUsage);
  return 2;
}
