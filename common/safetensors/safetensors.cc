#include "common/safetensors/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <exception>
#include <limits>
#include <optional>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "common/io/file_util.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace meft::safetensors {
namespace {

using json = nlohmann::json;

// Same bound as the reference implementation's spirit: real headers are kilobytes; anything
// near this is corrupt or hostile and must not make us allocate a huge JSON tree.
constexpr uint64_t kMaxHeaderSize = uint64_t{100} << 20;  // 100 MiB.
constexpr char kMetadataKey[] = "__metadata__";

struct DTypeEntry {
  DType dtype;
  std::string_view name;
  size_t size;
};

constexpr DTypeEntry kDTypes[] = {
    {DType::kBool, "BOOL", 1}, {DType::kU8, "U8", 1},   {DType::kI8, "I8", 1},
    {DType::kI16, "I16", 2},   {DType::kU16, "U16", 2}, {DType::kF16, "F16", 2},
    {DType::kBF16, "BF16", 2}, {DType::kI32, "I32", 4}, {DType::kU32, "U32", 4},
    {DType::kF32, "F32", 4},   {DType::kF64, "F64", 8}, {DType::kI64, "I64", 8},
    {DType::kU64, "U64", 8},
};

const DTypeEntry* FindDType(DType dtype) {
  for (const DTypeEntry& entry : kDTypes) {
    if (entry.dtype == dtype) return &entry;
  }
  return nullptr;
}

// Strict UTF-8 check (no overlong forms, no surrogates, nothing above U+10FFFF). Returns the
// byte offset of the first invalid sequence, or npos if `s` is valid.
size_t FindInvalidUtf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    unsigned char lo = 0x80, hi = 0xBF;  // Allowed range of the second byte.
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;  // Overlong.
      if (c == 0xED) hi = 0x9F;  // Surrogates.
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;  // Overlong.
      if (c == 0xF4) hi = 0x8F;  // Above U+10FFFF.
    } else {
      return i;
    }
    if (n - i < len) return i;
    if (p[i + 1] < lo || p[i + 1] > hi) return i;
    for (size_t k = 2; k < len; ++k) {
      if (p[i + k] < 0x80 || p[i + k] > 0xBF) return i;
    }
    i += len;
  }
  return std::string_view::npos;
}

// For error messages; long shapes are elided so a hostile header cannot bloat the message.
std::string ShapeString(const std::vector<int64_t>& shape) {
  constexpr size_t kMaxDims = 16;
  if (shape.size() <= kMaxDims) return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
  return absl::StrCat("[", absl::StrJoin(shape.begin(), shape.begin() + kMaxDims, ", "), ", ... (",
                      shape.size(), " dims)]");
}

// Describes a JSON value for an error message without serializing containers: dump() recurses,
// and a deeply nested or huge value must neither overflow the stack nor bloat the message.
std::string Describe(const json& value) {
  if (value.is_structured()) return value.type_name();
  constexpr size_t kMaxChars = 64;
  std::string text = value.dump();
  if (text.size() > kMaxChars) {
    text.resize(kMaxChars);
    text += "...";
  }
  return text;
}

// Number of bytes of a tensor, or false if a dimension is negative or the size overflows u64.
bool TensorBytes(DType dtype, const std::vector<int64_t>& shape, uint64_t* bytes) {
  uint64_t n = DTypeSize(dtype);
  for (int64_t dim : shape) {
    if (dim < 0) return false;
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(dim), &n)) return false;
  }
  *bytes = n;
  return true;
}

// Debian's abseil has its own string_view type, which StrCat requires; these bridge to it.
absl::string_view View(std::string_view s) { return absl::string_view(s.data(), s.size()); }
absl::string_view Name(DType dtype) { return View(DTypeName(dtype)); }

absl::Status FileError(const std::string& path, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat("safetensors file '", path, "': ", message));
}

absl::Status TensorError(const std::string& path, absl::string_view tensor,
                         absl::string_view message) {
  return absl::InvalidArgumentError(
      absl::StrCat("safetensors file '", path, "': tensor '", tensor, "': ", message));
}

