// TempDir and MakeTempDir: fresh, distinct directories; TempDir removes its tree when it goes.

#include "tests/testing/temp_dir.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>

namespace meft::testing {
namespace {

namespace fs = std::filesystem;

TEST(TempDirTest, MakesAFreshEmptyDirectoryAndRemovesItsTree) {
  std::string path;
  {
    const TempDir tmp("meft_temp_dir_test");
    path = tmp.path();
    ASSERT_FALSE(path.empty());
    EXPECT_EQ(fs::path(path).filename().string().rfind("meft_temp_dir_test_", 0), 0u) << path;
    ASSERT_TRUE(fs::is_directory(path));
    EXPECT_TRUE(fs::is_empty(path));
    EXPECT_EQ(tmp.Join("a"), path + "/a");
    fs::create_directories(tmp.Join("a/b"));
    std::ofstream(tmp.Join("a/b/file")) << "x";
    ASSERT_TRUE(fs::exists(tmp.Join("a/b/file")));
  }
  EXPECT_FALSE(fs::exists(path));
}

TEST(TempDirTest, DirectoriesAreDistinct) {
  const TempDir a, b;
  EXPECT_NE(a.path(), b.path());
  const std::string kept = MakeTempDir("meft_temp_dir_test");
  ASSERT_FALSE(kept.empty());
  EXPECT_TRUE(fs::is_directory(kept));
  EXPECT_NE(kept, a.path());
  fs::remove_all(kept);
}

}  // namespace
}  // namespace meft::testing
