// Checkpoint and restore through the parameter server's gRPC face continue bit-identically (see
// rpc_test_util.h for the harness and the wire encoding).

#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "tests/param_server/rpc_test_util.h"
#include "tests/testing/temp_dir.h"

namespace meft::rpc_test {
namespace {

using ::meft::testing::TempDir;

// ---------------------------------------------------------------------------------------------
// 8. Checkpoint and restore through RPC continue bit-identically.

// One lookup -> gradients -> step cycle of `step` over both layers, the same on any server.
void RunStep(Harness* h, uint64_t step, uint32_t seed, std::vector<std::string>* answers) {
  std::mt19937 rng(seed);
  for (uint32_t layer : {0u, 2u}) {
    for (uint32_t micro = 0; micro < 2; ++micro) {
      const Batch b = RandomBatch(&rng, 6, {1, 1, 1, 1, 1, 0});
      v1::LookupResponse resp;
      ASSERT_RPC_OK(h->Lookup(MakeLookup(b, step, micro, layer, true, v1::DTYPE_BF16), &resp));
      answers->push_back(resp.SerializeAsString());
      const Grads g = RandomGradsFor(Decode(resp), b.tokens, true, &rng);
      v1::GradientsResponse gresp;
      ASSERT_RPC_OK(h->Gradients(MakeGradients(g, b.tokens, step, micro, layer), &gresp));
    }
  }
  v1::StepRequest r;
  r.set_step(step);
  r.set_lr(3e-3);
  r.set_clip_factor(0.75);
  v1::StepResponse resp;
  ASSERT_RPC_OK(h->Step(r, &resp));
  ASSERT_EQ(resp.server_step(), step + 1);
}

TEST(RpcCheckpointTest, RestoreContinuesBitIdentically) {
  TempDir tmp;
  auto a = StartHarness(SmallOptions());
  ASSERT_NE(a, nullptr);
  std::vector<std::string> answers_a, answers_b;
  RunStep(a.get(), 0, 11, &answers_a);
  ASSERT_FALSE(HasFatalFailure());

  v1::SaveCheckpointRequest save;
  save.set_directory(tmp.path());
  v1::SaveCheckpointResponse saved;
  ASSERT_RPC_OK(a->Save(save, &saved));
  EXPECT_EQ(saved.step(), 1u);
  EXPECT_GT(saved.bytes_written(), 0u);
  EXPECT_EQ(saved.path(), tmp.path() + "/checkpoint-1");
  EXPECT_TRUE(std::filesystem::is_directory(saved.path()));

  // A fresh server with a different seed, so the restore has something to overwrite.
  server::ServerOptions o = SmallOptions();
  o.init.seed = 8;
  auto b = StartHarness(o);
  ASSERT_NE(b, nullptr);
  EXPECT_NE(a->Digest(), b->Digest());
  v1::RestoreCheckpointRequest restore;
  restore.set_path(saved.path());
  v1::RestoreCheckpointResponse restored;
  ASSERT_RPC_OK(b->Restore(restore, &restored));
  EXPECT_EQ(restored.step(), 1u);
  EXPECT_EQ(restored.path(), saved.path());
  EXPECT_EQ(a->Digest(), b->Digest());
  v1::ServerInfoResponse info;
  ASSERT_RPC_OK(b->Info(&info));
  EXPECT_EQ(info.step(), 1u);

  // Continuing on both gives the same answers and the same state.
  answers_a.clear();
  RunStep(a.get(), 1, 12, &answers_a);
  RunStep(b.get(), 1, 12, &answers_b);
  ASSERT_FALSE(HasFatalFailure());
  EXPECT_EQ(answers_a, answers_b);
  EXPECT_EQ(a->Digest(), b->Digest());

  // Restoring from the root folder picks its newest checkpoint.
  ASSERT_RPC_OK(a->Save(save, &saved));
  EXPECT_EQ(saved.step(), 2u);
  restore.set_path(tmp.path());
  ASSERT_RPC_OK(b->Restore(restore, &restored));
  EXPECT_EQ(restored.step(), 2u);
  EXPECT_EQ(a->Digest(), b->Digest());
}

}  // namespace
}  // namespace meft::rpc_test
