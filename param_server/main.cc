// meft-param-server: owns the adapter (keys, values, router, Adam state) of the layers it is
// given, answers lookups and gradients over gRPC, and serves Prometheus metrics.

#include <pthread.h>
#include <signal.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <memory>
#include <optional>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/config/config.h"
#include "common/logging/logging.h"
#include "common/metrics/exposer.h"
#include "common/metrics/metrics.h"
#include "common/rpc/message_memory.h"
#include "common/status.h"
#include "param_server/checkpoint/checkpoint.h"
#include "param_server/rpc/service.h"
#include "param_server/server/memory_budget.h"
#include "param_server/server/options.h"
#include "param_server/server/param_server.h"
#include "spdlog/spdlog.h"
#include "tbb/global_control.h"

namespace {

using meft::server::ServerConfig;

std::string MetricsAddress(const std::string& listen, uint32_t port) {
  std::string host = "127.0.0.1";
  const size_t colon = listen.rfind(':');
  if (colon != std::string::npos && colon > 0) host = listen.substr(0, colon);
  return absl::StrCat(host, ":", port);
}

// DESIGN §4's prediction against what the host (or its cgroup, or memory_limit_mb) can give.
absl::Status CheckHostMemory(const ServerConfig& config,
                             const meft::server::MemoryPrediction& need) {
  using meft::server::FormatBytes;
  const std::string parts = absl::StrCat(
      "adapter with Adam state ", FormatBytes(need.store_bytes), ", lookup cache ",
      FormatBytes(need.lookup_cache_bytes),
      need.restore_bytes > 0 ? absl::StrCat(", restore ", FormatBytes(need.restore_bytes)) : "");
  if (!config.memory_check) {
    spdlog::warn("host memory: predicted {} ({}); not checked (memory_check: false)",
                 FormatBytes(need.total()), parts);
    return absl::OkStatus();
  }
  meft::server::HostMemory host;
  if (config.memory_limit_mb > 0) {
    host = {config.memory_limit_mb << 20, "memory_limit_mb"};
  } else {
    MEFT_ASSIGN_OR_RETURN(host, meft::server::DetectHostMemory());
  }
  MEFT_RETURN_IF_ERROR(meft::server::CheckMemoryAdmission(need, host));
  spdlog::info("host memory: predicted {} ({}) of {} available ({})", FormatBytes(need.total()),
               parts, FormatBytes(host.bytes), host.source);
  return absl::OkStatus();
}

absl::Status Run(const ServerConfig& config, const sigset_t& stop_signals) {
  MEFT_RETURN_IF_ERROR(meft::logging::Init(config.log_level, "param-server"));
  spdlog::info("{}", meft::rpc::KeepMessageBuffersInHeap(
                         meft::config::AllocatorTunedByEnvironment()));
  std::optional<tbb::global_control> threads;
  if (config.threads > 0) {
    threads.emplace(tbb::global_control::max_allowed_parallelism, config.threads);
  }
  MEFT_ASSIGN_OR_RETURN(meft::server::ServerOptions options, meft::server::ToServerOptions(config));
  meft::rpc::RpcOptions rpc_options;
  rpc_options.listen = config.listen;
  rpc_options.max_message_bytes = static_cast<int>(config.max_message_mb) << 20;
  rpc_options.insecure = config.insecure;
  rpc_options.tls_cert_file = config.tls_cert;
  rpc_options.tls_key_file = config.tls_key;
  rpc_options.tls_client_ca_file = config.tls_client_ca;
  rpc_options.token_file = config.auth_token_file;
  rpc_options.shm_attach = config.shm_attach == "on"    ? meft::rpc::ShmAttach::kOn
                           : config.shm_attach == "off" ? meft::rpc::ShmAttach::kOff
                                                        : meft::rpc::ShmAttach::kAuto;
  MEFT_RETURN_IF_ERROR(meft::rpc::CheckListenAddress(rpc_options));
  options.max_response_bytes = rpc_options.max_message_bytes;
  const meft::server::MemoryPrediction need =
      meft::server::PredictMemory(options, !config.restore.empty());
  MEFT_RETURN_IF_ERROR(CheckHostMemory(config, need));

  meft::metrics::Registry registry;
  registry
      .AddGauge("meft_ps_predicted_memory_bytes",
                "Host memory the store was predicted to need at start (DESIGN §4: adapter with "
                "Adam state, lookup cache budget, a restore's transient copy)")
      .Set(static_cast<double>(need.total()));
  std::unique_ptr<meft::metrics::Exposer> exposer;
  if (config.metrics) {
    MEFT_ASSIGN_OR_RETURN(
        exposer, meft::metrics::Exposer::Start(MetricsAddress(config.listen, config.metrics_port),
                                               registry));
  }
  // Listen first, so health checks see NOT_SERVING (and calls UNAVAILABLE "store loading")
  // while the store is initialised or restored, which takes minutes at 7B scale. `server` is
  // declared first so that `running`, which answers with it, is destroyed before it.
  std::unique_ptr<meft::server::ParamServer> server;
  MEFT_ASSIGN_OR_RETURN(auto running, meft::rpc::StartServer(rpc_options, nullptr, &registry));
  spdlog::info("listening on {} with port {}; health NOT_SERVING until the store is loaded",
               config.listen, running->port());
  spdlog::info("initialising {} layers of r={} d={}", options.layers.size(), options.rows,
               options.dim);
  MEFT_ASSIGN_OR_RETURN(server, meft::server::ParamServer::Create(options, &registry));
  const meft::server::ServerInfo info = server->Info();
  spdlog::info("store ready: layers {}, r={}, d={}, E={}, n_probe={}, top_k={}, kernels {}",
               absl::StrJoin(info.layers, ","), info.rows, info.dim, info.experts, info.n_probe,
               info.top_k, info.isa);

  if (!config.restore.empty()) {
    std::string path = config.restore;
    if (path == "latest") {
      if (config.checkpoint_dir.empty()) {
        return absl::InvalidArgumentError("restore: \"latest\" needs checkpoint_dir");
      }
      auto latest = meft::checkpoint::FindLatest(config.checkpoint_dir);
      if (latest.ok()) {
        path = *latest;
      } else if (absl::IsNotFound(latest.status())) {
        path.clear();
        spdlog::info("no checkpoint under {}; starting fresh", config.checkpoint_dir);
      } else {
        return latest.status();
      }
    }
    if (!path.empty()) {
      MEFT_ASSIGN_OR_RETURN(auto restored, server->RestoreCheckpoint(path, /*confine=*/false));
      spdlog::info("resumed from {} at step {}", restored.path, restored.step);
    }
  }

  running->SetReady(server.get());
  // Scripts and tests parse this line: keep "(port N)" and ", metrics on URL" as they are.
  spdlog::info("serving meft.v1.ParamServer on {} (port {}){}", config.listen, running->port(),
               exposer ? absl::StrCat(", metrics on http://",
                                      MetricsAddress(config.listen, exposer->port()), "/metrics")
                       : "");
  spdlog::info("transport: {}{}",
               config.tls_cert.empty()        ? "plaintext"
               : config.tls_client_ca.empty() ? "TLS"
                                              : "mutual TLS",
               config.auth_token_file.empty() ? "" : ", bearer token required");
  spdlog::info("shared-memory arenas from workers on this host: {}",
               meft::rpc::ShmAttachAllowed(rpc_options) ? "accepted" : "refused (shm.attach)");

  // Wait for a stop signal; meanwhile, every few seconds, unmap the arenas of workers that left.
  int signal_number = -1;
  while (signal_number < 0) {
    const timespec sweep_period{.tv_sec = 2, .tv_nsec = 0};
    signal_number = sigtimedwait(&stop_signals, nullptr, &sweep_period);
    if (signal_number < 0 && errno != EAGAIN && errno != EINTR) {
      return absl::InternalError(absl::StrCat("sigtimedwait: ", std::strerror(errno)));
    }
    if (const size_t released = running->ReleaseUnlinkedArenas(); released > 0) {
      spdlog::debug("released {} shared-memory arena(s) of workers that left", released);
    }
  }
  spdlog::info("{} received: shutting down", strsignal(signal_number));
  server->BeginShutdown();  // release lookups waiting for a Step
  running->Shutdown(/*grace_seconds=*/5.0);
  if (!config.checkpoint_dir.empty()) {
    auto saved = server->SaveCheckpoint("");
    if (!saved.ok()) {
      return absl::Status(saved.status().code(),
                          absl::StrCat("final checkpoint failed: ", saved.status().message()));
    }
    spdlog::info("final checkpoint {}", saved->path);
  }
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  // Block the stop signals before any thread starts, so every thread inherits the mask and
  // main's sigwait is the one place that sees them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  ServerConfig config;
  meft::config::FieldSet fields;
  meft::server::RegisterFields(&config, &fields);
  CLI::App app{
      "meft-param-server: the CPU parameter server of MEFT. Owns the sparse adapter of the "
      "layers it serves, selects rows per token, and runs lazy Adam.\n"
      "Settings come from defaults, then --config FILE (YAML), then flags."};
  std::string config_path;
  app.add_option("--config", config_path, "YAML configuration file")->check(CLI::ExistingFile);
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
  if (status.ok()) status = Run(config, stop_signals);
  if (!status.ok()) {
    std::fprintf(stderr, "meft-param-server: error: %s\n", std::string(status.message()).c_str());
    return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  return 0;
}
