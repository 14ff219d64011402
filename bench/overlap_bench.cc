// meft_overlap_bench: how much of a training step the worker spends waiting for the parameter
// server, without overlap, with overlap, and with overlap plus prefetch (DESIGN §3, issue 4).
//
// A random LLaMA-shaped model runs on the CPU (LibTorch) and trains a MEFT adapter on a real
// in-process ParamServer behind a real loopback gRPC server; every mode gets a fresh server with
// the same seed and the same data. The worker's wait is MeftAdapter's MeftTimings::wait_seconds
// (the training thread blocked on lookups, gradient acknowledgements, GradNorm and Step).
//
// Defaults: d = 512, 8 layers (8 heads of 64, SwiGLU width 1376), micro-batch 1 x 256 tokens,
// grad_accum 2, r = 16384 rows per layer (E = 512, n_probe 8, top_k 64), bf16 rows on the wire.
// At this size the server's selection of one layer and the worker's forward + backward of one
// layer take the same order of time on a 2-core machine, which is where overlap matters. All
// sizes are flags: --dim --layers --tokens --rows --steps --warmup --accum --modes.

#include <sys/resource.h>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "common/config/config.h"
#include "common/metrics/metrics.h"
#include "common/rpc/message_memory.h"
#include "gpu_worker/adapters/meft_adapter.h"
#include "gpu_worker/data/dataset.h"
#include "gpu_worker/model/llama.h"
#include "gpu_worker/model/random_weights.h"
#include "gpu_worker/rpc/grpc_param_client.h"
#include "gpu_worker/train/trainer.h"
#include "param_server/kernels/dot.h"
#include "param_server/rpc/service.h"
#include "param_server/server/param_server.h"

