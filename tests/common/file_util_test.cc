#include "common/io/file_util.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace meft::io {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

class FileUtilTest : public ::testing::Test {
 protected:
  void SetUp() override {
    static std::atomic<int> counter{0};
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = absl::StrCat(::testing::TempDir(), "/meft_file_util_", info->name(), "_", ::getpid(),
                        "_", counter++);
    std::filesystem::remove_all(dir_);
    ASSERT_TRUE(std::filesystem::create_directories(dir_));
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  std::string Path(std::string_view name) const { return dir_ + "/" + std::string(name); }

  // Reads a file with the standard library, independently of ReadFile.
  static std::string Slurp(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  }

  static void Spit(const std::string& path, std::string_view content) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(content.data(), static_cast<std::streamsize>(content.size()));
  }

  // Names in `dir_` (not recursive), sorted, via std::filesystem.
  std::vector<std::string> Entries() const {
    std::vector<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator(dir_)) {
      names.push_back(entry.path().filename().string());
    }
    std::sort(names.begin(), names.end());
    return names;
  }

  std::string dir_;
};

TEST_F(FileUtilTest, WriteFileDurablyAndReadFileRoundTrip) {
  const std::string path = Path("data.bin");
  const std::string binary("\0\x01\xFF\n", 4);
  ASSERT_TRUE(WriteFileDurably(path, {"hello", "", " world", binary}).ok());
  const std::string expected = "hello world" + binary;
  EXPECT_EQ(Slurp(path), expected);
  absl::StatusOr<std::string> read = ReadFile(path);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(*read, expected);

  // Rewriting truncates.
  ASSERT_TRUE(WriteFileDurably(path, {"xy"}).ok());
  read = ReadFile(path);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(*read, "xy");

  // No chunks: an empty file.
  ASSERT_TRUE(WriteFileDurably(path, {}).ok());
  read = ReadFile(path);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(*read, "");
}

TEST_F(FileUtilTest, WriteFileDurablyLargeChunks) {
  const std::string path = Path("large.bin");
  std::string a(3 << 20, 'a');
  std::string b(1 << 20, 'b');
  for (size_t i = 0; i < a.size(); i += 4093) a[i] = static_cast<char>(i & 0xFF);
  ASSERT_TRUE(WriteFileDurably(path, {a, b}).ok());
  absl::StatusOr<std::string> read = ReadFile(path);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_TRUE(*read == a + b);
}

TEST_F(FileUtilTest, WriteFileDurablyErrorNamesPath) {
  // Parent directory missing.
  std::string path = Path("missing_dir/file.bin");
  absl::Status status = WriteFileDurably(path, {"x"});
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(status.message(), HasSubstr(path));
  EXPECT_THAT(status.message(), HasSubstr("No such file or directory"));

  // A parent component is a regular file.
  Spit(Path("plain"), "x");
  path = Path("plain/file.bin");
  status = WriteFileDurably(path, {"x"});
  EXPECT_FALSE(status.ok());
  EXPECT_THAT(status.message(), HasSubstr(path));

  // The path is a directory.
  status = WriteFileDurably(dir_, {"x"});
  EXPECT_FALSE(status.ok());
  EXPECT_THAT(status.message(), HasSubstr(dir_));
}

