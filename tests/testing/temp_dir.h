#pragma once

// Temporary directories for tests.

#include <string>
#include <string_view>

namespace meft::testing {

// A fresh, empty directory under GoogleTest's temporary folder (::testing::TempDir(), which
// honours TEST_TMPDIR), named `<prefix>_XXXXXX`, removed with everything in it when this object is
// destroyed. When the directory cannot be made the current test fails (ADD_FAILURE) and path() is
// empty. Not copyable or movable: the path belongs to this object alone.
class TempDir {
 public:
  explicit TempDir(std::string_view prefix = "meft_test");
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  // The directory's path, without a trailing slash.
  const std::string& path() const { return path_; }
  // path() + "/" + name.
  std::string Join(std::string_view name) const;

 private:
  std::string path_;
};

// A fresh, empty directory as TempDir makes it, left in place: for state that lives as long as
// the test program (suite fixtures' static data), which the test runner's temporary folder
// outlives. Fails the current test and returns "" when it cannot be made.
std::string MakeTempDir(std::string_view prefix = "meft_test");

}  // namespace meft::testing
