// Domain-level behaviour of ParamServer that the RPC tests do not reach: shutdown while a lookup
// waits, the bound on pending lookups, and confinement of checkpoint paths.

#include "param_server/server/param_server.h"

#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <future>
#include <optional>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "param_server/rpc/answer_sinks.h"
#include "param_server/server/memory_budget.h"
#include "param_server/store/layer_store.h"
#include "tests/testing/temp_dir.h"

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

// Only the step after the server's can be waited for (its Step may be running); a lookup two
// steps ahead is refused at once instead of holding a thread for step_wait_seconds (600 s here:
// the test would time out if it waited).
TEST(ParamServerTest, LookupMoreThanOneStepAheadFailsAtOnce) {
  ServerOptions o = Small();
  o.step_wait_seconds = 600;
  auto server = ParamServer::Create(o, nullptr);
  ASSERT_TRUE(server.ok());
  const Tokens t = MakeTokens(1.0f);
  const uint64_t before = (*server)->StateDigest();
  const absl::StatusOr<LookupReply> r = (*server)->Lookup(t.Call(2, 0));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
  EXPECT_THAT(std::string(r.status().message()),
              HasSubstr("header.step: lookup (step 2,"));
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("which is at step 0"));
  EXPECT_EQ((*server)->StateDigest(), before);
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

// The lookup cache's byte budget (lookup_cache_mb): each pending training lookup is charged its
// bound; one that would exceed the budget is refused with no state change; replays and
// evaluation lookups are not charged; a Step empties the cache and returns the charges.
TEST(ParamServerTest, LookupCacheBudgetBoundsPendingBytes) {
  ServerOptions o = Small();
  o.lookup_cache_bytes = LookupCacheBytesBound(o, 2) * 3 / 2;  // room for one 2-token lookup
  auto server = ParamServer::Create(o, nullptr);
  ASSERT_TRUE(server.ok());
  const Tokens a = MakeTokens(1.0f), b = MakeTokens(2.0f);
  ASSERT_TRUE((*server)->Lookup(a.Call(0, 0)).ok());
  const uint64_t before = (*server)->StateDigest();
  const auto r = (*server)->Lookup(b.Call(0, 1));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(r.status().message(), HasSubstr("lookup_cache_mb"));
  EXPECT_EQ((*server)->StateDigest(), before);
  EXPECT_TRUE((*server)->Lookup(a.Call(0, 0)).ok()) << "a replay is not charged again";
  LookupCall eval = b.Call(0, 1);
  eval.training = false;
  EXPECT_TRUE((*server)->Lookup(eval).ok()) << "evaluation lookups are never kept";
  ASSERT_TRUE((*server)->Step({0, 0.1, 1.0, {}}).ok());
  EXPECT_TRUE((*server)->Lookup(b.Call(1, 0)).ok()) << (*server)->Lookup(b.Call(1, 0)).status();
}

