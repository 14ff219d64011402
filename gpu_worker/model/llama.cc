#include "gpu_worker/model/llama.h"

#include <torch/torch.h>

#include <cmath>
#include <exception>
#include <limits>
#include <new>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"

namespace meft::worker {
namespace {

std::string ShapeString(c10::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape.begin(), shape.end(), ", "), "]");
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// HF LlamaRMSNorm: statistics in fp32, normalized activations cast back before the weight.
torch::Tensor RmsNorm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  torch::Tensor h = x.to(torch::kFloat32);
  h = h * torch::rsqrt(h.pow(2).mean({-1}, /*keepdim=*/true) + eps);
  return weight * h.to(x.scalar_type());
}

torch::Tensor RotateHalf(const torch::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return torch::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
}

// Names passed to AdapterHooks::ProjectionDelta.
const std::string kQProj = "q_proj";
const std::string kKProj = "k_proj";
const std::string kVProj = "v_proj";
const std::string kOProj = "o_proj";
const std::string kGateProj = "gate_proj";
const std::string kUpProj = "up_proj";
const std::string kDownProj = "down_proj";

torch::Tensor Project(const torch::Tensor& x, const torch::Tensor& weight, int64_t layer,
                      const std::string& name, AdapterHooks* hooks) {
  torch::Tensor y = torch::linear(x, weight);
  if (hooks != nullptr) {
    torch::Tensor delta = hooks->ProjectionDelta(layer, name, x);
    if (delta.defined()) y = y + delta;
  }
  return y;
}

// [B, kv_heads, S, hd] -> [B, kv_heads * n_rep, S, hd]; query head n reads kv head n / n_rep.
torch::Tensor RepeatKv(const torch::Tensor& x, int64_t n_rep) {
  if (n_rep == 1) return x;
  const int64_t b = x.size(0), kv = x.size(1), s = x.size(2), hd = x.size(3);
  return x.unsqueeze(2).expand({b, kv, n_rep, s, hd}).reshape({b, kv * n_rep, s, hd});
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// KvCache

int64_t KvCache::length() const { return key_mask_.defined() ? key_mask_.size(1) : 0; }

int64_t KvCache::batch_size() const { return key_mask_.defined() ? key_mask_.size(0) : 0; }

void KvCache::ReorderBatch(const torch::Tensor& indices) {
  if (!key_mask_.defined()) return;
  TORCH_CHECK(indices.dim() == 1, "KvCache::ReorderBatch: indices must be 1-D, got ",
              indices.sizes());
  const torch::Tensor idx = indices.to(key_mask_.device(), torch::kInt64);
  if (idx.numel() > 0) {
    const int64_t lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < batch_size(), "KvCache::ReorderBatch: index out of range [0, ",
                batch_size(), "): ", lo, "..", hi);
  }
  for (auto& t : keys_) t = t.index_select(0, idx);
  for (auto& t : values_) t = t.index_select(0, idx);
  key_mask_ = key_mask_.index_select(0, idx);
  num_real_ = num_real_.index_select(0, idx);
}

void KvCache::Clear() {
  keys_.clear();
  values_.clear();
  key_mask_ = torch::Tensor();
  num_real_ = torch::Tensor();
}

