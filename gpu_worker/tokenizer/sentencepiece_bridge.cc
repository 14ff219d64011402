#include "gpu_worker/tokenizer/sentencepiece_bridge.h"

#include <dlfcn.h>
#include <unistd.h>

#include <climits>

#include "gpu_worker/tokenizer/sentencepiece_shim.h"

namespace meft::worker::spm_bridge {
namespace {

constexpr char kModuleName[] = "libmeft_spm_shim.so";

// The loaded module, or why it could not be loaded.
struct Module {
  const MeftSpmApi* api = nullptr;
  std::string error;
};

std::string ExecutableDirectory() {
  char buffer[PATH_MAX];
  const ssize_t n = ::readlink("/proc/self/exe", buffer, sizeof(buffer) - 1);
  if (n <= 0) return "";
  const std::string path(buffer, static_cast<size_t>(n));
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? "" : path.substr(0, slash);
}

Module LoadModule() {
  std::vector<std::string> candidates;
  const std::string exe_dir = ExecutableDirectory();
  if (!exe_dir.empty()) {
    candidates.push_back(exe_dir + "/" + kModuleName);
    candidates.push_back(exe_dir + "/../lib/" + kModuleName);
  }
#ifdef MEFT_SPM_SHIM_PATH
  candidates.push_back(MEFT_SPM_SHIM_PATH);
#endif
  candidates.push_back(kModuleName);

  Module module;
  std::string tried;
  for (const std::string& candidate : candidates) {
    // A path with a '/' is opened as is; skip those that do not exist so that the message lists
    // only real failures.
    if (candidate.find('/') != std::string::npos && ::access(candidate.c_str(), F_OK) != 0) {
      tried += "\n  " + candidate + ": no such file";
      continue;
    }
    // RTLD_LOCAL keeps SentencePiece's bundled protobuf symbols out of the global scope;
    // RTLD_DEEPBIND makes SentencePiece bind to them rather than to the system libprotobuf.
    void* handle = ::dlopen(candidate.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
    if (handle == nullptr) {
      const char* why = ::dlerror();
      tried += "\n  " + candidate + ": " + (why != nullptr ? why : "dlopen failed");
      continue;
    }
    auto entry = reinterpret_cast<MeftSpmShimApiFn>(::dlsym(handle, "meft_spm_shim_api"));
    const MeftSpmApi* api = entry != nullptr ? entry() : nullptr;
    if (api == nullptr || api->abi_version != MEFT_SPM_SHIM_ABI_VERSION) {
      tried += "\n  " + candidate + ": not a compatible " + kModuleName;
      ::dlclose(handle);
      continue;
    }
    module.api = api;  // The module stays loaded for the life of the process.
    return module;
  }
  module.error =
      std::string("cannot load the SentencePiece module ") + kModuleName + "; tried:" + tried;
  return module;
}

const Module& GetModule() {
  static const Module module = LoadModule();  // Thread-safe one-time initialisation.
  return module;
}

const MeftSpmApi& Api() { return *GetModule().api; }

void AppendBytes(void* context, const char* data, size_t size) {
  static_cast<std::string*>(context)->append(data, size);
}

void AssignIds(void* context, const int* ids, size_t count) {
  static_cast<std::vector<int>*>(context)->assign(ids, ids + count);
}

// Collects the module's error message.
struct ErrorCollector {
  std::string message;
  MeftSpmError sink() { return MeftSpmError{AppendBytes, &message}; }
  std::string Result(int rc) {
    if (rc == 0) return "";
    return message.empty() ? std::string("SentencePiece failed") : message;
  }
};

}  // namespace

Processor::Processor() = default;

Processor::~Processor() {
  if (handle_ != nullptr) Api().destroy(handle_);
}

std::string Processor::LoadFromSerialized(std::string_view serialized) {
  const Module& module = GetModule();
  if (module.api == nullptr) return module.error;
  if (handle_ != nullptr) return "model already loaded";
  void* handle = module.api->create();
  if (handle == nullptr) return "out of memory creating a SentencePiece processor";
  ErrorCollector error;
  const int rc = module.api->load(handle, serialized.data(), serialized.size(), error.sink());
  if (rc != 0) {
    module.api->destroy(handle);
    return error.Result(rc);
  }
  handle_ = handle;
  return "";
}

std::string Processor::Encode(std::string_view text, std::vector<int>* ids) const {
  ids->clear();
  ErrorCollector error;
  return error.Result(
      Api().encode(handle_, text.data(), text.size(), AssignIds, ids, error.sink()));
}

std::string Processor::Decode(const std::vector<int>& ids, std::string* text) const {
  text->clear();
  ErrorCollector error;
  return error.Result(
      Api().decode(handle_, ids.data(), ids.size(), AppendBytes, text, error.sink()));
}

int Processor::piece_size() const { return Api().piece_size(handle_); }
int Processor::unk_id() const { return Api().special_id(handle_, kMeftSpmUnk); }
int Processor::bos_id() const { return Api().special_id(handle_, kMeftSpmBos); }
int Processor::eos_id() const { return Api().special_id(handle_, kMeftSpmEos); }
int Processor::pad_id() const { return Api().special_id(handle_, kMeftSpmPad); }

std::string Processor::IdToPiece(int id) const {
  std::string piece;
  Api().id_to_piece(handle_, id, AppendBytes, &piece);
  return piece;
}

std::string Train(const std::vector<std::pair<std::string, std::string>>& options,
                  const std::vector<std::string>& sentences, uint32_t seed,
                  std::string* serialized_model) {
  const Module& module = GetModule();
  if (module.api == nullptr) return module.error;
  std::vector<const char*> keys;
  std::vector<const char*> values;
  for (const auto& [key, value] : options) {
    keys.push_back(key.c_str());
    values.push_back(value.c_str());
  }
  std::vector<const char*> data;
  std::vector<size_t> sizes;
  for (const std::string& sentence : sentences) {
    data.push_back(sentence.data());
    sizes.push_back(sentence.size());
  }
  serialized_model->clear();
  ErrorCollector error;
  return error.Result(module.api->train(keys.data(), values.data(), keys.size(), data.data(),
                                        sizes.data(), data.size(), seed, AppendBytes,
                                        serialized_model, error.sink()));
}

}  // namespace meft::worker::spm_bridge
