// Transport benchmark (DESIGN §3): one layer's lookup round trip at d = 4096, T = 512, |S| = 2000
// bf16 rows, through the worker's real gRPC client into a real in-process parameter server on
// loopback, once with the shared-memory arena and once with tensors inline in gRPC messages,
// beside the single-thread memcpy bandwidth of the same byte count measured in the same run.
// See README.md ("meft_transport_bench") for what is measured and the results.

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/config/config.h"
#include "common/metrics/metrics.h"
#include "common/rpc/message_memory.h"
#include "gpu_worker/rpc/grpc_param_client.h"
#include "param_server/kernels/dot.h"
#include "param_server/rpc/service.h"
#include "param_server/server/param_server.h"
#include "tbb/info.h"

namespace meft {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int64_t kDim = 4096;
constexpr int64_t kTokens = 512;
constexpr int64_t kRows = 8464;
constexpr int64_t kMaxRows = 2000;  // |S|: random tokens select more; the cap keeps 2000
constexpr int kWarmup = 3;
constexpr int kIterations = 31;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

std::string CpuName() {
  std::ifstream in("/proc/cpuinfo");
  const std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t at = all.find("model name");
  if (at == std::string::npos) return "unknown";
  const size_t begin = all.find(": ", at) + 2;
  return all.substr(begin, all.find('\n', begin) - begin);
}

// The BLAS line of LibTorch's build configuration.
std::string TorchBlas() {
  const std::string config = at::show_config();
  const size_t at = config.find("BLAS_INFO=");
  if (at == std::string::npos) return "not reported";
  return config.substr(at, config.find_first_of(",\n", at) - at);
}

// Bytes that cross between the processes for one lookup: x up, every answer tensor down.
int64_t PayloadBytes(const torch::Tensor& x, const worker::LookupReply& r) {
  int64_t bytes = x.numel() * 4;
  for (const torch::Tensor* t : {&r.keys, &r.values, &r.token_gates, &r.router_rows}) {
    if (t->defined()) bytes += t->numel() * static_cast<int64_t>(t->element_size());
  }
  for (const torch::Tensor* t : {&r.row_ids, &r.token_rows, &r.token_experts, &r.expert_ids}) {
    if (t->defined()) bytes += t->numel() * 4;  // int32 on the wire
  }
  return bytes;
}

// Total seconds the server spent inside ParamServer::Lookup so far (its meft_ps_lookup_seconds
// histogram): the difference across one RPC is that RPC's server compute, so the transport time
// of the very same call is its RTT minus it, whatever else the machine is doing.
double ServerLookupSeconds(const metrics::Registry& registry) {
  const std::string text = registry.SerializeText();
  const std::string key = "meft_ps_lookup_seconds_sum ";
  const size_t at = text.find(key);
  return at == std::string::npos ? 0.0 : std::stod(text.substr(at + key.size()));
}

double MemcpySeconds(int64_t bytes) {
  std::vector<char> src(static_cast<size_t>(bytes), 1), dst(static_cast<size_t>(bytes), 0);
  std::vector<double> times;
  for (int i = 0; i < kWarmup + kIterations; ++i) {
    src[static_cast<size_t>(i)] = static_cast<char>(i);
    const auto start = Clock::now();
    std::memcpy(dst.data(), src.data(), src.size());
    const auto end = Clock::now();
    if (dst[static_cast<size_t>(i)] != static_cast<char>(i)) std::abort();
    if (i >= kWarmup) times.push_back(Seconds(end - start));
  }
  return Median(times);
}

int Run() {
  // As meft-param-server and meft-worker do at start.
  const std::string allocator =
      rpc::KeepMessageBuffersInHeap(config::AllocatorTunedByEnvironment());
  std::printf("CPU: %s; %d cores\n", CpuName().c_str(), tbb::info::default_concurrency());
  std::printf("%s (as the server and worker binaries set it)\n", allocator.c_str());
  std::printf("Dot kernel ISA (server selection): %s\n", std::string(kernels::Best().name).c_str());
  std::printf("LibTorch %s, %s; intra-op threads %d (the worker side does no BLAS work here)\n",
              TORCH_VERSION, TorchBlas().c_str(), at::get_num_threads());
  std::printf("Shape: d=%ld, T=%ld, r=%ld, top_k=64, n_probe=8, max_rows=%ld, bf16 rows\n",
              static_cast<long>(kDim), static_cast<long>(kTokens), static_cast<long>(kRows),
              static_cast<long>(kMaxRows));

  metrics::Registry registry;
  server::ServerOptions o;
  o.layers = {0};
  o.rows = kRows;
  o.dim = kDim;
  o.selector.max_rows = kMaxRows;
  o.max_tokens = kTokens;
  o.max_response_bytes = 1 << 30;
  auto domain = server::ParamServer::Create(o, &registry);
  if (!domain.ok()) {
    std::fprintf(stderr, "server: %s\n", domain.status().ToString().c_str());
    return 1;
  }
  rpc::RpcOptions ro;
  ro.listen = "127.0.0.1:0";
  ro.max_message_bytes = 1 << 30;
  auto running = rpc::StartServer(ro, domain->get(), &registry);
  if (!running.ok()) {
    std::fprintf(stderr, "rpc: %s\n", running.status().ToString().c_str());
    return 1;
  }
  const std::string address = absl::StrCat("127.0.0.1:", (*running)->port());

  torch::manual_seed(0);
  const torch::Tensor x = torch::randn({kTokens, kDim});

  // The server's own work for this lookup (decode x, select, gather and encode the rows),
  // called directly: no transport at all.
  std::string x_bytes(reinterpret_cast<const char*>(x.data_ptr<float>()), x.numel() * 4);
  server::LookupCall call;
  call.x = {wire::DType::kFp32, {kTokens, kDim}, x_bytes};
  std::vector<double> compute;
  for (int i = 0; i < kWarmup + kIterations; ++i) {
    const auto start = Clock::now();
    auto reply = (*domain)->Lookup(call);
    const auto end = Clock::now();
    if (!reply.ok()) {
      std::fprintf(stderr, "lookup: %s\n", reply.status().ToString().c_str());
      return 1;
    }
    if (i >= kWarmup) compute.push_back(Seconds(end - start));
  }
  const double compute_s = Median(compute);

  struct Mode {
    const char* name;
    worker::GrpcClientOptions::Transport transport;
    std::unique_ptr<worker::ParamClient> client;
    std::vector<double> times;        // RTT
    std::vector<double> transport_s;  // RTT - the server's compute in that call
    int64_t payload = 0;
  };
  Mode modes[] = {{"shm", worker::GrpcClientOptions::Transport::kShm, nullptr, {}, {}, 0},
                  {"grpc", worker::GrpcClientOptions::Transport::kGrpc, nullptr, {}, {}, 0}};
  for (Mode& m : modes) {
    worker::GrpcClientOptions co;
    co.address = address;
    co.max_message_bytes = 1 << 30;
    co.transport = m.transport;
    auto client = worker::CreateGrpcParamClient(co);
    if (!client.ok()) {
      std::fprintf(stderr, "client: %s\n", client.status().ToString().c_str());
      return 1;
    }
    m.client = std::move(*client);
  }
  // Alternate the transports so that a change in the machine's speed hits both alike.
  for (int i = 0; i < kWarmup + kIterations; ++i) {
    for (Mode& m : modes) {
      const double server_before = ServerLookupSeconds(registry);
      const auto start = Clock::now();
      auto r = m.client->Lookup({.layer = 0}, x, torch::Tensor(), /*training=*/false);
      const auto end = Clock::now();
      const double server_s = ServerLookupSeconds(registry) - server_before;
      if (!r.ok()) {
        std::fprintf(stderr, "%s lookup: %s\n", m.name, r.status().ToString().c_str());
        return 1;
      }
      if (r->row_ids.size(0) != kMaxRows) {
        std::fprintf(stderr, "%s: |S| = %ld, expected %ld\n", m.name,
                     static_cast<long>(r->row_ids.size(0)), static_cast<long>(kMaxRows));
        return 1;
      }
      m.payload = PayloadBytes(x, *r);
      if (i >= kWarmup) {
        m.times.push_back(Seconds(end - start));
        m.transport_s.push_back(Seconds(end - start) - server_s);
      }
    }
  }

  std::printf(
      "\nserver compute for the same lookup, ParamServer::Lookup called directly: %.2f ms (median "
      "of %d)\n",
      compute_s * 1e3, kIterations);
  std::printf(
      "payload per round trip: x up (fp32) + every answer tensor down (bf16 K, V and "
      "router rows; int32 ids and slots; fp32 gates); gradients not included\n\n");
  std::printf("%-5s %10s %12s %10s %12s %12s %12s %12s %12s %12s\n", "", "RTT ms", "payload MB",
              "raw GB/s", "transport ms", "trans. GB/s", "memcpy GB/s", "trans/memcpy",
              "RTT-direct ms", "its/memcpy");
  for (const Mode& m : modes) {
    const double rtt = Median(m.times);
    const double transport = Median(m.transport_s);
    const double bytes = static_cast<double>(m.payload);
    const double memcpy_s = MemcpySeconds(m.payload);
    const double outside = rtt - compute_s;
    std::printf("%-5s %10.2f %12.2f %10.2f %12.2f %12.2f %12.2f %11.0f%% %12.2f %11.0f%%\n", m.name,
                rtt * 1e3, bytes / 1e6, bytes / rtt / 1e9, transport * 1e3,
                bytes / transport / 1e9, bytes / memcpy_s / 1e9, 100.0 * memcpy_s / transport,
                outside * 1e3, 100.0 * memcpy_s / outside);
  }
  std::printf(
      "\nRTT: median of %d round trips of worker::ParamClient::Lookup (request built from a "
      "torch tensor, answer decoded into torch tensors). transport: median over the same "
      "round trips of RTT minus the server's time inside ParamServer::Lookup during that call "
      "(its meft_ps_lookup_seconds histogram). RTT-direct: median RTT minus the median of "
      "ParamServer::Lookup called directly (answer built in the server's own buffers), i.e. "
      "everything a round trip adds to the server's work, including encoding into the arena "
      "instead of a buffer. Targets: shm transport >= 70%% of memcpy; gRPC transport >= 1 GB/s.\n",
      kIterations);
  (*running)->Shutdown(1.0);
  return 0;
}

}  // namespace
}  // namespace meft

int main() { return meft::Run(); }
