#include "gpu_worker/model/weights.h"

#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/io/file_util.h"
#include "common/safetensors/safetensors.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace meft::worker {
namespace {

using json = nlohmann::json;
namespace st = ::meft::safetensors;

constexpr char kSingleFile[] = "model.safetensors";
constexpr char kIndexFile[] = "model.safetensors.index.json";

std::optional<torch::ScalarType> TorchType(st::DType dtype) {
  switch (dtype) {
    case st::DType::kF32:
      return torch::kFloat32;
    case st::DType::kBF16:
      return torch::kBFloat16;
    case st::DType::kF16:
      return torch::kFloat16;
    default:
      return std::nullopt;
  }
}

// Copies one tensor out of the mapping and converts it to `dtype`. Assumes a little-endian host,
// like the safetensors format itself.
absl::StatusOr<torch::Tensor> ReadTensor(const st::File& file, const st::TensorInfo& info,
                                         torch::ScalarType dtype) {
  std::optional<torch::ScalarType> stored = TorchType(info.dtype);
  if (!stored) {
    const std::string_view name = st::DTypeName(info.dtype);
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors file '", file.path(), "': tensor '", info.name, "': dtype ",
                     std::string(name), " is not supported for model weights (F32, BF16 or F16)"));
  }
  MEFT_ASSIGN_OR_RETURN(std::span<const uint8_t> bytes, file.Data(info.name));
  try {
    // A fresh, aligned tensor: the mapping's bytes need not be aligned, and the result must not
    // point into the mapping, which closes when the File goes away.
    torch::Tensor raw = torch::empty(info.shape, torch::TensorOptions().dtype(*stored));
    if (!bytes.empty()) std::memcpy(raw.data_ptr(), bytes.data(), bytes.size());
    if (*stored == dtype) return raw;
    return raw.to(dtype);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat("safetensors file '", file.path(),
                                                     "': tensor '", info.name,
                                                     "': out of memory while loading"));
  } catch (const std::exception& e) {
    return absl::InternalError(
        absl::StrCat("safetensors file '", file.path(), "': tensor '", info.name, "': ", e.what()));
  }
}

absl::Status LoadSingleFile(const std::string& path, torch::ScalarType dtype,
                            std::map<std::string, torch::Tensor>* out, WeightSources* sources) {
  MEFT_ASSIGN_OR_RETURN(std::unique_ptr<st::File> file, st::File::Open(path));
  for (const st::TensorInfo& info : file->tensors()) {
    MEFT_ASSIGN_OR_RETURN(torch::Tensor t, ReadTensor(*file, info, dtype));
    (*out)[info.name] = std::move(t);
    if (sources != nullptr) (*sources)[info.name] = path;
  }
  return absl::OkStatus();
}

absl::Status IndexError(const std::string& index_path, const std::string& message) {
  return absl::InvalidArgumentError(absl::StrCat("weight index '", index_path, "': ", message));
}

// Shard file name -> the tensors the index assigns to it.
absl::StatusOr<std::map<std::string, std::set<std::string>>> ParseIndex(
    const std::string& index_path) {
  MEFT_ASSIGN_OR_RETURN(std::string text, io::ReadFile(index_path));
  json root = json::parse(text, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) return IndexError(index_path, "not valid JSON");
  if (!root.is_object()) return IndexError(index_path, "must be a JSON object");
  auto map_it = root.find("weight_map");
  if (map_it == root.end()) return IndexError(index_path, "missing \"weight_map\"");
  if (!map_it->is_object()) return IndexError(index_path, "\"weight_map\" must be an object");
  std::map<std::string, std::set<std::string>> shards;
  for (auto it = map_it->begin(); it != map_it->end(); ++it) {
    if (!it.value().is_string()) {
      return IndexError(index_path, absl::StrCat("weight_map entry for tensor '", it.key(),
                                                 "' must be a file name string"));
    }
    const std::string shard = it.value().get<std::string>();
    // Shards live in the model folder itself; refuse anything that could point elsewhere.
    if (shard.empty() || shard == "." || shard == ".." || shard.find('/') != std::string::npos) {
      return IndexError(index_path,
                        absl::StrCat("weight_map entry for tensor '", it.key(), "': shard '", shard,
                                     "' is not a file name inside the model folder"));
    }
    shards[shard].insert(it.key());
  }
  if (shards.empty()) return IndexError(index_path, "\"weight_map\" is empty");
  return shards;
}

absl::Status LoadSharded(const std::string& model_dir, const std::string& index_path,
                         torch::ScalarType dtype, std::map<std::string, torch::Tensor>* out,
                         WeightSources* sources) {
  MEFT_ASSIGN_OR_RETURN(auto shards, ParseIndex(index_path));
  // All shards must exist before any is read: a missing shard is the likelier mistake.
  for (const auto& [shard, names] : shards) {
    const std::string shard_path = absl::StrCat(model_dir, "/", shard);
    if (!io::PathExists(shard_path)) {
      return absl::NotFoundError(absl::StrCat("weight index '", index_path, "': shard '", shard,
                                              "' (listed for tensor '", *names.begin(),
                                              "') does not exist at '", shard_path, "'"));
    }
  }
  for (const auto& [shard, names] : shards) {
    const std::string shard_path = absl::StrCat(model_dir, "/", shard);
    absl::StatusOr<std::unique_ptr<st::File>> opened = st::File::Open(shard_path);
    if (!opened.ok()) {
      return absl::Status(opened.status().code(),
                          absl::StrCat("weight index '", index_path, "': shard '", shard,
                                       "': ", opened.status().message()));
    }
    const st::File& file = **opened;
    for (const std::string& name : names) {
      if (file.Find(name) == nullptr) {
        return absl::NotFoundError(absl::StrCat("weight index '", index_path, "': tensor '", name,
                                                "' is mapped to shard '", shard,
                                                "' but that shard has no such tensor"));
      }
    }
    for (const st::TensorInfo& info : file.tensors()) {
      if (names.count(info.name) == 0) {
        return IndexError(index_path,
                          absl::StrCat("shard '", shard, "' holds tensor '", info.name,
                                       "', which the weight_map does not assign to that shard"));
      }
      MEFT_ASSIGN_OR_RETURN(torch::Tensor t, ReadTensor(file, info, dtype));
      (*out)[info.name] = std::move(t);
      if (sources != nullptr) (*sources)[info.name] = shard_path;
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::map<std::string, torch::Tensor>> LoadWeights(const std::string& model_dir,
                                                                 torch::ScalarType dtype,
                                                                 WeightSources* sources) {
  if (dtype != torch::kFloat32 && dtype != torch::kBFloat16 && dtype != torch::kFloat16) {
    return absl::InvalidArgumentError(
        absl::StrCat("model '", model_dir,
                     "': weights can be loaded as float32, bfloat16 or "
                     "float16, not ",
                     std::string(c10::toString(dtype))));
  }
  std::map<std::string, torch::Tensor> weights;
  if (sources != nullptr) sources->clear();
  const std::string single = absl::StrCat(model_dir, "/", kSingleFile);
  const std::string index = absl::StrCat(model_dir, "/", kIndexFile);
  if (io::PathExists(single)) {
    MEFT_RETURN_IF_ERROR(LoadSingleFile(single, dtype, &weights, sources));
  } else if (io::PathExists(index)) {
    MEFT_RETURN_IF_ERROR(LoadSharded(model_dir, index, dtype, &weights, sources));
  } else {
    return absl::NotFoundError(absl::StrCat("model '", model_dir, "': neither ", kSingleFile,
                                            " nor ", kIndexFile, " exists"));
  }
  return weights;
}

}  // namespace meft::worker
