#include "common/safetensors/safetensors.h"

#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace meft::safetensors {
namespace {

using ::testing::HasSubstr;

// Builds a safetensors byte string by hand: 8-byte little-endian header length, header, data.
// Deliberately independent of the writer under test.
std::string Build(std::string_view header, std::string_view data = {}) {
  std::string out;
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xFF));
  out.append(header);
  out.append(data);
  return out;
}

// A raw 8-byte little-endian length prefix followed by arbitrary bytes.
std::string WithLength(uint64_t n, std::string_view rest) {
  std::string out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xFF));
  out.append(rest);
  return out;
}

std::string Bytes(std::initializer_list<uint8_t> bytes) {
  return std::string(bytes.begin(), bytes.end());
}

std::vector<uint8_t> ToVector(std::span<const uint8_t> s) {
  return std::vector<uint8_t>(s.begin(), s.end());
}

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    static std::atomic<int> counter{0};
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = absl::StrCat(::testing::TempDir(), "/meft_safetensors_", info->name(), "_", ::getpid(),
                        "_", counter++);
    std::filesystem::remove_all(dir_);
    ASSERT_TRUE(std::filesystem::create_directories(dir_));
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  // Writes `content` to a fresh file in the test directory and returns its path.
  std::string WriteRaw(std::string_view content, std::string_view name = "t.safetensors") {
    std::string path = dir_ + "/" + std::string(name);
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(content.data(), static_cast<std::streamsize>(content.size()));
    out.close();
    EXPECT_TRUE(out.good()) << path;
    return path;
  }

  // Opens a corrupt file and checks the error code and that the message names the file and,
  // when given, the tensor and an extra fragment.
  void ExpectCorrupt(std::string_view content, std::string_view tensor = {},
                     std::string_view fragment = {}) {
    std::string path = WriteRaw(content);
    absl::StatusOr<std::unique_ptr<File>> file = File::Open(path);
    ASSERT_FALSE(file.ok()) << "accepted corrupt file";
    EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << file.status();
    EXPECT_THAT(file.status().message(), HasSubstr(path));
    if (!tensor.empty()) {
      EXPECT_THAT(file.status().message(), HasSubstr("'" + std::string(tensor) + "'"));
    }
    if (!fragment.empty()) {
      EXPECT_THAT(file.status().message(), HasSubstr(std::string(fragment)));
    }
  }

  std::string dir_;
};

