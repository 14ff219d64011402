// libmeft_spm_shim.so: the only code that includes SentencePiece's headers or links its
// libraries (see sentencepiece_shim.h for why). It must include no abseil header either:
// SentencePiece 0.1.x declares `namespace absl { using std::string_view; }`, which collides with
// Debian's abseil. Built with hidden visibility; only meft_spm_shim_api is exported.
#include "gpu_worker/tokenizer/sentencepiece_shim.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <exception>
#include <new>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace sentencepiece::logging {
// Exported by libsentencepiece; declared in its internal common.h, not in the public headers.
void SetMinLogLevel(int v);
}  // namespace sentencepiece::logging

namespace {

using sentencepiece::SentencePieceProcessor;

// SentencePiece's log levels are INFO 0, WARNING 1, ERROR 2, FATAL 3. Under RTLD_DEEPBIND its
// references to std::cerr bind to libstdc++'s own, never-constructed std::cerr whenever the
// executable holds a copy-relocated std::cerr (any PIE that uses std::cerr does), so any log line
// would crash. Only FATAL stays enabled, and it aborts anyway. Errors still come back as Status.
constexpr int kSilentLogLevel = 3;

void Report(MeftSpmError error, std::string_view message) {
  if (error.sink != nullptr) error.sink(error.context, message.data(), message.size());
}

int Check(const sentencepiece::util::Status& status, MeftSpmError error) {
  if (status.ok()) return 0;
  std::string message = status.ToString();
  if (message.empty()) message = "unknown SentencePiece error";
  Report(error, message);
  return 1;
}

const SentencePieceProcessor* Sp(const void* processor) {
  return static_cast<const SentencePieceProcessor*>(processor);
}

// Feeds an in-memory list of sentences to the trainer.
class SentenceList : public sentencepiece::SentenceIterator {
 public:
  explicit SentenceList(const std::vector<std::string>& sentences) : sentences_(sentences) {}
  bool done() const override { return next_ >= sentences_.size(); }
  void Next() override { ++next_; }
  const std::string& value() const override { return sentences_[next_]; }
  sentencepiece::util::Status status() const override { return sentencepiece::util::Status(); }

 private:
  const std::vector<std::string>& sentences_;
  size_t next_ = 0;
};

void* Create() { return new (std::nothrow) SentencePieceProcessor(); }

void Destroy(void* processor) { delete static_cast<SentencePieceProcessor*>(processor); }

int Load(void* processor, const char* data, size_t size, MeftSpmError error) {
  try {
    return Check(static_cast<SentencePieceProcessor*>(processor)->LoadFromSerializedProto(
                     std::string_view(data, size)),
                 error);
  } catch (const std::exception& e) {
    Report(error, e.what());
    return 1;
  }
}

int Encode(const void* processor, const char* text, size_t size, MeftSpmIdsSink out,
           void* out_context, MeftSpmError error) {
  try {
    std::vector<int> ids;
    if (Check(Sp(processor)->Encode(std::string_view(text, size), &ids), error) != 0) return 1;
    out(out_context, ids.data(), ids.size());
    return 0;
  } catch (const std::exception& e) {
    Report(error, e.what());
    return 1;
  }
}

int Decode(const void* processor, const int* ids, size_t count, MeftSpmBytesSink out,
           void* out_context, MeftSpmError error) {
  try {
    std::string text;
    if (Check(Sp(processor)->Decode(std::vector<int>(ids, ids + count), &text), error) != 0) {
      return 1;
    }
    out(out_context, text.data(), text.size());
    return 0;
  } catch (const std::exception& e) {
    Report(error, e.what());
    return 1;
  }
}

int PieceSize(const void* processor) { return Sp(processor)->GetPieceSize(); }

int SpecialId(const void* processor, int which) {
  switch (which) {
    case kMeftSpmUnk:
      return Sp(processor)->unk_id();
    case kMeftSpmBos:
      return Sp(processor)->bos_id();
    case kMeftSpmEos:
      return Sp(processor)->eos_id();
    case kMeftSpmPad:
      return Sp(processor)->pad_id();
  }
  return -1;
}

void IdToPiece(const void* processor, int id, MeftSpmBytesSink out, void* out_context) {
  try {
    const std::string piece = Sp(processor)->IdToPiece(id);
    out(out_context, piece.data(), piece.size());
  } catch (const std::exception&) {
    out(out_context, "", 0);
  }
}

int Train(const char* const* keys, const char* const* values, size_t option_count,
          const char* const* sentences, const size_t* sentence_sizes, size_t sentence_count,
          uint32_t seed, MeftSpmBytesSink model_out, void* model_context, MeftSpmError error) {
  try {
    std::unordered_map<std::string, std::string> kwargs;
    for (size_t i = 0; i < option_count; ++i) kwargs[keys[i]] = values[i];
    kwargs["minloglevel"] = std::to_string(kSilentLogLevel);
    std::vector<std::string> list;
    list.reserve(sentence_count);
    for (size_t i = 0; i < sentence_count; ++i) list.emplace_back(sentences[i], sentence_sizes[i]);
    sentencepiece::SetRandomGeneratorSeed(seed);
    SentenceList iterator(list);
    std::string model;
    if (Check(sentencepiece::SentencePieceTrainer::Train(kwargs, &iterator, &model), error) != 0) {
      return 1;
    }
    model_out(model_context, model.data(), model.size());
    return 0;
  } catch (const std::exception& e) {
    Report(error, e.what());
    return 1;
  }
}

constexpr MeftSpmApi kApi = {
    .abi_version = MEFT_SPM_SHIM_ABI_VERSION,
    .create = Create,
    .destroy = Destroy,
    .load = Load,
    .encode = Encode,
    .decode = Decode,
    .piece_size = PieceSize,
    .special_id = SpecialId,
    .id_to_piece = IdToPiece,
    .train = Train,
};

}  // namespace

extern "C" __attribute__((visibility("default"))) const MeftSpmApi* meft_spm_shim_api(void) {
  static const bool silenced = [] {
    sentencepiece::logging::SetMinLogLevel(kSilentLogLevel);
    return true;
  }();
  (void)silenced;
  return &kApi;
}
