// Fuzzes the wire codec: CheckTensor against a fuzzed spec, then DecodeFloats / DecodeInt32 on
// whatever it accepts, and the round trips Decode -> Encode (bit-exact) and FloatToBf16 against
// a reference round-to-nearest-even on every 4-byte word of the input.
//
// Input layout: [dtype][rank][spec flags][rank x dim byte][spec dims...][data...]; dims are small
// so accepted tensors are common, and a dim byte of 0xff becomes a huge value to probe overflow.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/wire/tensor_codec.h"

namespace {

using meft::wire::DType;

[[noreturn]] void Fail(const char* what) {
  std::fprintf(stderr, "tensor_codec_fuzzer: %s\n", what);
  std::abort();
}

class Reader {
 public:
  Reader(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  uint8_t Byte() {
    if (pos_ >= size_) return 0;
    return data_[pos_++];
  }
  absl::string_view Rest() const {
    return absl::string_view(reinterpret_cast<const char*>(data_) + pos_, size_ - pos_);
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

int64_t Dim(uint8_t b) {
  if (b == 0xff) return int64_t{1} << 62;
  if (b == 0xfe) return -5;
  return b % 17;
}

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Textbook fp32 -> bf16, round to nearest even; NaN -> quiet NaN with the sign kept.
uint16_t ReferenceBf16(uint32_t bits) {
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  const uint64_t rounded = uint64_t{bits} + 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(rounded >> 16);
}

void CheckBf16(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  const uint16_t b = meft::wire::FloatToBf16(f);
  if (b != ReferenceBf16(bits)) Fail("FloatToBf16 differs from round-to-nearest-even");
  const float back = meft::wire::Bf16ToFloat(b);
  if (std::isnan(f) != std::isnan(back)) Fail("NaN not preserved by bf16");
  if (std::isinf(f) && back != f) Fail("infinity not preserved by bf16");
  if (!std::isnan(back) && meft::wire::FloatToBf16(back) != b) Fail("bf16 round trip unstable");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  for (size_t i = 0; i + 4 <= size; i += 4) {
    uint32_t bits;
    std::memcpy(&bits, data + i, 4);
    CheckBf16(bits);
  }

  Reader in(data, size);
  static constexpr DType kTypes[] = {DType::kFp32, DType::kBf16, DType::kInt32, DType::kUint8};
  meft::wire::TensorView tensor;
  tensor.dtype = kTypes[in.Byte() % 4];
  const int rank = in.Byte() % 5;
  const uint8_t flags = in.Byte();
  for (int i = 0; i < rank; ++i) tensor.shape.push_back(Dim(in.Byte()));
  meft::wire::TensorSpec spec;
  spec.dtypes = (flags & 1) ? std::vector<DType>{DType::kFp32, DType::kBf16}
                            : std::vector<DType>{tensor.dtype};
  const int spec_rank = (flags & 2) ? (rank + 1) % 5 : rank;
  for (int i = 0; i < spec_rank; ++i) {
    const uint8_t b = in.Byte();
    spec.shape.push_back(b & 0x80 ? -1 : Dim(b));
  }
  if (flags & 4) spec.max_elements = flags >> 3;
  tensor.data = in.Rest();

  const absl::Status status = meft::wire::CheckTensor(tensor, "x", spec);
  if (!status.ok()) {
    if (status.message().empty()) Fail("rejection without a message");
    return 0;
  }
  const int64_t numel = meft::wire::NumElements(tensor);
  if (numel < 0 || static_cast<uint64_t>(numel) * meft::wire::DTypeSize(tensor.dtype) !=
                       tensor.data.size()) {
    Fail("accepted tensor whose data does not match its shape");
  }

  std::string encoded;
  if (tensor.dtype == DType::kFp32 || tensor.dtype == DType::kBf16) {
    std::vector<float> values;
    const bool require_finite = flags & 0x40;
    const absl::Status decoded = meft::wire::DecodeFloats(tensor, "x", require_finite, &values);
    if (!decoded.ok()) {
      if (!require_finite) Fail("DecodeFloats failed without require_finite");
      return 0;
    }
    if (static_cast<int64_t>(values.size()) != numel) Fail("DecodeFloats size mismatch");
    bool has_nan = false;
    for (float v : values) {
      has_nan |= std::isnan(v);
      if (require_finite && !std::isfinite(v)) Fail("non-finite value passed require_finite");
    }
    // NaN payloads may be quietened on the way; every other value must survive bit for bit.
    if (!has_nan) {
      meft::wire::EncodeFloats(values, tensor.dtype, &encoded);
      if (encoded != tensor.data) Fail("float decode/encode round trip differs");
    }
    if (tensor.dtype == DType::kFp32) {
      for (size_t i = 0; i < values.size(); ++i) {
        uint32_t raw;
        std::memcpy(&raw, tensor.data.data() + 4 * i, 4);
        if (!std::isnan(values[i]) && Bits(values[i]) != raw) Fail("fp32 decode changed bits");
      }
    }
  } else if (tensor.dtype == DType::kInt32) {
    std::vector<int32_t> values;
    meft::wire::DecodeInt32(tensor, &values);
    if (static_cast<int64_t>(values.size()) != numel) Fail("DecodeInt32 size mismatch");
    meft::wire::EncodeInt32(values, &encoded);
    if (encoded != tensor.data) Fail("int32 decode/encode round trip differs");
  }
  return 0;
}