TEST(DTypeTest, NamesSizesAndParsing) {
  const std::vector<std::tuple<DType, std::string_view, size_t>> expected = {
      {DType::kBool, "BOOL", 1}, {DType::kU8, "U8", 1},   {DType::kI8, "I8", 1},
      {DType::kI16, "I16", 2},   {DType::kU16, "U16", 2}, {DType::kF16, "F16", 2},
      {DType::kBF16, "BF16", 2}, {DType::kI32, "I32", 4}, {DType::kU32, "U32", 4},
      {DType::kF32, "F32", 4},   {DType::kF64, "F64", 8}, {DType::kI64, "I64", 8},
      {DType::kU64, "U64", 8},
  };
  for (const auto& [dtype, name, size] : expected) {
    EXPECT_EQ(DTypeName(dtype), name);
    EXPECT_EQ(DTypeSize(dtype), size) << name;
    absl::StatusOr<DType> parsed = ParseDType(name);
    ASSERT_TRUE(parsed.ok()) << name;
    EXPECT_EQ(*parsed, dtype);
  }
  for (std::string_view bad : {"", "f32", "F8_E4M3", "FLOAT", "F32 "}) {
    absl::StatusOr<DType> parsed = ParseDType(bad);
    ASSERT_FALSE(parsed.ok()) << bad;
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST_F(SafetensorsTest, ReadsHandBuiltFile) {
  // 1.5f = 0x3FC00000; int16 {1, -2} = 01 00 FE FF. Header keys in non-offset order on purpose,
  // and the header is not padded to a multiple of 8.
  const std::string header = R"({"b":{"dtype":"I16","shape":[2],"data_offsets":[4,8]},)"
                             R"("a":{"dtype":"F32","shape":[],"data_offsets":[0,4]},)"
                             R"("__metadata__":{"format":"pt","note":"h\u00e9"}})";
  const std::string data = Bytes({0x00, 0x00, 0xC0, 0x3F, 0x01, 0x00, 0xFE, 0xFF});
  std::string path = WriteRaw(Build(header, data));

  absl::StatusOr<std::unique_ptr<File>> file = File::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  const File& f = **file;
  EXPECT_EQ(f.path(), path);
  EXPECT_EQ(f.data_size(), 8u);
  ASSERT_EQ(f.tensors().size(), 2u);
  EXPECT_EQ(f.tensors()[0].name, "a");
  EXPECT_EQ(f.tensors()[0].dtype, DType::kF32);
  EXPECT_TRUE(f.tensors()[0].shape.empty());
  EXPECT_EQ(f.tensors()[0].begin, 0u);
  EXPECT_EQ(f.tensors()[0].end, 4u);
  EXPECT_EQ(f.tensors()[1].name, "b");
  EXPECT_EQ(f.tensors()[1].dtype, DType::kI16);
  EXPECT_EQ(f.tensors()[1].shape, std::vector<int64_t>{2});
  EXPECT_EQ(f.tensors()[1].begin, 4u);
  EXPECT_EQ(f.tensors()[1].end, 8u);

  const TensorInfo* b = f.Find("b");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->name, "b");
  EXPECT_EQ(f.Find("c"), nullptr);

  absl::StatusOr<std::span<const uint8_t>> a_data = f.Data("a");
  ASSERT_TRUE(a_data.ok()) << a_data.status();
  ASSERT_EQ(a_data->size(), 4u);
  float a_value;
  std::memcpy(&a_value, a_data->data(), 4);
  EXPECT_EQ(a_value, 1.5f);
  absl::StatusOr<std::span<const uint8_t>> b_data = f.Data("b");
  ASSERT_TRUE(b_data.ok()) << b_data.status();
  int16_t b_values[2];
  ASSERT_EQ(b_data->size(), sizeof(b_values));
  std::memcpy(b_values, b_data->data(), sizeof(b_values));
  EXPECT_EQ(b_values[0], 1);
  EXPECT_EQ(b_values[1], -2);

  const std::map<std::string, std::string> expected_metadata = {{"format", "pt"},
                                                                {"note", "h\xC3\xA9"}};
  EXPECT_EQ(f.metadata(), expected_metadata);

  EXPECT_TRUE(f.CheckTensor("a", DType::kF32, {}).ok());
  EXPECT_TRUE(f.CheckTensor("b", DType::kI16, {2}).ok());
}

TEST_F(SafetensorsTest, AcceptsSpacePaddedHeader) {
  std::string header = R"({"x":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}})";
  header.append(16, ' ');
  absl::StatusOr<std::unique_ptr<File>> file = File::Open(WriteRaw(Build(header, "abc")));
  ASSERT_TRUE(file.ok()) << file.status();
  absl::StatusOr<std::span<const uint8_t>> data = (*file)->Data("x");
  ASSERT_TRUE(data.ok());
  EXPECT_EQ(ToVector(*data), (std::vector<uint8_t>{'a', 'b', 'c'}));
}

TEST_F(SafetensorsTest, EmptyFileWithoutTensorsIsValid) {
  absl::StatusOr<std::unique_ptr<File>> file = File::Open(WriteRaw(Build("{}")));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE((*file)->tensors().empty());
  EXPECT_TRUE((*file)->metadata().empty());
  EXPECT_EQ((*file)->data_size(), 0u);

  file = File::Open(WriteRaw(Build(R"({"__metadata__":{}})")));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE((*file)->tensors().empty());

  file = File::Open(WriteRaw(Build(R"({"__metadata__":{"a":"b"}}   )")));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->metadata().at("a"), "b");
}

