// The same-host transport on the server side: AttachArena, request tensors given as arena spans
// and answers written into a response region, checked byte for byte against the inline path
// and a twin server fed inline; every malformed span is rejected naming the field, with the
// server's state digest unchanged.

#include <gmock/gmock.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/metrics/metrics.h"
#include "common/shm/arena.h"
#include "meft/v1/param_server.grpc.pb.h"
#include "param_server/rpc/arena_registry.h"
#include "param_server/rpc/service.h"
#include "param_server/server/param_server.h"
#include "tests/testing/in_process_server.h"

namespace meft {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kDim = 32;
constexpr int64_t kTokens = 6;
constexpr int64_t kTopK = 4;

server::ServerOptions Options() {
  server::ServerOptions o;
  o.layers = {0};
  o.rows = 256;
  o.dim = kDim;
  o.experts = 16;
  o.selector.n_probe = 2;
  o.selector.top_k = kTopK;
  o.init.seed = 3;
  return o;
}

struct Served : testing::InProcessServer {
  std::unique_ptr<v1::ParamServer::Stub> stub;
};

std::unique_ptr<Served> Serve(rpc::ShmAttach attach = rpc::ShmAttach::kAuto) {
  auto s = std::make_unique<Served>();
  rpc::RpcOptions o = testing::LoopbackRpcOptions();
  o.shm_attach = attach;
  const absl::Status started = s->Start(Options(), o);
  if (!started.ok()) {
    ADD_FAILURE() << started;
    return nullptr;
  }
  s->stub = v1::ParamServer::NewStub(
      grpc::CreateChannel(s->address(), grpc::InsecureChannelCredentials()));
  return s;
}

std::vector<float> RandomFloats(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist;
  std::vector<float> v(n);
  for (float& f : v) f = dist(rng);
  return v;
}

void SetFloats(const std::vector<float>& values, std::vector<int64_t> shape, v1::Tensor* t) {
  t->set_dtype(v1::DTYPE_FP32);
  for (int64_t d : shape) t->add_shape(d);
  t->set_data(std::string(reinterpret_cast<const char*>(values.data()), values.size() * 4));
}

// The bytes of an answer tensor, inline or from `arena`.
std::string Bytes(const v1::Tensor& t, const shm::Arena& arena) {
  if (!t.has_arena()) return t.data();
  return std::string(reinterpret_cast<const char*>(arena.data() + t.arena().offset()),
                     t.arena().bytes());
}

class ShmRpcTest : public ::testing::Test {
 protected:
  void SetUp() override {
    served_ = Serve();
    ASSERT_NE(served_, nullptr);
    auto arena = shm::Arena::Create(1 << 20);
    ASSERT_TRUE(arena.ok()) << arena.status();
    arena_ = std::move(*arena);
    ASSERT_NO_FATAL_FAILURE(Attach());
  }

  void Attach() {
    grpc::ClientContext context;
    v1::AttachArenaRequest request;
    request.set_name(arena_->name());
    request.set_size(arena_->size());
    request.set_nonce(arena_->Nonce());
    v1::AttachArenaResponse response;
    const grpc::Status s = served_->stub->AttachArena(&context, request, &response);
    ASSERT_TRUE(s.ok()) << s.error_message();
    ASSERT_NE(response.arena_id(), 0u);
    arena_id_ = response.arena_id();
  }

  // Copies `values` to `offset` of the arena and points `t` there.
  void PutFloats(const std::vector<float>& values, std::vector<int64_t> shape, uint64_t offset,
                 v1::Tensor* t) {
    std::memcpy(arena_->data() + offset, values.data(), values.size() * 4);
    t->set_dtype(v1::DTYPE_FP32);
    for (int64_t d : shape) t->add_shape(d);
    t->mutable_arena()->set_offset(offset);
    t->mutable_arena()->set_bytes(values.size() * 4);
  }

