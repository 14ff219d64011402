// Writes small valid seed inputs for the fuzzers into <out>/<target>/ (usage:
// make_fuzz_seeds tests/fuzz/corpus). The output is committed; rerun only when a format changes.

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "common/safetensors/safetensors.h"
#include "common/wire/tensor_codec.h"
#include "meft/v1/param_server.pb.h"

namespace {

namespace fs = std::filesystem;

void WriteSeed(const fs::path& dir, const std::string& name, const std::string& bytes) {
  fs::create_directories(dir);
  std::ofstream(dir / name, std::ios::binary) << bytes;
}

std::string Floats(int n, float scale) {
  std::vector<float> v(n);
  for (int i = 0; i < n; ++i) v[i] = scale * static_cast<float>((i * 7) % 11 - 5);
  std::string out;
  meft::wire::EncodeFloats(v, meft::wire::DType::kFp32, &out);
  return out;
}

std::string Bf16s(int n, float scale) {
  std::vector<float> v(n);
  for (int i = 0; i < n; ++i) v[i] = scale * static_cast<float>((i * 5) % 9 - 4);
  std::string out;
  meft::wire::EncodeFloats(v, meft::wire::DType::kBf16, &out);
  return out;
}

void SetTensor(meft::v1::Tensor* t, meft::v1::DType dtype, std::vector<int64_t> shape,
               std::string data) {
  t->set_dtype(dtype);
  for (int64_t d : shape) t->add_shape(d);
  t->set_data(std::move(data));
}

template <typename Message>
void WriteRequest(const fs::path& dir, const std::string& name, char kind, const Message& m) {
  WriteSeed(dir, name, std::string(1, kind) + m.SerializeAsString());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <corpus dir>\n", argv[0]);
    return 2;
  }
  const fs::path root = argv[1];

  // safetensors: written by our own writer, then read back as bytes.
  {
    const fs::path dir = root / "safetensors_fuzzer";
    const fs::path tmp = fs::temp_directory_path() / "meft_fuzz_seed.safetensors";
    const std::string a = Floats(6, 0.5f);
    const std::string b = "\x01\x02\x03\x04";
    const std::vector<meft::safetensors::TensorToWrite> tensors = {
        {"a", meft::safetensors::DType::kF32, {2, 3},
         {reinterpret_cast<const uint8_t*>(a.data()), a.size()}},
        {"b", meft::safetensors::DType::kU8, {4},
         {reinterpret_cast<const uint8_t*>(b.data()), b.size()}},
        {"empty", meft::safetensors::DType::kBF16, {0, 5}, {}},
    };
    for (const auto& [name, meta] :
         std::vector<std::pair<std::string, std::map<std::string, std::string>>>{
             {"two_tensors", {{"format", "pt"}}}, {"no_metadata", {}}}) {
      if (!meft::safetensors::Write(tmp.string(), tensors, meta).ok()) return 1;
      std::ifstream in(tmp, std::ios::binary);
      WriteSeed(dir, name, std::string(std::istreambuf_iterator<char>(in), {}));
    }
    if (!meft::safetensors::Write(tmp.string(), {}, {}).ok()) return 1;
    std::ifstream in(tmp, std::ios::binary);
    WriteSeed(dir, "empty", std::string(std::istreambuf_iterator<char>(in), {}));
    fs::remove(tmp);
  }

  // Wire codec: [dtype][rank][flags][dims][spec dims][data].
  {
    const fs::path dir = root / "tensor_codec_fuzzer";
    WriteSeed(dir, "fp32_2x3", std::string("\x00\x02\x00\x02\x03\x02\x80", 7) + Floats(6, 1.0f));
    WriteSeed(dir, "bf16_any", std::string("\x01\x01\x41\x04\x80", 5) + Bf16s(4, 2.0f));
    WriteSeed(dir, "int32_3", std::string("\x02\x01\x00\x03\x03", 5) +
                                  std::string("\x01\x00\x00\x00\xff\xff\xff\xff\x07\x00\x00\x80",
                                              12));
    WriteSeed(dir, "uint8_scalar", std::string("\x03\x00\x00\x2a", 4));
  }

  // Requests for a server with layers {0}, rows 64, dim 8, top_k 4.
  {
    const fs::path dir = root / "param_server_request_fuzzer";
    meft::v1::LookupRequest lookup;
    lookup.mutable_header()->set_layer(0);
    lookup.set_training(true);
    SetTensor(lookup.mutable_x(), meft::v1::DTYPE_FP32, {2, 8}, Floats(16, 0.25f));
    WriteRequest(dir, "lookup_train_fp32", 0, lookup);
    lookup.set_training(false);
    lookup.set_row_dtype(meft::v1::DTYPE_FP32);
    SetTensor(lookup.mutable_token_mask(), meft::v1::DTYPE_UINT8, {2}, std::string("\x01\x00", 2));
    WriteRequest(dir, "lookup_eval_mask", 0, lookup);
    lookup.Clear();
    lookup.mutable_header()->set_micro_step(1);
    lookup.set_training(true);
    SetTensor(lookup.mutable_x(), meft::v1::DTYPE_BF16, {3, 8}, Bf16s(24, 0.5f));
    WriteRequest(dir, "lookup_train_bf16", 0, lookup);

    meft::v1::GradientsRequest grads;
    grads.mutable_header()->set_layer(0);
    SetTensor(grads.mutable_key_grads(), meft::v1::DTYPE_FP32, {4, 8}, Floats(32, 0.01f));
    SetTensor(grads.mutable_value_grads(), meft::v1::DTYPE_FP32, {4, 8}, Floats(32, 0.02f));
    SetTensor(grads.mutable_gate_grads(), meft::v1::DTYPE_FP32, {2, 4}, Floats(8, 0.1f));
    WriteRequest(dir, "gradients_fp32", 1, grads);

    meft::v1::StepRequest step;
    step.set_step(0);
    step.set_lr(0.01);
    step.set_clip_factor(1.0);
    WriteRequest(dir, "step_all", 2, step);
    step.add_layers(0);
    step.set_step(1);
    WriteRequest(dir, "step_layer0", 2, step);
  }
  return 0;
}