// Reads a JSON number that must be an integer >= 0 into `out`. `what` names the field in the
// error message.
absl::Status GetNonNegativeInteger(const json& value, const std::string& path,
                                   absl::string_view tensor, absl::string_view what,
                                   uint64_t* out) {
  if (value.is_number_unsigned()) {
    *out = value.get<uint64_t>();
    return absl::OkStatus();
  }
  if (value.is_number_integer()) {
    int64_t v = value.get<int64_t>();
    if (v < 0) return TensorError(path, tensor, absl::StrCat(what, " is negative (", v, ")"));
    *out = static_cast<uint64_t>(v);
    return absl::OkStatus();
  }
  return TensorError(path, tensor,
                     absl::StrCat(what, " must be a non-negative integer, got ", Describe(value)));
}

absl::StatusOr<TensorInfo> ParseTensorEntry(const std::string& path, const std::string& name,
                                            const json& entry, uint64_t data_size) {
  if (!entry.is_object()) {
    return TensorError(path, name, absl::StrCat("entry must be an object, got ", Describe(entry)));
  }
  TensorInfo info;
  info.name = name;

  auto dtype_it = entry.find("dtype");
  if (dtype_it == entry.end()) return TensorError(path, name, "missing \"dtype\"");
  if (!dtype_it->is_string()) {
    return TensorError(path, name,
                       absl::StrCat("\"dtype\" must be a string, got ", Describe(*dtype_it)));
  }
  const std::string& dtype_name = dtype_it->get_ref<const std::string&>();
  absl::StatusOr<DType> dtype = ParseDType(dtype_name);
  if (!dtype.ok()) {
    return TensorError(path, name, absl::StrCat("unknown dtype \"", dtype_name, "\""));
  }
  info.dtype = *dtype;

  auto shape_it = entry.find("shape");
  if (shape_it == entry.end()) return TensorError(path, name, "missing \"shape\"");
  if (!shape_it->is_array()) {
    return TensorError(path, name,
                       absl::StrCat("\"shape\" must be an array, got ", Describe(*shape_it)));
  }
  info.shape.reserve(shape_it->size());
  for (const json& dim : *shape_it) {
    uint64_t d;
    MEFT_RETURN_IF_ERROR(GetNonNegativeInteger(dim, path, name, "shape dimension", &d));
    if (d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return TensorError(path, name, absl::StrCat("shape dimension ", d, " is too large"));
    }
    info.shape.push_back(static_cast<int64_t>(d));
  }

  auto offsets_it = entry.find("data_offsets");
  if (offsets_it == entry.end()) return TensorError(path, name, "missing \"data_offsets\"");
  if (!offsets_it->is_array() || offsets_it->size() != 2) {
    return TensorError(path, name,
                       absl::StrCat("\"data_offsets\" must be an array [begin, end], got ",
                                    Describe(*offsets_it)));
  }
  MEFT_RETURN_IF_ERROR(
      GetNonNegativeInteger((*offsets_it)[0], path, name, "data_offsets begin", &info.begin));
  MEFT_RETURN_IF_ERROR(
      GetNonNegativeInteger((*offsets_it)[1], path, name, "data_offsets end", &info.end));

  uint64_t bytes;
  if (!TensorBytes(info.dtype, info.shape, &bytes)) {
    return TensorError(path, name,
                       absl::StrCat("size of shape ", ShapeString(info.shape), " x ",
                                    Name(info.dtype), " overflows 64 bits"));
  }
  if (info.end < info.begin) {
    return TensorError(path, name,
                       absl::StrCat("data_offsets end ", info.end, " < begin ", info.begin));
  }
  if (info.end - info.begin != bytes) {
    return TensorError(path, name,
                       absl::StrCat("data_offsets [", info.begin, ", ", info.end, ") span ",
                                    info.end - info.begin, " bytes but ", Name(info.dtype), " ",
                                    ShapeString(info.shape), " needs ", bytes));
  }
  if (info.end > data_size) {
    return TensorError(path, name,
                       absl::StrCat("data_offsets [", info.begin, ", ", info.end,
                                    ") extend beyond the data buffer of ", data_size, " bytes"));
  }
  return info;
}