TEST_F(SafetensorsTest, EmptyAndZeroDimTensorsAreValid) {
  // Two empty tensors share offset 4 with the end of "s"; "z" [2,0,3] and "e" [0] have no bytes.
  const std::string header = R"({"s":{"dtype":"I32","shape":[],"data_offsets":[0,4]},)"
                             R"("z":{"dtype":"F64","shape":[2,0,3],"data_offsets":[4,4]},)"
                             R"("e":{"dtype":"BF16","shape":[0],"data_offsets":[4,4]},)"
                             R"("first":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}})";
  absl::StatusOr<std::unique_ptr<File>> file =
      File::Open(WriteRaw(Build(header, Bytes({7, 0, 0, 0}))));
  ASSERT_TRUE(file.ok()) << file.status();
  const File& f = **file;
  ASSERT_EQ(f.tensors().size(), 4u);
  EXPECT_EQ(f.tensors()[0].name, "first");
  EXPECT_EQ(f.tensors()[1].name, "s");
  EXPECT_EQ(f.tensors()[2].name, "e");  // Ties between empty tensors broken by name.
  EXPECT_EQ(f.tensors()[3].name, "z");
  absl::StatusOr<std::span<const uint8_t>> z = f.Data("z");
  ASSERT_TRUE(z.ok());
  EXPECT_TRUE(z->empty());
  EXPECT_TRUE(f.CheckTensor("z", DType::kF64, {2, 0, 3}).ok());
  absl::StatusOr<std::span<const uint8_t>> s = f.Data("s");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(ToVector(*s), (std::vector<uint8_t>{7, 0, 0, 0}));
}

TEST_F(SafetensorsTest, MissingTensorIsNotFoundNamingFileAndTensor) {
  std::string path =
      WriteRaw(Build(R"({"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", "a"));
  absl::StatusOr<std::unique_ptr<File>> file = File::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();

  absl::StatusOr<std::span<const uint8_t>> data = (*file)->Data("missing_weight");
  ASSERT_FALSE(data.ok());
  EXPECT_EQ(data.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(data.status().message(), HasSubstr(path));
  EXPECT_THAT(data.status().message(), HasSubstr("missing_weight"));

  absl::Status check = (*file)->CheckTensor("missing_weight", DType::kU8, {1});
  EXPECT_EQ(check.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(check.message(), HasSubstr(path));
  EXPECT_THAT(check.message(), HasSubstr("missing_weight"));
}

TEST_F(SafetensorsTest, CheckTensorMismatchNamesExpectedAndActual) {
  std::string path = WriteRaw(Build(
      R"({"layer.w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]}})", std::string(12, 'x')));
  absl::StatusOr<std::unique_ptr<File>> file = File::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();

  absl::Status status = (*file)->CheckTensor("layer.w", DType::kF32, {3, 2});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr(path));
  EXPECT_THAT(status.message(), HasSubstr("layer.w"));
  EXPECT_THAT(status.message(), HasSubstr("F32 [3, 2]"));
  EXPECT_THAT(status.message(), HasSubstr("BF16 [2, 3]"));

  status = (*file)->CheckTensor("layer.w", DType::kBF16, {6});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("[6]"));
}

TEST_F(SafetensorsTest, MissingFileIsNotFound) {
  std::string path = absl::StrCat(dir_, "/does_not_exist.safetensors");
  absl::StatusOr<std::unique_ptr<File>> file = File::Open(path);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(file.status().message(), HasSubstr(path));
}

TEST_F(SafetensorsTest, DirectoryIsRejected) {
  absl::StatusOr<std::unique_ptr<File>> file = File::Open(dir_);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(file.status().message(), HasSubstr(dir_));
}

TEST_F(SafetensorsTest, MoveKeepsDataValid) {
  std::string path =
      WriteRaw(Build(R"({"x":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})", "hi"));
  absl::StatusOr<std::unique_ptr<File>> file = File::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  File moved(std::move(**file));
  file->reset();
  absl::StatusOr<std::span<const uint8_t>> data = moved.Data("x");
  ASSERT_TRUE(data.ok());
  EXPECT_EQ(ToVector(*data), (std::vector<uint8_t>{'h', 'i'}));
}

// ---- Validation: one corrupt file per rule. ----

TEST_F(SafetensorsTest, RejectsFileShorterThanEightBytes) {
  ExpectCorrupt("", {}, "shorter");
  ExpectCorrupt(std::string(7, '\0'), {}, "shorter");
}

TEST_F(SafetensorsTest, RejectsZeroHeaderLength) {
  ExpectCorrupt(WithLength(0, ""), {}, "header length is 0");
  ExpectCorrupt(WithLength(0, "{}"), {}, "header length is 0");
}

TEST_F(SafetensorsTest, RejectsHugeHeaderLength) {
  ExpectCorrupt(WithLength((uint64_t{100} << 20) + 1, "{}"), {}, "exceeds the limit");
  ExpectCorrupt(WithLength(~uint64_t{0}, "{}"), {}, "exceeds the limit");
}

