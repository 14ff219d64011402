#pragma once

// Reader and writer for the Hugging Face safetensors format:
//
//   [8 bytes: N, little-endian u64][N bytes: JSON header][data buffer]
//
// The header is a JSON object mapping each tensor name to
// {"dtype": "F32", "shape": [d0, d1, ...], "data_offsets": [begin, end]}, offsets relative to the
// start of the data buffer, plus an optional "__metadata__" object of string -> string. The
// tensors must cover the data buffer exactly, without gaps or overlap. Tensor bytes are stored
// little-endian, row-major.
//
// Errors: NOT_FOUND for a missing file or tensor, INVALID_ARGUMENT for corrupt content or
// inconsistent writer input; other I/O failures carry the code derived from errno. Every message
// names the file, and the tensor where there is one. Nothing here throws.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace meft::safetensors {

// Element types known to this implementation. The 8-bit float types of newer safetensors
// versions are not supported and are rejected as unknown.
enum class DType { kBool, kU8, kI8, kI16, kU16, kF16, kBF16, kI32, kU32, kF32, kF64, kI64, kU64 };

// Size of one element in bytes (kBool is one byte).
size_t DTypeSize(DType dtype);

// The header spelling: "BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
// "F64", "I64", "U64".
std::string_view DTypeName(DType dtype);

// Inverse of DTypeName (case-sensitive). INVALID_ARGUMENT for any other string.
absl::StatusOr<DType> ParseDType(std::string_view name);

// One tensor as described by a file's header.
struct TensorInfo {
  std::string name;
  DType dtype = DType::kU8;
  // Non-negative dimensions; empty for a scalar (one element).
  std::vector<int64_t> shape;
  // Byte range [begin, end) within the data buffer (not the file);
  // end - begin == product(shape) * DTypeSize(dtype).
  uint64_t begin = 0;
  uint64_t end = 0;
};

// A read-only, memory-mapped safetensors file. Open validates the whole header, so every
// TensorInfo it exposes is consistent and lies within the mapping. Data() returns views into the
// mapping without copying; they stay valid while the File lives.
//
// Thread-safety: immutable after Open; const methods may be called concurrently. The file must
// not be truncated or rewritten in place while it is open (the views would see the change or
// fault); writers replace files by rename, which is safe.
class File {
 public:
  // Maps and validates `path`. NOT_FOUND if it does not exist, INVALID_ARGUMENT if it is not a
  // well-formed safetensors file.
  static absl::StatusOr<std::unique_ptr<File>> Open(const std::string& path);

  File(File&& other) noexcept;
  File& operator=(File&& other) noexcept;
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  ~File();

  // All tensors, ordered by data offset (ties between empty tensors broken by name).
  const std::vector<TensorInfo>& tensors() const { return tensors_; }

  // The tensor called `name`, or nullptr. The pointer lives as long as the File.
  const TensorInfo* Find(std::string_view name) const;

  // The bytes of tensor `name` (end - begin bytes, possibly empty, no alignment guarantee).
  // NOT_FOUND naming the file and the tensor if there is no such tensor.
  absl::StatusOr<std::span<const uint8_t>> Data(std::string_view name) const;

  // OK if tensor `name` exists with exactly this dtype and shape. NOT_FOUND if it does not exist;
  // INVALID_ARGUMENT naming the file, the tensor and the expected and actual dtype and shape if
  // it differs.
  absl::Status CheckTensor(std::string_view name, DType dtype,
                           const std::vector<int64_t>& shape) const;

  // The "__metadata__" map; empty if the header has none.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  const std::string& path() const { return path_; }

  // Size of the data buffer in bytes (file size - 8 - header length).
  uint64_t data_size() const { return data_size_; }

 private:
  File() = default;
  void Unmap();

  std::string path_;
  // The whole file, mapped read-only; nullptr after a move.
  void* mapping_ = nullptr;
  size_t mapping_size_ = 0;
  const uint8_t* data_ = nullptr;  // Start of the data buffer inside the mapping.
  uint64_t data_size_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t, std::less<>> index_;  // name -> position in tensors_.
  std::map<std::string, std::string> metadata_;
};

// One tensor to write. `data` is borrowed: it must stay valid during Write and hold exactly
// product(shape) * DTypeSize(dtype) bytes, little-endian, row-major.
struct TensorToWrite {
  std::string name;
  DType dtype = DType::kU8;
  std::vector<int64_t> shape;
  std::span<const uint8_t> data;
};

// Writes a safetensors file at `path` (created or truncated, then fsynced via
// io::WriteFileDurably; the parent directory is not fsynced). Tensors are laid out in the given
// order without padding; the header lists "__metadata__" first (omitted when `metadata` is
// empty), then the tensors in the given order, each as {"dtype","shape","data_offsets"}, compact
// JSON padded with spaces to a multiple of 8 bytes. Tensor data is written straight from the
// given spans, never gathered into one buffer.
//
// INVALID_ARGUMENT (before anything is written) if a name is empty, "__metadata__", duplicated or
// not valid UTF-8, a dimension is negative, the size overflows, a data span's size does not match
// the shape, or a metadata key or value is not valid UTF-8. Returns the number of bytes written.
absl::StatusOr<uint64_t> Write(const std::string& path, const std::vector<TensorToWrite>& tensors,
                               const std::map<std::string, std::string>& metadata = {});

}  // namespace meft::safetensors
