// The worker's gRPC client with the same-host shared-memory transport against real in-process
// parameter servers: answers bit-identical to the inline gRPC transport over a training step,
// fallback and errors when the arena cannot be attached, re-attaching after the server lost it,
// concurrent lookups, answer tensors that outlive the client, shm at non-loopback addresses,
// and retrying the set-up after a transient failure.

#include "gpu_worker/rpc/shm_transport.h"

#include <gmock/gmock.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/metrics/metrics.h"
#include "gpu_worker/rpc/grpc_param_client.h"
#include "meft/v1/param_server.grpc.pb.h"
#include "param_server/rpc/service.h"
#include "param_server/server/param_server.h"
#include "tests/testing/in_process_server.h"

namespace meft::worker {
namespace {

using ::testing::HasSubstr;
using Transport = GrpcClientOptions::Transport;

server::ServerOptions Options(int64_t dim = 32, int64_t rows = 256) {
  server::ServerOptions o;
  o.layers = {0, 1};
  o.rows = rows;
  o.dim = dim;
  o.experts = 16;
  o.selector.n_probe = 2;
  o.selector.top_k = 4;
  o.init.seed = 11;
  return o;
}

struct Served : testing::InProcessServer {
  // Successful AttachArena calls this server answered.
  double Attaches() {
    return registry
        .AddCounter("meft_ps_requests_total", "Requests by method and status code",
                    {{"method", "AttachArena"}, {"code", "OK"}})
        .Value();
  }
};

std::unique_ptr<Served> Serve(const server::ServerOptions& options,
                              rpc::ShmAttach attach = rpc::ShmAttach::kAuto) {
  auto s = std::make_unique<Served>();
  rpc::RpcOptions o = testing::LoopbackRpcOptions();
  o.shm_attach = attach;
  const absl::Status started = s->Start(options, o);
  EXPECT_TRUE(started.ok()) << started;
  if (!started.ok()) return nullptr;
  return s;
}

std::unique_ptr<ParamClient> Client(const std::string& address, Transport transport,
                                    uint64_t arena_bytes = 0) {
  GrpcClientOptions o;
  o.address = address;
  o.deadline_seconds = 20;
  o.transport = transport;
  o.shm_arena_bytes = arena_bytes;
  auto client = CreateGrpcParamClient(o);
  EXPECT_TRUE(client.ok()) << client.status();
  return client.ok() ? std::move(*client) : nullptr;
}

void ExpectSameTensor(const torch::Tensor& a, const torch::Tensor& b, const char* what) {
  ASSERT_EQ(a.defined(), b.defined()) << what;
  if (!a.defined()) return;
  ASSERT_EQ(a.scalar_type(), b.scalar_type()) << what;
  ASSERT_EQ(a.sizes(), b.sizes()) << what;
  EXPECT_TRUE(torch::equal(a, b)) << what;
}

void ExpectSame(const LookupReply& a, const LookupReply& b) {
  ExpectSameTensor(a.row_ids, b.row_ids, "row_ids");
  ExpectSameTensor(a.keys, b.keys, "keys");
  ExpectSameTensor(a.values, b.values, "values");
  ExpectSameTensor(a.token_rows, b.token_rows, "token_rows");
  ExpectSameTensor(a.token_gates, b.token_gates, "token_gates");
  ExpectSameTensor(a.token_experts, b.token_experts, "token_experts");
  ExpectSameTensor(a.expert_ids, b.expert_ids, "expert_ids");
  ExpectSameTensor(a.router_rows, b.router_rows, "router_rows");
  EXPECT_EQ(a.replayed, b.replayed);
}

// Bytes of an answer as the server sent it: integer tensors as int32 (the client widens them).
double WireBytes(const LookupReply& r) {
  double bytes = 0;
  for (const torch::Tensor* t : {&r.row_ids, &r.keys, &r.values, &r.token_rows, &r.token_gates,
                                 &r.token_experts, &r.expert_ids, &r.router_rows}) {
    if (!t->defined()) continue;
    bytes += static_cast<double>(t->numel()) *
             (t->scalar_type() == torch::kInt64 ? 4.0 : static_cast<double>(t->element_size()));
  }
  return bytes;
}

torch::Tensor X(int64_t tokens, int64_t dim, uint64_t seed) {
  torch::manual_seed(seed);
  return torch::randn({tokens, dim});
}

// One training step through each client (lookups and gradients on both layers, norm, step) and
// a lookup of the next step; every answer and the servers' states must match exactly.
TEST(ShmTransportTest, TrainingStepIsBitIdenticalToGrpc) {
  auto shm_server = Serve(Options());
  auto grpc_server = Serve(Options());
  ASSERT_TRUE(shm_server && grpc_server);
  auto shm = Client(shm_server->address(), Transport::kShm);
  auto grpc = Client(grpc_server->address(), Transport::kGrpc);
  ASSERT_TRUE(shm && grpc);
  double expected_up = 0, expected_down = 0;  // tensor bytes through the arena
  const torch::Tensor mask = torch::tensor({1, 1, 1, 0, 1, 1, 1, 1}, torch::kUInt8);
  for (uint32_t layer : {0u, 1u}) {
    const RequestHeader h{.step = 0, .micro_step = 0, .layer = layer};
    const torch::Tensor x = X(8, 32, layer);
    auto a = shm->Lookup(h, x, mask, /*training=*/true);
    auto b = grpc->Lookup(h, x, mask, /*training=*/true);
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    ExpectSame(*a, *b);
    EXPECT_EQ(a->keys.scalar_type(), torch::kBFloat16);  // bf16 rows by default
    expected_up += x.numel() * 4.0;
    expected_down += WireBytes(*a);
    const int64_t n = a->row_ids.size(0);
    torch::manual_seed(100 + layer);
    const torch::Tensor kg = torch::randn({n, 32}), vg = torch::randn({n, 32});
    const torch::Tensor gg = torch::randn({8, 4}) * a->token_rows.ge(0);
    expected_up += (kg.numel() + vg.numel() + gg.numel()) * 4.0;
    ASSERT_TRUE(shm->Gradients(h, kg, vg, gg).ok());
    ASSERT_TRUE(grpc->Gradients(h, kg, vg, gg).ok());
  }
  auto na = shm->GradNorm(0);
  auto nb = grpc->GradNorm(0);
  ASSERT_TRUE(na.ok() && nb.ok());
  EXPECT_EQ(*na, *nb);
  EXPECT_GT(*na, 0.0);
  ASSERT_TRUE(shm->Step(0, 1e-2, 1.0).ok());
  ASSERT_TRUE(grpc->Step(0, 1e-2, 1.0).ok());
  EXPECT_EQ(shm_server->domain->StateDigest(), grpc_server->domain->StateDigest());
  for (uint32_t layer : {0u, 1u}) {
    const RequestHeader h{.step = 1, .micro_step = 0, .layer = layer};
    const torch::Tensor x = X(8, 32, layer);
    auto a = shm->Lookup(h, x, torch::Tensor(), true);
    auto b = grpc->Lookup(h, x, torch::Tensor(), true);
    ASSERT_TRUE(a.ok() && b.ok());
    ExpectSame(*a, *b);
    expected_up += x.numel() * 4.0;
    expected_down += WireBytes(*a);
  }
  EXPECT_EQ(shm_server->Attaches(), 1.0);
  EXPECT_EQ(grpc_server->Attaches(), 0.0);
  // Every tensor crossed through the arena, and the servers' counters say so: x and the fp32
  // gradients up, every answer tensor down (ids and slots as int32, rows as bf16).
  auto counter = [](Served* s, const char* name) {
    return s->registry.AddCounter(name, "").Value();
  };
  EXPECT_EQ(counter(shm_server.get(), "meft_ps_arena_bytes_received_total"), expected_up);
  EXPECT_EQ(counter(shm_server.get(), "meft_ps_arena_bytes_sent_total"), expected_down);
  EXPECT_EQ(counter(grpc_server.get(), "meft_ps_arena_bytes_received_total"), 0.0);
  EXPECT_EQ(counter(grpc_server.get(), "meft_ps_arena_bytes_sent_total"), 0.0);
}

TEST(ShmTransportTest, AutoUsesShmOnLoopbackAndFp32RowsMatch) {
  auto served = Serve(Options());
  ASSERT_TRUE(served);
  GrpcClientOptions o;
  o.address = served->address();
  o.bf16_rows = false;
  o.bf16_grads = true;
  auto shm = CreateGrpcParamClient(o);  // transport defaults to auto
  o.transport = Transport::kGrpc;
  auto grpc = CreateGrpcParamClient(o);
  ASSERT_TRUE(shm.ok() && grpc.ok());
  const torch::Tensor x = X(5, 32, 3);
  auto a = (*shm)->Lookup({.layer = 1}, x, torch::Tensor(), false);
  auto b = (*grpc)->Lookup({.layer = 1}, x, torch::Tensor(), false);
  ASSERT_TRUE(a.ok() && b.ok());
  ExpectSame(*a, *b);
  EXPECT_EQ(a->keys.scalar_type(), torch::kFloat32);
  EXPECT_EQ(served->Attaches(), 1.0);
}

// meft.bf16_grads: gradients encoded to bf16 straight into the arena reach the server as the
// same bits as gradients encoded into a gRPC message.
TEST(ShmTransportTest, Bf16GradientsMatchGrpc) {
  auto shm_server = Serve(Options());
  auto grpc_server = Serve(Options());
  ASSERT_TRUE(shm_server && grpc_server);
  GrpcClientOptions o;
  o.bf16_grads = true;
  o.address = shm_server->address();
  o.transport = Transport::kShm;
  auto shm = CreateGrpcParamClient(o);
  o.address = grpc_server->address();
  o.transport = Transport::kGrpc;
  auto grpc = CreateGrpcParamClient(o);
  ASSERT_TRUE(shm.ok() && grpc.ok());
  const RequestHeader h{.step = 0, .micro_step = 0, .layer = 0};
  const torch::Tensor x = X(9, 32, 8);
  auto a = (*shm)->Lookup(h, x, torch::Tensor(), true);
  auto b = (*grpc)->Lookup(h, x, torch::Tensor(), true);
  ASSERT_TRUE(a.ok() && b.ok());
  const int64_t n = a->row_ids.size(0);
  torch::manual_seed(5);
  const torch::Tensor kg = torch::randn({n, 32}), vg = torch::randn({n, 32}) * 1e-3;
  const torch::Tensor gg = torch::randn({9, 4}) * a->token_rows.ge(0);
  ASSERT_TRUE((*shm)->Gradients(h, kg, vg, gg).ok());
  ASSERT_TRUE((*grpc)->Gradients(h, kg, vg, gg).ok());
  EXPECT_EQ(shm_server->domain->StateDigest(), grpc_server->domain->StateDigest());
  // Through the arena indeed: x (fp32), key and value gradients (bf16), gate gradients (fp32).
  EXPECT_EQ(shm_server->registry.AddCounter("meft_ps_arena_bytes_received_total", "").Value(),
            x.numel() * 4.0 + (kg.numel() + vg.numel()) * 2.0 + gg.numel() * 4.0);
  // And the server got bf16: fp32 gradients would have changed the state differently.
  auto fp32_server = Serve(Options());
  o.bf16_grads = false;
  o.address = fp32_server->address();
  auto fp32 = CreateGrpcParamClient(o);
  ASSERT_TRUE(fp32.ok());
  ASSERT_TRUE((*fp32)->Lookup(h, x, torch::Tensor(), true).ok());
  ASSERT_TRUE((*fp32)->Gradients(h, kg, vg, gg).ok());
  EXPECT_NE(fp32_server->domain->StateDigest(), grpc_server->domain->StateDigest());
}

TEST(ShmTransportTest, AutoFallsBackToGrpcWhenTheServerRefusesShm) {
  auto refusing = Serve(Options(), rpc::ShmAttach::kOff);
  auto twin = Serve(Options());
  ASSERT_TRUE(refusing && twin);
  auto autod = Client(refusing->address(), Transport::kAuto);
  auto grpc = Client(twin->address(), Transport::kGrpc);
  const torch::Tensor x = X(6, 32, 5);
  auto a = autod->Lookup({.layer = 0}, x, torch::Tensor(), false);
  auto b = grpc->Lookup({.layer = 0}, x, torch::Tensor(), false);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  ExpectSame(*a, *b);
  EXPECT_EQ(refusing->Attaches(), 0.0);

  auto required = Client(refusing->address(), Transport::kShm);
  auto failed = required->Lookup({.layer = 0}, x, torch::Tensor(), false);
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kFailedPrecondition) << failed.status();
  EXPECT_THAT(std::string(failed.status().message()), HasSubstr("meft.transport: shm"));
  EXPECT_THAT(std::string(failed.status().message()), HasSubstr("shm.attach"));
  // The error sticks: later calls fail the same way instead of silently going inline.
  EXPECT_EQ(
      required->Gradients({}, torch::zeros({1, 32}), torch::zeros({1, 32}), torch::Tensor()).code(),
      absl::StatusCode::kFailedPrecondition);
}

TEST(ShmTransportTest, ReattachesAfterTheServerRestarts) {
  auto served = Serve(Options());
  ASSERT_TRUE(served);
  auto shm = Client(served->address(), Transport::kShm);
  const torch::Tensor x = X(4, 32, 9);
  auto before = shm->Lookup({.layer = 0}, x, torch::Tensor(), false);
  ASSERT_TRUE(before.ok()) << before.status();
  EXPECT_EQ(served->Attaches(), 1.0);

  // A new gRPC server on the same port knows no arenas, as after a process restart.
  served->running->Shutdown(1.0);
  metrics::Registry restarted_registry;
  rpc::RpcOptions o;
  o.listen = served->address();
  auto restarted = rpc::StartServer(o, served->domain.get(), &restarted_registry);
  ASSERT_TRUE(restarted.ok()) << restarted.status();
  absl::StatusOr<LookupReply> after = absl::UnavailableError("not called");
  for (int i = 0; i < 100 && absl::IsUnavailable(after.status()); ++i) {
    if (i > 0) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    after = shm->Lookup({.layer = 0}, x, torch::Tensor(), false);
  }
  ASSERT_TRUE(after.ok()) << after.status();
  ExpectSame(*before, *after);
  EXPECT_EQ(
      restarted_registry
          .AddCounter("meft_ps_requests_total", "", {{"method", "AttachArena"}, {"code", "OK"}})
          .Value(),
      1.0);
  EXPECT_EQ(restarted_registry
                .AddCounter("meft_ps_requests_total", "",
                            {{"method", "Lookup"}, {"code", "FAILED_PRECONDITION"}})
                .Value(),
            1.0);
  (*restarted)->Shutdown(1.0);
}

TEST(ShmTransportTest, ConcurrentLookupsMatchSequentialOnes) {
  auto served = Serve(Options());
  ASSERT_TRUE(served);
  auto shm = Client(served->address(), Transport::kShm);
  auto grpc = Client(served->address(), Transport::kGrpc);
  constexpr int kThreads = 4, kPerThread = 12;
  // Inputs made up front: torch's global generator is not for concurrent seeding.
  std::map<std::pair<int, int>, torch::Tensor> inputs;
  std::map<std::pair<int, int>, LookupReply> expected;
  for (int t = 0; t < kThreads; ++t) {
    for (int i = 0; i < kPerThread; ++i) {
      inputs[{t, i}] = X(3 + i, 32, t * 100 + i);
      auto r = grpc->Lookup({.layer = static_cast<uint32_t>(i % 2)}, inputs[{t, i}],
                            torch::Tensor(), false);
      ASSERT_TRUE(r.ok()) << r.status();
      expected[{t, i}] = *r;
    }
  }
  std::vector<std::map<int, LookupReply>> per_thread(kThreads);
  std::vector<absl::Status> errors(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread && errors[t].ok(); ++i) {
        auto r = shm->Lookup({.layer = static_cast<uint32_t>(i % 2)}, inputs.at({t, i}),
                             torch::Tensor(), false);
        if (!r.ok()) {
          errors[t] = r.status();
        } else {
          per_thread[t][i] = *std::move(r);  // kept: later answers must not overwrite it
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) {
    ASSERT_TRUE(errors[t].ok()) << errors[t];
    for (int i = 0; i < kPerThread; ++i) {
      SCOPED_TRACE(::testing::Message() << "thread " << t << " lookup " << i);
      ExpectSame(per_thread[t][i], expected[{t, i}]);
    }
  }
}

TEST(ShmTransportTest, AnswersOutliveTheClient) {
  auto served = Serve(Options());
  ASSERT_TRUE(served);
  const torch::Tensor x = X(7, 32, 21);
  // Inline answers alias the received message; their values stay right after the client is gone
  // (that the alias holds its owner is tested in answer_tensor_test).
  absl::StatusOr<LookupReply> expected;
  {
    auto grpc = Client(served->address(), Transport::kGrpc);
    expected = grpc->Lookup({.layer = 1}, x, torch::Tensor(), false);
    ASSERT_TRUE(expected.ok());
  }
  auto fresh = Client(served->address(), Transport::kGrpc)->Lookup({.layer = 1}, x, {}, false);
  ASSERT_TRUE(fresh.ok());
  ExpectSame(*expected, *fresh);
  LookupReply kept;
  {
    auto shm = Client(served->address(), Transport::kShm);
    auto r = shm->Lookup({.layer = 1}, x, torch::Tensor(), false);
    ASSERT_TRUE(r.ok()) << r.status();
    kept = *r;
  }
  ExpectSame(kept, *expected);
}

// meft.transport: shm attaches at an address that is not a numeric loopback one (a compose
// service name, say); AttachArena's nonce proves the shared host. auto keeps such addresses on
// gRPC.
TEST(ShmTransportTest, ShmAttachesAtANonLoopbackAddress) {
  auto served = Serve(Options());
  ASSERT_TRUE(served);
  const std::string address = "ipv4:" + served->address();  // not loopback to rpc::IsLoopback
  const torch::Tensor x = X(4, 32, 13);
  auto required = Client(address, Transport::kShm);
  auto a = required->Lookup({.layer = 0}, x, torch::Tensor(), false);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(served->Attaches(), 1.0);
  auto autod = Client(address, Transport::kAuto);
  auto b = autod->Lookup({.layer = 0}, x, torch::Tensor(), false);
  ASSERT_TRUE(b.ok()) << b.status();
  ExpectSame(*a, *b);
  EXPECT_EQ(served->Attaches(), 1.0);
}

// A transient failure while setting up the arena (the server not up yet) is not remembered:
// once the server answers, meft.transport: shm works.
TEST(ShmTransportTest, TransientSetupFailureIsRetried) {
  auto served = Serve(Options());
  ASSERT_TRUE(served);
  served->running->Shutdown(1.0);
  auto shm = Client(served->address(), Transport::kShm);
  const torch::Tensor x = X(4, 32, 17);
  auto down = shm->Lookup({.layer = 0}, x, torch::Tensor(), false);
  EXPECT_EQ(down.status().code(), absl::StatusCode::kUnavailable) << down.status();

  metrics::Registry restarted_registry;
  rpc::RpcOptions o;
  o.listen = served->address();
  auto restarted = rpc::StartServer(o, served->domain.get(), &restarted_registry);
  ASSERT_TRUE(restarted.ok()) << restarted.status();
  absl::StatusOr<LookupReply> up = down;
  for (int i = 0; i < 100 && absl::IsUnavailable(up.status()); ++i) {
    if (i > 0) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    up = shm->Lookup({.layer = 0}, x, torch::Tensor(), false);
  }
  ASSERT_TRUE(up.ok()) << up.status();
  EXPECT_EQ(
      restarted_registry
          .AddCounter("meft_ps_requests_total", "", {{"method", "AttachArena"}, {"code", "OK"}})
          .Value(),
      1.0);
  (*restarted)->Shutdown(1.0);
}

TEST(ShmTransportTest, ArenaTooSmallForAnAnswer) {
  // d = 1024, r = 512: the answer to 200 tokens may hold 512 rows, 2 MiB of bf16 keys and values.
  auto served = Serve(Options(/*dim=*/1024, /*rows=*/512));
  ASSERT_TRUE(served);
  const torch::Tensor x = X(200, 1024, 2);
  auto required = Client(served->address(), Transport::kShm, /*arena_bytes=*/1 << 20);
  auto failed = required->Lookup({.layer = 0}, x, torch::Tensor(), false);
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kResourceExhausted) << failed.status();
  EXPECT_THAT(std::string(failed.status().message()), HasSubstr("meft.shm_arena_mb"));
  // auto sends that answer inline instead, and the result is the same as over gRPC.
  auto autod = Client(served->address(), Transport::kAuto, 1 << 20);
  auto grpc = Client(served->address(), Transport::kGrpc);
  auto a = autod->Lookup({.layer = 0}, x, torch::Tensor(), false);
  auto b = grpc->Lookup({.layer = 0}, x, torch::Tensor(), false);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  ExpectSame(*a, *b);
  GrpcClientOptions bad;
  bad.shm_arena_bytes = 1000;
  EXPECT_THAT(std::string(CreateGrpcParamClient(bad).status().message()),
              HasSubstr("meft.shm_arena_mb"));
}

TEST(ShmTransportTest, SizeBoundsFollowTheServerDescription) {
  ServerInfo d;
  d.dim = 4096;
  d.rows = 8464;
  d.top_k = 64;
  d.n_probe = 8;
  d.experts = 368;
  d.max_rows = 2000;
  d.max_tokens = 512;
  // 2000 rows of bf16 K and V, ids, three [512, 64] slot tensors, 368 experts' ids and rows.
  const uint64_t expected = 64 + 8000 + 2 * 2000 * 8192 + 3 * 512 * 64 * 4 + 1472 + 368 * 8192;
  EXPECT_EQ(ResponseBytesBound(d, 512, 2), expected);
  d.per_token = false;
  EXPECT_EQ(ResponseBytesBound(d, 512, 2), 64 + 8000 + 2 * 2000 * 8192);
  d.max_rows = 0;
  d.rows = 131072;
  d.max_tokens = 8192;
  EXPECT_EQ(DefaultArenaBytes(d, 2), uint64_t{4} << 30);  // capped
  d.dim = 8;
  d.rows = 64;
  d.max_tokens = 16;
  EXPECT_EQ(DefaultArenaBytes(d, 2), uint64_t{64} << 20);  // at least 64 MiB
}

// A fake parameter server that accepts any arena, records where each Lookup's x and response
// region lie, holds the first Lookup until the test releases it (as a server still selecting
// would, past the client's deadline) and refuses every Lookup with INVALID_ARGUMENT (a definite
// answer).
class RecordingServer final : public v1::ParamServer::Service {
 public:
  struct Spans {
    uint64_t x_offset = 0, x_bytes = 0, region_offset = 0, region_bytes = 0;
  };