TEST_F(SafetensorsTest, RejectsHeaderBeyondFileEnd) {
  ExpectCorrupt(WithLength(3, "{}"), {}, "beyond the end");
  ExpectCorrupt(WithLength(1000, R"({"__metadata__":{}})"), {}, "beyond the end");
}

TEST_F(SafetensorsTest, RejectsInvalidUtf8Header) {
  ExpectCorrupt(Build("{\"\xFF\":{}}"), {}, "UTF-8");
  // Overlong encoding of '/' and a lone surrogate.
  ExpectCorrupt(Build("{\"\xC0\xAF\":{}}"), {}, "UTF-8");
  ExpectCorrupt(Build("{\"\xED\xA0\x80\":{}}"), {}, "UTF-8");
  // Truncated multi-byte sequence at the end of the header.
  ExpectCorrupt(Build("{}\xE2\x82"), {}, "UTF-8");
}

TEST_F(SafetensorsTest, RejectsInvalidJson) {
  ExpectCorrupt(Build(R"({"a":)"), {}, "not valid JSON");
  ExpectCorrupt(Build(R"({"a":{"dtype":"U8",}})"), {}, "not valid JSON");
  ExpectCorrupt(Build("{} {}"), {}, "not valid JSON");
  // A NUL byte must not end the header early (nlohmann would stop parsing there).
  ExpectCorrupt(Build(std::string("{}\0\0", 4)), {}, "not valid JSON");
  ExpectCorrupt(Build(std::string(R"({"__metadata__":{}})"
                                  "\0"
                                  R"({"a":1})",
                                  27)),
                {}, "not valid JSON");
}

TEST_F(SafetensorsTest, RejectsHeaderThatIsNotAnObject) {
  ExpectCorrupt(Build("[]"), {}, "must be a JSON object");
  ExpectCorrupt(Build(R"("x")"), {}, "must be a JSON object");
  ExpectCorrupt(Build("12345678"), {}, "must be a JSON object");
  ExpectCorrupt(Build("null"), {}, "must be a JSON object");
}

TEST_F(SafetensorsTest, RejectsEntryThatIsNotAnObject) {
  ExpectCorrupt(Build(R"({"w":[1,2]})"), "w", "must be an object");
  ExpectCorrupt(Build(R"({"w":"F32"})"), "w", "must be an object");
}

TEST_F(SafetensorsTest, RejectsMissingFields) {
  ExpectCorrupt(Build(R"({"w":{"shape":[1],"data_offsets":[0,1]}})", "a"), "w",
                "missing \"dtype\"");
  ExpectCorrupt(Build(R"({"w":{"dtype":"U8","data_offsets":[0,1]}})", "a"), "w",
                "missing \"shape\"");
  ExpectCorrupt(Build(R"({"w":{"dtype":"U8","shape":[1]}})", "a"), "w", "missing \"data_offsets\"");
}

TEST_F(SafetensorsTest, RejectsIllTypedFields) {
  ExpectCorrupt(Build(R"({"w":{"dtype":4,"shape":[1],"data_offsets":[0,1]}})", "a"), "w",
                "\"dtype\" must be a string");
  ExpectCorrupt(Build(R"({"w":{"dtype":"U8","shape":1,"data_offsets":[0,1]}})", "a"), "w",
                "\"shape\" must be an array");
  ExpectCorrupt(Build(R"({"w":{"dtype":"U8","shape":["1"],"data_offsets":[0,1]}})", "a"), "w",
                "non-negative integer");
  ExpectCorrupt(Build(R"({"w":{"dtype":"U8","shape":[1.0],"data_offsets":[0,1]}})", "a"), "w",
                "non-negative integer");
  ExpectCorrupt(Build(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":{"b":0}}})", "a"), "w",
                "\"data_offsets\" must be an array");
  ExpectCorrupt(Build(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[1]}})", "a"), "w",
                "\"data_offsets\" must be an array");
  ExpectCorrupt(Build(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}})", "a"), "w",
                "\"data_offsets\" must be an array");
  ExpectCorrupt(Build(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1.5]}})", "a"), "w",
                "non-negative integer");
  ExpectCorrupt(Build(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}})", "a"), "w",
                "negative");
  ExpectCorrupt(Build(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":["0","1"]}})", "a"), "w",
                "non-negative integer");
  // Larger than any u64: nlohmann parses it as a float.
  ExpectCorrupt(
      Build(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,99999999999999999999]}})", "a"),
      "w", "non-negative integer");
}

