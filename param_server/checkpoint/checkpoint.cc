#include "param_server/checkpoint/checkpoint.h"

#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <new>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/io/file_util.h"
#include "common/safetensors/safetensors.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace meft::checkpoint {
namespace {

using nlohmann::json;
namespace st = ::meft::safetensors;

std::span<const uint8_t> Bytes(const std::vector<float>& v) {
  return {reinterpret_cast<const uint8_t*>(v.data()), v.size() * sizeof(float)};
}
std::span<const uint8_t> Bytes(const int64_t& v) {
  return {reinterpret_cast<const uint8_t*>(&v), sizeof(v)};
}

std::string TensorName(uint32_t layer, absl::string_view block, absl::string_view suffix = "") {
  return absl::StrCat("layers.", layer, ".", block, suffix.empty() ? "" : ".", suffix);
}

json ConfigToJson(const AdapterConfig& c) {
  return json{{"format", "meft-adapter"},
              {"format_version", 1},
              {"rows", c.rows},
              {"dim", c.dim},
              {"experts", c.experts},
              {"n_probe", c.n_probe},
              {"top_k", c.top_k},
              {"max_rows", c.max_rows},
              {"mode", c.mode},
              {"gated", c.gated},
              {"layers", c.layers},
              {"seed", c.seed},
              {"router_init", c.router_init},
              {"beta1", c.beta1},
              {"beta2", c.beta2},
              {"eps", c.eps},
              {"weight_decay", c.weight_decay}};
}

// Reads key `key` of object `j` into `out`, naming file and key on error.
template <typename T>
absl::Status Field(const json& j, const std::string& file, const char* key, T* out) {
  auto it = j.find(key);
  if (it == j.end()) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": missing field \"", key, "\""));
  }
  bool ok;
  if constexpr (std::is_same_v<T, bool>) {
    ok = it->is_boolean();
  } else if constexpr (std::is_same_v<T, std::string>) {
    ok = it->is_string();
  } else if constexpr (std::is_floating_point_v<T>) {
    ok = it->is_number();
  } else if constexpr (std::is_unsigned_v<T>) {
    ok = it->is_number_unsigned();
  } else if constexpr (std::is_integral_v<T>) {
    ok = it->is_number_integer();
  } else {
    ok = it->is_array();
    if (ok) {
      for (const auto& e : *it)
        ok = ok && e.is_number_unsigned() && e.get<uint64_t>() <= UINT32_MAX;
    }
  }
  if (!ok) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": field \"", key, "\" has the wrong type: ", it->dump()));
  }
  *out = it->get<T>();
  return absl::OkStatus();
}

absl::StatusOr<json> ParseJsonFile(const std::string& path) {
  MEFT_ASSIGN_OR_RETURN(std::string text, io::ReadFile(path));
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  }
  return j;
}