// std::bad_alloc while the store is allocated or a checkpoint is read becomes RESOURCE_EXHAUSTED
// naming what was being allocated; a failed restore leaves the served state as it was.
TEST(ParamServerTest, AllocationFailuresAreResourceExhaustedAndLoseNoState) {
  ServerOptions o = Small();
  o.layers = {0, 1};
  store::FailAllocationAfterForTesting(4);  // layer 0's three blocks, layer 1's keys, then fail
  auto failed = ParamServer::Create(o, nullptr);
  store::FailAllocationAfterForTesting(-1);
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(failed.status().message(), HasSubstr("layer 1: out of host memory"));

  const testing::TempDir tmp("meft_oom");
  const fs::path dir = tmp.Join("checkpoints");
  auto server = ParamServer::Create(o, nullptr);
  ASSERT_TRUE(server.ok()) << server.status();
  const auto saved = (*server)->SaveCheckpoint(dir.string());
  ASSERT_TRUE(saved.ok()) << saved.status();
  const Tokens t = MakeTokens(1.0f);
  ASSERT_TRUE((*server)->Lookup(t.Call(0, 0)).ok());  // state a failed restore must keep
  const uint64_t before = (*server)->StateDigest();
  store::FailAllocationAfterForTesting(2);
  const auto restored = (*server)->RestoreCheckpoint(saved->path, /*confine=*/false);
  store::FailAllocationAfterForTesting(-1);
  EXPECT_EQ(restored.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(restored.status().message(), HasSubstr("out of host memory reading the checkpoint"));
  EXPECT_EQ((*server)->StateDigest(), before);
  EXPECT_TRUE((*server)->RestoreCheckpoint(saved->path, false).ok());
}

// Overlap (DESIGN §3): Step updates layers in ascending order and answers a layer's next lookup
// as soon as that layer is done. The hook pauses Step(0) right after layer 0: a lookup of layer 0
// for step 1 must be answered then, with the updated parameters, while the lookup of layer 1 for
// step 1 (sent before the Step) is still held back. Without per-layer release the early lookup
// would time out after step_wait_seconds and the test would fail; nothing here depends on speed.
TEST(ParamServerTest, StepAnswersEachLayersNextLookupAsSoonAsThatLayerIsUpdated) {
  ServerOptions o = Small();
  o.layers = {0, 1};
  o.step_wait_seconds = 30;
  const Tokens t = MakeTokens(0.5f);
  auto call = [&](uint64_t step, uint32_t layer, bool training) {
    LookupCall c = t.Call(step, 0);
    c.header.layer = layer;
    c.training = training;
    c.row_dtype = wire::DType::kFp32;
    return c;
  };
  ParamServer* server = nullptr;
  std::future<absl::StatusOr<LookupReply>> late1;
  std::optional<absl::StatusOr<LookupReply>> early0;
  bool late1_held_back = false;
  o.on_layer_stepped = [&](uint32_t layer, uint64_t step) {
    if (layer != 0 || step != 0) return;
    early0 = std::async(std::launch::async, [&] { return server->Lookup(call(1, 0, true)); }).get();
    late1_held_back = late1.wait_for(std::chrono::seconds(0)) == std::future_status::timeout;
  };
  auto created = ParamServer::Create(o, nullptr);
  ASSERT_TRUE(created.ok()) << created.status();
  server = created->get();
  // Step 0: a lookup and gradients on both layers, so Step changes the values.
  for (uint32_t layer : {0u, 1u}) {
    auto r = server->Lookup(call(0, layer, true));
    ASSERT_TRUE(r.ok()) << r.status();
    const int64_t n = r->row_ids.shape[0];
    // Only the values move, so step 1 selects the same rows.
    std::vector<float> kg(n * 4, 0.0f), vg(n * 4, -0.5f), gg(2 * 3, 0.0f);
    const std::string kb(reinterpret_cast<const char*>(kg.data()), kg.size() * 4);
    const std::string vb(reinterpret_cast<const char*>(vg.data()), vg.size() * 4);
    const std::string gb(reinterpret_cast<const char*>(gg.data()), gg.size() * 4);
    ASSERT_TRUE(server
                    ->Gradients({{0, 0, layer},
                                 {wire::DType::kFp32, {n, 4}, kb},
                                 {wire::DType::kFp32, {n, 4}, vb},
                                 wire::TensorView{wire::DType::kFp32, {2, 3}, gb}})
                    .ok());
  }
  late1 = std::async(std::launch::async, [&] { return server->Lookup(call(1, 1, true)); });
  auto stepped = server->Step({0, 0.1, 1.0, {}});
  ASSERT_TRUE(stepped.ok()) << stepped.status();

  ASSERT_TRUE(early0.has_value()) << "the hook did not run after layer 0";
  ASSERT_TRUE(early0->ok()) << early0->status();
  EXPECT_TRUE(late1_held_back) << "layer 1 answered step 1 before its own update";
  const absl::StatusOr<LookupReply> late = late1.get();
  ASSERT_TRUE(late.ok()) << late.status();
  // The early answer already carries layer 0's updated values (V was 0 before the Step).
  auto after = server->Lookup(call(1, 0, false));
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ((*early0)->values.data, after->values.data);
  EXPECT_NE((*early0)->values.data, std::string(after->values.data.size(), '\0'));
}

TEST(ParamServerTest, CheckpointPathsFromRequestsStayInsideCheckpointDir) {
  const testing::TempDir tmp("meft_confine");
  const fs::path root = tmp.Join("root");
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
}

// A same-host lookup offers memory for its answer (LookupCall::answer_sink): each tensor goes
// straight into it, aligned, in field order, with the bytes of an ordinary answer; a sink too
// small for the whole answer leaves every tensor in its own bytes; and a placed answer is not
// held to the message limit, which only bounds answers that travel inside a message.
TEST(ParamServerTest, AnswerIsWrittenIntoTheOfferedOutputWhenItAllFits) {
  ServerOptions o = Small();
  auto server = ParamServer::Create(o, nullptr);
  ASSERT_TRUE(server.ok()) << server.status();
  const Tokens t = MakeTokens(0.3f);
  LookupCall call = t.Call(0, 0);
  call.training = false;
  const absl::StatusOr<LookupReply> plain = (*server)->Lookup(call);
  ASSERT_TRUE(plain.ok()) << plain.status();

  auto fields = [](const LookupReply& r) {
    return std::vector<const wire::Tensor*>{&r.row_ids,     &r.keys,        &r.values,
                                            &r.token_rows,  &r.token_gates, &r.token_experts,
                                            &r.expert_ids,  &r.router_rows};
  };
  uint64_t total = 0;
  for (const wire::Tensor* f : fields(*plain)) {
    ASSERT_TRUE(f->present) << "per_token gated answers have every field";
    ASSERT_FALSE(f->placed_offset.has_value());
    total += 64 + f->data.size();
  }

  alignas(64) static uint8_t memory[1 << 16];
  ASSERT_LT(100 + total, sizeof(memory));
  std::memset(memory, 0xAB, sizeof(memory));
  call.answer_sink = std::make_shared<rpc::RegionAnswerSink>(memory, 100, total);  // 1st at 128
  const absl::StatusOr<LookupReply> placed = (*server)->Lookup(call);
  ASSERT_TRUE(placed.ok()) << placed.status();
  uint64_t next = 100;
  const auto expected = fields(*plain);
  const auto got = fields(*placed);
  for (size_t i = 0; i < got.size(); ++i) {
    SCOPED_TRACE(i);
    ASSERT_TRUE(got[i]->placed_offset.has_value());
    const uint64_t at = *got[i]->placed_offset;
    EXPECT_EQ(at % 64, 0u);
    EXPECT_GE(at, next);
    EXPECT_LE(at + got[i]->placed_bytes, 100 + total);
    EXPECT_TRUE(got[i]->data.empty());
    EXPECT_EQ(got[i]->dtype, expected[i]->dtype);
    EXPECT_EQ(got[i]->shape, expected[i]->shape);
    EXPECT_EQ(std::string(reinterpret_cast<const char*>(memory + at), got[i]->placed_bytes),
              expected[i]->data);
    next = at + got[i]->placed_bytes;
  }
  EXPECT_EQ(memory[99], 0xAB) << "nothing is written before the output";
  EXPECT_EQ(memory[100 + total], 0xAB) << "nothing is written past it";

  // One aligned layout needs 64 bytes of slack per tensor at most; the sum of the bytes alone,
  // minus one, cannot hold the answer, so nothing is placed.
  uint64_t bytes = 0;
  for (const wire::Tensor* f : expected) bytes += f->data.size();
  call.answer_sink = std::make_shared<rpc::RegionAnswerSink>(memory, 0, bytes - 1);
  const absl::StatusOr<LookupReply> inline_reply = (*server)->Lookup(call);
  ASSERT_TRUE(inline_reply.ok()) << inline_reply.status();
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_FALSE(fields(*inline_reply)[i]->placed_offset.has_value());
    EXPECT_EQ(fields(*inline_reply)[i]->data, expected[i]->data);
  }

  o.max_response_bytes = 1024;  // smaller than any answer (the estimate adds 4096)
  auto limited = ParamServer::Create(o, nullptr);
  ASSERT_TRUE(limited.ok());
  call.answer_sink.reset();
  const absl::StatusOr<LookupReply> refused = (*limited)->Lookup(call);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(refused.status().message(), HasSubstr("message limit"));
  call.answer_sink = std::make_shared<rpc::RegionAnswerSink>(memory, 0, sizeof(memory));
  EXPECT_TRUE((*limited)->Lookup(call).ok()) << "a placed answer travels outside the message";
}

}  // namespace
}  // namespace meft::server