TEST_F(SafetensorsTest, RejectsUnknownDtype) {
  ExpectCorrupt(Build(R"({"w":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}})", "a"), "w",
                "unknown dtype \"F8_E4M3\"");
  ExpectCorrupt(Build(R"({"w":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}})", "abcd"), "w",
                "unknown dtype");
}

TEST_F(SafetensorsTest, RejectsNegativeDimension) {
  ExpectCorrupt(Build(R"({"w":{"dtype":"U8","shape":[2,-1],"data_offsets":[0,0]}})"), "w",
                "negative");
}

TEST_F(SafetensorsTest, RejectsDimensionAboveInt64) {
  ExpectCorrupt(Build(R"({"w":{"dtype":"U8","shape":[9223372036854775808],"data_offsets":[0,0]}})"),
                "w", "too large");
}

TEST_F(SafetensorsTest, RejectsShapeProductOverflow) {
  // 2^32 * 2^32 overflows u64 on its own; 2^31 * 2^31 * 4 bytes overflows only with the dtype.
  ExpectCorrupt(
      Build(R"({"w":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,0]}})"), "w",
      "overflows");
  ExpectCorrupt(
      Build(R"({"w":{"dtype":"F32","shape":[2147483648,2147483648,4],"data_offsets":[0,0]}})"), "w",
      "overflows");
}

TEST_F(SafetensorsTest, RejectsEndBeforeBegin) {
  ExpectCorrupt(
      Build(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})", std::string(8, '\0')), "w",
      "end 4 < begin 8");
}

TEST_F(SafetensorsTest, RejectsSizeNotMatchingShape) {
  ExpectCorrupt(Build(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", "abcd"), "w",
                "needs 8");
  ExpectCorrupt(Build(R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[0,4]}})", "abcd"), "w",
                "needs 0");
}

TEST_F(SafetensorsTest, RejectsOffsetsBeyondDataBuffer) {
  ExpectCorrupt(Build(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})"), "w",
                "beyond the data buffer");
  ExpectCorrupt(Build(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                      R"("w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                      "abcdef"),
                "w", "beyond the data buffer");
  ExpectCorrupt(Build(R"({"w":{"dtype":"U8","shape":[0],)"
                      R"("data_offsets":[18446744073709551615,18446744073709551615]}})"),
                "w", "beyond the data buffer");
}

TEST_F(SafetensorsTest, RejectsOverlappingTensors) {
  ExpectCorrupt(Build(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                      R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                      std::string(8, '\0')),
                "b", "overlap tensor 'a'");
  // Identical ranges.
  ExpectCorrupt(Build(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                      R"("b":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}})",
                      std::string(4, '\0')),
                "b", "overlap");
}