  v1::LookupRequest ShmLookup(bool training, uint32_t micro_step = 0) {
    v1::LookupRequest r;
    r.mutable_header()->set_micro_step(micro_step);
    r.set_training(training);
    r.set_arena_id(arena_id_);
    PutFloats(x_, {kTokens, kDim}, 4096, r.mutable_x());
    r.mutable_response_region()->set_offset(65536);
    r.mutable_response_region()->set_bytes(512 << 10);
    return r;
  }

  grpc::Status Lookup(Served& s, const v1::LookupRequest& r, v1::LookupResponse* out) {
    grpc::ClientContext context;
    return s.stub->Lookup(&context, r, out);
  }
  grpc::Status Gradients(Served& s, const v1::GradientsRequest& r) {
    grpc::ClientContext context;
    v1::GradientsResponse out;
    return s.stub->Gradients(&context, r, &out);
  }

  // A request that must fail with `code` naming `field`, leaving the state digest unchanged.
  template <typename Request>
  void ExpectRejected(const Request& r, grpc::StatusCode code, const std::string& field) {
    const uint64_t before = served_->domain->StateDigest();
    grpc::Status s;
    if constexpr (std::is_same_v<Request, v1::LookupRequest>) {
      v1::LookupResponse out;
      s = Lookup(*served_, r, &out);
    } else {
      s = Gradients(*served_, r);
    }
    EXPECT_EQ(s.error_code(), code) << field << ": " << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr(field));
    EXPECT_EQ(served_->domain->StateDigest(), before) << field;
  }

  std::unique_ptr<Served> served_;
  std::unique_ptr<shm::Arena> arena_;
  uint64_t arena_id_ = 0;
  const std::vector<float> x_ = RandomFloats(kTokens * kDim, 1);
};

TEST_F(ShmRpcTest, AnswerInTheRegionEqualsTheInlineAnswer) {
  v1::LookupRequest inline_request;
  SetFloats(x_, {kTokens, kDim}, inline_request.mutable_x());
  v1::LookupResponse inline_answer, shm_answer;
  ASSERT_TRUE(Lookup(*served_, inline_request, &inline_answer).ok());
  ASSERT_TRUE(Lookup(*served_, ShmLookup(false), &shm_answer).ok());
  const auto fields = [](const v1::LookupResponse& r) {
    return std::vector<const v1::Tensor*>{&r.row_ids(),    &r.keys(),        &r.values(),
                                          &r.token_rows(), &r.token_gates(), &r.token_experts(),
                                          &r.expert_ids(), &r.router_rows()};
  };
  const auto a = fields(inline_answer), b = fields(shm_answer);
  for (size_t i = 0; i < a.size(); ++i) {
    SCOPED_TRACE(i);
    EXPECT_FALSE(a[i]->has_arena());
    EXPECT_TRUE(b[i]->has_arena());
    EXPECT_TRUE(b[i]->data().empty());
    EXPECT_EQ(b[i]->arena().offset() % shm::kAlignment, 0u);
    EXPECT_GE(b[i]->arena().offset(), 65536u);
    EXPECT_LE(b[i]->arena().offset() + b[i]->arena().bytes(), 65536u + (512 << 10));
    EXPECT_EQ(a[i]->dtype(), b[i]->dtype());
    EXPECT_EQ(std::vector<int64_t>(a[i]->shape().begin(), a[i]->shape().end()),
              std::vector<int64_t>(b[i]->shape().begin(), b[i]->shape().end()));
    EXPECT_EQ(Bytes(*a[i], *arena_), Bytes(*b[i], *arena_));
  }
  EXPECT_GT(inline_answer.keys().data().size(), 0u);
}

TEST_F(ShmRpcTest, TooSmallRegionGivesAnInlineAnswer) {
  v1::LookupRequest r = ShmLookup(false);
  r.mutable_response_region()->set_bytes(256);
  v1::LookupResponse answer;
  ASSERT_TRUE(Lookup(*served_, r, &answer).ok());
  EXPECT_FALSE(answer.keys().has_arena());
  EXPECT_EQ(answer.keys().data().size(),
            static_cast<size_t>(answer.keys().shape(0) * kDim * 2));  // bf16 by default
}