absl::StatusOr<AdapterConfig> ReadConfigFile(const std::string& path) {
  MEFT_ASSIGN_OR_RETURN(json j, ParseJsonFile(path));
  std::string format;
  MEFT_RETURN_IF_ERROR(Field(j, path, "format", &format));
  if (format != "meft-adapter") {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": field \"format\" is \"", format, "\", expected \"meft-adapter\""));
  }
  AdapterConfig c;
  MEFT_RETURN_IF_ERROR(Field(j, path, "rows", &c.rows));
  MEFT_RETURN_IF_ERROR(Field(j, path, "dim", &c.dim));
  MEFT_RETURN_IF_ERROR(Field(j, path, "experts", &c.experts));
  MEFT_RETURN_IF_ERROR(Field(j, path, "n_probe", &c.n_probe));
  MEFT_RETURN_IF_ERROR(Field(j, path, "top_k", &c.top_k));
  MEFT_RETURN_IF_ERROR(Field(j, path, "max_rows", &c.max_rows));
  MEFT_RETURN_IF_ERROR(Field(j, path, "mode", &c.mode));
  MEFT_RETURN_IF_ERROR(Field(j, path, "gated", &c.gated));
  MEFT_RETURN_IF_ERROR(Field(j, path, "layers", &c.layers));
  MEFT_RETURN_IF_ERROR(Field(j, path, "seed", &c.seed));
  MEFT_RETURN_IF_ERROR(Field(j, path, "router_init", &c.router_init));
  MEFT_RETURN_IF_ERROR(Field(j, path, "beta1", &c.beta1));
  MEFT_RETURN_IF_ERROR(Field(j, path, "beta2", &c.beta2));
  MEFT_RETURN_IF_ERROR(Field(j, path, "eps", &c.eps));
  MEFT_RETURN_IF_ERROR(Field(j, path, "weight_decay", &c.weight_decay));
  if (c.rows <= 0 || c.dim <= 0 || c.experts <= 0 || c.rows % c.experts != 0 ||
      c.rows > INT32_MAX) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": fields \"rows\" (", c.rows, "), \"dim\" (", c.dim, ") and \"experts\" (",
        c.experts, ") must be positive with experts dividing rows"));
  }
  if (c.layers.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": field \"layers\" is empty"));
  }
  return c;
}

// Copies tensor `name` of `file` (fp32, `shape`) into `out`.
absl::Status ReadFloats(const st::File& file, const std::string& name,
                        const std::vector<int64_t>& shape, std::vector<float>* out) {
  MEFT_RETURN_IF_ERROR(file.CheckTensor(name, st::DType::kF32, shape));
  MEFT_ASSIGN_OR_RETURN(auto data, file.Data(name));
  out->resize(data.size() / sizeof(float));
  std::memcpy(out->data(), data.data(), data.size());
  return absl::OkStatus();
}

absl::StatusOr<int64_t> ReadStep(const st::File& file, const std::string& name) {
  MEFT_RETURN_IF_ERROR(file.CheckTensor(name, st::DType::kI64, {}));
  MEFT_ASSIGN_OR_RETURN(auto data, file.Data(name));
  int64_t v;
  std::memcpy(&v, data.data(), sizeof(v));
  if (v < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(file.path(), ": tensor \"", name, "\" is negative (", v, ")"));
  }
  return v;
}

}  // namespace

absl::StatusOr<AdapterConfig> ReadConfig(const std::string& dir) {
  return ReadConfigFile(absl::StrCat(dir, "/", kConfigFile));
}

std::string CheckpointName(uint64_t step) { return absl::StrCat("checkpoint-", step); }