TEST_F(SafetensorsTest, RejectsDataBufferNotCoveredContiguously) {
  // Gap between tensors.
  ExpectCorrupt(Build(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                      R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                      std::string(12, '\0')),
                "b", "gap");
  // Gap before the first tensor.
  ExpectCorrupt(
      Build(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", std::string(8, '\0')), "a",
      "gap");
  // Trailing bytes after the last tensor.
  ExpectCorrupt(
      Build(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", std::string(8, '\0')), {},
      "[4, 8) are not covered");
  // Data present but no tensors at all.
  ExpectCorrupt(Build("{}", "x"), {}, "not covered");
}

TEST_F(SafetensorsTest, RejectsDuplicateTensorNames) {
  ExpectCorrupt(Build(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                      R"("w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
                      "ab"),
                "w", "duplicate tensor name");
  ExpectCorrupt(Build(R"({"":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                      R"("":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
                      "ab"),
                "", "duplicate tensor name");
  ExpectCorrupt(Build(R"({"__metadata__":{},"__metadata__":{}})"), {},
                "duplicate key \"__metadata__\"");
  // Duplicate keys inside an entry are rejected too.
  ExpectCorrupt(Build(R"({"w":{"dtype":"U8","dtype":"I8","shape":[1],"data_offsets":[0,1]}})", "a"),
                {}, "duplicate key \"dtype\"");
}

TEST_F(SafetensorsTest, RejectsDeeplyNestedValuesWithoutCrashing) {
  const size_t depth = 200000;
  const std::string open(depth, '['), close(depth, ']');
  ExpectCorrupt(Build(R"({"w":)" + open + close + "}"), "w", "must be an object, got array");
  ExpectCorrupt(Build(R"({"__metadata__":{"k":)" + open + close + "}}"), {},
                "must be a string, got array");
  ExpectCorrupt(Build(R"({"w":)" + open), {}, "not valid JSON");
  // A long string token in a syntax error does not make a huge message.
  std::string path = WriteRaw(Build(R"({"w":")" + std::string(1 << 20, 'x') + R"(" x})"));
  absl::StatusOr<std::unique_ptr<File>> file = File::Open(path);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_LT(file.status().message().size(), 4096u);
}

TEST_F(SafetensorsTest, RejectsMalformedMetadata) {
  ExpectCorrupt(Build(R"({"__metadata__":"x"})"), {}, "\"__metadata__\" must be an object");
  ExpectCorrupt(Build(R"({"__metadata__":null})"), {}, "\"__metadata__\" must be an object");
  ExpectCorrupt(Build(R"({"__metadata__":["a","b"]})"), {}, "\"__metadata__\" must be an object");
  ExpectCorrupt(Build(R"({"__metadata__":{"step":1}})"), {}, "key \"step\" must be a string");
  ExpectCorrupt(Build(R"({"__metadata__":{"nested":{"a":"b"}}})"), {}, "must be a string");
}

// Cutting a valid file anywhere must fail cleanly: the header no longer fits or the last tensor
// runs past the data buffer.
TEST_F(SafetensorsTest, EveryTruncationFailsCleanly) {
  const std::vector<uint8_t> a = {1, 2, 3, 4, 5, 6, 7, 8};
  const std::vector<uint8_t> b = {9, 10, 11, 12};
  std::string src = absl::StrCat(dir_, "/full.safetensors");
  absl::StatusOr<uint64_t> written = Write(src,
                                           {{"a", DType::kF32, {2}, a},
                                            {"empty", DType::kF16, {0, 4}, {}},
                                            {"b", DType::kU8, {2, 2}, b}},
                                           {{"k", "v"}});
  ASSERT_TRUE(written.ok()) << written.status();
  std::ifstream in(src, std::ios::binary);
  std::string full((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_EQ(full.size(), *written);
  ASSERT_TRUE(File::Open(WriteRaw(full)).ok());

  for (size_t cut = 0; cut < full.size(); ++cut) {
    std::string path = WriteRaw(std::string_view(full).substr(0, cut));
    absl::StatusOr<std::unique_ptr<File>> file = File::Open(path);
    ASSERT_FALSE(file.ok()) << "cut at " << cut;
    EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << "cut at " << cut;
    EXPECT_THAT(file.status().message(), HasSubstr(path)) << "cut at " << cut;
  }
  // Extra bytes at the end are not covered by any tensor.
  ExpectCorrupt(full + "x", {}, "not covered");
}

// Random single-byte corruptions of a valid file must never crash; whatever Open accepts must
// stay self-consistent.
TEST_F(SafetensorsTest, RandomCorruptionNeverCrashes) {
  std::vector<uint8_t> data(64);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i);
  std::string src = absl::StrCat(dir_, "/full.safetensors");
  ASSERT_TRUE(Write(src,
                    {{"x", DType::kI32, {2, 4}, std::span(data).subspan(0, 32)},
                     {"y", DType::kBF16, {16}, std::span(data).subspan(32, 32)}},
                    {{"format", "pt"}})
                  .ok());
  std::ifstream in(src, std::ios::binary);
  std::string full((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());

  std::mt19937 rng(12345);
  for (int trial = 0; trial < 500; ++trial) {
    std::string corrupt = full;
    size_t pos = rng() % corrupt.size();
    corrupt[pos] = static_cast<char>(rng() & 0xFF);
    std::string path = WriteRaw(corrupt);
    absl::StatusOr<std::unique_ptr<File>> file = File::Open(path);
    if (!file.ok()) {
      EXPECT_THAT(file.status().message(), HasSubstr(path));
      continue;
    }
    uint64_t covered = 0;
    for (const TensorInfo& t : (*file)->tensors()) {
      EXPECT_EQ(t.begin, covered);
      covered = t.end;
      absl::StatusOr<std::span<const uint8_t>> bytes = (*file)->Data(t.name);
      ASSERT_TRUE(bytes.ok());
      EXPECT_EQ(bytes->size(), t.end - t.begin);
    }
    EXPECT_EQ(covered, (*file)->data_size());
  }
}

// ---- Writer. ----

TEST_F(SafetensorsTest, WriterProducesExactBytes) {
  // Header {"x":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}} is 53 bytes, padded with three
  // spaces to 56 = 0x38.
  const std::vector<uint8_t> x = {1, 2};
  std::string path = absl::StrCat(dir_, "/tiny.safetensors");
  absl::StatusOr<uint64_t> written = Write(path, {{"x", DType::kU8, {2}, x}});
  ASSERT_TRUE(written.ok()) << written.status();

  std::string expected = Bytes({0x38, 0, 0, 0, 0, 0, 0, 0});
  expected += R"({"x":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})";
  expected += "   ";
  expected += Bytes({0x01, 0x02});
  ASSERT_EQ(expected.size(), 66u);

  std::ifstream in(path, std::ios::binary);
  std::string actual((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(actual, expected);
  EXPECT_EQ(*written, 66u);
}

TEST_F(SafetensorsTest, WriterPutsMetadataFirst) {
  // {"__metadata__":{"k":"v"},"x":{...}} is 78 bytes, padded to 80 = 0x50.
  const std::vector<uint8_t> x = {1, 2};
  std::string path = absl::StrCat(dir_, "/meta.safetensors");
  absl::StatusOr<uint64_t> written = Write(path, {{"x", DType::kU8, {2}, x}}, {{"k", "v"}});
  ASSERT_TRUE(written.ok()) << written.status();

  std::string expected = Bytes({0x50, 0, 0, 0, 0, 0, 0, 0});
  expected += R"({"__metadata__":{"k":"v"},"x":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})";
  expected += "  ";
  expected += Bytes({0x01, 0x02});
  std::ifstream in(path, std::ios::binary);
  std::string actual((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(actual, expected);
  EXPECT_EQ(*written, expected.size());
}

TEST_F(SafetensorsTest, WriterRoundTrip) {
  std::mt19937 rng(7);
  struct Case {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
  };
  const std::vector<Case> cases = {
      {"f32.matrix", DType::kF32, {3, 5}}, {"bf16", DType::kBF16, {7}},
      {"scalar_f64", DType::kF64, {}},     {"empty", DType::kI64, {0}},
      {"u8.cube", DType::kU8, {2, 3, 4}},  {"zero_dim", DType::kF16, {4, 0, 2}},
      {"bool", DType::kBool, {5}},         {"i8", DType::kI8, {3}},
      {"i16", DType::kI16, {2, 2}},        {"u16", DType::kU16, {1}},
      {"i32", DType::kI32, {1, 1, 1}},     {"u32", DType::kU32, {6}},
      {"u64", DType::kU64, {2}},           {"quote\"and\\slash/\xC3\xA9", DType::kF32, {1}},
  };
  std::vector<std::vector<uint8_t>> buffers;
  std::vector<TensorToWrite> tensors;
  for (const Case& c : cases) {
    size_t n = DTypeSize(c.dtype);
    for (int64_t d : c.shape) n *= static_cast<size_t>(d);
    std::vector<uint8_t> bytes(n);
    for (uint8_t& byte : bytes) byte = static_cast<uint8_t>(rng());
    buffers.push_back(std::move(bytes));
  }
  for (size_t i = 0; i < cases.size(); ++i) {
    tensors.push_back({cases[i].name, cases[i].dtype, cases[i].shape, buffers[i]});
  }
  const std::map<std::string, std::string> metadata = {
      {"format", "pt"}, {"step", "1200"}, {"unicode \xE2\x9C\x93", "line\nbreak\t\"q\""}};

  std::string path = absl::StrCat(dir_, "/round.safetensors");
  absl::StatusOr<uint64_t> written = Write(path, tensors, metadata);
  ASSERT_TRUE(written.ok()) << written.status();
  EXPECT_EQ(std::filesystem::file_size(path), *written);

  absl::StatusOr<std::unique_ptr<File>> file = File::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  const File& f = **file;
  EXPECT_EQ(f.metadata(), metadata);
  ASSERT_EQ(f.tensors().size(), cases.size());
  // Non-empty tensors keep the written order.
  std::vector<std::string> nonempty_written, nonempty_read;
  for (size_t i = 0; i < cases.size(); ++i) {
    if (!buffers[i].empty()) nonempty_written.push_back(cases[i].name);
  }
  for (const TensorInfo& t : f.tensors()) {
    if (t.end > t.begin) nonempty_read.push_back(t.name);
  }
  EXPECT_EQ(nonempty_read, nonempty_written);
  for (size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE(cases[i].name);
    EXPECT_TRUE(f.CheckTensor(cases[i].name, cases[i].dtype, cases[i].shape).ok());
    absl::StatusOr<std::span<const uint8_t>> data = f.Data(cases[i].name);
    ASSERT_TRUE(data.ok()) << data.status();
    EXPECT_EQ(ToVector(*data), buffers[i]);
  }

  // The header is padded to a multiple of 8.
  std::ifstream in(path, std::ios::binary);
  unsigned char len_bytes[8];
  in.read(reinterpret_cast<char*>(len_bytes), 8);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
  EXPECT_EQ(header_len % 8, 0u);
}

TEST_F(SafetensorsTest, WriterEmptyFileRoundTrip) {
  std::string path = absl::StrCat(dir_, "/empty.safetensors");
  absl::StatusOr<uint64_t> written = Write(path, {});
  ASSERT_TRUE(written.ok()) << written.status();
  EXPECT_EQ(*written, 16u);  // "{}" padded to 8 bytes.
  absl::StatusOr<std::unique_ptr<File>> file = File::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE((*file)->tensors().empty());
}

TEST_F(SafetensorsTest, WriterRejectsInconsistentInput) {
  std::string path = absl::StrCat(dir_, "/bad.safetensors");
  const std::vector<uint8_t> four(4);
  auto expect_rejected = [&](const std::vector<TensorToWrite>& tensors, std::string_view tensor,
                             std::string_view fragment) {
    absl::StatusOr<uint64_t> written = Write(path, tensors);
    ASSERT_FALSE(written.ok());
    EXPECT_EQ(written.status().code(), absl::StatusCode::kInvalidArgument) << written.status();
    EXPECT_THAT(written.status().message(), HasSubstr(path));
    if (!tensor.empty()) {
      EXPECT_THAT(written.status().message(), HasSubstr("'" + std::string(tensor) + "'"));
    }
    EXPECT_THAT(written.status().message(), HasSubstr(std::string(fragment)));
    EXPECT_FALSE(std::filesystem::exists(path)) << "wrote a file despite the error";
  };
  expect_rejected({{"w", DType::kF32, {2}, four}}, "w", "needs 8");
  expect_rejected({{"w", DType::kU8, {4}, four}, {"w", DType::kU8, {4}, four}}, "w", "duplicate");
  expect_rejected({{"w", DType::kU8, {-4}, four}}, "w", "negative");
  expect_rejected({{"__metadata__", DType::kU8, {4}, four}}, "__metadata__", "reserved");
  expect_rejected({{"", DType::kU8, {4}, four}}, {}, "empty name");
  expect_rejected({{"bad\xFF", DType::kU8, {4}, four}}, {}, "UTF-8");
  expect_rejected({{"big", DType::kU64, {int64_t{1} << 40, int64_t{1} << 40}, four}}, "big",
                  "overflows");

  absl::StatusOr<uint64_t> written =
      Write(path, {{"w", DType::kU8, {4}, four}}, {{"k", "bad\xC0"}});
  ASSERT_FALSE(written.ok());
  EXPECT_EQ(written.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(written.status().message(), HasSubstr(path));
}

TEST_F(SafetensorsTest, WriterReportsUnwritablePath) {
  std::string path = absl::StrCat(dir_, "/no_such_dir/out.safetensors");
  const std::vector<uint8_t> four(4);
  absl::StatusOr<uint64_t> written = Write(path, {{"w", DType::kU8, {4}, four}});
  ASSERT_FALSE(written.ok());
  EXPECT_EQ(written.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(written.status().message(), HasSubstr(path));
}

}  // namespace
}  // namespace meft::safetensors