// ---------------------------------------------------------------------------------------------
// Loading

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Load(const std::string& model_dir,
                                                             torch::Device device,
                                                             torch::ScalarType dtype) {
  MEFT_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(model_dir));
  WeightSources sources;
  MEFT_ASSIGN_OR_RETURN(auto weights, LoadWeights(model_dir, dtype, &sources));
  absl::StatusOr<std::unique_ptr<LlamaModel>> model =
      FromWeights(config, std::move(weights), device, dtype, &sources);
  if (!model.ok()) {
    return absl::Status(model.status().code(),
                        absl::StrCat("model '", model_dir, "': ", model.status().message()));
  }
  return model;
}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::FromWeights(
    const ModelConfig& config, std::map<std::string, torch::Tensor> weights, torch::Device device,
    torch::ScalarType dtype, const WeightSources* sources) {
  if (dtype != torch::kFloat32 && dtype != torch::kBFloat16 && dtype != torch::kFloat16) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model dtype must be float32, bfloat16 or float16, not ", c10::toString(dtype)));
  }
  const ModelConfig& c = config;
  if (c.vocab_size <= 0 || c.hidden_size <= 0 || c.intermediate_size <= 0 ||
      c.num_hidden_layers <= 0 || c.num_attention_heads <= 0 || c.num_key_value_heads <= 0 ||
      c.head_dim <= 0 || c.head_dim % 2 != 0 ||
      c.num_attention_heads % c.num_key_value_heads != 0) {
    return absl::InvalidArgumentError(
        "model config: sizes must be positive, head_dim even and num_key_value_heads must divide "
        "num_attention_heads");
  }
  auto where = [&](const std::string& name) -> std::string {
    if (sources == nullptr) return "";
    auto it = sources->find(name);
    return it == sources->end() ? "" : absl::StrCat(" in '", it->second, "'");
  };

  std::unique_ptr<LlamaModel> model(new LlamaModel(config, device, dtype));
  // Takes the tensor `name` out of `weights` after checking its shape, so the host copy goes
  // away as soon as the device copy exists; what remains at the end is unexpected.
  auto take = [&](const std::string& name,
                  const std::vector<int64_t>& shape) -> absl::StatusOr<torch::Tensor> {
    auto it = weights.find(name);
    if (it == weights.end()) {
      return absl::NotFoundError(
          absl::StrCat("missing tensor '", name, "' (expected shape ", ShapeString(shape), ")"));
    }
    const torch::Tensor& t = it->second;
    if (!t.defined() || t.sizes() != c10::IntArrayRef(shape)) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", name, "'", where(name), " has shape ",
                       t.defined() ? ShapeString(t.sizes()) : std::string("<undefined>"),
                       ", expected ", ShapeString(shape)));
    }
    torch::Tensor out = t.detach().to(device, dtype).contiguous();
    weights.erase(it);
    return out;
  };

  try {
    model->layers_.resize(c.num_hidden_layers);
    for (const LlamaTensorSpec& t : LlamaTensorSpecs(LlamaDimsOf(c))) {
      MEFT_ASSIGN_OR_RETURN(*model->Slot(t), take(t.name, t.shape));
    }
    if (c.tie_word_embeddings) {
      // transformers ignores a stored head of a tied model; so do we.
      model->lm_head_ = model->embed_tokens_;
      weights.erase("lm_head.weight");
    }
    for (const auto& [name, tensor] : weights) {
      if (absl::EndsWith(name, "rotary_emb.inv_freq")) continue;
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected tensor '", name, "'", where(name), " (not part of a ",
                       c.architecture, " model with ", c.num_hidden_layers, " layers",
                       c.tie_word_embeddings ? ", tied embeddings" : "", ")"));
    }
    weights.clear();

    // inv_freq_i = 1 / theta^(2i / head_dim), as HF computes it (fp32); linear scaling divides
    // the positions by the factor, which is the same as dividing inv_freq.
    torch::Tensor exponent = torch::arange(0, c.head_dim, 2, torch::kInt64).to(torch::kFloat32) /
                             static_cast<double>(c.head_dim);
    torch::Tensor inv_freq = 1.0 / torch::pow(c.rope_theta, exponent);
    if (c.rope_scaling_factor != 1.0) inv_freq = inv_freq / c.rope_scaling_factor;
    model->inv_freq_ = inv_freq.to(device);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("out of memory while building the model");
  } catch (const std::exception& e) {
    // c10::Error (device out of memory, no such device, ...) derives from std::exception.
    return absl::InternalError(absl::StrCat("building the model failed: ", e.what()));
  }
  return model;
}

// ---------------------------------------------------------------------------------------------
// Forward