// Parses the header JSON, rejecting duplicate keys in any object (nlohmann keeps the last one
// silently, which would hide a duplicated tensor name).
absl::StatusOr<json> ParseHeaderJson(const std::string& path, std::string_view header) {
  std::vector<std::set<std::string>> open_objects;
  std::optional<std::string> duplicate;  // The first duplicated key.
  bool duplicate_is_tensor = false;
  auto callback = [&](int /*depth*/, json::parse_event_t event, json& parsed) -> bool {
    switch (event) {
      case json::parse_event_t::object_start:
        open_objects.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!open_objects.empty()) open_objects.pop_back();
        break;
      case json::parse_event_t::key:
        if (!open_objects.empty() && parsed.is_string() &&
            !open_objects.back().insert(parsed.get<std::string>()).second && !duplicate) {
          duplicate = parsed.get<std::string>();
          duplicate_is_tensor = open_objects.size() == 1 && *duplicate != kMetadataKey;
        }
        break;
      default:
        break;
    }
    return true;
  };

  json parsed;
  try {
    parsed = json::parse(header.begin(), header.end(), callback, /*allow_exceptions=*/true);
  } catch (const json::exception& e) {
    // nlohmann quotes the last token read, which can be as long as the header.
    std::string what = e.what();
    if (what.size() > 512) what = absl::StrCat(what.substr(0, 512), "...");
    return FileError(path, absl::StrCat("header is not valid JSON: ", what));
  } catch (const std::exception& e) {
    return absl::ResourceExhaustedError(
        absl::StrCat("safetensors file '", path, "': parsing the header failed: ", e.what()));
  }
  if (duplicate) {
    if (duplicate_is_tensor) {
      return TensorError(path, *duplicate, "duplicate tensor name in header");
    }
    return FileError(path, absl::StrCat("duplicate key \"", *duplicate, "\" in header"));
  }
  if (!parsed.is_object()) {
    return FileError(path, absl::StrCat("header must be a JSON object, got ", parsed.type_name()));
  }
  return parsed;
}

}  // namespace

size_t DTypeSize(DType dtype) {
  const DTypeEntry* entry = FindDType(dtype);
  return entry == nullptr ? 0 : entry->size;
}

std::string_view DTypeName(DType dtype) {
  const DTypeEntry* entry = FindDType(dtype);
  return entry == nullptr ? std::string_view("UNKNOWN") : entry->name;
}

absl::StatusOr<DType> ParseDType(std::string_view name) {
  for (const DTypeEntry& entry : kDTypes) {
    if (entry.name == name) return entry.dtype;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown safetensors dtype \"", View(name), "\""));
}

File::File(File&& other) noexcept { *this = std::move(other); }

File& File::operator=(File&& other) noexcept {
  if (this != &other) {
    Unmap();
    path_ = std::move(other.path_);
    mapping_ = std::exchange(other.mapping_, nullptr);
    mapping_size_ = std::exchange(other.mapping_size_, 0);
    data_ = std::exchange(other.data_, nullptr);
    data_size_ = std::exchange(other.data_size_, 0);
    tensors_ = std::move(other.tensors_);
    index_ = std::move(other.index_);
    metadata_ = std::move(other.metadata_);
  }
  return *this;
}

File::~File() { Unmap(); }

void File::Unmap() {
  if (mapping_ != nullptr) ::munmap(mapping_, mapping_size_);
  mapping_ = nullptr;
  mapping_size_ = 0;
}

