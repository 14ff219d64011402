// meft_ffn_sparsity_bench: the paper's premise, measured on a real model (issue 11). MEFT rests
// on two observations: a trained FFN's activations are sparse (a few neurons carry each token),
// and a sparse adapter's selection ships only a small part of its rows per micro-batch.
//
// The bench runs the frozen model of a worker configuration (model_dir, data.train, the prompt
// template, data.max_length, train.micro_batch_size; the same YAML keys and flags as
// meft-worker) over the first --examples training examples, tokenized exactly as training sees
// them (prompt + answer), and reads every decoder layer's FFN input x_t through the adapter hook.
// Per layer it reports, over all real tokens:
//   - the SwiGLU product h_t = silu(W_gate x_t) * (W_up x_t) (intermediate_size values per
//     token): the fraction of entries with |h_ti| below each absolute threshold, the fraction
//     below each fraction of the token's own max_i |h_ti|, and the share of sum_i |h_ti| that the
//     token's 64 largest entries hold;
//   - the adapter's |S| / r per lookup: the parameter server's own selection code
//     (param_server/routing, DESIGN §2) over each micro-batch's tokens, against a freshly
//     initialised layer store (K ~ N(0, 0.02), router = 50 x mean of its keys) of r rows, for
//     each --rows value, with top_k 64 and n_probe 8. A fresh store is what the first steps of
//     training select from; the mean |S| and |S| / (tokens x top_k), the paper's beta, are shown.
//
// --random-weights runs the same architecture with random N(0, 0.02) weights instead, the control
// that shows what training did to the activations.
//
//   build/bench/meft_ffn_sparsity_bench --model-dir DIR --data-train FILE [--config run.yaml]
//       [--examples 64] [--rows 4096,16384] [--json out.json] [--random-weights]

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/config/config.h"
#include "gpu_worker/app/worker_config.h"
#include "gpu_worker/data/dataset.h"
#include "gpu_worker/model/adapter_hooks.h"
#include "gpu_worker/model/llama.h"
#include "gpu_worker/model/random_weights.h"
#include "nlohmann/json.hpp"
#include "param_server/kernels/dot.h"
#include "param_server/routing/selector.h"
#include "param_server/store/layer_store.h"

namespace meft::bench {
namespace {

constexpr double kAbsThresholds[] = {0.001, 0.01, 0.1};
constexpr double kRelThresholds[] = {0.01, 0.05, 0.1};
constexpr int64_t kTopNeurons = 64;
constexpr int64_t kTopK = 64;
constexpr int64_t kNProbe = 8;

// Keeps every layer's FFN input of one forward pass, as fp32 [B, T, d] on the CPU.
class CaptureHooks : public worker::AdapterHooks {
 public:
  void FfnInputReady(int64_t layer, const torch::Tensor& ffn_input,
                     const torch::Tensor& /*token_mask*/) override {
    inputs_[layer] = ffn_input.detach().to(torch::kCPU, torch::kFloat32).contiguous();
  }
  const std::map<int64_t, torch::Tensor>& inputs() const { return inputs_; }

