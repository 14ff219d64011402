// meft_gpu_shape_bench: peak device memory and training speed of the dense `parallel` baseline
// and of `meft` at a model shape (issue 12), with a real meft-param-server process on the same
// machine over the shared-memory transport. Writes results.json and results.md into --out.
//
//   meft_gpu_shape_bench --shape 7b --out DIR             # LLaMA-7B shape, bf16 on CUDA
//   meft_gpu_shape_bench --shape tiny --device cpu --out DIR   # the CPU dry run (seconds)
//
// Per configuration (default at 7b: parallel r=3072, meft r=3072, meft r=16384), in one run:
//  - peak CUDA allocator memory (reset before the configuration, read after its last step; on
//    the CPU there is none and the worker's peak RSS stands in), next to DESIGN §4's prediction
//    (frozen weights + what the adapter keeps on the device);
//  - the worker's and the server's peak RSS (the server's against §4's 16 bytes per parameter);
//  - tokens per second over the measured optimizer steps (after the warm-up steps), and where the
//    step went: waiting on the server, moving rows to the device, the rest (compute);
//  - per-layer wait, rows per lookup |S| and bytes moved per step in units of the adapter's fp32
//    size, from the server's own counters.
//
// The model is a random LLaMA drawn on the device (RandomLlamaWeightsOn) and shared by every
// configuration; the tokens are uniform random ids, so the tokens of a micro-batch share nothing
// and |S| is the worst case, close to r (1 - exp(-T top_k / r)); the results say so.

#include <ATen/CPUGeneratorImpl.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <torch/cuda.h>
#include <torch/torch.h>
#include <torch/version.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/shm/arena.h"
#include "common/status.h"
#include "gpu_worker/adapters/baselines.h"
#include "gpu_worker/adapters/meft_adapter.h"
#include "gpu_worker/data/dataset.h"
#include "gpu_worker/metrics/worker_metrics.h"
#include "gpu_worker/model/llama.h"
#include "gpu_worker/model/random_weights.h"
#include "gpu_worker/rpc/grpc_param_client.h"
#include "gpu_worker/train/trainer.h"
#include "nlohmann/json.hpp"

namespace meft::bench {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

void Log(const std::string& line) {
  std::fprintf(stderr, "[gpu_shape_bench] %s\n", line.c_str());
  std::fflush(stderr);
}

// ---------------------------------------------------------------------------------------------
// Settings

// One configuration: "parallel:R" or "meft:R", optionally ":refetch" (meft.refetch_in_backward)
// and ":maxrows=N" (the server's adapter.max_rows).
struct ConfigSpec {
  std::string adapter;
  int64_t rows = 0;
  bool refetch = false;
  int64_t max_rows = 0;

  std::string Name() const {
    std::string n = absl::StrCat(adapter, " r=", rows);
    if (refetch) absl::StrAppend(&n, " refetch");
    if (max_rows > 0) absl::StrAppend(&n, " max_rows=", max_rows);
    return n;
  }
};

absl::StatusOr<ConfigSpec> ParseConfig(absl::string_view text) {
  const std::vector<std::string> parts = absl::StrSplit(text, ':');
  ConfigSpec c;
  if (parts.size() < 2 || (parts[0] != "parallel" && parts[0] != "meft") ||
      !absl::SimpleAtoi(parts[1], &c.rows) || c.rows <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--configs: \"", text, "\" is not parallel:ROWS or meft:ROWS[:refetch][:maxrows=N]"));
  }
  c.adapter = parts[0];
  for (size_t i = 2; i < parts.size(); ++i) {
    const std::string& p = parts[i];
    if (p == "refetch" && c.adapter == "meft") {
      c.refetch = true;
    } else if (p.rfind("maxrows=", 0) == 0 && c.adapter == "meft" &&
               absl::SimpleAtoi(p.substr(8), &c.max_rows) && c.max_rows > 0) {
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("--configs: unknown option \"", p, "\" in \"", text, "\""));
    }
  }
  return c;
}

struct Settings {
  std::string shape = "tiny";
  std::string out;
  std::string device = "auto";  // auto | cpu | cuda
  std::string server_binary = MEFT_PARAM_SERVER_BINARY;
  std::string configs;         // "" = the shape's default
  int64_t layers = 0;          // model layers; 0 = the shape's
  int64_t adapter_layers = 0;  // the first N layers carry the adapter; 0 = all
  int64_t micro_batch = 0;     // sequences per micro-batch; 0 = the shape's
  int64_t tokens = 0;          // tokens per sequence; 0 = the shape's
  int64_t warmup = 1;          // optimizer steps before measuring
  int64_t steps = 0;           // measured optimizer steps; 0 = the shape's
  int64_t accum = 1;           // micro-batches per optimizer step
  int64_t server_threads = 0;  // the server's --threads; 0 = all cores
  int64_t arena_mb = 0;        // the worker's arena; 0 = ArenaBytesFor the configuration
  std::string transport = "shm";
  // Wrap the client in MeteredParamClient as meft-worker does (it stages device tensors on the
  // host before each call, and its meter gives the staging time and the worker's payload bytes).
  bool metered = true;
  double budget_seconds = 0;  // skip configurations that start after this much time; 0 = none
  uint64_t seed = 1;
};

struct Shape {
  worker::ModelConfig model;
  int64_t micro_batch = 0, tokens = 0, steps = 0;
  std::string configs;
};