// Training through the arena changes the state exactly as the same requests sent inline to a
// twin server.
TEST_F(ShmRpcTest, TrainingThroughTheArenaMatchesATwinFedInline) {
  auto twin = Serve();
  ASSERT_NE(twin, nullptr);
  ASSERT_EQ(twin->domain->StateDigest(), served_->domain->StateDigest());
  v1::LookupResponse shm_answer, inline_answer;
  ASSERT_TRUE(Lookup(*served_, ShmLookup(true), &shm_answer).ok());
  v1::LookupRequest inline_request;
  inline_request.set_training(true);
  SetFloats(x_, {kTokens, kDim}, inline_request.mutable_x());
  ASSERT_TRUE(Lookup(*twin, inline_request, &inline_answer).ok());
  const int64_t n = shm_answer.row_ids().shape(0);
  const auto kg = RandomFloats(n * kDim, 2), vg = RandomFloats(n * kDim, 3);
  std::vector<float> gg = RandomFloats(kTokens * kTopK, 4);
  const std::string slots = Bytes(shm_answer.token_rows(), *arena_);
  for (size_t s = 0; s < gg.size(); ++s) {
    int32_t pos;
    std::memcpy(&pos, slots.data() + 4 * s, 4);
    if (pos < 0) gg[s] = 0.0f;
  }
  v1::GradientsRequest shm_grads, inline_grads;
  shm_grads.set_arena_id(arena_id_);
  PutFloats(kg, {n, kDim}, 4096, shm_grads.mutable_key_grads());
  PutFloats(vg, {n, kDim}, 4096 + shm::AlignUp(kg.size() * 4), shm_grads.mutable_value_grads());
  SetFloats(gg, {kTokens, kTopK}, shm_grads.mutable_gate_grads());  // inline and arena may mix
  SetFloats(kg, {n, kDim}, inline_grads.mutable_key_grads());
  SetFloats(vg, {n, kDim}, inline_grads.mutable_value_grads());
  SetFloats(gg, {kTokens, kTopK}, inline_grads.mutable_gate_grads());
  ASSERT_TRUE(Gradients(*served_, shm_grads).ok());
  ASSERT_TRUE(Gradients(*twin, inline_grads).ok());
  EXPECT_EQ(twin->domain->StateDigest(), served_->domain->StateDigest());
}

