#include "common/wire/tensor_codec.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace meft::wire {

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kFp32:
    case DType::kInt32:
      return 4;
    case DType::kBf16:
      return 2;
    case DType::kUint8:
      return 1;
  }
  return 0;
}

absl::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFp32:
      return "fp32";
    case DType::kBf16:
      return "bf16";
    case DType::kInt32:
      return "int32";
    case DType::kUint8:
      return "uint8";
  }
  return "?";
}

uint16_t FloatToBf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  // Round to nearest, ties to even: add 0x7fff plus the lowest kept bit, then truncate.
  // Overflow into the exponent is the correct rounding up to infinity. A NaN keeps its sign and
  // is made quiet. Branch-free, so that EncodeFloatsTo's loop vectorizes.
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (bits >> 16) | 0x0040u;
  const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
  return static_cast<uint16_t>(nan ? quiet_nan : rounded);
}

float Bf16ToFloat(uint16_t value) {
  const uint32_t bits = static_cast<uint32_t>(value) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

std::string ShapeString(std::span<const int64_t> shape) {
  return absl::StrCat("[",
                      absl::StrJoin(shape, ", ",
                                    [](std::string* out, int64_t d) {
                                      if (d < 0) {
                                        out->append("*");
                                      } else {
                                        absl::StrAppend(out, d);
                                      }
                                    }),
                      "]");
}

absl::Status CheckTensor(const TensorView& tensor, absl::string_view field,
                         const TensorSpec& spec) {
  bool dtype_ok = false;
  for (DType d : spec.dtypes) dtype_ok |= (d == tensor.dtype);
  if (!dtype_ok) {
    std::vector<absl::string_view> names;
    for (DType d : spec.dtypes) names.push_back(DTypeName(d));
    return absl::InvalidArgumentError(absl::StrCat(field, ".dtype: expected ",
                                                   absl::StrJoin(names, " or "), ", got ",
                                                   DTypeName(tensor.dtype)));
  }
  bool shape_ok = tensor.shape.size() == spec.shape.size();
  for (size_t i = 0; shape_ok && i < spec.shape.size(); ++i) {
    shape_ok = tensor.shape[i] >= 0 && (spec.shape[i] < 0 || spec.shape[i] == tensor.shape[i]);
  }
  if (!shape_ok) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".shape: expected ", ShapeString(spec.shape), ", got ", ShapeString(tensor.shape)));
  }
  int64_t numel = 1;
  for (int64_t d : tensor.shape) {
    if (d != 0 && numel > spec.max_elements / d) {
      return absl::ResourceExhaustedError(absl::StrCat(field, ".shape: ", ShapeString(tensor.shape),
                                                       " exceeds the limit of ", spec.max_elements,
                                                       " elements"));
    }
    numel *= d;
  }
  if (numel > spec.max_elements) {
    return absl::ResourceExhaustedError(absl::StrCat(field, ".shape: ", ShapeString(tensor.shape),
                                                     " exceeds the limit of ", spec.max_elements,
                                                     " elements"));
  }
  const uint64_t expected = static_cast<uint64_t>(numel) * DTypeSize(tensor.dtype);
  if (tensor.data.size() != expected) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".data: ", tensor.data.size(), " bytes, expected ", expected, " for ",
                     DTypeName(tensor.dtype), " ", ShapeString(tensor.shape)));
  }
  return absl::OkStatus();
}

int64_t NumElements(const TensorView& tensor) {
  int64_t numel = 1;
  for (int64_t d : tensor.shape) numel *= d;
  return numel;
}

absl::Status DecodeFloats(const TensorView& tensor, absl::string_view field, bool require_finite,
                          std::vector<float>* out) {
  const int64_t numel = NumElements(tensor);
  out->resize(static_cast<size_t>(numel));
  const char* src = tensor.data.data();
  if (tensor.dtype == DType::kFp32) {
    // memcpy's pointers must not be null even for zero bytes; an empty vector's data() may be.
    if (numel > 0) std::memcpy(out->data(), src, static_cast<size_t>(numel) * sizeof(float));
  } else if (tensor.dtype == DType::kBf16) {
    for (int64_t i = 0; i < numel; ++i) {
      uint16_t v;
      std::memcpy(&v, src + 2 * i, sizeof(v));
      (*out)[i] = Bf16ToFloat(v);
    }
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".dtype: expected a float dtype, got ", DTypeName(tensor.dtype)));
  }
  if (require_finite) {
    for (int64_t i = 0; i < numel; ++i) {
      if (!std::isfinite((*out)[i])) {
        return absl::InvalidArgumentError(
            absl::StrCat(field, ".data: non-finite value at element ", i));
      }
    }
  }
  return absl::OkStatus();
}

void DecodeInt32(const TensorView& tensor, std::vector<int32_t>* out) {
  out->resize(static_cast<size_t>(NumElements(tensor)));
  if (out->empty()) return;  // data() may be null, which memcpy does not allow
  std::memcpy(out->data(), tensor.data.data(), out->size() * sizeof(int32_t));
}

void EncodeFloatsTo(std::span<const float> values, DType dtype, char* dst) {
  if (values.empty()) return;  // values.data() may be null, which memcpy does not allow
  if (dtype == DType::kFp32) {
    std::memcpy(dst, values.data(), values.size() * sizeof(float));
    return;
  }
  for (size_t i = 0; i < values.size(); ++i) {
    const uint16_t v = FloatToBf16(values[i]);
    std::memcpy(dst + 2 * i, &v, sizeof(v));
  }
}

void EncodeFloats(std::span<const float> values, DType dtype, std::string* out) {
  if (values.empty()) return;
  if (dtype == DType::kFp32) {
    // append copies once; resize would first fill the new bytes with zeros.
    out->append(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
    return;
  }
  const size_t start = out->size();
  out->resize(start + values.size() * DTypeSize(dtype));
  EncodeFloatsTo(values, dtype, out->data() + start);
}

void EncodeRowsTo(const float* base, int64_t dim, std::span<const int32_t> row_ids, DType dtype,
                  char* dst) {
  const size_t row_bytes = static_cast<size_t>(dim) * DTypeSize(dtype);
  for (size_t r = 0; r < row_ids.size(); ++r) {
    const float* src = base + static_cast<int64_t>(row_ids[r]) * dim;
    EncodeFloatsTo(std::span<const float>(src, static_cast<size_t>(dim)), dtype,
                   dst + r * row_bytes);
  }
}

void EncodeRows(const float* base, int64_t dim, std::span<const int32_t> row_ids, DType dtype,
                std::string* out) {
  const size_t start = out->size();
  out->resize(start + row_ids.size() * static_cast<size_t>(dim) * DTypeSize(dtype));
  if (row_ids.empty()) return;
  EncodeRowsTo(base, dim, row_ids, dtype, out->data() + start);
}

void EncodeInt32(std::span<const int32_t> values, std::string* out) {
  const size_t start = out->size();
  if (values.empty()) return;  // values.data() may be null, which memcpy does not allow
  out->resize(start + values.size() * sizeof(int32_t));
  std::memcpy(out->data() + start, values.data(), values.size() * sizeof(int32_t));
}

}  // namespace meft::wire