// LLaMA-7B (Llama-2-7b's config.json: 32 layers, d = 4096, 32 heads of 128, no GQA, SwiGLU 11008,
// vocabulary 32000) at micro-batch 2 x 256; or a tiny model for the CPU dry run with r scaled in
// the same 3 : 16 proportion.
absl::StatusOr<Shape> MakeShape(const std::string& name) {
  Shape s;
  worker::ModelConfig& c = s.model;
  c.architecture = "llama";
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  if (name == "7b") {
    c.vocab_size = 32000;
    c.hidden_size = 4096;
    c.intermediate_size = 11008;
    c.num_hidden_layers = 32;
    c.num_attention_heads = 32;
    c.num_key_value_heads = 32;
    c.head_dim = 128;
    c.max_position_embeddings = 4096;
    s.micro_batch = 2;
    s.tokens = 256;
    s.steps = 3;
    s.configs = "parallel:3072,meft:3072,meft:16384";
  } else if (name == "tiny") {
    c.vocab_size = 256;
    c.hidden_size = 64;
    c.intermediate_size = 176;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 4;
    c.head_dim = 16;
    c.max_position_embeddings = 256;
    s.micro_batch = 2;
    s.tokens = 32;
    s.steps = 2;
    s.configs = "parallel:96,meft:96,meft:512";
  } else {
    return absl::InvalidArgumentError(absl::StrCat("--shape: \"", name, "\" is not 7b or tiny"));
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// Host memory

// VmHWM (peak resident set) of /proc/<pid>/status in bytes; -1 when unreadable.
int64_t PeakRssBytes(const std::string& pid) {
  std::ifstream in("/proc/" + pid + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::atoll(line.c_str() + 6) * 1024;
  }
  return -1;
}

// Restarts this process's VmHWM from its current RSS (Linux >= 4.0); false when not allowed.
bool ResetOwnPeakRss() {
  std::ofstream out("/proc/self/clear_refs");
  out << "5";
  out.close();
  return out.good();
}

int64_t HostMemoryBytes() {
  return static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) *
         static_cast<int64_t>(sysconf(_SC_PAGESIZE));
}

std::string CpuModel() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown";
}

// ---------------------------------------------------------------------------------------------
// The parameter server as a child process

using Samples = std::map<std::string, double>;

// Prometheus text format: "name{labels} value" lines (comments skipped).
Samples ParseSamples(const std::string& text) {
  Samples out;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.empty() || line[0] == '#') continue;
    const size_t space = line.rfind(' ');
    if (space == std::string::npos) continue;
    out[line.substr(0, space)] = std::strtod(line.c_str() + space + 1, nullptr);
  }
  return out;
}

