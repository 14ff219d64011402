#include "param_server/server/options.h"

#include "absl/strings/str_cat.h"

namespace meft::server {

void RegisterFields(ServerConfig* c, config::FieldSet* f) {
  f->Add("listen", &c->listen,
         "gRPC address HOST:PORT; loopback by default (a non-loopback address needs tls.cert, "
         "tls.key and auth.token_file, or --insecure)");
  f->Add("metrics", &c->metrics, "serve Prometheus metrics on metrics_port");
  f->Add("metrics_port", &c->metrics_port,
         "port of the Prometheus /metrics endpoint, on the listen host; 0 = any free port");
  f->SetRange("metrics_port", 0, 65535);
  f->AddChoice("log_level", &c->log_level, {"trace", "debug", "info", "warn", "error", "off"},
               "log verbosity");
  f->Add("threads", &c->threads, "worker threads for selection and Adam; 0 = all cores");
  f->Add("max_message_mb", &c->max_message_mb,
         "largest gRPC message accepted or sent, in MiB; larger requests get RESOURCE_EXHAUSTED");
  f->SetRange("max_message_mb", 1, 2047);
  f->Add("insecure", &c->insecure,
         "allow a non-loopback listener without TLS and token (trusted networks only)");
  f->Add("tls.cert", &c->tls_cert,
         "PEM certificate chain of the server; set with tls.key to serve TLS");
  f->Add("tls.key", &c->tls_key, "PEM private key of tls.cert");
  f->Add("tls.client_ca", &c->tls_client_ca,
         "PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)");
  f->Add("auth.token_file", &c->auth_token_file,
         "file holding the bearer token every call must send as \"authorization: Bearer "
         "<token>\" (health checks excepted); \"\" = no token");
  f->AddChoice("shm.attach", &c->shm_attach, {"auto", "on", "off"},
               "let workers on this host send tensors through a shared-memory arena: auto = "
               "only on a loopback listener, on = always, off = never (tensors go inline)");
  f->Add("restore", &c->restore,
         "checkpoint to load at start: a checkpoint-<step> folder, a folder holding them (newest "
         "wins), or \"latest\" for the newest under checkpoint_dir; \"\" = fresh init");
  f->Add("adapter.layers", &c->layers, "decoder layers this server owns, e.g. \"0-31\"");
  f->Add("adapter.rows", &c->rows, "r: key-value pairs per layer");
  f->SetRange("adapter.rows", 1, 2147483647.0);
  f->Add("adapter.dim", &c->dim, "d: hidden size of the model");
  f->SetRange("adapter.dim", 1, 1 << 20);
  f->Add("adapter.experts", &c->experts,
         "E: key-experts per layer, must divide rows; 0 = divisor of r nearest 4*ceil(sqrt(r))");
  f->SetRange("adapter.experts", 0, 2147483647.0);
  f->Add("adapter.n_probe", &c->n_probe, "experts probed per token");
  f->SetRange("adapter.n_probe", 1, 1 << 20);
  f->Add("adapter.top_k", &c->top_k, "key-value pairs selected per token");
  f->SetRange("adapter.top_k", 1, 1 << 20);
  f->Add("adapter.max_rows", &c->max_rows,
         "cap on unique rows per lookup (rows chosen by most tokens kept); 0 = no cap");
  f->SetRange("adapter.max_rows", 0, 2147483647.0);
  f->AddChoice("adapter.mode", &c->mode, {"per_token", "union"},
               "per_token: each token uses its own top_k rows; union: every row of S");
  f->Add("adapter.gated", &c->gated, "score keys by g_t[e] * (k . x) instead of k . x");
  f->Add("adapter.seed", &c->seed, "seed of the initialisation (layer l uses seed and l)");
  f->Add("adapter.init_std", &c->init_std, "std of the N(0, std) key initialisation");
  f->SetRange("adapter.init_std", 0, 1e6);
  f->AddChoice("adapter.router_init", &c->router_init, {"mean_keys", "normal"},
               "router rows: router_scale * mean of the expert's keys, or N(0, init_std)");
  f->Add("adapter.router_scale", &c->router_scale, "scale of the mean_keys router init");
  f->Add("optimizer.beta1", &c->beta1, "Adam first-moment decay");
  f->SetRange("optimizer.beta1", 0, 0.999999999);
  f->Add("optimizer.beta2", &c->beta2, "Adam second-moment decay");
  f->SetRange("optimizer.beta2", 0, 0.999999999);
  f->Add("optimizer.eps", &c->eps, "Adam epsilon added to sqrt(v)");
  f->SetRange("optimizer.eps", 1e-30, 1);
  f->Add("optimizer.weight_decay", &c->weight_decay,
         "decoupled weight decay on touched rows: p *= 1 - lr * wd");
  f->SetRange("optimizer.weight_decay", 0, 1e6);
  f->AddChoice("wire_dtype", &c->wire_dtype, {"bf16", "fp32"},
               "dtype of rows sent when a lookup does not ask for one");
  f->Add("max_tokens", &c->max_tokens, "largest number of tokens in one lookup");
  f->SetRange("max_tokens", 1, 1 << 24);
  f->Add("checkpoint_dir", &c->checkpoint_dir,
         "where checkpoint-<step>/ folders go; SIGTERM writes one there; checkpoint paths in "
         "requests must lie inside it; \"\" = none");
  f->Add("max_pending_lookups", &c->max_pending_lookups,
         "per layer: training lookups that may await their gradients at once");
  f->SetRange("max_pending_lookups", 1, 1 << 20);
  f->Add("lookup_cache_mb", &c->lookup_cache_mb,
         "all layers: bytes of training lookups awaiting their gradients, in MiB; 0 = two "
         "micro-batches of max_tokens per layer");
  f->SetRange("lookup_cache_mb", 0, 1 << 30);
  f->Add("memory_check", &c->memory_check,
         "refuse to start when the store's predicted memory exceeds what the host (or its "
         "cgroup) can give");
  f->Add("memory_limit_mb", &c->memory_limit_mb,
         "memory the start-up check may use, in MiB; 0 = detect (MemAvailable, cgroup limit)");
  f->SetRange("memory_limit_mb", 0, 1 << 30);
  f->Add("step_wait_seconds", &c->step_wait_seconds,
         "how long a lookup for the next step waits for the current Step before failing");
  f->SetRange("step_wait_seconds", 0, 86400);
  f->AddChoice("isa", &c->isa, {"auto", "avx512", "avx2", "generic"},
               "dot-product kernels; auto = the best this CPU supports");
}

absl::StatusOr<ServerOptions> ToServerOptions(const ServerConfig& c) {
  ServerOptions o;
  o.layers = c.layers;
  o.rows = c.rows;
  o.dim = c.dim;
  o.experts = c.experts;
  if (c.experts != 0 && c.rows % c.experts != 0) {
    return absl::InvalidArgumentError(absl::StrCat("adapter.experts: ", c.experts,
                                                   " does not divide adapter.rows (", c.rows, ")"));
  }
  o.selector.n_probe = c.n_probe;
  o.selector.top_k = c.top_k;
  o.selector.max_rows = c.max_rows;
  o.selector.gated = c.gated;
  o.mode = c.mode == "union" ? Mode::kUnion : Mode::kPerToken;
  o.init.seed = c.seed;
  o.init.init_std = static_cast<float>(c.init_std);
  o.init.router_init =
      c.router_init == "normal" ? store::RouterInit::kNormal : store::RouterInit::kMeanKeys;
  o.init.router_scale = static_cast<float>(c.router_scale);
  o.adam = {c.beta1, c.beta2, c.eps, c.weight_decay};
  o.wire_dtype = c.wire_dtype == "fp32" ? wire::DType::kFp32 : wire::DType::kBf16;
  o.max_tokens = c.max_tokens;
  o.checkpoint_dir = c.checkpoint_dir;
  o.step_wait_seconds = c.step_wait_seconds;
  o.max_pending_lookups = c.max_pending_lookups;
  o.lookup_cache_bytes = c.lookup_cache_mb << 20;
  if (c.isa == "avx512") {
    o.isa = kernels::Isa::kAvx512;
  } else if (c.isa == "avx2") {
    o.isa = kernels::Isa::kAvx2;
  } else if (c.isa == "generic") {
    o.isa = kernels::Isa::kGeneric;
  }
  if (o.isa.has_value() && !kernels::IsaSupported(*o.isa)) {
    return absl::InvalidArgumentError(
        absl::StrCat("isa: ", c.isa, " is not supported by this CPU"));
  }
  return o;
}

}  // namespace meft::server