  grpc::Status ServerInfo(grpc::ServerContext*, const v1::ServerInfoRequest*,
                          v1::ServerInfoResponse* r) override {
    r->add_layers(0);
    r->set_rows(256);
    r->set_dim(32);
    r->set_experts(16);
    r->set_n_probe(2);
    r->set_top_k(4);
    r->set_max_tokens(64);
    r->set_mode(v1::SELECTION_MODE_PER_TOKEN);
    r->set_gated(true);
    return grpc::Status::OK;
  }
  grpc::Status AttachArena(grpc::ServerContext*, const v1::AttachArenaRequest*,
                           v1::AttachArenaResponse* r) override {
    r->set_arena_id(1);
    return grpc::Status::OK;
  }
  grpc::Status Lookup(grpc::ServerContext*, const v1::LookupRequest* request,
                      v1::LookupResponse*) override {
    bool first = false;
    {
      std::lock_guard lock(mu_);
      spans_.push_back({request->x().arena().offset(), request->x().arena().bytes(),
                        request->response_region().offset(), request->response_region().bytes()});
      first = spans_.size() == 1;
    }
    if (first && hold_first_) {
      // Held until the test has seen the client give up (bounded, so a failing test ends).
      std::unique_lock lock(mu_);
      released_cv_.wait_for(lock, std::chrono::seconds(60), [this] { return released_; });
    }
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "refused by the test");
  }