class ServerProcess {
 public:
  // Starts `binary args...` with stdout and stderr going to `log_path` and waits until it logs
  // that it serves (its store is initialised), at most `timeout_seconds`. The server gets SIGTERM
  // when this process dies, so a crashed benchmark leaves no 70 GB server behind.
  static absl::StatusOr<std::unique_ptr<ServerProcess>> Start(const std::string& binary,
                                                              std::vector<std::string> args,
                                                              const std::string& log_path,
                                                              double timeout_seconds) {
    if (access(binary.c_str(), X_OK) != 0) {
      return absl::FailedPreconditionError(
          absl::StrCat(binary, " is not an executable (--server-binary)"));
    }
    args.insert(args.begin(), binary);
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    const auto start = Clock::now();
    // Between fork and exec only async-signal-safe calls: this process has threads.
    const pid_t pid = fork();
    if (pid < 0) return absl::InternalError(absl::StrCat("fork: ", std::strerror(errno)));
    if (pid == 0) {
      prctl(PR_SET_PDEATHSIG, SIGTERM);
      const int fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (fd < 0) _exit(126);
      dup2(fd, STDOUT_FILENO);
      dup2(fd, STDERR_FILENO);
      close(fd);
      execv(argv[0], argv.data());
      _exit(127);
    }
    std::unique_ptr<ServerProcess> p(new ServerProcess(pid, log_path));
    while (true) {
      std::ifstream in(log_path);
      std::string line;
      while (std::getline(in, line)) {
        const size_t port_at = line.find("(port ");
        const size_t metrics_at = line.find("metrics on http://");
        if (line.find("serving meft.v1.ParamServer") == std::string::npos ||
            port_at == std::string::npos) {
          continue;
        }
        p->port_ = std::atoi(line.c_str() + port_at + 6);
        if (metrics_at != std::string::npos) {
          const size_t colon = line.find(':', metrics_at + 18);
          if (colon != std::string::npos) p->metrics_port_ = std::atoi(line.c_str() + colon + 1);
        }
        p->startup_seconds_ = SecondsSince(start);
        return p;
      }
      int status = 0;
      if (waitpid(pid, &status, WNOHANG) == pid) {
        p->pid_ = 0;
        return absl::FailedPreconditionError(
            absl::StrCat(binary, " exited before serving (status ", status, "); see ", log_path));
      }
      if (SecondsSince(start) > timeout_seconds) {
        return absl::DeadlineExceededError(
            absl::StrCat(binary, " did not serve within ", timeout_seconds, " s; see ", log_path));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }

  // SIGTERM (no checkpoint_dir: it just stops), SIGKILL after 30 s.
  ~ServerProcess() {
    if (pid_ <= 0) return;
    kill(pid_, SIGTERM);
    const auto start = Clock::now();
    while (waitpid(pid_, nullptr, WNOHANG) != pid_) {
      if (SecondsSince(start) > 30) {
        kill(pid_, SIGKILL);
        waitpid(pid_, nullptr, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }

  int port() const { return port_; }
  double startup_seconds() const { return startup_seconds_; }
  int64_t PeakRss() const { return PeakRssBytes(std::to_string(pid_)); }

  // The server's /metrics samples.
  absl::StatusOr<Samples> Scrape() const {
    if (metrics_port_ <= 0) return absl::FailedPreconditionError("the server serves no metrics");
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return absl::InternalError("socket");
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(metrics_port_));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    std::string response;
    if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
      const std::string request = "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
      if (write(fd, request.data(), request.size()) == static_cast<ssize_t>(request.size())) {
        char buffer[65536];
        ssize_t n;
        while ((n = read(fd, buffer, sizeof(buffer))) > 0) response.append(buffer, n);
      }
    }
    close(fd);
    const size_t body = response.find("\r\n\r\n");
    if (response.rfind("HTTP/1.1 200", 0) != 0 || body == std::string::npos) {
      return absl::UnavailableError(
          absl::StrCat("scraping the server's metrics on port ", metrics_port_, " failed"));
    }
    return ParseSamples(response.substr(body + 4));
  }

 private:
  ServerProcess(pid_t pid, std::string log_path) : pid_(pid), log_path_(std::move(log_path)) {}
  pid_t pid_;
  std::string log_path_;
  int port_ = 0, metrics_port_ = 0;
  double startup_seconds_ = 0;
};

// The server counters the results use, as differences over the measured steps.
struct ServerCounters {
  double lookups = 0, rows = 0;
  double arena_in = 0, arena_out = 0;      // tensor bytes through the arena
  double message_in = 0, message_out = 0;  // serialized gRPC messages
  double lookup_seconds = 0;               // inside ParamServer::Lookup
  double step_seconds = 0;                 // inside the optimizer step

  static ServerCounters From(const Samples& s) {
    auto get = [&](const std::string& name) {
      auto it = s.find(name);
      return it == s.end() ? 0.0 : it->second;
    };
    ServerCounters c;
    c.lookups = get("meft_ps_lookups_total");
    c.rows = get("meft_ps_rows_served_total");
    c.arena_in = get("meft_ps_arena_bytes_received_total");
    c.arena_out = get("meft_ps_arena_bytes_sent_total");
    c.message_in = get("meft_ps_bytes_received_total");
    c.message_out = get("meft_ps_bytes_sent_total");
    c.lookup_seconds = get("meft_ps_lookup_seconds_sum");
    c.step_seconds = get("meft_ps_optimizer_step_seconds_sum");
    return c;
  }
  ServerCounters Minus(const ServerCounters& o) const {
    return {lookups - o.lookups,
            rows - o.rows,
            arena_in - o.arena_in,
            arena_out - o.arena_out,
            message_in - o.message_in,
            message_out - o.message_out,
            lookup_seconds - o.lookup_seconds,
            step_seconds - o.step_seconds};
  }
};

// ---------------------------------------------------------------------------------------------
// One configuration

struct Context {
  Settings settings;
  Shape shape;
  torch::Device device = torch::kCPU;
  torch::ScalarType dtype = torch::kFloat32;
  const worker::LlamaModel* model = nullptr;
  int64_t weight_bytes = 0;
  int64_t adapter_layers = 0;
  std::vector<worker::TokenizedExample> examples;
};

void Synchronize(const torch::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize();
}

std::vector<worker::TokenizedExample> RandomExamples(int64_t n, int64_t tokens, int64_t vocab,
                                                     uint64_t seed) {
  torch::Generator gen = at::detail::createCPUGenerator(seed);
  std::vector<worker::TokenizedExample> out;
  for (int64_t i = 0; i < n; ++i) {
    const torch::Tensor ids = torch::randint(3, vocab, {tokens}, gen, torch::kInt64);
    worker::TokenizedExample e;
    e.input_ids.assign(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + tokens);
    e.labels = e.input_ids;
    e.prompt_length = 0;
    out.push_back(std::move(e));
  }
  return out;
}

// Per-step wall times measured between step ends with the device synchronised, so queued
// kernels are charged to the step that launched them.
struct StepClock {
  torch::Device device;
  int64_t warmup;
  Clock::time_point last = Clock::now();
  std::vector<double> measured;  // seconds of each measured step
  std::vector<double> losses;
  double last_seconds = 0;  // of the latest step, measured or not
  int64_t tokens = 0;       // in the measured steps

  // Returns true at the end of the last warm-up step (measurement starts).
  bool Tick(const worker::StepStats& stats) {
    Synchronize(device);
    const auto now = Clock::now();
    const double seconds = std::chrono::duration<double>(now - last).count();
    last = now;
    last_seconds = seconds;
    losses.push_back(stats.loss);
    if (stats.step > warmup) {
      measured.push_back(seconds);
      tokens += stats.tokens;
    }
    return stats.step == warmup;
  }
};

// The server's defaults this program leaves alone (param_server/server/options.h).
constexpr int64_t kServerTopK = 64;
constexpr int64_t kServerNProbe = 8;

// Arena bytes for `spec` when --arena-mb is 0: every adapter layer's fp32 gradients in flight at
// once (with overlap, backward hands each layer's gradients to a background send at GPU speed,
// faster than the server accumulates them, and a send that finds no room goes inline in a gRPC
// message) plus three lookups' queries and answers (two in flight, one re-fetched in backward).
// The worker's own default (DefaultArenaBytes) holds two lookups with their gradients.
uint64_t ArenaBytesFor(const ConfigSpec& spec, int64_t dim, int64_t tokens, int64_t layers) {
  using shm::AlignUp;
  int64_t rows = std::min(tokens * kServerTopK, spec.rows);
  if (spec.max_rows > 0) rows = std::min(rows, spec.max_rows);
  const auto t = static_cast<uint64_t>(tokens), r = static_cast<uint64_t>(rows),
             d = static_cast<uint64_t>(dim), slots = t * static_cast<uint64_t>(kServerTopK),
             experts = t * static_cast<uint64_t>(kServerNProbe);  // router rows, at most
  const uint64_t x = AlignUp(t * d * 4);
  // As worker::ResponseBytesBound for bf16 rows: ids, K[S] and V[S], token slots, gates and
  // experts, expert ids and router rows, each 64-byte aligned.
  const uint64_t answer = shm::kAlignment + AlignUp(r * 4) + 2 * AlignUp(r * d * 2) +
                          3 * AlignUp(slots * 4) + AlignUp(experts * 4) + AlignUp(experts * d * 2);
  const uint64_t grads = 2 * AlignUp(r * d * 4) + AlignUp(slots * 4);
  const uint64_t bytes =
      shm::kHeaderBytes + 3 * (x + answer) + static_cast<uint64_t>(layers) * grads;
  return std::max<uint64_t>((bytes + (uint64_t{1} << 20) - 1) >> 20, 64) << 20;
}

json RunConfig(const Context& ctx, const ConfigSpec& spec) {
  const Settings& s = ctx.settings;
  const auto config_start = Clock::now();
  const int64_t d = ctx.shape.model.hidden_size;
  const int64_t layers = ctx.adapter_layers;
  json r = {{"name", spec.Name()},      {"adapter", spec.adapter}, {"rows", spec.rows},
            {"adapter_layers", layers}, {"refetch", spec.refetch}, {"max_rows", spec.max_rows}};
  Log(absl::StrCat(spec.Name(), ": starting"));

  // Memory readings restart here: the model stays allocated (it is part of every peak).
  const bool rss_reset = ResetOwnPeakRss();
  const bool device_peak_reset = worker::ResetCudaAllocatorPeak(ctx.device);

  std::vector<int64_t> adapter_layer_ids;
  for (int64_t l = 0; l < layers; ++l) adapter_layer_ids.push_back(l);
  const int64_t max_steps = s.warmup + s.steps;
  auto loader = worker::DataLoader::Create(
      ctx.examples, 0, {.micro_batch_size = ctx.shape.micro_batch, .shuffle = false});
  if (!loader.ok()) {
    r["error"] = std::string(loader.status().message());
    return r;
  }
  const worker::TrainerOptions trainer_options{.max_steps = max_steps,
                                               .grad_accum = s.accum,
                                               .lr = 1e-4,
                                               .warmup_ratio = 0.0,
                                               .progress = false};
  StepClock clock{.device = ctx.device, .warmup = s.warmup};
  std::optional<ServerCounters> counters_start;
  ServerCounters counters;
  std::unique_ptr<ServerProcess> server;
  // Outlives `client` (the metering wrapper points at it).
  auto meter = std::make_unique<worker::ClientMeter>();
  std::optional<worker::MeterReader> meter_reader;
  worker::ServerTimings metered;
  std::unique_ptr<worker::ParamClient> client;
  std::unique_ptr<worker::MeftAdapter> meft;
  std::unique_ptr<worker::ParallelAdapter> parallel;
  worker::MeftTimings timings;
  int64_t experts = 0;
  double init_seconds = 0;

  worker::TrainTarget target{.adapter = spec.adapter};
  if (spec.adapter == "parallel") {
    const auto init_start = Clock::now();
    auto a = worker::ParallelAdapter::Create(
        {.rows = spec.rows, .layers = adapter_layer_ids, .seed = s.seed}, d, ctx.device);
    if (!a.ok()) {
      r["error"] = std::string(a.status().message());
      return r;
    }
    parallel = std::move(*a);
    target.hooks = parallel.get();
    target.local = parallel->named_parameters();
    Synchronize(ctx.device);
    init_seconds = SecondsSince(init_start);
  } else {
    std::vector<std::string> args = {
        "--listen",         "127.0.0.1:0",
        "--metrics-port",   "0",
        "--shm-attach",     "on",
        "--adapter-layers", absl::StrCat("0-", layers - 1),
        "--adapter-rows",   absl::StrCat(spec.rows),
        "--adapter-dim",    absl::StrCat(d),
        "--max-tokens",     absl::StrCat(ctx.shape.micro_batch * ctx.shape.tokens),
        "--adapter-seed",   absl::StrCat(s.seed)};
    if (spec.max_rows > 0) {
      args.insert(args.end(), {"--adapter-max-rows", absl::StrCat(spec.max_rows)});
    }
    if (s.server_threads > 0) {
      args.insert(args.end(), {"--threads", absl::StrCat(s.server_threads)});
    }
    const std::string log_path = absl::StrCat(
        s.out, "/server-", spec.adapter, "-", spec.rows, spec.refetch ? "-refetch" : "",
        spec.max_rows > 0 ? absl::StrCat("-maxrows", spec.max_rows) : "", ".log");
    auto started = ServerProcess::Start(s.server_binary, args, log_path, /*timeout=*/900);
    if (!started.ok()) {
      r["error"] = std::string(started.status().message());
      return r;
    }
    server = std::move(*started);
    init_seconds = server->startup_seconds();
    Log(absl::StrFormat("%s: server ready after %.1f s (port %d)", spec.Name(), init_seconds,
                        server->port()));
    worker::GrpcClientOptions co;
    co.address = absl::StrCat("127.0.0.1:", server->port());
    co.deadline_seconds = 600;
    co.shm_arena_bytes =
        s.arena_mb > 0 ? static_cast<uint64_t>(s.arena_mb) << 20
                       : ArenaBytesFor(spec, d, ctx.shape.micro_batch * ctx.shape.tokens, layers);
    r["arena_bytes"] = co.shm_arena_bytes;
    auto transport = worker::ParseTransport(s.transport);
    if (!transport.ok()) {
      r["error"] = std::string(transport.status().message());
      return r;
    }
    co.transport = *transport;
    auto c = worker::CreateGrpcParamClient(co);
    if (!c.ok()) {
      r["error"] = std::string(c.status().message());
      return r;
    }
    client = std::move(*c);
    if (s.metered) {
      client = std::make_unique<worker::MeteredParamClient>(std::move(client), meter.get());
    }
    auto description = client->Describe();
    if (!description.ok()) {
      r["error"] = std::string(description.status().message());
      return r;
    }
    experts = description->experts;
    meft = std::make_unique<worker::MeftAdapter>(
        client.get(), *description,
        worker::MeftAdapterOptions{.refetch_in_backward = spec.refetch, .overlap = true});
    target.hooks = meft.get();
    target.meft = meft.get();
    target.server = client.get();
  }

  auto trainer = worker::Trainer::Create(ctx.model, target, loader->get(), trainer_options);
  if (!trainer.ok()) {
    r["error"] = std::string(trainer.status().message());
    return r;
  }
  std::string scrape_error;
  auto history = (*trainer)->Run([&](const worker::StepStats& stats) {
    const bool start_measuring = clock.Tick(stats);
    Log(absl::StrFormat("%s: step %d of %d, %.2f s, loss %.4f", spec.Name(), stats.step, max_steps,
                        clock.last_seconds, stats.loss));
    if (meft != nullptr) {
      if (start_measuring) {
        meft->TakeTimings();
        meter_reader.emplace(meter.get());
      }
      if (start_measuring || stats.step == max_steps) {
        absl::StatusOr<Samples> samples = server->Scrape();
        if (!samples.ok()) {
          scrape_error = std::string(samples.status().message());
        } else if (start_measuring) {
          counters_start = ServerCounters::From(*samples);
        } else if (counters_start.has_value()) {
          counters = ServerCounters::From(*samples).Minus(*counters_start);
        }
      }
      if (stats.step == max_steps) {
        timings = meft->TakeTimings();
        if (meter_reader.has_value()) metered = meter_reader->Take();
      }
    }
    clock.last = Clock::now();  // the scrape and the log line are no step's time
    return absl::OkStatus();
  });
  if (!history.ok()) {
    r["error"] = std::string(history.status().message());
    return r;
  }
  if (!scrape_error.empty()) {
    r["error"] = scrape_error;
    return r;
  }

  // Memory.
  const std::optional<worker::DeviceMemory> device_memory = worker::CudaAllocatorMemory(ctx.device);
  const double n_steps = static_cast<double>(clock.measured.size());
  const double per_step_divisor = std::max(1.0, n_steps);
  const double rows_per_lookup = counters.lookups > 0 ? counters.rows / counters.lookups : 0.0;
  const int64_t adapter_params = spec.adapter == "parallel"
                                     ? 2 * spec.rows * d * layers
                                     : (2 * spec.rows * d + experts * d) * layers;
  const double adapter_bytes = 4.0 * static_cast<double>(adapter_params);
  // DESIGN §4: frozen weights plus, for parallel, K and V in fp32 with their gradients and AdamW's
  // two moments (16 bytes per parameter); for meft, the fetched K[S] and V[S] kept in fp32 for
  // backward in every adapter layer (8 |S| d bytes per layer), or one layer's with refetch.
  const double adapter_device_bytes = spec.adapter == "parallel"
                                          ? 16.0 * static_cast<double>(adapter_params)
                                          : 8.0 * rows_per_lookup * static_cast<double>(d) *
                                                static_cast<double>(spec.refetch ? 1 : layers);
  const double predicted_device = static_cast<double>(ctx.weight_bytes) + adapter_device_bytes;
  json memory = {
      {"device", ctx.device.is_cuda() ? "cuda" : "cpu"},
      {"device_peak_bytes", device_memory ? json(device_memory->peak_bytes) : json(nullptr)},
      {"device_weights_bytes", ctx.weight_bytes},
      {"predicted_device_bytes", predicted_device},
      {"predicted_adapter_device_bytes", adapter_device_bytes},
      {"device_rest_bytes",
       device_memory ? json(static_cast<double>(device_memory->peak_bytes) - predicted_device)
                     : json(nullptr)},
      {"worker_peak_rss_bytes", PeakRssBytes("self")},
      {"device_peak_is_per_config", device_peak_reset},
      {"worker_peak_rss_is_per_config", rss_reset},
  };
  if (server != nullptr) {
    memory["server_peak_rss_bytes"] = server->PeakRss();
    memory["predicted_server_bytes"] = 16.0 * static_cast<double>(adapter_params);
  }
  r["memory"] = memory;

  // Speed.
  double measured_seconds = 0;
  for (double x : clock.measured) measured_seconds += x;
  const double step_seconds = measured_seconds / per_step_divisor;
  const double wait = timings.wait_seconds / per_step_divisor;
  const double transfer = timings.transfer_seconds / per_step_divisor;
  const double layer_visits = static_cast<double>(layers * s.accum);
  r["speed"] = {
      {"measured_steps", clock.measured.size()},
      {"tokens_per_step", static_cast<double>(clock.tokens) / per_step_divisor},
      {"tokens_per_second",
       measured_seconds > 0 ? static_cast<double>(clock.tokens) / measured_seconds : 0.0},
      {"step_seconds", step_seconds},
      {"compute_seconds", std::max(0.0, step_seconds - wait - transfer)},
      {"wait_seconds", wait},
      {"transfer_seconds", transfer},
      {"wait_per_layer_seconds", wait / layer_visits},
      {"server_call_seconds", timings.call_seconds / per_step_divisor},
      // MeteredParamClient (with --metered): device tensors copied to the host before calls,
      // on whichever thread made the call (gradients: background threads).
      {"stage_seconds", metered.transfer_seconds / per_step_divisor},
      {"server_lookup_seconds", counters.lookup_seconds / per_step_divisor},
      {"server_optimizer_seconds", counters.step_seconds / per_step_divisor},
      {"step_seconds_each", clock.measured},
  };
  // Traffic (meft): from the server's counters over the measured steps.
  const double up = (counters.arena_in + counters.message_in) / per_step_divisor;
  const double down = (counters.arena_out + counters.message_out) / per_step_divisor;
  r["traffic"] = {
      {"experts", experts},
      {"adapter_params", adapter_params},
      {"adapter_fp32_bytes", adapter_bytes},
      {"lookups_per_step", counters.lookups / per_step_divisor},
      {"rows_per_lookup", rows_per_lookup},
      {"rows_per_lookup_over_r", rows_per_lookup / static_cast<double>(spec.rows)},
      {"bytes_to_server_per_step", up},
      {"bytes_from_server_per_step", down},
      {"arena_bytes_per_step", (counters.arena_in + counters.arena_out) / per_step_divisor},
      {"message_bytes_per_step", (counters.message_in + counters.message_out) / per_step_divisor},
      {"bytes_per_step_over_adapter", (up + down) / adapter_bytes},
      // The same payload as the worker's meter counts it (tensors as the worker holds them:
      // int64 ids, bf16 or fp32 floats); 0 without --metered.
      {"worker_bytes_sent_per_step", static_cast<double>(metered.bytes_sent) / per_step_divisor},
      {"worker_bytes_received_per_step",
       static_cast<double>(metered.bytes_received) / per_step_divisor},
  };
  r["losses"] = clock.losses;
  r["init_seconds"] = init_seconds;
  r["wall_seconds"] = SecondsSince(config_start);
  Log(absl::StrFormat("%s: done in %.1f s", spec.Name(), SecondsSince(config_start)));
  return r;
}

// ---------------------------------------------------------------------------------------------
// Output

// Bytes in GB, MB or kB (decimal units), whichever keeps the number readable; "n/a (CPU)" for
// the null of a reading the CPU does not have.
std::string Bytes(const json& bytes) {
  if (!bytes.is_number()) return "n/a (CPU)";
  const double b = bytes.get<double>();
  const double magnitude = std::abs(b);
  if (magnitude >= 1e9) return absl::StrFormat("%.2f GB", b / 1e9);
  if (magnitude >= 1e6) return absl::StrFormat("%.1f MB", b / 1e6);
  return absl::StrFormat("%.1f kB", b / 1e3);
}

const json* FindConfig(const json& configs, const std::string& adapter, int64_t rows) {
  for (const json& c : configs) {
    if (c.value("adapter", "") == adapter && c.value("rows", int64_t{0}) == rows &&
        !c.value("refetch", false) && c.value("max_rows", int64_t{0}) == 0 &&
        !c.contains("error")) {
      return &c;
    }
  }
  return nullptr;
}

// The quantities issue 13 sets targets for, where this run measured them: meft's peak over
// parallel's at the same r, meft's largest r's peak, meft's tokens/s over parallel's.
json Comparisons(const json& configs, bool on_cuda) {
  json out = json::array();
  const json* largest = nullptr;
  for (const json& c : configs) {
    if (c.value("adapter", "") != "meft" || c.contains("error")) continue;
    if (largest == nullptr || c["rows"].get<int64_t>() > (*largest)["rows"].get<int64_t>()) {
      largest = &c;
    }
    const json* p = FindConfig(configs, "parallel", c["rows"].get<int64_t>());
    if (p == nullptr || c.value("refetch", false) || c.value("max_rows", int64_t{0}) != 0) continue;
    const std::string key = on_cuda ? "device_peak_bytes" : "worker_peak_rss_bytes";
    const double mine = c["memory"][key].get<double>(), theirs = (*p)["memory"][key].get<double>();
    out.push_back({{"what", absl::StrCat("peak memory of ", c["name"].get<std::string>(), " / ",
                                         (*p)["name"].get<std::string>())},
                   {"measure", on_cuda ? "CUDA allocator peak" : "worker peak RSS (CPU run)"},
                   {"value", mine / theirs},
                   {"target", "<= 0.50"}});
    out.push_back({{"what", absl::StrCat("tokens/s of ", c["name"].get<std::string>(), " / ",
                                         (*p)["name"].get<std::string>())},
                   {"measure", "same run"},
                   {"value", c["speed"]["tokens_per_second"].get<double>() /
                                 (*p)["speed"]["tokens_per_second"].get<double>()},
                   {"target", ">= 0.80"}});
  }
  if (largest != nullptr && on_cuda) {
    out.push_back({{"what", absl::StrCat("peak memory of ", (*largest)["name"].get<std::string>())},
                   {"measure", "CUDA allocator peak, GB"},
                   {"value", (*largest)["memory"]["device_peak_bytes"].get<double>() / 1e9},
                   {"target", "<= 24"}});
  }
  return out;
}

std::string Markdown(const json& results) {
  std::string md;
  const json& shape = results["shape"];
  absl::StrAppend(
      &md, "# meft_gpu_shape_bench: ", results["shape_name"].get<std::string>(), "\n\n",
      absl::StrFormat(
          "Model: random LLaMA, %d layers, d = %d, FFN %d, %d heads (kv %d), vocab "
          "%d, %s on %s. Micro-batch %d x %d tokens, grad_accum %d; %d warm-up + %d "
          "measured optimizer steps per configuration. Adapter on %d layers; meft: "
          "a meft-param-server process on this machine, transport %s, overlap on.\n\n",
          shape["layers"].get<int64_t>(), shape["hidden_size"].get<int64_t>(),
          shape["intermediate_size"].get<int64_t>(), shape["heads"].get<int64_t>(),
          shape["kv_heads"].get<int64_t>(), shape["vocab_size"].get<int64_t>(),
          shape["dtype"].get<std::string>(), shape["device"].get<std::string>(),
          shape["micro_batch"].get<int64_t>(), shape["tokens"].get<int64_t>(),
          shape["grad_accum"].get<int64_t>(), results["settings"]["warmup"].get<int64_t>(),
          results["settings"]["steps"].get<int64_t>(), shape["adapter_layers"].get<int64_t>(),
          results["settings"]["transport"].get<std::string>()));
  absl::StrAppend(&md,
                  "| config | peak device memory | §4 model: weights + adapter | rest "
                  "(activations, workspace) | worker peak RSS | server peak RSS (§4: 16 B/param) | "
                  "tokens/s | step s: compute / wait / transfer | wait per layer | rows per lookup "
                  "(/ r) | bytes per step / adapter size (to / from server) |\n",
                  "|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const json& c : results["configs"]) {
    if (c.contains("error")) {
      absl::StrAppend(&md, "| ", c["name"].get<std::string>(),
                      " | failed: ", c["error"].get<std::string>(), " |||||||||||\n");
      continue;
    }
    const json& m = c["memory"];
    const json& sp = c["speed"];
    const json& t = c["traffic"];
    const bool meft = c["adapter"] == "meft";
    const double adapter_bytes = t["adapter_fp32_bytes"].get<double>();
    absl::StrAppend(
        &md, "| ", c["name"].get<std::string>(), " | ", Bytes(m["device_peak_bytes"]), " | ",
        Bytes(m["predicted_device_bytes"]), " | ", Bytes(m["device_rest_bytes"]), " | ",
        Bytes(m["worker_peak_rss_bytes"]), " | ",
        meft ? absl::StrCat(Bytes(m["server_peak_rss_bytes"]), " (",
                            Bytes(m["predicted_server_bytes"]), ")")
             : std::string("-"),
        " | ", absl::StrFormat("%.0f", sp["tokens_per_second"].get<double>()), " | ",
        absl::StrFormat("%.3f: %.3f / %.3f / %.3f", sp["step_seconds"].get<double>(),
                        sp["compute_seconds"].get<double>(), sp["wait_seconds"].get<double>(),
                        sp["transfer_seconds"].get<double>()),
        " | ",
        meft ? absl::StrFormat("%.1f ms", 1e3 * sp["wait_per_layer_seconds"].get<double>())
             : std::string("-"),
        " | ",
        meft ? absl::StrFormat("%.0f (%.3f)", t["rows_per_lookup"].get<double>(),
                               t["rows_per_lookup_over_r"].get<double>())
             : std::string("-"),
        " | ",
        meft ? absl::StrFormat("%.2f (%.2f / %.2f)", t["bytes_per_step_over_adapter"].get<double>(),
                               t["bytes_to_server_per_step"].get<double>() / adapter_bytes,
                               t["bytes_from_server_per_step"].get<double>() / adapter_bytes)
             : std::string("-"),
        " |\n");
  }
  if (!results["comparisons"].empty()) {
    absl::StrAppend(&md,
                    "\n| quantity | measure | value | target (issue 13) |\n|---|---|---|---|\n");
    for (const json& c : results["comparisons"]) {
      absl::StrAppend(&md, "| ", c["what"].get<std::string>(), " | ",
                      c["measure"].get<std::string>(), " | ",
                      absl::StrFormat("%.3f", c["value"].get<double>()), " | ",
                      c["target"].get<std::string>(), " |\n");
    }
  }
  absl::StrAppend(&md, "\nNotes:\n\n");
  for (const json& n : results["notes"]) absl::StrAppend(&md, "- ", n.get<std::string>(), "\n");
  return md;
}

absl::Status WriteFile(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc);
  out << text;
  out.close();
  if (!out.good()) return absl::InternalError(absl::StrCat("writing ", path, " failed"));
  return absl::OkStatus();
}

absl::Status Run(Settings s) {
  MEFT_ASSIGN_OR_RETURN(Shape shape, MakeShape(s.shape));
  if (s.layers > 0) shape.model.num_hidden_layers = s.layers;
  if (s.micro_batch > 0) shape.micro_batch = s.micro_batch;
  if (s.tokens > 0) shape.tokens = s.tokens;
  if (s.steps <= 0) s.steps = shape.steps;
  if (s.configs.empty()) s.configs = shape.configs;
  if (s.out.empty()) return absl::InvalidArgumentError("--out DIR is required");
  if (s.warmup < 1 || s.accum < 1) {
    return absl::InvalidArgumentError("--warmup and --accum must be at least 1");
  }
  std::vector<ConfigSpec> specs;
  for (absl::string_view c : absl::StrSplit(s.configs, ',', absl::SkipEmpty())) {
    MEFT_ASSIGN_OR_RETURN(ConfigSpec spec, ParseConfig(c));
    specs.push_back(spec);
  }
  std::error_code ec;
  std::filesystem::create_directories(s.out, ec);
  if (ec) return absl::InternalError(absl::StrCat("--out ", s.out, ": ", ec.message()));

  Context ctx;
  if (s.device == "cuda" || (s.device == "auto" && torch::cuda::is_available())) {
    if (!torch::cuda::is_available()) {
      return absl::FailedPreconditionError("--device cuda, but no CUDA device is available");
    }
    ctx.device = torch::Device(torch::kCUDA, 0);
    ctx.dtype = torch::kBFloat16;  // as meft-worker runs on CUDA
  } else if (s.device != "auto" && s.device != "cpu") {
    return absl::InvalidArgumentError("--device: auto, cpu or cuda");
  }
  ctx.settings = s;
  ctx.shape = shape;
  const int64_t model_layers = shape.model.num_hidden_layers;
  ctx.adapter_layers =
      s.adapter_layers > 0 ? std::min(s.adapter_layers, model_layers) : model_layers;
  const int64_t sequences = shape.micro_batch * s.accum * (s.warmup + s.steps);
  ctx.examples = RandomExamples(sequences, shape.tokens, shape.model.vocab_size, s.seed + 6);

  const auto run_start = Clock::now();
  Log(absl::StrCat("drawing the model on ", ctx.device.str()));
  std::unique_ptr<worker::LlamaModel> model;
  {
    auto m = worker::LlamaModel::FromWeights(
        shape.model, worker::RandomLlamaWeightsOn(shape.model, s.seed, ctx.device, ctx.dtype),
        ctx.device, ctx.dtype);
    if (!m.ok()) return m.status();
    model = std::move(*m);
  }
  for (const auto& [name, t] : model->NamedParameters()) {
    ctx.weight_bytes += t.numel() * static_cast<int64_t>(t.element_size());
  }
  ctx.model = model.get();
  Synchronize(ctx.device);
  const double model_seconds = SecondsSince(run_start);
  Log(absl::StrFormat("model ready: %.2f GB in %.1f s", ctx.weight_bytes / 1e9, model_seconds));

  json configs = json::array();
  for (const ConfigSpec& spec : specs) {
    if (s.budget_seconds > 0 && SecondsSince(run_start) > s.budget_seconds) {
      configs.push_back(
          {{"name", spec.Name()},
           {"adapter", spec.adapter},
           {"rows", spec.rows},
           {"error", absl::StrFormat("not run: the %.0f s budget was spent", s.budget_seconds)}});
      continue;
    }
    configs.push_back(RunConfig(ctx, spec));
  }

  const worker::ModelConfig& mc = shape.model;
  json results = {
      {"schema", "meft_gpu_shape_bench/1"},
      {"shape_name", s.shape},
      {"shape",
       {{"layers", mc.num_hidden_layers},
        {"hidden_size", mc.hidden_size},
        {"intermediate_size", mc.intermediate_size},
        {"heads", mc.num_attention_heads},
        {"kv_heads", mc.num_key_value_heads},
        {"vocab_size", mc.vocab_size},
        {"parameters", model->NumParameters()},
        {"dtype", ctx.dtype == torch::kBFloat16 ? "bf16" : "fp32"},
        {"device", ctx.device.is_cuda() ? "cuda" : "cpu"},
        {"micro_batch", shape.micro_batch},
        {"tokens", shape.tokens},
        {"grad_accum", s.accum},
        {"adapter_layers", ctx.adapter_layers}}},
      {"settings",
       {{"warmup", s.warmup},
        {"steps", s.steps},
        {"transport", s.transport},
        {"metered", s.metered},
        {"server_threads", s.server_threads},
        {"arena_mb", s.arena_mb},
        {"seed", s.seed},
        {"configs", s.configs}}},
      {"machine",
       {{"cpu", CpuModel()},
        {"hardware_threads", std::thread::hardware_concurrency()},
        {"host_memory_bytes", HostMemoryBytes()},
        {"libtorch", TORCH_VERSION},
        {"cuda_devices", torch::cuda::device_count()}}},
      {"model_seconds", model_seconds},
      {"configs", configs},
  };
  results["comparisons"] = Comparisons(configs, ctx.device.is_cuda());
  json notes = json::array();
  notes.push_back(
      "Inputs are uniform random token ids on a random model: the tokens of a micro-batch share "
      "nothing, so |S| is the worst case, close to r (1 - exp(-T top_k / r)); real text selects "
      "fewer rows.");
  notes.push_back(
      "§4 model on the device: frozen weights plus 16 B per parameter for parallel (K, V, their "
      "gradients, AdamW m and v, fp32) or 8 |S| d B per adapter layer for meft (K[S], V[S] kept in "
      "fp32 for backward; one layer's with refetch); 'rest' = measured peak - model, i.e. "
      "activations, temporaries and allocator rounding.");
  notes.push_back(
      "Step split from the worker's training thread: wait = blocked on the parameter server "
      "(lookups, gradient acknowledgements, GradNorm, Step); transfer = moving fetched rows to "
      "the device; compute = the rest. On CUDA the adapter drains the stream before it waits "
      "for a lookup, so kernels still queued count as compute.");
  notes.push_back(
      "Bytes per step: tensor bytes through the shared-memory arena plus serialized gRPC "
      "messages, both directions, from the server's counters, over the fp32 size of K, V and the "
      "router.");
  if (!ctx.device.is_cuda()) {
    notes.push_back(
        "CPU run: there is no CUDA allocator; the worker's peak RSS is the memory "
        "measure (it includes LibTorch and the model).");
  }
  if (ctx.adapter_layers != model_layers) {
    notes.push_back(absl::StrCat("The adapter is on the first ", ctx.adapter_layers, " of ",
                                 model_layers, " layers (--adapter-layers)."));
  }
  results["notes"] = notes;
  results["wall_seconds"] = SecondsSince(run_start);

  MEFT_RETURN_IF_ERROR(WriteFile(s.out + "/results.json", results.dump(2) + "\n"));
  MEFT_RETURN_IF_ERROR(WriteFile(s.out + "/results.md", Markdown(results)));
  std::printf("%s", Markdown(results).c_str());
  Log(absl::StrFormat("wrote %s/results.json and results.md in %.1f s", s.out,
                      SecondsSince(run_start)));
  for (const json& c : configs) {
    if (c.contains("error")) {
      return absl::InternalError(
          absl::StrCat(c["name"].get<std::string>(), ": ", c["error"].get<std::string>()));
    }
  }
  return absl::OkStatus();
}

constexpr const char* kUsage =
    "usage: meft_gpu_shape_bench --out DIR [--shape 7b|tiny] [--device auto|cpu|cuda]\n"
    "  [--server-binary PATH] [--configs parallel:R,meft:R[:refetch][:maxrows=N],...]\n"
    "  [--layers N] [--adapter-layers N] [--micro-batch N] [--tokens N] [--warmup N]\n"
    "  [--steps N] [--accum N] [--server-threads N] [--arena-mb N] [--transport shm|auto|grpc]\n"
    "  [--metered on|off] [--budget-seconds S] [--seed N]\n";

}  // namespace
}  // namespace meft::bench

