#pragma once

// The parameter server's configuration as users write it (YAML keys and --flags), and its
// translation into ServerOptions. Reads no files itself: main() owns the FieldSet's sources.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/config/config.h"
#include "param_server/server/param_server.h"

namespace meft::server {

// Everything `meft-param-server` can be told. Defaults serve a small store for the quick start.
struct ServerConfig {
  // Process.
  std::string listen = "127.0.0.1:50051";
  bool metrics = true;
  uint32_t metrics_port = 9464;
  std::string log_level = "info";
  uint32_t threads = 0;
  uint32_t max_message_mb = 1024;
  bool insecure = false;
  std::string tls_cert;  // PEM paths; "" = plaintext
  std::string tls_key;
  std::string tls_client_ca;        // "" = no client certificate asked
  std::string auth_token_file;      // "" = calls need no token
  std::string shm_attach = "auto";  // auto | on | off: may workers attach a shared-memory arena
  std::string restore;
  // Adapter and selection.
  std::vector<uint32_t> layers = {0, 1};
  int64_t rows = 4096;
  int64_t dim = 64;
  int64_t experts = 0;
  int64_t n_probe = 8;
  int64_t top_k = 64;
  int64_t max_rows = 0;
  std::string mode = "per_token";
  bool gated = true;
  uint64_t seed = 0;
  double init_std = 0.02;
  std::string router_init = "mean_keys";
  double router_scale = 50.0;
  // Optimizer.
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  // Serving.
  std::string wire_dtype = "bf16";
  int64_t max_tokens = 8192;
  std::string checkpoint_dir;
  double step_wait_seconds = 30.0;
  int64_t max_pending_lookups = 256;
  int64_t lookup_cache_mb = 0;  // 0 = auto (see ServerOptions::lookup_cache_bytes)
  // Start-up admission (server/memory_budget.h): refuse a store the host cannot hold.
  bool memory_check = true;
  int64_t memory_limit_mb = 0;  // 0 = detect
  std::string isa = "auto";
};

// Registers every ServerConfig field (name, default, one-line doc) in `fields`.
void RegisterFields(ServerConfig* config, config::FieldSet* fields);

// Validates the adapter/optimizer/serving part and builds ServerOptions; errors name the key.
absl::StatusOr<ServerOptions> ToServerOptions(const ServerConfig& config);

}  // namespace meft::server