  void Release() {
    {
      std::lock_guard lock(mu_);
      released_ = true;
    }
    released_cv_.notify_all();
  }

  std::vector<Spans> spans() {
    std::lock_guard lock(mu_);
    return spans_;
  }
  bool hold_first_ = true;

 private:
  std::mutex mu_;
  std::condition_variable released_cv_;
  bool released_ = false;
  std::vector<Spans> spans_;
};

bool Overlap(uint64_t a, uint64_t a_bytes, uint64_t b, uint64_t b_bytes) {
  return a < b + b_bytes && b < a + a_bytes;
}

// The regions of a call that ended without a definite answer (here its deadline passed while
// the server still held it) are kept out of the allocator: the server may yet read x from them
// or write its answer there. The regions of a definitely refused call are reused at once, which
// shows the check below can see reuse.
TEST(ShmTransportTest, RegionsOfACallTheServerMayStillRunAreNotReused) {
  for (const bool hold_first : {true, false}) {
    SCOPED_TRACE(hold_first ? "first call times out" : "first call refused");
    RecordingServer service;
    service.hold_first_ = hold_first;
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&service);
    std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
    ASSERT_TRUE(server != nullptr && port != 0);
    GrpcClientOptions o;
    o.address = "127.0.0.1:" + std::to_string(port);
    o.transport = Transport::kShm;
    o.deadline_seconds = 2;  // per call; only the held call comes near it
    auto client = CreateGrpcParamClient(o);
    ASSERT_TRUE(client.ok()) << client.status();
    const torch::Tensor x = X(16, 32, 1);
    const auto first = (*client)->Lookup({.layer = 0}, x, torch::Tensor(), false);
    EXPECT_EQ(first.status().code(), hold_first ? absl::StatusCode::kDeadlineExceeded
                                                : absl::StatusCode::kInvalidArgument)
        << first.status();
    service.Release();
    for (int i = 0; i < 2; ++i) {
      EXPECT_EQ((*client)->Lookup({.layer = 0}, x, torch::Tensor(), false).status().code(),
                absl::StatusCode::kInvalidArgument);
    }
    const std::vector<RecordingServer::Spans> spans = service.spans();
    ASSERT_EQ(spans.size(), 3u);
    for (const auto& s : spans) {
      ASSERT_GT(s.x_bytes, 0u) << "x went through the arena";
      ASSERT_GT(s.region_bytes, 0u) << "a response region was offered";
    }
    const auto& a = spans[0];
    const auto& b = spans[1];
    const bool reused = Overlap(a.x_offset, a.x_bytes, b.x_offset, b.x_bytes) ||
                        Overlap(a.x_offset, a.x_bytes, b.region_offset, b.region_bytes) ||
                        Overlap(a.region_offset, a.region_bytes, b.x_offset, b.x_bytes) ||
                        Overlap(a.region_offset, a.region_bytes, b.region_offset, b.region_bytes);
    EXPECT_EQ(reused, !hold_first);
    // The refused second call's regions are free again for the third.
    EXPECT_EQ(spans[2].x_offset, b.x_offset);
    EXPECT_EQ(spans[2].region_offset, b.region_offset);
    server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(3));
  }
}

}  // namespace
}  // namespace meft::worker