namespace {

// Removes checkpoint-<step>.tmp-<pid> folders left by processes that died while writing.
absl::Status RemoveAbandonedTemporaries(const std::string& root) {
  MEFT_ASSIGN_OR_RETURN(std::vector<std::string> names, io::ListDirectory(root));
  for (const std::string& name : names) {
    const size_t at = name.rfind(".tmp-");
    if (name.rfind("checkpoint-", 0) != 0 || at == std::string::npos) continue;
    int pid;
    if (!absl::SimpleAtoi(name.substr(at + 5), &pid) || pid == ::getpid()) continue;
    if (::kill(pid, 0) == 0 || errno != ESRCH) continue;  // its writer may still be running
    MEFT_RETURN_IF_ERROR(io::RemoveAll(absl::StrCat(root, "/", name)));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<uint64_t> Write(const std::string& root, uint64_t step, const AdapterConfig& config,
                               const std::vector<const store::LayerStore*>& layers,
                               const WriteOptions& options) {
  MEFT_RETURN_IF_ERROR(io::CreateDirectories(root));
  MEFT_RETURN_IF_ERROR(RemoveAbandonedTemporaries(root));
  const std::string final_dir = absl::StrCat(root, "/", CheckpointName(step));
  const std::string tmp_dir = absl::StrCat(final_dir, ".tmp-", ::getpid());
  MEFT_RETURN_IF_ERROR(io::RemoveAll(tmp_dir));
  MEFT_RETURN_IF_ERROR(io::CreateDirectories(tmp_dir));
  auto stage = [&](absl::string_view name) {
    if (options.on_stage) options.on_stage(name);
  };
  uint64_t bytes = 0;

  std::vector<st::TensorToWrite> model;
  std::vector<st::TensorToWrite> optimizer;
  std::vector<int64_t> steps;
  steps.reserve(layers.size() * 3);
  for (const store::LayerStore* layer : layers) {
    const std::pair<absl::string_view, const store::ParamBlock*> blocks[] = {
        {"keys", &layer->keys}, {"values", &layer->values}, {"router", &layer->router}};
    for (const auto& [name, block] : blocks) {
      const std::vector<int64_t> shape = {block->rows, block->dim};
      model.push_back(
          {TensorName(layer->layer, name), st::DType::kF32, shape, Bytes(block->param)});
      optimizer.push_back({TensorName(layer->layer, name, "exp_avg"), st::DType::kF32, shape,
                           Bytes(block->exp_avg)});
      optimizer.push_back({TensorName(layer->layer, name, "exp_avg_sq"), st::DType::kF32, shape,
                           Bytes(block->exp_avg_sq)});
      steps.push_back(block->adam_step);
      optimizer.push_back(
          {TensorName(layer->layer, name, "step"), st::DType::kI64, {}, Bytes(steps.back())});
    }
  }
  const std::map<std::string, std::string> meta = {{"format", "meft-adapter"},
                                                   {"step", absl::StrCat(step)}};
  MEFT_ASSIGN_OR_RETURN(uint64_t n, st::Write(absl::StrCat(tmp_dir, "/", kModelFile), model, meta));
  bytes += n;
  stage(kModelFile);
  MEFT_ASSIGN_OR_RETURN(n, st::Write(absl::StrCat(tmp_dir, "/", kOptimizerFile), optimizer, meta));
  bytes += n;
  stage(kOptimizerFile);

  const std::string config_text = ConfigToJson(config).dump(2) + "\n";
  MEFT_RETURN_IF_ERROR(
      io::WriteFileDurably(absl::StrCat(tmp_dir, "/", kConfigFile), {config_text}));
  bytes += config_text.size();
  stage(kConfigFile);
  const std::string state_text =
      json{{"global_step", step}, {"writer", "meft-param-server"}}.dump(2) + "\n";
  MEFT_RETURN_IF_ERROR(io::WriteFileDurably(absl::StrCat(tmp_dir, "/", kStateFile), {state_text}));
  bytes += state_text.size();
  stage(kStateFile);

  MEFT_RETURN_IF_ERROR(io::FsyncDirectory(tmp_dir));
  stage("rename");
  MEFT_RETURN_IF_ERROR(io::ReplaceDirectoryAtomically(tmp_dir, final_dir));
  return bytes;
}

namespace {

// adapter_config.json and the step of trainer_state.json.
absl::Status ReadConfigAndStep(const std::string& dir, AdapterConfig* config, uint64_t* step) {
  MEFT_ASSIGN_OR_RETURN(*config, ReadConfigFile(absl::StrCat(dir, "/", kConfigFile)));
  const std::string state_path = absl::StrCat(dir, "/", kStateFile);
  MEFT_ASSIGN_OR_RETURN(json state, ParseJsonFile(state_path));
  return Field(state, state_path, "global_step", step);
}

absl::StatusOr<Loaded> ReadOrThrow(const std::string& dir) {
  Loaded out;
  MEFT_RETURN_IF_ERROR(ReadConfigAndStep(dir, &out.config, &out.step));

  MEFT_ASSIGN_OR_RETURN(auto model, st::File::Open(absl::StrCat(dir, "/", kModelFile)));
  MEFT_ASSIGN_OR_RETURN(auto optimizer, st::File::Open(absl::StrCat(dir, "/", kOptimizerFile)));
  const AdapterConfig& c = out.config;
  for (uint32_t l : c.layers) {
    store::LayerStore layer;
    layer.layer = l;
    layer.rows = c.rows;
    layer.dim = c.dim;
    layer.experts = c.experts;
    layer.rows_per_expert = c.rows / c.experts;
    layer.step = out.step;
    const std::pair<absl::string_view, store::ParamBlock*> blocks[] = {
        {"keys", &layer.keys}, {"values", &layer.values}, {"router", &layer.router}};
    for (const auto& [name, block] : blocks) {
      const int64_t rows = name == "router" ? c.experts : c.rows;
      block->Allocate(rows, c.dim);
      const std::vector<int64_t> shape = {rows, c.dim};
      MEFT_RETURN_IF_ERROR(ReadFloats(*model, TensorName(l, name), shape, &block->param));
      MEFT_RETURN_IF_ERROR(
          ReadFloats(*optimizer, TensorName(l, name, "exp_avg"), shape, &block->exp_avg));
      MEFT_RETURN_IF_ERROR(
          ReadFloats(*optimizer, TensorName(l, name, "exp_avg_sq"), shape, &block->exp_avg_sq));
      MEFT_ASSIGN_OR_RETURN(block->adam_step, ReadStep(*optimizer, TensorName(l, name, "step")));
    }
    out.layers.push_back(std::move(layer));
  }
  return out;
}

}  // namespace

absl::StatusOr<Loaded> Read(const std::string& dir) {
  try {
    return ReadOrThrow(dir);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        absl::StrCat(dir, ": out of host memory reading the checkpoint (it is read whole before "
                          "it replaces the store, which stays as it was)"));
  }
}

absl::StatusOr<ParameterView> OpenParameters(const std::string& dir) {
  ParameterView out;
  MEFT_RETURN_IF_ERROR(ReadConfigAndStep(dir, &out.config, &out.step));
  MEFT_ASSIGN_OR_RETURN(out.model, st::File::Open(absl::StrCat(dir, "/", kModelFile)));
  const AdapterConfig& c = out.config;
  for (uint32_t l : c.layers) {
    ParameterView::Layer layer{.layer = l};
    const std::pair<absl::string_view, std::span<const uint8_t>*> blocks[] = {
        {"keys", &layer.keys}, {"values", &layer.values}, {"router", &layer.router}};
    for (const auto& [name, span] : blocks) {
      const int64_t rows = name == "router" ? c.experts : c.rows;
      const std::string tensor = TensorName(l, name);
      MEFT_RETURN_IF_ERROR(out.model->CheckTensor(tensor, st::DType::kF32, {rows, c.dim}));
      MEFT_ASSIGN_OR_RETURN(*span, out.model->Data(tensor));
    }
    out.layers.push_back(layer);
  }
  return out;
}

absl::StatusOr<std::string> FindLatest(const std::string& root) {
  MEFT_ASSIGN_OR_RETURN(std::vector<std::string> names, io::ListDirectory(root));
  bool found = false;
  uint64_t best = 0;
  for (const std::string& name : names) {
    const std::string kPrefix = "checkpoint-";
    if (name.rfind(kPrefix, 0) != 0) continue;
    uint64_t step;
    if (!absl::SimpleAtoi(name.substr(kPrefix.size()), &step)) continue;
    if (CheckpointName(step) != name) continue;  // "checkpoint-007", "checkpoint-3.tmp-12"
    const std::string dir = absl::StrCat(root, "/", name);
    bool complete = true;
    for (absl::string_view f : {kConfigFile, kModelFile, kOptimizerFile, kStateFile}) {
      complete = complete && io::PathExists(absl::StrCat(dir, "/", f));
    }
    if (complete && (!found || step > best)) {
      best = step;
      found = true;
    }
  }
  if (!found) {
    return absl::NotFoundError(absl::StrCat(root, ": no complete checkpoint-<step> folder"));
  }
  return absl::StrCat(root, "/", CheckpointName(best));
}

}  // namespace meft::checkpoint