TEST_F(FileUtilTest, ReadFileErrors) {
  const std::string path = Path("absent");
  absl::StatusOr<std::string> read = ReadFile(path);
  ASSERT_FALSE(read.ok());
  EXPECT_EQ(read.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(read.status().message(), HasSubstr(path));

  read = ReadFile(dir_);
  ASSERT_FALSE(read.ok());
  EXPECT_THAT(read.status().message(), HasSubstr(dir_));
}

TEST_F(FileUtilTest, FsyncDirectory) {
  EXPECT_TRUE(FsyncDirectory(dir_).ok());
  const std::string path = Path("absent");
  absl::Status status = FsyncDirectory(path);
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(status.message(), HasSubstr(path));
}

TEST_F(FileUtilTest, CreateDirectories) {
  const std::string nested = Path("a/b/c");
  ASSERT_TRUE(CreateDirectories(nested).ok());
  EXPECT_TRUE(std::filesystem::is_directory(nested));
  EXPECT_TRUE(CreateDirectories(nested).ok());  // Idempotent.

  Spit(Path("file"), "x");
  absl::Status status = CreateDirectories(Path("file"));
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(status.message(), HasSubstr(Path("file")));

  const std::string below_file = Path("file/sub");
  status = CreateDirectories(below_file);
  EXPECT_FALSE(status.ok());
  EXPECT_THAT(status.message(), HasSubstr(below_file));
}

TEST_F(FileUtilTest, RemoveAll) {
  ASSERT_TRUE(std::filesystem::create_directories(Path("tree/x/y")));
  Spit(Path("tree/x/y/f"), "1");
  Spit(Path("tree/g"), "2");
  ASSERT_TRUE(RemoveAll(Path("tree")).ok());
  EXPECT_FALSE(std::filesystem::exists(Path("tree")));

  Spit(Path("single"), "3");
  ASSERT_TRUE(RemoveAll(Path("single")).ok());
  EXPECT_FALSE(std::filesystem::exists(Path("single")));

  EXPECT_TRUE(RemoveAll(Path("never_existed")).ok());
  EXPECT_TRUE(RemoveAll(Path("never/existed/either")).ok());
}

TEST_F(FileUtilTest, PathExistsAndListDirectory) {
  EXPECT_TRUE(PathExists(dir_));
  EXPECT_FALSE(PathExists(Path("nope")));

  absl::StatusOr<std::vector<std::string>> names = ListDirectory(dir_);
  ASSERT_TRUE(names.ok()) << names.status();
  EXPECT_THAT(*names, IsEmpty());

  Spit(Path("b"), "");
  Spit(Path("a"), "");
  Spit(Path("C"), "");
  ASSERT_TRUE(std::filesystem::create_directory(Path("sub")));
  Spit(Path("sub/inner"), "");
  EXPECT_TRUE(PathExists(Path("a")));
  EXPECT_TRUE(PathExists(Path("sub")));

  names = ListDirectory(dir_);
  ASSERT_TRUE(names.ok()) << names.status();
  EXPECT_THAT(*names, ElementsAre("C", "a", "b", "sub"));

  const std::string missing = Path("missing");
  names = ListDirectory(missing);
  ASSERT_FALSE(names.ok());
  EXPECT_EQ(names.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(names.status().message(), HasSubstr(missing));
}

TEST_F(FileUtilTest, ReplaceDirectoryAtomicallyWithoutExistingFinal) {
  const std::string tmp = Path("ckpt.tmp");
  const std::string final_dir = Path("ckpt");
  ASSERT_TRUE(CreateDirectories(tmp).ok());
  ASSERT_TRUE(WriteFileDurably(tmp + "/weights", {"new"}).ok());
  ASSERT_TRUE(FsyncDirectory(tmp).ok());

  ASSERT_TRUE(ReplaceDirectoryAtomically(tmp, final_dir).ok());
  EXPECT_FALSE(std::filesystem::exists(tmp));
  EXPECT_EQ(Slurp(final_dir + "/weights"), "new");
  EXPECT_THAT(Entries(), ElementsAre("ckpt"));
}

TEST_F(FileUtilTest, ReplaceDirectoryAtomicallyReplacesExistingFinal) {
  const std::string tmp = Path("ckpt.tmp");
  const std::string final_dir = Path("ckpt");
  ASSERT_TRUE(std::filesystem::create_directories(final_dir + "/nested"));
  Spit(final_dir + "/weights", "old");
  Spit(final_dir + "/old_only", "stale");
  Spit(final_dir + "/nested/deep", "stale");

  ASSERT_TRUE(CreateDirectories(tmp).ok());
  ASSERT_TRUE(WriteFileDurably(tmp + "/weights", {"new"}).ok());
  ASSERT_TRUE(WriteFileDurably(tmp + "/new_only", {"fresh"}).ok());
  ASSERT_TRUE(FsyncDirectory(tmp).ok());

  ASSERT_TRUE(ReplaceDirectoryAtomically(tmp, final_dir).ok());
  EXPECT_FALSE(std::filesystem::exists(tmp));
  EXPECT_EQ(Slurp(final_dir + "/weights"), "new");
  EXPECT_EQ(Slurp(final_dir + "/new_only"), "fresh");
  EXPECT_FALSE(std::filesystem::exists(final_dir + "/old_only"));
  EXPECT_FALSE(std::filesystem::exists(final_dir + "/nested"));
  // The old content (swapped under the temporary name) is gone.
  EXPECT_THAT(Entries(), ElementsAre("ckpt"));

  // A second replacement works the same way.
  ASSERT_TRUE(CreateDirectories(tmp).ok());
  ASSERT_TRUE(WriteFileDurably(tmp + "/weights", {"newer"}).ok());
  ASSERT_TRUE(ReplaceDirectoryAtomically(tmp, final_dir + "/").ok());
  EXPECT_EQ(Slurp(final_dir + "/weights"), "newer");
  EXPECT_FALSE(std::filesystem::exists(final_dir + "/new_only"));
  EXPECT_THAT(Entries(), ElementsAre("ckpt"));
}

TEST_F(FileUtilTest, ReplaceDirectoryAtomicallyMissingTmpLeavesFinalIntact) {
  const std::string final_dir = Path("ckpt");
  ASSERT_TRUE(std::filesystem::create_directories(final_dir));
  Spit(final_dir + "/weights", "old");

  const std::string tmp = Path("absent.tmp");
  absl::Status status = ReplaceDirectoryAtomically(tmp, final_dir);
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(status.message(), HasSubstr(tmp));
  EXPECT_EQ(Slurp(final_dir + "/weights"), "old");
  EXPECT_THAT(Entries(), ElementsAre("ckpt"));
}

TEST_F(FileUtilTest, ReplaceDirectoryAtomicallyFailedExchangeLeavesFinalIntact) {
  // A directory cannot be exchanged with its own subdirectory (EINVAL): nothing may change.
  const std::string tmp = Path("ckpt.tmp");
  const std::string final_dir = Path("ckpt.tmp/ckpt");
  ASSERT_TRUE(std::filesystem::create_directories(final_dir));
  Spit(final_dir + "/weights", "old");

  absl::Status status = ReplaceDirectoryAtomically(tmp, final_dir);
  EXPECT_FALSE(status.ok());
  EXPECT_THAT(status.message(), HasSubstr(final_dir));
  EXPECT_EQ(Slurp(final_dir + "/weights"), "old");
  EXPECT_THAT(Entries(), ElementsAre("ckpt.tmp"));
  absl::StatusOr<std::vector<std::string>> inside = ListDirectory(tmp);
  ASSERT_TRUE(inside.ok()) << inside.status();
  EXPECT_THAT(*inside, ElementsAre("ckpt"));
}

TEST_F(FileUtilTest, ReplaceDirectoryAtomicallyRejectsNonDirectoryTmp) {
  const std::string tmp = Path("file.tmp");
  Spit(tmp, "x");
  absl::Status status = ReplaceDirectoryAtomically(tmp, Path("ckpt"));
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(status.message(), HasSubstr(tmp));
  EXPECT_FALSE(std::filesystem::exists(Path("ckpt")));
}

}  // namespace
}  // namespace meft::io