TEST_F(ShmRpcTest, MalformedSpansAreRejectedNamingTheFieldWithoutStateChange) {
  using grpc::StatusCode;
  {
    v1::LookupRequest r = ShmLookup(true);
    r.mutable_x()->mutable_arena()->set_offset(arena_->size() - 8);
    ExpectRejected(r, StatusCode::INVALID_ARGUMENT, "x.arena");
  }
  {
    v1::LookupRequest r = ShmLookup(true);
    r.mutable_x()->mutable_arena()->set_offset(0);  // the header
    ExpectRejected(r, StatusCode::INVALID_ARGUMENT, "x.arena");
  }
  {
    v1::LookupRequest r = ShmLookup(true);
    r.mutable_x()->mutable_arena()->set_offset(UINT64_MAX - 4);
    ExpectRejected(r, StatusCode::INVALID_ARGUMENT, "x.arena");
  }
  {
    v1::LookupRequest r = ShmLookup(true);
    r.mutable_x()->mutable_arena()->set_bytes(UINT64_MAX);
    ExpectRejected(r, StatusCode::INVALID_ARGUMENT, "x.arena");
  }
  {
    v1::LookupRequest r = ShmLookup(true);
    r.mutable_x()->mutable_arena()->set_bytes(kTokens * kDim * 4 - 4);  // does not match shape
    ExpectRejected(r, StatusCode::INVALID_ARGUMENT, "x.");
  }
  {
    v1::LookupRequest r = ShmLookup(true);
    r.mutable_x()->set_data(std::string(kTokens * kDim * 4, '\0'));
    ExpectRejected(r, StatusCode::INVALID_ARGUMENT, "x: both data and arena");
  }
  {
    v1::LookupRequest r = ShmLookup(true);
    r.set_arena_id(0);
    r.clear_response_region();
    ExpectRejected(r, StatusCode::INVALID_ARGUMENT, "x.arena: set, but the request names no");
  }
  {
    v1::LookupRequest r = ShmLookup(true);
    r.set_arena_id(arena_id_ ^ 1);
    ExpectRejected(r, StatusCode::FAILED_PRECONDITION, "arena_id: arena not attached");
  }
  {
    v1::LookupRequest r = ShmLookup(true);
    r.mutable_response_region()->set_bytes(arena_->size());
    ExpectRejected(r, StatusCode::INVALID_ARGUMENT, "response_region");
  }
  {
    v1::LookupRequest r = ShmLookup(true);
    r.mutable_response_region()->set_offset(8);
    ExpectRejected(r, StatusCode::INVALID_ARGUMENT, "response_region");
  }
  {
    v1::LookupRequest r;
    r.set_training(true);
    SetFloats(x_, {kTokens, kDim}, r.mutable_x());
    r.mutable_response_region()->set_offset(4096);
    r.mutable_response_region()->set_bytes(4096);
    ExpectRejected(r, StatusCode::INVALID_ARGUMENT, "response_region: set, but");
  }
  // Gradients of a real training lookup, each with one bad span.
  v1::LookupResponse answer;
  ASSERT_TRUE(Lookup(*served_, ShmLookup(true), &answer).ok());
  const int64_t n = answer.row_ids().shape(0);
  const auto good = [&] {
    v1::GradientsRequest g;
    g.set_arena_id(arena_id_);
    PutFloats(std::vector<float>(n * kDim, 0.5f), {n, kDim}, 4096, g.mutable_key_grads());
    PutFloats(std::vector<float>(n * kDim, 0.25f), {n, kDim}, 4096 + shm::AlignUp(n * kDim * 4),
              g.mutable_value_grads());
    SetFloats(std::vector<float>(kTokens * kTopK, 0.0f), {kTokens, kTopK}, g.mutable_gate_grads());
    return g;
  };
  {
    v1::GradientsRequest g = good();
    g.mutable_key_grads()->mutable_arena()->set_offset(arena_->size());
    ExpectRejected(g, StatusCode::INVALID_ARGUMENT, "key_grads.arena");
  }
  {
    v1::GradientsRequest g = good();
    g.mutable_value_grads()->mutable_arena()->set_bytes(8);
    ExpectRejected(g, StatusCode::INVALID_ARGUMENT, "value_grads");
  }
  {
    v1::GradientsRequest g = good();
    g.set_arena_id(arena_id_ + 1);
    ExpectRejected(g, StatusCode::FAILED_PRECONDITION, "arena_id: arena not attached");
  }
  {
    v1::GradientsRequest g = good();
    std::vector<float> nan(n * kDim, 0.5f);
    nan[3] = std::nanf("");
    PutFloats(nan, {n, kDim}, 4096, g.mutable_key_grads());
    g.mutable_key_grads()->clear_shape();
    g.mutable_key_grads()->add_shape(n);
    g.mutable_key_grads()->add_shape(kDim);
    ExpectRejected(g, StatusCode::INVALID_ARGUMENT, "key_grads.data: non-finite");
  }
  // The good request still works after all of that.
  EXPECT_TRUE(Gradients(*served_, good()).ok());
}

TEST_F(ShmRpcTest, AttachErrors) {
  const auto attach = [&](Served& s, const std::string& name, uint64_t size,
                          const std::string& nonce) {
    grpc::ClientContext context;
    v1::AttachArenaRequest request;
    request.set_name(name);
    request.set_size(size);
    request.set_nonce(nonce);
    v1::AttachArenaResponse response;
    return s.stub->AttachArena(&context, request, &response);
  };
  std::string wrong = arena_->Nonce();
  wrong[0] ^= 1;
  grpc::Status s = attach(*served_, arena_->name(), arena_->size(), wrong);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("nonce"));
  s = attach(*served_, arena_->name(), arena_->size(), "short");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("nonce"));
  s = attach(*served_, "/etc/passwd", 4096, arena_->Nonce());
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("name"));
  s = attach(*served_, "/meft-0-gone", 4096, arena_->Nonce());
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  s = attach(*served_, arena_->name(), arena_->size() + 1, arena_->Nonce());
  EXPECT_EQ(s.error_code(), grpc::StatusCode::OUT_OF_RANGE);
  EXPECT_THAT(s.error_message(), HasSubstr("size"));
  // The failed attaches left the working one alone.
  v1::LookupResponse answer;
  EXPECT_TRUE(Lookup(*served_, ShmLookup(false), &answer).ok());

  auto off = Serve(rpc::ShmAttach::kOff);
  ASSERT_NE(off, nullptr);
  s = attach(*off, arena_->name(), arena_->size(), arena_->Nonce());
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("shm.attach"));
}

