#include "gpu_worker/app/worker_config.h"

#include <torch/torch.h>

#include <algorithm>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/status.h"
#include "gpu_worker/app/server_connect.h"
#include "gpu_worker/rpc/grpc_param_client.h"
#include "spdlog/spdlog.h"

namespace meft::worker {

void RegisterWorkerFields(WorkerConfig* c, config::FieldSet* f) {
  f->Add("model_dir", &c->model_dir,
         "Hugging Face model folder: config.json, *.safetensors, tokenizer.json or "
         "tokenizer.model");
  f->Add("output_dir", &c->output_dir, "where checkpoints, predictions.jsonl and metrics.json go");
  f->AddChoice("device", &c->device, {"auto", "cpu", "cuda"}, "auto = CUDA when LibTorch has it");
  f->AddChoice("log_level", &c->log_level, {"trace", "debug", "info", "warn", "error", "off"},
               "log verbosity");
  f->Add("metrics.listen", &c->metrics_listen,
         "HOST:PORT where `train` serves Prometheus metrics (meft_worker_*), e.g. "
         "127.0.0.1:9465, 0.0.0.0:9465 in a container; port 0 = any free port; \"\" = none");
  f->Add("metrics.linger_seconds", &c->metrics_linger_seconds,
         "keep the metrics endpoint up this long after training ends (a last scrape)");
  f->SetRange("metrics.linger_seconds", 0, 86400);
  f->Add("data.train", &c->train_file,
         "training data, JSONL with instruction, optional input, output");
  f->Add("data.eval", &c->eval_file, "evaluation data, same format (optional answers list)");
  f->Add("data.max_length", &c->max_length,
         "longest training example in tokens (longer ones are truncated)");
  f->SetRange("data.max_length", 2, 1 << 20);
  f->Add("data.train_on_inputs", &c->train_on_inputs, "compute the loss on prompt tokens too");
  f->AddChoice("data.template", &c->prompt_template, {"alpaca", "chatml"},
               "prompt preset: alpaca (Stanford Alpaca) or chatml (<|im_start|>user ... "
               "<|im_start|>assistant, as SmolLM2's and Qwen's chat templates render one turn)");
  f->Add("data.system_prompt", &c->system_prompt,
         "chatml: the system message (default: the one SmolLM2-Instruct's template inserts); "
         "\"\" = no system turn");
  f->Add("data.template_with_input", &c->template_with_input,
         "prompt template with {instruction} and {input}; \"\" = the preset's");
  f->Add("data.template_without_input", &c->template_without_input,
         "prompt template with {instruction}; \"\" = the preset's");
  f->AddChoice(
      "adapter.type", &c->adapter, {"meft", "parallel", "lora", "none"},
      "meft: sparse adapter on the parameter server; parallel: the same adapter dense on the "
      "device; lora: low-rank updates of projections; none: the bare model (eval and generate "
      "only, no server)");
  f->Add("adapter.layers", &c->layers,
         "layers with an adapter, e.g. \"0-31\"; empty = all (meft: the server's)");
  f->Add("adapter.rows", &c->parallel_rows, "parallel: key-value pairs per layer (r)");
  f->SetRange("adapter.rows", 1, 1 << 30);
  f->Add("adapter.lora_rank", &c->lora_rank, "lora: rank");
  f->SetRange("adapter.lora_rank", 1, 1 << 16);
  f->Add("adapter.lora_alpha", &c->lora_alpha, "lora: the update is scaled by alpha / rank");
  f->Add("adapter.lora_targets", &c->lora_targets,
         "lora: comma-separated projections "
         "(q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)");
  f->Add("adapter.seed", &c->adapter_seed, "seed of the parallel/lora initialisation");
  f->Add("meft.server", &c->server, "parameter server address HOST:PORT");
  f->Add("meft.servers", &c->servers,
         "several parameter servers (shards owning disjoint layers), e.g. [HOST:PORT, HOST:PORT]; "
         "replaces meft.server");
  f->Add("meft.reconnect_timeout_seconds", &c->reconnect_timeout_seconds,
         "how long to wait (exponential backoff) for a parameter server that went away or is "
         "loading its store; 0 = fail at once");
  f->SetRange("meft.reconnect_timeout_seconds", 0, 1e7);
  f->Add("meft.prefetch_layers", &c->prefetch_layers,
         "p: layer l is looked up with the FFN input of layer l - p (same in training and "
         "evaluation)");
  f->SetRange("meft.prefetch_layers", 0, 1 << 10);
  f->Add("meft.refetch_in_backward", &c->refetch_in_backward,
         "re-fetch rows in backward instead of keeping them on the device");
  f->Add("meft.overlap", &c->overlap,
         "overlap server calls with compute: lookups run during the base FFN (and prefetched "
         "layers), gradients and Step in the background; false = synchronous (same results)");
  f->Add("meft.bf16_rows", &c->bf16_rows, "receive rows as bf16 (else fp32)");
  f->Add("meft.timeout_seconds", &c->server_timeout_seconds, "deadline of one call to the server");
  f->SetRange("meft.timeout_seconds", 0.001, 86400);
  f->AddChoice("meft.transport", &c->transport, {"auto", "shm", "grpc"},
               "tensors to the server: shm = through a shared-memory arena (same host only, error "
               "if it cannot be attached), grpc = inline in messages, auto = shm when the server "
               "address is loopback and the arena attaches, else grpc");
  f->Add("meft.shm_arena_mb", &c->shm_arena_mb,
         "size of the shared-memory arena in MiB; 0 = room for two lookups of the server's "
         "max_tokens (64 MiB to 4 GiB)");
  f->SetRange("meft.shm_arena_mb", 0, 1 << 20);
  f->Add("meft.shm_pin", &c->shm_pin,
         "register the arena as pinned memory (one DMA per host-to-device copy) when LibTorch "
         "has CUDA and a device is present");
  f->Add("meft.tls_ca", &c->tls_ca,
         "PEM CA that signed the server's certificate; set = TLS to the server, \"\" = plaintext");
  f->Add("meft.tls_cert", &c->tls_cert,
         "PEM client certificate for mutual TLS (with meft.tls_key)");
  f->Add("meft.tls_key", &c->tls_key, "PEM private key of meft.tls_cert");
  f->Add("meft.token_file", &c->token_file,
         "file holding the server's bearer token (never the token itself on the command line)");
  f->Add("train.max_steps", &c->max_steps, "optimizer steps");
  f->SetRange("train.max_steps", 1, 1e12);
  f->Add("train.micro_batch_size", &c->micro_batch_size, "examples per micro-batch");
  f->SetRange("train.micro_batch_size", 1, 1 << 20);
  f->Add("train.grad_accum", &c->grad_accum, "micro-batches per optimizer step");
  f->SetRange("train.grad_accum", 1, 1 << 20);
  f->Add("train.lr", &c->lr, "peak learning rate");
  f->SetRange("train.lr", 0, 10);
  f->Add("train.warmup_ratio", &c->warmup_ratio,
         "fraction of steps of linear warmup, then linear decay to 0");
  f->SetRange("train.warmup_ratio", 0, 1);
  f->Add("train.max_grad_norm", &c->max_grad_norm, "global gradient-norm clipping; 0 = off");
  f->SetRange("train.max_grad_norm", 0, 1e9);
  f->Add("train.weight_decay", &c->weight_decay,
         "decoupled weight decay (parallel/lora; meft: set it on the server)");
  f->SetRange("train.weight_decay", 0, 1e3);
  f->Add("train.seed", &c->seed, "seed of the data order");
  f->Add("train.log_every", &c->log_every, "steps between log lines");
  f->SetRange("train.log_every", 1, 1e12);
  f->Add("train.save_every", &c->save_every, "steps between checkpoints; 0 = only at the end");
  f->SetRange("train.save_every", 0, 1e12);
  f->Add("train.eval_every", &c->eval_every, "steps between evaluations on data.eval; 0 = none");
  f->SetRange("train.eval_every", 0, 1e12);
  f->Add("train.eval_limit", &c->eval_limit, "examples in each periodic evaluation; 0 = all");
  f->SetRange("train.eval_limit", 0, 1e12);
  f->Add("eval.metrics", &c->metrics,
         "comma-separated: nq_substring_em, squad_lower_substring, gsm8k_final_number, "
         "toolbench_api_iou");
  f->Add("eval.max_new_tokens", &c->max_new_tokens, "longest generated answer");
  f->SetRange("eval.max_new_tokens", 1, 1 << 16);
  f->Add("eval.num_beams", &c->num_beams, "1 = greedy, more = beam search");
  f->SetRange("eval.num_beams", 1, 64);
  f->Add("eval.batch_size", &c->eval_batch_size, "prompts per generation batch");
  f->SetRange("eval.batch_size", 1, 1 << 16);
}

absl::StatusOr<EvaluateOptions> MakeEvaluateOptions(const WorkerConfig& c) {
  EvaluateOptions o;
  for (absl::string_view name : absl::StrSplit(c.metrics, ',', absl::SkipEmpty())) {
    auto metric = ParseMetric(std::string(name));
    if (!metric.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("eval.metrics: ", metric.status().message()));
    }
    o.metrics.push_back(*metric);
  }
  o.generate.max_new_tokens = c.max_new_tokens;
  o.generate.num_beams = c.num_beams;
  o.generate.batch_size = c.eval_batch_size;
  o.max_prompt_length = c.max_length;
  return o;
}

