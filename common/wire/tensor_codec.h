#pragma once

// Bounds-checked conversion between the wire form of a tensor (raw little-endian bytes with a
// dtype and a row-major shape) and plain C++ buffers. Independent of protobuf: rpc/ code maps
// proto messages onto TensorView and back.

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace meft::wire {

enum class DType { kFp32, kBf16, kInt32, kUint8 };

// Bytes per element.
size_t DTypeSize(DType dtype);
absl::string_view DTypeName(DType dtype);  // "fp32", "bf16", "int32", "uint8"

// fp32 -> bf16 with round-to-nearest-even; NaN stays NaN (quiet), infinities stay infinite.
uint16_t FloatToBf16(float value);
float Bf16ToFloat(uint16_t value);

// A tensor as it arrives: `data` is borrowed and must outlive the view.
struct TensorView {
  DType dtype = DType::kFp32;
  std::vector<int64_t> shape;
  absl::string_view data;
};

// A tensor to send: owns its bytes, or names where they were written in memory the receiver
// provided (`placed_offset`, then `data` is empty). `present` is false for an absent optional
// field.
struct Tensor {
  bool present = false;
  DType dtype = DType::kFp32;
  std::vector<int64_t> shape;
  std::string data;
  std::optional<uint64_t> placed_offset;  // offset of the bytes in the receiver's memory
  uint64_t placed_bytes = 0;              // their length, with placed_offset
};

// Expected form of a tensor. A dim of -1 in `shape` matches any size (and is bound by the
// caller afterwards); `shape.size()` is the required rank.
struct TensorSpec {
  std::vector<DType> dtypes;   // accepted dtypes
  std::vector<int64_t> shape;  // expected dims, -1 = any
  int64_t max_elements = int64_t{1} << 34;
};

// Checks dtype, rank, dims, that the element count does not overflow or exceed
// `spec.max_elements`, and that data holds exactly numel * DTypeSize bytes. Errors are
// INVALID_ARGUMENT (RESOURCE_EXHAUSTED when over max_elements) and name `field`, e.g.
// "x.shape: expected [*, 64], got [3, 65]".
absl::Status CheckTensor(const TensorView& tensor, absl::string_view field, const TensorSpec& spec);

// Number of elements; the tensor must have passed CheckTensor.
int64_t NumElements(const TensorView& tensor);

// Decodes an fp32 or bf16 tensor into `out` (resized to numel). With `require_finite`, a NaN
// or infinity gives INVALID_ARGUMENT "<field>.data: non-finite value at element i".
// Preconditions: CheckTensor passed.
absl::Status DecodeFloats(const TensorView& tensor, absl::string_view field, bool require_finite,
                          std::vector<float>* out);

// Decodes an int32 tensor. Preconditions: CheckTensor passed with dtype int32.
void DecodeInt32(const TensorView& tensor, std::vector<int32_t>* out);

// Appends `values` encoded as `dtype` (fp32 or bf16) to `out`.
void EncodeFloats(std::span<const float> values, DType dtype, std::string* out);
// Writes `values` encoded as `dtype` to `dst` (values.size() * DTypeSize(dtype) bytes).
void EncodeFloatsTo(std::span<const float> values, DType dtype, char* dst);
// Encodes `rows.size()` rows of `dim` floats, each taken from `base + row_ids[i] * dim`, as
// `dtype` (fp32 or bf16), appending to `out`. Gathers and converts in one pass.
void EncodeRows(const float* base, int64_t dim, std::span<const int32_t> row_ids, DType dtype,
                std::string* out);
// As EncodeRows, writing to `dst` (row_ids.size() * dim * DTypeSize(dtype) bytes).
void EncodeRowsTo(const float* base, int64_t dim, std::span<const int32_t> row_ids, DType dtype,
                  char* dst);
void EncodeInt32(std::span<const int32_t> values, std::string* out);

std::string ShapeString(std::span<const int64_t> shape);

}  // namespace meft::wire