namespace meft::bench {
namespace {

using Clock = std::chrono::steady_clock;
using worker::MeftAdapterOptions;
using worker::MeftTimings;

struct Settings {
  int64_t dim = 512;
  int64_t layers = 8;
  int64_t tokens = 256;
  int64_t rows = 16384;
  int64_t steps = 6;   // measured optimizer steps
  int64_t warmup = 1;  // optimizer steps before measuring
  int64_t accum = 2;   // micro-batches per optimizer step
  std::string modes = "sync,overlap,prefetch1,prefetch2";
};

struct Mode {
  std::string name;
  MeftAdapterOptions options;
};

struct Result {
  Mode mode;
  double seconds = 0.0;      // wall time of the measured steps
  double cpu_seconds = 0.0;  // CPU time of the whole process (worker and server) in them
  double lookups = 0.0;      // lookups the server answered in them
  double rows = 0.0;         // rows it sent in them
  MeftTimings timings;
  std::vector<double> losses;
};

double ProcessCpuSeconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         1e-6 * static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

std::string CpuModel() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown";
}

// The BLAS LibTorch was built against, and the BLAS/LAPACK libraries actually mapped.
void PrintBlas() {
  for (absl::string_view field : absl::StrSplit(at::show_config(), absl::ByAnyChar(",\n"))) {
    field = absl::StripAsciiWhitespace(field);
    for (absl::string_view key : {"BLAS_INFO", "LAPACK_INFO"}) {
      const size_t at = field.find(key);
      if (at != absl::string_view::npos) {
        std::printf("LibTorch build: %s\n", std::string(field.substr(at)).c_str());
      }
    }
  }
  std::ifstream maps("/proc/self/maps");
  std::set<std::string> libs;
  std::string line;
  while (std::getline(maps, line)) {
    const size_t slash = line.find('/');
    if (slash == std::string::npos) continue;
    const std::string path = line.substr(slash);
    if (path.find("blas") != std::string::npos || path.find("mkl") != std::string::npos ||
        path.find("lapack") != std::string::npos) {
      libs.insert(path);
    }
  }
  std::printf("BLAS libraries loaded:");
  for (const std::string& l : libs) std::printf(" %s", l.c_str());
  std::printf("%s\n", libs.empty() ? " none" : "");
}

worker::ModelConfig ModelShape(const Settings& s) {
  worker::ModelConfig c;
  c.vocab_size = 1024;
  c.hidden_size = s.dim;
  c.intermediate_size = (s.dim * 8 / 3 + 31) / 32 * 32;  // LLaMA's 8/3 d, rounded to 32
  c.num_hidden_layers = s.layers;
  c.head_dim = 64;
  c.num_attention_heads = s.dim / 64;
  c.num_key_value_heads = s.dim / 64;
  c.rms_norm_eps = 1e-5;
  c.max_position_embeddings = 4096;
  return c;
}

std::vector<worker::TokenizedExample> RandomExamples(const Settings& s, int64_t n, int64_t vocab) {
  torch::Generator gen = at::detail::createCPUGenerator(7);
  std::vector<worker::TokenizedExample> out;
  for (int64_t i = 0; i < n; ++i) {
    const torch::Tensor ids = torch::randint(3, vocab, {s.tokens}, gen, torch::kInt64);
    worker::TokenizedExample e;
    e.input_ids.assign(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + s.tokens);
    e.labels = e.input_ids;
    e.prompt_length = 0;
    out.push_back(std::move(e));
  }
  return out;
}

Result RunMode(const Settings& s, const Mode& mode, const worker::LlamaModel& model) {
  server::ServerOptions o;
  o.layers.clear();
  for (int64_t l = 0; l < s.layers; ++l) o.layers.push_back(static_cast<uint32_t>(l));
  o.rows = s.rows;
  o.dim = s.dim;
  o.init.seed = 1;
  o.max_tokens = std::max<int64_t>(8192, s.tokens);
  metrics::Registry registry;
  metrics::Counter& lookups = registry.AddCounter("meft_ps_lookups_total", "Lookups answered");
  metrics::Counter& rows = registry.AddCounter("meft_ps_rows_served_total", "Rows sent");
  auto domain = server::ParamServer::Create(o, &registry);
  if (!domain.ok()) {
    std::fprintf(stderr, "server: %s\n", std::string(domain.status().message()).c_str());
    std::exit(1);
  }
  auto running = rpc::StartServer({.listen = "127.0.0.1:0"}, domain->get(), nullptr);
  if (!running.ok()) {
    std::fprintf(stderr, "gRPC: %s\n", std::string(running.status().message()).c_str());
    std::exit(1);
  }
  worker::GrpcClientOptions co;
  co.address = "127.0.0.1:" + std::to_string((*running)->port());
  auto client = *worker::CreateGrpcParamClient(co);
  worker::MeftAdapter adapter(client.get(), *client->Describe(), mode.options);
  auto loader = *worker::DataLoader::Create(RandomExamples(s, 8, model.config().vocab_size), 0,
                                            {.micro_batch_size = 1, .seed = 3});
  worker::TrainTarget target{
      .adapter = "meft", .hooks = &adapter, .meft = &adapter, .server = client.get()};
  auto trainer = *worker::Trainer::Create(&model, target, loader.get(),
                                          {.max_steps = s.warmup + s.steps,
                                           .grad_accum = s.accum,
                                           .lr = 1e-3,
                                           .warmup_ratio = 0.0,
                                           .progress = false});
  Result r{.mode = mode};
  Clock::time_point start = Clock::now();
  double cpu_start = ProcessCpuSeconds(), lookups_start = 0, rows_start = 0;
  auto history = trainer->Run([&](const worker::StepStats& stats) {
    if (stats.step == s.warmup) {
      adapter.TakeTimings();
      start = Clock::now();
      cpu_start = ProcessCpuSeconds();
      lookups_start = lookups.Value();
      rows_start = rows.Value();
    }
    return absl::OkStatus();
  });
  r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  r.cpu_seconds = ProcessCpuSeconds() - cpu_start;
  r.lookups = lookups.Value() - lookups_start;
  r.rows = rows.Value() - rows_start;
  r.timings = adapter.TakeTimings();
  if (!history.ok()) {
    std::fprintf(stderr, "%s: %s\n", mode.name.c_str(),
                 std::string(history.status().message()).c_str());
    std::exit(1);
  }
  for (const auto& h : *history) r.losses.push_back(h.loss);
  (*running)->Shutdown(1.0);
  return r;
}

}  // namespace
}  // namespace meft::bench