 private:
  std::map<int64_t, torch::Tensor> inputs_;
};

// Per-layer sums over real tokens.
struct LayerStats {
  int64_t tokens = 0;
  int64_t entries = 0;
  std::vector<int64_t> below_abs = std::vector<int64_t>(std::size(kAbsThresholds));
  std::vector<int64_t> below_rel = std::vector<int64_t>(std::size(kRelThresholds));
  double top_share_sum = 0;                    // sum over tokens of the top-64 share
  std::map<int64_t, std::vector<double>> rows;  // r -> |S| of each lookup
  std::map<int64_t, std::vector<double>> betas;  // r -> |S| / (tokens x top_k) of each lookup
};

void AddActivations(const torch::Tensor& h, LayerStats* stats) {  // h: [N, I] fp32, real tokens
  const torch::Tensor a = h.abs();
  stats->tokens += a.size(0);
  stats->entries += a.numel();
  for (size_t i = 0; i < std::size(kAbsThresholds); ++i) {
    stats->below_abs[i] += (a < kAbsThresholds[i]).sum().item<int64_t>();
  }
  const torch::Tensor row_max = std::get<0>(a.max(1, /*keepdim=*/true));
  for (size_t i = 0; i < std::size(kRelThresholds); ++i) {
    stats->below_rel[i] += (a < row_max * kRelThresholds[i]).sum().item<int64_t>();
  }
  const int64_t k = std::min<int64_t>(kTopNeurons, a.size(1));
  const torch::Tensor top = std::get<0>(a.topk(k, 1)).sum(1);
  const torch::Tensor total = a.sum(1).clamp_min(1e-30);
  stats->top_share_sum += (top / total).sum().item<double>();
}

double Mean(const std::vector<double>& v) {
  return v.empty() ? 0.0 : std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
}

int Run(int argc, char** argv) {
  worker::WorkerConfig config;
  config.adapter = "none";
  config::FieldSet fields;
  worker::RegisterWorkerFields(&config, &fields);
  CLI::App app{"meft_ffn_sparsity_bench: FFN activation sparsity and MEFT's |S| / r on a model"};
  std::string config_path, rows_list = "4096,16384", json_path;
  int64_t num_examples = 64;
  uint64_t store_seed = 1;
  app.add_option("--config", config_path, "YAML configuration file (meft-worker's keys)")
      ->check(CLI::ExistingFile);
  app.add_option("--examples", num_examples, "training examples to run (from data.train)");
  app.add_option("--rows", rows_list, "comma-separated adapter sizes r for |S| / r");
  app.add_option("--store-seed", store_seed, "seed of the fresh adapter stores");
  app.add_option("--json", json_path, "also write the results to this JSON file");
  bool random_weights = false;
  app.add_flag("--random-weights", random_weights,
               "control: the same architecture with random N(0, 0.02) weights (seeded by "
               "--store-seed) instead of the trained ones");
  fields.BindCli(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  absl::Status status = fields.registration_status();
  if (status.ok() && !config_path.empty()) status = fields.LoadYamlFile(config_path);
  if (status.ok()) status = fields.ApplyCli();
  if (!status.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(status.message()).c_str());
    return 2;
  }
  if (config.adapter != "none") {
    std::fprintf(stderr, "error: adapter.type: the bench runs the bare model; leave it at none\n");
    return 2;
  }
  std::vector<int64_t> rows;
  for (absl::string_view r : absl::StrSplit(rows_list, ',', absl::SkipEmpty())) {
    int64_t value = 0;
    if (!absl::SimpleAtoi(r, &value) || value < kTopK) {
      std::fprintf(stderr, "error: --rows: \"%s\" is not an integer >= %lld\n",
                   std::string(r).c_str(), static_cast<long long>(kTopK));
      return 2;
    }
    rows.push_back(value);
  }
  if (num_examples <= 0) {
    std::fprintf(stderr, "error: --examples must be positive\n");
    return 2;
  }

  auto session = worker::OpenSession(config);
  if (!session.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(session.status().message()).c_str());
    return 1;
  }
  worker::WorkerSession& s = **session;
  if (random_weights) {
    const worker::ModelConfig shape = s.model->config();
    auto model = worker::LlamaModel::FromWeights(
        shape, worker::RandomLlamaWeights(shape, store_seed), s.model->device(), s.model->dtype());
    if (!model.ok()) {
      std::fprintf(stderr, "error: %s\n", std::string(model.status().message()).c_str());
      return 1;
    }
    s.model = std::move(*model);
  }
  auto examples = worker::LoadJsonl(config.train_file);
  if (!examples.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(examples.status().message()).c_str());
    return 1;
  }
  if (static_cast<int64_t>(examples->size()) > num_examples) examples->resize(num_examples);
  auto tokenized = worker::TokenizeExamples(*examples, s.formatter, *s.tokenizer,
                                            {.max_length = config.max_length});
  if (!tokenized.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(tokenized.status().message()).c_str());
    return 1;
  }

  const worker::ModelConfig& mc = s.model->config();
  const int64_t d = mc.hidden_size;
  std::printf("model: %s%s (%lld layers, d=%lld, FFN %lld, %s); %zu examples of %s, micro-batch %lld\n",
              config.model_dir.c_str(), random_weights ? ", random weights instead of its own" : "",
              static_cast<long long>(mc.num_hidden_layers),
              static_cast<long long>(d), static_cast<long long>(mc.intermediate_size),
              s.model->device().str().c_str(), tokenized->examples.size(),
              config.train_file.c_str(), static_cast<long long>(config.micro_batch_size));
  std::printf("LibTorch intra-op threads: %d; selection kernel: %s; %u hardware threads\n",
              at::get_num_threads(), std::string(kernels::Best().name).c_str(),
              std::thread::hardware_concurrency());

  const std::map<std::string, torch::Tensor> weights = s.model->NamedParameters();
  std::vector<LayerStats> stats(mc.num_hidden_layers);
  // Per layer, every micro-batch's FFN inputs [B*T, d] with their real-token mask: the selection
  // runs after the forward passes, one layer at a time, so that only one layer's fresh store
  // (about 16 bytes per adapter parameter) exists at once.
  struct Lookup {
    torch::Tensor x;
    torch::Tensor mask;
    int64_t real_tokens = 0;
  };
  std::vector<std::vector<Lookup>> captured(mc.num_hidden_layers);
  torch::NoGradGuard no_grad;
  const int64_t n = static_cast<int64_t>(tokenized->examples.size());
  for (int64_t begin = 0; begin < n; begin += config.micro_batch_size) {
    std::vector<int64_t> indices;
    for (int64_t i = begin; i < std::min(n, begin + config.micro_batch_size); ++i) {
      indices.push_back(i);
    }
    auto batch = worker::CollateRightPadded(tokenized->examples, indices, s.tokenizer->pad_id());
    if (!batch.ok()) {
      std::fprintf(stderr, "error: %s\n", std::string(batch.status().message()).c_str());
      return 1;
    }
    CaptureHooks hooks;
    s.model->Forward(batch->input_ids.to(s.model->device()),
                     batch->attention_mask.to(s.model->device()), nullptr, &hooks);
    const torch::Tensor mask = batch->attention_mask.reshape({-1}).to(torch::kBool);
    const torch::Tensor mask_bytes = batch->attention_mask.reshape({-1}).to(torch::kUInt8);
    for (const auto& [l, x] : hooks.inputs()) {
      const torch::Tensor flat = x.reshape({-1, d});
      const torch::Tensor real = flat.index({mask});
      const std::string p = absl::StrCat("model.layers.", l, ".mlp.");
      const torch::Tensor gate = weights.at(p + "gate_proj.weight").to(torch::kCPU, torch::kFloat32);
      const torch::Tensor up = weights.at(p + "up_proj.weight").to(torch::kCPU, torch::kFloat32);
      const torch::Tensor h = torch::silu(real.matmul(gate.t())) * real.matmul(up.t());
      AddActivations(h, &stats[l]);
      captured[l].push_back({flat, mask_bytes, real.size(0)});
    }
    std::fprintf(stderr, "\r%lld/%lld examples", static_cast<long long>(indices.back() + 1),
                 static_cast<long long>(n));
  }
  std::fprintf(stderr, "\n");

  // |S| of each micro-batch's lookup against a fresh store: what the first steps of training
  // select from.
  for (int64_t l = 0; l < mc.num_hidden_layers; ++l) {
    for (int64_t r : rows) {
      store::InitOptions init;
      init.seed = store_seed;
      auto store = store::LayerStore::Create(static_cast<uint32_t>(l), r, d,
                                             store::DefaultExperts(r), init);
      if (!store.ok()) {
        std::fprintf(stderr, "error: store r=%lld: %s\n", static_cast<long long>(r),
                     std::string(store.status().message()).c_str());
        return 1;
      }
      for (const Lookup& lookup : captured[l]) {
        const routing::Selection sel = routing::Select(
            *store, lookup.x.data_ptr<float>(), lookup.x.size(0), lookup.mask.data_ptr<uint8_t>(),
            {.n_probe = kNProbe, .top_k = kTopK, .gated = true}, kernels::Best());
        const double size = static_cast<double>(sel.rows.size());
        stats[l].rows[r].push_back(size);
        stats[l].betas[r].push_back(size / static_cast<double>(lookup.real_tokens * kTopK));
      }
    }
    std::fprintf(stderr, "\rselection: layer %lld/%lld", static_cast<long long>(l + 1),
                 static_cast<long long>(mc.num_hidden_layers));
  }
  std::fprintf(stderr, "\n");

  // Table: one row per layer.
  std::string header = "| layer |";
  std::string rule = "|---|";
  for (double t : kAbsThresholds) {
    absl::StrAppend(&header, " |h| < ", t, " |");
    rule += "---|";
  }
  for (double t : kRelThresholds) {
    absl::StrAppend(&header, " |h| < ", t, " max |");
    rule += "---|";
  }
  absl::StrAppend(&header, " top-", kTopNeurons, " share of sum |h| |");
  rule += "---|";
  for (int64_t r : rows) {
    absl::StrAppend(&header, " |S| / r at r=", r, " |");
    rule += "---|";
  }
  std::printf("\n%s\n%s\n", header.c_str(), rule.c_str());
  nlohmann::json out;
  out["model_dir"] = config.model_dir;
  out["random_weights"] = random_weights;
  out["data"] = config.train_file;
  out["examples"] = n;
  out["micro_batch_size"] = config.micro_batch_size;
  out["top_k"] = kTopK;
  out["n_probe"] = kNProbe;
  std::vector<double> mean_abs(std::size(kAbsThresholds)), mean_rel(std::size(kRelThresholds));
  double mean_top = 0;
  std::map<int64_t, double> mean_ratio, mean_beta, mean_rows;
  const double layers = static_cast<double>(mc.num_hidden_layers);
  for (int64_t l = 0; l < mc.num_hidden_layers; ++l) {
    const LayerStats& st = stats[l];
    nlohmann::json jl;
    jl["layer"] = l;
    jl["tokens"] = st.tokens;
    std::string line = absl::StrCat("| ", l, " |");
    for (size_t i = 0; i < std::size(kAbsThresholds); ++i) {
      const double f = static_cast<double>(st.below_abs[i]) / static_cast<double>(st.entries);
      absl::StrAppend(&line, absl::StrFormat(" %.3f |", f));
      jl["below_abs"][absl::StrCat(kAbsThresholds[i])] = f;
      mean_abs[i] += f / layers;
    }
    for (size_t i = 0; i < std::size(kRelThresholds); ++i) {
      const double f = static_cast<double>(st.below_rel[i]) / static_cast<double>(st.entries);
      absl::StrAppend(&line, absl::StrFormat(" %.3f |", f));
      jl["below_rel_max"][absl::StrCat(kRelThresholds[i])] = f;
      mean_rel[i] += f / layers;
    }
    const double top = st.top_share_sum / static_cast<double>(st.tokens);
    absl::StrAppend(&line, absl::StrFormat(" %.3f |", top));
    jl["top_share"] = top;
    mean_top += top / layers;
    for (int64_t r : rows) {
      const double ratio = Mean(st.rows.at(r)) / static_cast<double>(r);
      absl::StrAppend(&line, absl::StrFormat(" %.3f |", ratio));
      jl["rows"][absl::StrCat(r)] = {{"mean_rows", Mean(st.rows.at(r))},
                                     {"rows_over_r", ratio},
                                     {"beta", Mean(st.betas.at(r))}};
      mean_ratio[r] += ratio / layers;
      mean_beta[r] += Mean(st.betas.at(r)) / layers;
      mean_rows[r] += Mean(st.rows.at(r)) / layers;
    }
    out["layers"].push_back(jl);
    std::printf("%s\n", line.c_str());
  }
  std::string line = "| mean |";
  for (double f : mean_abs) absl::StrAppend(&line, absl::StrFormat(" %.3f |", f));
  for (double f : mean_rel) absl::StrAppend(&line, absl::StrFormat(" %.3f |", f));
  absl::StrAppend(&line, absl::StrFormat(" %.3f |", mean_top));
  for (int64_t r : rows) absl::StrAppend(&line, absl::StrFormat(" %.3f |", mean_ratio[r]));
  std::printf("%s\n\n", line.c_str());
  for (int64_t r : rows) {
    std::printf(
        "r=%lld: mean |S| = %.0f rows per lookup (%.1f %% of r), beta = |S| / (tokens x top_k) = "
        "%.3f\n",
        static_cast<long long>(r), mean_rows[r], 100.0 * mean_ratio[r], mean_beta[r]);
    out["summary"]["rows"][absl::StrCat(r)] = {
        {"mean_rows", mean_rows[r]}, {"rows_over_r", mean_ratio[r]}, {"beta", mean_beta[r]}};
  }
  out["summary"]["top_share"] = mean_top;
  if (!json_path.empty()) {
    std::ofstream f(json_path);
    f << out.dump(2) << "\n";
    if (!f) {
      std::fprintf(stderr, "error: cannot write %s\n", json_path.c_str());
      return 1;
    }
  }
  return 0;
}

}  // namespace
}  // namespace meft::bench

int main(int argc, char** argv) { return meft::bench::Run(argc, argv); }