TrainerOptions MakeTrainerOptions(const WorkerConfig& c) {
  TrainerOptions o;
  o.max_steps = c.max_steps;
  o.grad_accum = c.grad_accum;
  o.lr = c.lr;
  o.warmup_ratio = c.warmup_ratio;
  o.max_grad_norm = c.max_grad_norm;
  o.adamw.weight_decay = c.weight_decay;
  o.log_every = c.log_every;
  o.save_every = c.save_every;
  o.output_dir = c.output_dir;
  o.reconnect_timeout_seconds = c.reconnect_timeout_seconds;
  return o;
}

absl::StatusOr<std::unique_ptr<WorkerSession>> OpenSession(const WorkerConfig& c) {
  auto s = std::make_unique<WorkerSession>();
  torch::Device device = torch::kCPU;
  if (c.device == "cuda" || (c.device == "auto" && torch::cuda::is_available())) {
    if (!torch::cuda::is_available()) {
      return absl::FailedPreconditionError("device: cuda, but this LibTorch has no CUDA device");
    }
    device = torch::Device(torch::kCUDA, 0);
  }
  // fp32 on the CPU; bf16 weights on CUDA (the adapters compute in fp32).
  const torch::ScalarType dtype = device.is_cuda() ? torch::kBFloat16 : torch::kFloat32;
  MEFT_ASSIGN_OR_RETURN(s->tokenizer, Tokenizer::Load(c.model_dir));
  MEFT_ASSIGN_OR_RETURN(s->model, LlamaModel::Load(c.model_dir, device, dtype));
  const ModelConfig& mc = s->model->config();
  if (mc.pad_token_id >= 0) MEFT_RETURN_IF_ERROR(s->tokenizer->set_pad_id(mc.pad_token_id));
  MEFT_ASSIGN_OR_RETURN(PromptTemplate tmpl, PresetTemplate(c.prompt_template, c.system_prompt));
  if (c.prompt_template == "chatml") {
    for (const char* marker : {"<|im_start|>", "<|im_end|>"}) {
      if (s->tokenizer->SpecialTokenId(marker) < 0) {
        spdlog::warn(
            "data.template: chatml, but {} is not a special token of {}; it is encoded "
            "as plain text",
            marker, s->tokenizer->source());
      }
    }
  }
  if (!c.template_with_input.empty()) tmpl.with_input = c.template_with_input;
  if (!c.template_without_input.empty()) tmpl.without_input = c.template_without_input;
  MEFT_ASSIGN_OR_RETURN(s->formatter, PromptFormatter::Create(tmpl));

  std::vector<int64_t> layers;
  for (uint32_t l : c.layers) {
    if (l >= mc.num_hidden_layers) {
      return absl::InvalidArgumentError(absl::StrCat(
          "adapter.layers: layer ", l, " but the model has ", mc.num_hidden_layers, " layers"));
    }
    layers.push_back(l);
  }
  if (layers.empty()) {
    for (int64_t l = 0; l < mc.num_hidden_layers; ++l) layers.push_back(l);
  }
  s->target.adapter = c.adapter;
  const int64_t d = mc.hidden_size;
  if (c.adapter == "meft") {
    GrpcClientOptions co;
    co.address = c.server;
    co.bf16_rows = c.bf16_rows;
    co.deadline_seconds = c.server_timeout_seconds;
    co.tls_ca_file = c.tls_ca;
    co.tls_cert_file = c.tls_cert;
    co.tls_key_file = c.tls_key;
    co.token_file = c.token_file;
    MEFT_ASSIGN_OR_RETURN(co.transport, ParseTransport(c.transport));
    co.shm_arena_bytes = uint64_t{c.shm_arena_mb} << 20;
    co.shm_pin = c.shm_pin;
    MEFT_ASSIGN_OR_RETURN(ConnectedServers connected, ConnectParamServers(c, co));
    s->client = std::move(connected.client);
    ServerInfo server = connected.description;
    if (server.dim != d) {
      return absl::FailedPreconditionError(absl::StrCat(
          connected.key, ": the parameter server at ", connected.addresses, " has d = ", server.dim,
          " but the model's hidden_size is ", d, " (start it with --adapter-dim ", d, ")"));
    }
    for (uint32_t l : server.layers) {
      if (l >= mc.num_hidden_layers) {
        return absl::FailedPreconditionError(
            absl::StrCat(connected.key, ": the parameter server owns layer ", l,
                         " but the model has ", mc.num_hidden_layers, " layers"));
      }
    }
    if (!c.layers.empty()) {
      std::vector<uint32_t> kept;
      for (uint32_t l : server.layers) {
        if (std::find(c.layers.begin(), c.layers.end(), l) != c.layers.end()) kept.push_back(l);
      }
      server.layers = kept;
    }
    // Every call the adapter and the trainer make is timed and its bytes counted.
    s->client = std::make_unique<MeteredParamClient>(std::move(s->client), &s->client_meter);
    s->meft = std::make_unique<MeftAdapter>(
        s->client.get(), server,
        MeftAdapterOptions{.prefetch_layers = c.prefetch_layers,
                           .refetch_in_backward = c.refetch_in_backward,
                           .overlap = c.overlap});
    s->target.hooks = s->meft.get();
    s->target.meft = s->meft.get();
    s->target.server = s->client.get();
  } else if (c.adapter == "none") {
    // The bare model: no hooks, no server, nothing to train.
  } else if (c.adapter == "parallel") {
    MEFT_ASSIGN_OR_RETURN(
        s->parallel,
        ParallelAdapter::Create({.rows = c.parallel_rows, .layers = layers, .seed = c.adapter_seed},
                                d, device));
    s->target.hooks = s->parallel.get();
    s->target.local = s->parallel->named_parameters();
  } else {
    const int64_t q = mc.num_attention_heads * mc.head_dim;
    const int64_t kv = mc.num_key_value_heads * mc.head_dim;
    const int64_t inter = mc.intermediate_size;
    const std::map<std::string, std::pair<int64_t, int64_t>> shapes = {
        {"q_proj", {d, q}},       {"k_proj", {d, kv}},       {"v_proj", {d, kv}},
        {"o_proj", {q, d}},       {"gate_proj", {d, inter}}, {"up_proj", {d, inter}},
        {"down_proj", {inter, d}}};
    LoraOptions lo;
    lo.rank = c.lora_rank;
    lo.alpha = c.lora_alpha;
    lo.layers = layers;
    lo.seed = c.adapter_seed;
    lo.targets.clear();
    for (absl::string_view t : absl::StrSplit(c.lora_targets, ',', absl::SkipEmpty())) {
      lo.targets.emplace_back(t);
    }
    MEFT_ASSIGN_OR_RETURN(s->lora, LoraAdapter::Create(lo, shapes, device));
    s->target.hooks = s->lora.get();
    s->target.local = s->lora->named_parameters();
    s->target.lora = s->lora.get();
    // PEFT's base_model_name_or_path: absolute, so AutoPeftModel finds it from anywhere.
    std::error_code error;
    const std::filesystem::path absolute = std::filesystem::absolute(c.model_dir, error);
    s->target.base_model = error ? c.model_dir : absolute.lexically_normal().string();
  }
  return s;
}

}  // namespace meft::worker