torch::Tensor LlamaModel::Forward(const torch::Tensor& input_ids,
                                  const torch::Tensor& attention_mask, KvCache* cache,
                                  AdapterHooks* hooks) const {
  const ModelConfig& c = config_;
  TORCH_CHECK(input_ids.defined() && input_ids.dim() == 2,
              "LlamaModel::Forward: input_ids must be [B, T]");
  TORCH_CHECK(input_ids.scalar_type() == torch::kInt64,
              "LlamaModel::Forward: input_ids must be int64, got ", input_ids.scalar_type());
  const int64_t B = input_ids.size(0), T = input_ids.size(1);
  TORCH_CHECK(B > 0 && T > 0, "LlamaModel::Forward: empty input ", input_ids.sizes());
  const torch::Tensor ids = input_ids.to(device_);
  {
    const int64_t lo = ids.min().item<int64_t>(), hi = ids.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < c.vocab_size, "LlamaModel::Forward: token id out of range [0, ",
                c.vocab_size, "): ", lo, "..", hi);
  }
  torch::Tensor mask;  // [B, T] int64
  if (attention_mask.defined()) {
    TORCH_CHECK(attention_mask.sizes() == input_ids.sizes(), "LlamaModel::Forward: attention_mask ",
                attention_mask.sizes(), " does not match input_ids ", input_ids.sizes());
    mask = attention_mask.to(device_, torch::kInt64);
  } else {
    mask = torch::ones({B, T}, torch::TensorOptions().dtype(torch::kInt64).device(device_));
  }
  const bool has_past = cache != nullptr && !cache->empty();
  if (has_past) {
    TORCH_CHECK(cache->batch_size() == B, "LlamaModel::Forward: cache holds batch size ",
                cache->batch_size(), ", input has ", B);
    TORCH_CHECK(static_cast<int64_t>(cache->keys_.size()) == c.num_hidden_layers,
                "LlamaModel::Forward: cache was filled by a model with another layer count");
  }
  const int64_t past = has_past ? cache->length() : 0;
  const int64_t S = past + T;
  const auto long_opts = torch::TensorOptions().dtype(torch::kInt64).device(device_);

  // Position ids: count of real tokens before each token (HF generation convention).
  torch::Tensor num_real_before = has_past ? cache->num_real_ : torch::zeros({B}, long_opts);
  torch::Tensor positions = (num_real_before.unsqueeze(1) + mask.cumsum(1) - 1).clamp_min(0);

  // allowed [B, 1, T, S]: causal over buffer indices, optional sliding window (query i sees key
  // j iff i - j < window, current HF convention), padded keys removed.
  torch::Tensor key_mask = mask.to(torch::kBool);
  if (has_past) key_mask = torch::cat({cache->key_mask_, key_mask}, 1);
  torch::Tensor q_idx = torch::arange(past, S, long_opts).unsqueeze(1);  // [T, 1]
  torch::Tensor k_idx = torch::arange(0, S, long_opts).unsqueeze(0);     // [1, S]
  torch::Tensor allowed = k_idx <= q_idx;
  if (c.sliding_window > 0) allowed = allowed.logical_and(q_idx - k_idx < c.sliding_window);
  allowed = allowed.unsqueeze(0).logical_and(key_mask.unsqueeze(1)).unsqueeze(1);
  const torch::Tensor disallowed = allowed.logical_not();

  // Rotary tables [B, 1, T, head_dim] in the model dtype.
  torch::Tensor freqs = positions.to(torch::kFloat32).unsqueeze(-1) * inv_freq_;  // [B,T,hd/2]
  torch::Tensor emb = torch::cat({freqs, freqs}, -1);
  const torch::Tensor cos = emb.cos().to(dtype_).unsqueeze(1);
  const torch::Tensor sin = emb.sin().to(dtype_).unsqueeze(1);

  const int64_t H = c.num_attention_heads, KV = c.num_key_value_heads, hd = c.head_dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  const double lowest = std::numeric_limits<float>::lowest();

  std::vector<torch::Tensor> new_keys, new_values;
  new_keys.reserve(layers_.size());
  new_values.reserve(layers_.size());

  torch::Tensor h = embed_tokens_.index_select(0, ids.reshape({-1})).view({B, T, c.hidden_size});
  for (int64_t li = 0; li < static_cast<int64_t>(layers_.size()); ++li) {
    const Layer& l = layers_[li];
    torch::Tensor x = RmsNorm(h, l.input_layernorm, c.rms_norm_eps);
    torch::Tensor q = Project(x, l.q_proj, li, kQProj, hooks).view({B, T, H, hd}).transpose(1, 2);
    torch::Tensor k = Project(x, l.k_proj, li, kKProj, hooks).view({B, T, KV, hd}).transpose(1, 2);
    torch::Tensor v = Project(x, l.v_proj, li, kVProj, hooks).view({B, T, KV, hd}).transpose(1, 2);
    q = q * cos + RotateHalf(q) * sin;
    k = k * cos + RotateHalf(k) * sin;
    if (has_past) {
      k = torch::cat({cache->keys_[li], k}, 2);
      v = torch::cat({cache->values_[li], v}, 2);
    }
    if (cache != nullptr) {
      new_keys.push_back(k);
      new_values.push_back(v);
    }
    k = RepeatKv(k, H / KV);
    v = RepeatKv(v, H / KV);
    torch::Tensor scores = (torch::matmul(q, k.transpose(-1, -2)) * scale).to(torch::kFloat32);
    scores = scores.masked_fill(disallowed, lowest);
    torch::Tensor probs = torch::softmax(scores, -1).to(dtype_);
    torch::Tensor attn = torch::matmul(probs, v).transpose(1, 2).reshape({B, T, H * hd});
    h = h + Project(attn, l.o_proj, li, kOProj, hooks);

    x = RmsNorm(h, l.post_attention_layernorm, c.rms_norm_eps);
    if (hooks != nullptr) hooks->FfnInputReady(li, x, mask);
    torch::Tensor gate = torch::silu(Project(x, l.gate_proj, li, kGateProj, hooks));
    torch::Tensor up = Project(x, l.up_proj, li, kUpProj, hooks);
    torch::Tensor ffn = Project(gate * up, l.down_proj, li, kDownProj, hooks);
    if (hooks != nullptr) {
      torch::Tensor delta = hooks->FfnDelta(li, x, mask);
      if (delta.defined()) ffn = ffn + delta;
    }
    h = h + ffn;
  }
  h = RmsNorm(h, norm_, c.rms_norm_eps);
  torch::Tensor logits = torch::linear(h, lm_head_).to(torch::kFloat32);

  if (cache != nullptr) {
    cache->keys_ = std::move(new_keys);
    cache->values_ = std::move(new_values);
    cache->key_mask_ = key_mask;
    cache->num_real_ = num_real_before + mask.sum(1);
  }
  return logits;
}

