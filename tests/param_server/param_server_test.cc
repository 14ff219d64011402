// Domain-level behaviour of ParamServer that the RPC tests do not reach: shutdown while a lookup
// waits, the bound on pending lookups, and confinement of checkpoint paths.

#include "param_server/server/param_server.h"

#include <unistd.h>

#include <filesystem>
#include <future>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace meft::server {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;

ServerOptions Small() {
  ServerOptions o;
  o.layers = {0};
  o.rows = 32;
  o.dim = 4;
  o.experts = 4;
  o.selector.n_probe = 2;
  o.selector.top_k = 3;
  return o;
}

struct Tokens {
  std::vector<float> x;
  std::string bytes;
  LookupCall Call(uint64_t step, uint32_t micro) const {
    return {{step, micro, 0}, {wire::DType::kFp32, {2, 4}, bytes}, {}, true, {}, {}};
  }
};

Tokens MakeTokens(float base) {
  Tokens t;
  for (int i = 0; i < 8; ++i) t.x.push_back(base + 0.1f * static_cast<float>(i));
  t.bytes.assign(reinterpret_cast<const char*>(t.x.data()), t.x.size() * sizeof(float));
  return t;
}

TEST(ParamServerTest, ShutdownReleasesALookupWaitingForTheNextStep) {
  ServerOptions o = Small();
  o.step_wait_seconds = 600;  // would block the test for ten minutes without the shutdown
  auto server = ParamServer::Create(o, nullptr);
  ASSERT_TRUE(server.ok());
  const Tokens t = MakeTokens(1.0f);
  auto waiting = std::async(std::launch::async, [&] { return (*server)->Lookup(t.Call(1, 0)); });
  // Whether the shutdown comes before or after the lookup starts waiting, it must fail.
  (*server)->BeginShutdown();
  const absl::StatusOr<LookupReply> r = waiting.get();
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
}

TEST(ParamServerTest, CancelledWaitEnds) {
  ServerOptions o = Small();
  o.step_wait_seconds = 600;
  auto server = ParamServer::Create(o, nullptr);
  LookupCall call = MakeTokens(1.0f).Call(1, 0);
  const Tokens t = MakeTokens(1.0f);
  call.x.data = t.bytes;
  call.is_cancelled = [] { return true; };
  EXPECT_EQ((*server)->Lookup(call).status().code(), absl::StatusCode::kCancelled);
}

TEST(ParamServerTest, PendingLookupsAreBounded) {
  ServerOptions o = Small();
  o.max_pending_lookups = 2;
  auto server = ParamServer::Create(o, nullptr);
  const Tokens a = MakeTokens(1.0f), b = MakeTokens(2.0f), c = MakeTokens(3.0f);
  ASSERT_TRUE((*server)->Lookup(a.Call(0, 0)).ok());
  ASSERT_TRUE((*server)->Lookup(b.Call(0, 1)).ok());
  const uint64_t before = (*server)->StateDigest();
  const auto r = (*server)->Lookup(c.Call(0, 2));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(r.status().message(), HasSubstr("max_pending_lookups"));
  EXPECT_EQ((*server)->StateDigest(), before);
  EXPECT_TRUE((*server)->Lookup(a.Call(0, 0)).ok()) << "a replay is not a new pending lookup";
  LookupCall eval = c.Call(0, 2);
  eval.training = false;
  EXPECT_TRUE((*server)->Lookup(eval).ok()) << "evaluation lookups are never kept";
}

TEST(ParamServerTest, CheckpointPathsFromRequestsStayInsideCheckpointDir) {
  const fs::path root =
      fs::path(::testing::TempDir()) / ("meft_confine_" + std::to_string(::getpid()));
  fs::remove_all(root);
  ServerOptions o = Small();
  o.checkpoint_dir = (root / "ckpt").string();
  auto server = ParamServer::Create(o, nullptr);
  ASSERT_TRUE(server.ok());
  const uint64_t before = (*server)->StateDigest();
  for (const std::string& bad :
       {std::string("../elsewhere"), (root / "elsewhere").string(), std::string("/tmp")}) {
    SCOPED_TRACE(bad);
    const auto saved = (*server)->SaveCheckpoint(bad);
    EXPECT_EQ(saved.status().code(), absl::StatusCode::kPermissionDenied);
    EXPECT_THAT(saved.status().message(), HasSubstr("directory"));
    const auto restored = (*server)->RestoreCheckpoint(bad);
    EXPECT_EQ(restored.status().code(), absl::StatusCode::kPermissionDenied);
    EXPECT_THAT(restored.status().message(), HasSubstr("path"));
  }
  EXPECT_FALSE(fs::exists(root / "elsewhere"));
  // Inside is fine, relative or absolute.
  const auto rel = (*server)->SaveCheckpoint("run-a");
  ASSERT_TRUE(rel.ok()) << rel.status();
  EXPECT_EQ(rel->path, (root / "ckpt" / "run-a" / "checkpoint-0").string());
  ASSERT_TRUE((*server)->SaveCheckpoint("").ok());
  ASSERT_TRUE((*server)->RestoreCheckpoint((root / "ckpt" / "run-a").string()).ok());
  // The operator may restore from anywhere.
  fs::create_directories(root / "outside");
  fs::rename(root / "ckpt" / "run-a" / "checkpoint-0", root / "outside" / "checkpoint-0");
  EXPECT_TRUE((*server)->RestoreCheckpoint((root / "outside").string(), /*confine=*/false).ok());
  EXPECT_EQ((*server)->StateDigest(), before);
  fs::remove_all(root);
}

}  // namespace
}  // namespace meft::server