absl::StatusOr<std::unique_ptr<File>> File::Open(const std::string& path) {
  int fd;
  do {
    fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("safetensors file '", path, "': open"));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    absl::Status status =
        absl::ErrnoToStatus(errno, absl::StrCat("safetensors file '", path, "': stat"));
    ::close(fd);
    return status;
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return FileError(path, "not a regular file");
  }
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    return FileError(
        path, absl::StrCat("file is ", file_size, " bytes, shorter than the 8-byte header length"));
  }

  std::unique_ptr<File> file(new File());
  file->path_ = path;
  void* mapping = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  int mmap_errno = errno;
  ::close(fd);  // The mapping keeps the file referenced.
  if (mapping == MAP_FAILED) {
    return absl::ErrnoToStatus(mmap_errno, absl::StrCat("safetensors file '", path, "': mmap"));
  }
  file->mapping_ = mapping;
  file->mapping_size_ = file_size;
  const auto* base = static_cast<const uint8_t*>(mapping);

  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | base[i];
  if (header_size == 0) return FileError(path, "header length is 0");
  if (header_size > kMaxHeaderSize) {
    return FileError(path, absl::StrCat("header length ", header_size, " exceeds the limit of ",
                                        kMaxHeaderSize, " bytes"));
  }
  if (header_size > file_size - 8) {
    return FileError(path,
                     absl::StrCat("header length ", header_size, " extends beyond the end of the ",
                                  file_size, "-byte file"));
  }
  const std::string_view header(reinterpret_cast<const char*>(base + 8), header_size);
  file->data_ = base + 8 + header_size;
  file->data_size_ = file_size - 8 - header_size;

  if (size_t bad = FindInvalidUtf8(header); bad != std::string_view::npos) {
    return FileError(path, absl::StrCat("header is not valid UTF-8 at byte ", bad));
  }
  // nlohmann treats a NUL byte as the end of input and would ignore whatever follows it; valid
  // JSON never contains a raw NUL.
  if (size_t nul = header.find('\0'); nul != std::string_view::npos) {
    return FileError(path, absl::StrCat("header is not valid JSON: NUL byte at ", nul));
  }
  MEFT_ASSIGN_OR_RETURN(json parsed, ParseHeaderJson(path, header));

  try {
    for (auto it = parsed.begin(); it != parsed.end(); ++it) {
      if (it.key() == kMetadataKey) {
        if (!it.value().is_object()) {
          return FileError(
              path, absl::StrCat("\"__metadata__\" must be an object, got ", Describe(it.value())));
        }
        for (auto m = it.value().begin(); m != it.value().end(); ++m) {
          if (!m.value().is_string()) {
            return FileError(path, absl::StrCat("\"__metadata__\" value for key \"", m.key(),
                                                "\" must be a string, got ", Describe(m.value())));
          }
          file->metadata_.emplace(m.key(), m.value().get<std::string>());
        }
        continue;
      }
      MEFT_ASSIGN_OR_RETURN(TensorInfo info,
                            ParseTensorEntry(path, it.key(), it.value(), file->data_size_));
      file->tensors_.push_back(std::move(info));
    }
  } catch (const std::exception& e) {
    // Not expected: every access above is type-checked first.
    return absl::InternalError(
        absl::StrCat("safetensors file '", path, "': reading the header failed: ", e.what()));
  }

  std::vector<TensorInfo>& tensors = file->tensors_;
  std::sort(tensors.begin(), tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    if (a.begin != b.begin) return a.begin < b.begin;
    if (a.end != b.end) return a.end < b.end;
    return a.name < b.name;
  });
  uint64_t covered = 0;  // The data buffer [0, covered) is covered by tensors[0, i).
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorInfo& t = tensors[i];
    if (t.begin < covered) {
      return TensorError(path, t.name,
                         absl::StrCat("data_offsets [", t.begin, ", ", t.end, ") overlap tensor '",
                                      tensors[i - 1].name, "' at [", tensors[i - 1].begin, ", ",
                                      tensors[i - 1].end, ")"));
    }
    if (t.begin > covered) {
      return TensorError(
          path, t.name,
          absl::StrCat("data_offsets begin ", t.begin, " leaves a gap: data buffer bytes [",
                       covered, ", ", t.begin, ") are not covered by any tensor"));
    }
    covered = t.end;
  }
  if (covered != file->data_size_) {
    return FileError(path, absl::StrCat("data buffer bytes [", covered, ", ", file->data_size_,
                                        ") are not covered by any tensor"));
  }
  for (size_t i = 0; i < tensors.size(); ++i) file->index_.emplace(tensors[i].name, i);
  return file;
}

const TensorInfo* File::Find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

absl::StatusOr<std::span<const uint8_t>> File::Data(std::string_view name) const {
  const TensorInfo* info = Find(name);
  if (info == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("safetensors file '", path_, "': no tensor '", View(name), "'"));
  }
  return std::span<const uint8_t>(data_ + info->begin, info->end - info->begin);
}