int64_t LlamaModel::NumParameters() const {
  int64_t n = 0;
  for (const auto& [name, t] : NamedParameters()) n += t.numel();
  return n;
}

std::map<std::string, torch::Tensor> LlamaModel::NamedParameters() const {
  std::map<std::string, torch::Tensor> out;
  for (const LlamaTensorSpec& t : LlamaTensorSpecs(LlamaDimsOf(config_))) {
    out[t.name] = Slot(t);
  }
  return out;
}

torch::Tensor* LlamaModel::Slot(const LlamaTensorSpec& t) {
  using R = LlamaTensorRole;
  switch (t.role) {
    case R::kEmbedTokens:
      return &embed_tokens_;
    case R::kFinalNorm:
      return &norm_;
    case R::kLmHead:
      return &lm_head_;
    default:
      break;
  }
  Layer& l = layers_.at(static_cast<size_t>(t.layer));
  switch (t.role) {
    case R::kInputLayernorm:
      return &l.input_layernorm;
    case R::kQProj:
      return &l.q_proj;
    case R::kKProj:
      return &l.k_proj;
    case R::kVProj:
      return &l.v_proj;
    case R::kOProj:
      return &l.o_proj;
    case R::kPostAttentionLayernorm:
      return &l.post_attention_layernorm;
    case R::kGateProj:
      return &l.gate_proj;
    case R::kUpProj:
      return &l.up_proj;
    case R::kDownProj:
      return &l.down_proj;
    default:
      break;
  }
  TORCH_INTERNAL_ASSERT(false, "LlamaModel::Slot: unknown tensor role");
  return nullptr;
}

}  // namespace meft::worker