int main(int argc, char** argv) {
  namespace bench = meft::bench;
  bench::Settings s;
  for (int i = 1; i < argc; ++i) {
    const std::string key = argv[i];
    if (key == "--help" || key == "-h") {
      std::printf("%s", bench::kUsage);
      return 0;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "%s needs a value\n%s", key.c_str(), bench::kUsage);
      return 2;
    }
    const std::string value = argv[++i];
    std::string* text = key == "--shape"           ? &s.shape
                        : key == "--out"           ? &s.out
                        : key == "--device"        ? &s.device
                        : key == "--server-binary" ? &s.server_binary
                        : key == "--configs"       ? &s.configs
                        : key == "--transport"     ? &s.transport
                                                   : nullptr;
    int64_t* number = key == "--layers"           ? &s.layers
                      : key == "--adapter-layers" ? &s.adapter_layers
                      : key == "--micro-batch"    ? &s.micro_batch
                      : key == "--tokens"         ? &s.tokens
                      : key == "--warmup"         ? &s.warmup
                      : key == "--steps"          ? &s.steps
                      : key == "--accum"          ? &s.accum
                      : key == "--server-threads" ? &s.server_threads
                      : key == "--arena-mb"       ? &s.arena_mb
                                                  : nullptr;
    if (text != nullptr) {
      *text = value;
    } else if (number != nullptr && absl::SimpleAtoi(value, number) && *number >= 0) {
    } else if (key == "--budget-seconds" && absl::SimpleAtod(value, &s.budget_seconds)) {
    } else if (key == "--seed" && absl::SimpleAtoi(value, &s.seed)) {
    } else if (key == "--metered" && (value == "on" || value == "off")) {
      s.metered = value == "on";
    } else {
      std::fprintf(stderr, "bad argument %s %s\n%s", key.c_str(), value.c_str(), bench::kUsage);
      return 2;
    }
  }
  try {
    const absl::Status status = bench::Run(s);
    if (!status.ok()) {
      std::fprintf(stderr, "meft_gpu_shape_bench: %s\n", status.ToString().c_str());
      return 1;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "meft_gpu_shape_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