int main(int argc, char** argv) {
  namespace bench = meft::bench;
  bench::Settings s;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const size_t eq = arg.find('=');
    const std::string key = arg.substr(0, eq),
                      value = eq == std::string::npos ? "" : arg.substr(eq + 1);
    int64_t* field = key == "--dim"      ? &s.dim
                     : key == "--layers" ? &s.layers
                     : key == "--tokens" ? &s.tokens
                     : key == "--rows"   ? &s.rows
                     : key == "--steps"  ? &s.steps
                     : key == "--warmup" ? &s.warmup
                     : key == "--accum"  ? &s.accum
                                         : nullptr;
    if (key == "--modes") {
      s.modes = value;
    } else if (field != nullptr && !value.empty()) {
      *field = std::atoll(value.c_str());
    } else {
      std::fprintf(stderr,
                   "unknown argument %s\nflags: --dim=N --layers=N --tokens=N --rows=N --steps=N "
                   "--warmup=N --accum=N --modes=sync,overlap,prefetch1,prefetch2\n",
                   arg.c_str());
      return 2;
    }
  }
  if (s.dim % 64 != 0 || s.dim <= 0 || s.layers <= 0 || s.tokens <= 0 || s.rows <= 0 ||
      s.steps <= 0 || s.warmup < 0 || s.accum <= 0) {
    std::fprintf(stderr, "bad sizes: --dim must be a positive multiple of 64, the rest positive\n");
    return 2;
  }
  std::vector<bench::Mode> modes;
  for (absl::string_view m : absl::StrSplit(s.modes, ',')) {
    if (m == "sync") {
      modes.push_back({"no overlap", {.prefetch_layers = 0, .overlap = false}});
    } else if (m == "overlap") {
      modes.push_back({"overlap", {.prefetch_layers = 0, .overlap = true}});
    } else if (m == "prefetch1") {
      modes.push_back({"overlap + prefetch 1", {.prefetch_layers = 1, .overlap = true}});
    } else if (m == "prefetch2") {
      modes.push_back({"overlap + prefetch 2", {.prefetch_layers = 2, .overlap = true}});
    } else {
      std::fprintf(stderr, "--modes: unknown mode \"%s\"\n", std::string(m).c_str());
      return 2;
    }
  }

  const meft::worker::ModelConfig shape = bench::ModelShape(s);
  const std::string allocator = meft::rpc::KeepMessageBuffersInHeap(
      meft::config::AllocatorTunedByEnvironment());  // as the binaries do
  std::printf("CPU: %s; %u hardware threads (worker and server share them)\n",
              bench::CpuModel().c_str(), std::thread::hardware_concurrency());
  std::printf("%s (as the server and worker binaries set it)\n", allocator.c_str());
  std::printf("LibTorch intra-op threads: %d; server dot kernel: %s\n", at::get_num_threads(),
              std::string(meft::kernels::Best().name).c_str());
  bench::PrintBlas();
  std::printf(
      "model: d=%lld, %lld layers, %lld heads of 64, FFN %lld, fp32 on the CPU; micro-batch 1 x "
      "%lld tokens, grad_accum %lld; adapter on every layer, r=%lld, top_k 64, n_probe 8; "
      "%lld warm-up + %lld measured optimizer steps per mode\n\n",
      static_cast<long long>(s.dim), static_cast<long long>(s.layers),
      static_cast<long long>(shape.num_attention_heads),
      static_cast<long long>(shape.intermediate_size), static_cast<long long>(s.tokens),
      static_cast<long long>(s.accum), static_cast<long long>(s.rows),
      static_cast<long long>(s.warmup), static_cast<long long>(s.steps));
  std::fflush(stdout);

  auto model = meft::worker::LlamaModel::FromWeights(
      shape, meft::worker::RandomLlamaWeights(shape, 11), torch::kCPU, torch::kFloat32);
  if (!model.ok()) {
    std::fprintf(stderr, "model: %s\n", std::string(model.status().message()).c_str());
    return 1;
  }
  std::vector<bench::Result> results;
  for (const bench::Mode& mode : modes) {
    results.push_back(bench::RunMode(s, mode, **model));
    const bench::Result& r = results.back();
    std::printf("%-22s done: %.2f s per step\n", mode.name.c_str(),
                r.seconds / static_cast<double>(s.steps));
    std::fflush(stdout);
  }

  const double base = results.front().seconds;
  std::printf("\n%-22s %8s %8s %8s %9s %9s %8s %9s %10s\n", "mode", "step s", "wait s",
              "wait %", "transfer%", "server s", "cpu s", "rows/lkp", "step/first");
  for (const bench::Result& r : results) {
    const double n = static_cast<double>(s.steps);
    std::printf("%-22s %8.3f %8.3f %7.1f%% %8.1f%% %9.3f %8.3f %9.0f %10.3f\n",
                r.mode.name.c_str(), r.seconds / n, r.timings.wait_seconds / n,
                100.0 * r.timings.wait_seconds / r.seconds,
                100.0 * r.timings.transfer_seconds / r.seconds, r.timings.call_seconds / n,
                r.cpu_seconds / n, r.rows / std::max(r.lookups, 1.0), r.seconds / base);
  }
  std::printf(
      "\nwait: training thread blocked on the server (lookups, gradient acks, GradNorm, Step);\n"
      "server s: summed duration of the server calls per step (overlapping calls add up);\n"
      "cpu s: CPU time of the process (worker and server together) per step;\n"
      "rows/lkp: rows the server sent per lookup (|S|);\n"
      "step/first: step time relative to the first mode listed.\n");
  // Overlap must not change the numbers: compare losses of the modes with the same prefetch.
  for (size_t i = 1; i < results.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (results[i].mode.options.prefetch_layers != results[j].mode.options.prefetch_layers) {
        continue;
      }
      std::printf("losses of \"%s\" and \"%s\": %s\n", results[j].mode.name.c_str(),
                  results[i].mode.name.c_str(),
                  results[i].losses == results[j].losses ? "bit-identical" : "DIFFERENT");
    }
  }
  return 0;
}