absl::Status File::CheckTensor(std::string_view name, DType dtype,
                               const std::vector<int64_t>& shape) const {
  const TensorInfo* info = Find(name);
  if (info == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("safetensors file '", path_, "': no tensor '", View(name), "'"));
  }
  if (info->dtype != dtype || info->shape != shape) {
    return TensorError(path_, View(name),
                       absl::StrCat("expected ", Name(dtype), " ", ShapeString(shape), ", found ",
                                    Name(info->dtype), " ", ShapeString(info->shape)));
  }
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> Write(const std::string& path, const std::vector<TensorToWrite>& tensors,
                               const std::map<std::string, std::string>& metadata) {
  std::set<std::string_view> names;
  std::vector<uint64_t> offsets;  // Begin of each tensor, then the total size.
  offsets.reserve(tensors.size() + 1);
  uint64_t total = 0;
  for (const TensorToWrite& t : tensors) {
    if (t.name.empty()) return FileError(path, "cannot write a tensor with an empty name");
    if (t.name == kMetadataKey) {
      return TensorError(path, t.name, "name is reserved for the metadata map");
    }
    if (FindInvalidUtf8(t.name) != std::string_view::npos) {
      return TensorError(path, t.name, "name is not valid UTF-8");
    }
    if (!names.insert(t.name).second) return TensorError(path, t.name, "duplicate tensor name");
    if (DTypeSize(t.dtype) == 0) return TensorError(path, t.name, "invalid dtype");
    for (int64_t dim : t.shape) {
      if (dim < 0) {
        return TensorError(path, t.name,
                           absl::StrCat("negative dimension in shape ", ShapeString(t.shape)));
      }
    }
    uint64_t bytes;
    if (!TensorBytes(t.dtype, t.shape, &bytes)) {
      return TensorError(path, t.name,
                         absl::StrCat("size of shape ", ShapeString(t.shape), " overflows"));
    }
    if (t.data.size() != bytes) {
      return TensorError(path, t.name,
                         absl::StrCat("data has ", t.data.size(), " bytes but ", Name(t.dtype), " ",
                                      ShapeString(t.shape), " needs ", bytes));
    }
    offsets.push_back(total);
    if (__builtin_add_overflow(total, bytes, &total)) {
      return FileError(path, "total tensor size overflows");
    }
  }
  offsets.push_back(total);
  for (const auto& [key, value] : metadata) {
    if (FindInvalidUtf8(key) != std::string_view::npos ||
        FindInvalidUtf8(value) != std::string_view::npos) {
      return FileError(path, absl::StrCat("metadata entry \"", key, "\" is not valid UTF-8"));
    }
  }

  std::string header;
  try {
    // JSON string literal with escaping; input is valid UTF-8, so dump() does not throw.
    auto quote = [](std::string_view s) { return json(std::string(s)).dump(); };
    header = "{";
    bool first = true;
    if (!metadata.empty()) {
      absl::StrAppend(&header, "\"", kMetadataKey, "\":{");
      bool first_entry = true;
      for (const auto& [key, value] : metadata) {
        absl::StrAppend(&header, first_entry ? "" : ",", quote(key), ":", quote(value));
        first_entry = false;
      }
      header += "}";
      first = false;
    }
    for (size_t i = 0; i < tensors.size(); ++i) {
      const TensorToWrite& t = tensors[i];
      absl::StrAppend(&header, first ? "" : ",", quote(t.name), ":{\"dtype\":\"", Name(t.dtype),
                      "\",\"shape\":[", absl::StrJoin(t.shape, ","), "],\"data_offsets\":[",
                      offsets[i], ",", offsets[i + 1], "]}");
      first = false;
    }
    header += "}";
  } catch (const std::exception& e) {
    return absl::InternalError(
        absl::StrCat("safetensors file '", path, "': building the header failed: ", e.what()));
  }
  header.append((8 - header.size() % 8) % 8, ' ');
  if (header.size() > kMaxHeaderSize) {
    return FileError(path, absl::StrCat("header of ", header.size(), " bytes exceeds the limit of ",
                                        kMaxHeaderSize));
  }

  char length[8];
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) length[i] = static_cast<char>((n >> (8 * i)) & 0xFF);

  std::vector<std::string_view> chunks;
  chunks.reserve(tensors.size() + 2);
  chunks.emplace_back(length, sizeof(length));
  chunks.emplace_back(header);
  for (const TensorToWrite& t : tensors) {
    if (t.data.empty()) continue;
    chunks.emplace_back(reinterpret_cast<const char*>(t.data.data()), t.data.size());
  }
  MEFT_RETURN_IF_ERROR(io::WriteFileDurably(path, chunks));
  return uint64_t{8} + header.size() + total;
}

}  // namespace meft::safetensors