TEST(ArenaRegistryTest, AttachDropsArenasWhoseNameIsGone) {
  rpc::ArenaRegistry registry;
  auto first = shm::Arena::Create(4096);
  ASSERT_TRUE(first.ok());
  auto first_id = registry.Attach((*first)->name(), 4096, (*first)->Nonce());
  ASSERT_TRUE(first_id.ok()) << first_id.status();
  auto kept = shm::Arena::Create(4096);
  ASSERT_TRUE(kept.ok());
  auto kept_id = registry.Attach((*kept)->name(), 4096, (*kept)->Nonce());
  ASSERT_TRUE(kept_id.ok()) << kept_id.status();
  EXPECT_EQ(registry.size(), 2u);
  // The first worker exits (its arena unlinks its name); a new one attaches under a new name.
  first->reset();
  auto second = shm::Arena::Create(4096);
  ASSERT_TRUE(second.ok());
  ASSERT_TRUE(registry.Attach((*second)->name(), 4096, (*second)->Nonce()).ok());
  EXPECT_EQ(registry.size(), 2u);
  EXPECT_EQ(registry.Find(*first_id).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(registry.Find(*kept_id).ok());
}

TEST(ArenaRegistryTest, ReleaseUnlinkedUnmapsArenasOfWorkersThatLeft) {
  rpc::ArenaRegistry registry;
  auto gone = shm::Arena::Create(4096);
  ASSERT_TRUE(gone.ok());
  auto gone_id = registry.Attach((*gone)->name(), 4096, (*gone)->Nonce());
  ASSERT_TRUE(gone_id.ok()) << gone_id.status();
  auto kept = shm::Arena::Create(4096);
  ASSERT_TRUE(kept.ok());
  auto kept_id = registry.Attach((*kept)->name(), 4096, (*kept)->Nonce());
  ASSERT_TRUE(kept_id.ok()) << kept_id.status();
  EXPECT_EQ(registry.ReleaseUnlinked(), 0u);
  // A request in flight holds the arena it uses.
  auto in_flight = registry.Find(*gone_id);
  ASSERT_TRUE(in_flight.ok());
  // The worker exits (its arena unlinks its name); no other worker attaches afterwards.
  gone->reset();
  EXPECT_EQ(registry.ReleaseUnlinked(), 1u);
  EXPECT_EQ(registry.size(), 1u);
  EXPECT_EQ(registry.Find(*gone_id).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(registry.Find(*kept_id).ok());
  EXPECT_EQ((*in_flight)->size(), 4096u);  // still mapped for the request that holds it
  EXPECT_EQ(registry.ReleaseUnlinked(), 0u);
}

TEST(ShmAttachPolicyTest, AutoOnlyOnLoopback) {
  rpc::RpcOptions o;
  o.listen = "127.0.0.1:1";
  EXPECT_TRUE(rpc::ShmAttachAllowed(o));
  o.listen = "0.0.0.0:1";
  EXPECT_FALSE(rpc::ShmAttachAllowed(o));
  o.shm_attach = rpc::ShmAttach::kOn;
  EXPECT_TRUE(rpc::ShmAttachAllowed(o));
  o.listen = "[::1]:1";
  o.shm_attach = rpc::ShmAttach::kOff;
  EXPECT_FALSE(rpc::ShmAttachAllowed(o));
}

}  // namespace
}  // namespace meft
