// End-to-end tests of the parameter server's gRPC face: the real server runs in-process on a
// loopback port picked by the kernel, and every request is built by hand as raw little-endian
// tensor bytes, the way a worker written in another language would build it.

#include <gmock/gmock.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common/metrics/metrics.h"
#include "common/safetensors/safetensors.h"
#include "meft/v1/param_server.grpc.pb.h"
#include "meft/v1/param_server.pb.h"
#include "param_server/rpc/service.h"
#include "param_server/server/param_server.h"

namespace meft {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kDim = 16;
constexpr int64_t kRows = 256;
constexpr int64_t kExperts = 16;
constexpr int64_t kRowsPerExpert = kRows / kExperts;
constexpr int64_t kProbe = 4;
constexpr int64_t kTopK = 8;

server::ServerOptions SmallOptions() {
  server::ServerOptions o;
  o.layers = {0, 2};
  o.rows = kRows;
  o.dim = kDim;
  o.experts = kExperts;
  o.selector.n_probe = kProbe;
  o.selector.top_k = kTopK;
  o.init.seed = 7;
  return o;
}

// ---------------------------------------------------------------------------------------------
// Tensors on the wire, encoded and decoded byte by byte (little-endian), independently of
// common/wire.

uint32_t FloatBits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}

float BitsFloat(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}

void AppendLe(uint64_t value, int bytes, std::string* out) {
  for (int i = 0; i < bytes; ++i) out->push_back(static_cast<char>((value >> (8 * i)) & 0xffu));
}

uint64_t ReadLe(const std::string& data, size_t offset, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) {
    v |= uint64_t{static_cast<unsigned char>(data[offset + i])} << (8 * i);
  }
  return v;
}

// fp32 -> bf16, round to nearest even (finite inputs).
uint16_t ToBf16(float f) {
  const uint32_t b = FloatBits(f);
  return static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

v1::Tensor MakeTensor(v1::DType dtype, const std::vector<int64_t>& shape, std::string data) {
  v1::Tensor t;
  t.set_dtype(dtype);
  for (int64_t d : shape) t.add_shape(d);
  t.set_data(std::move(data));
  return t;
}

v1::Tensor Fp32(const std::vector<float>& v, const std::vector<int64_t>& shape) {
  std::string data;
  for (float f : v) AppendLe(FloatBits(f), 4, &data);
  return MakeTensor(v1::DTYPE_FP32, shape, std::move(data));
}

v1::Tensor Bf16(const std::vector<float>& v, const std::vector<int64_t>& shape) {
  std::string data;
  for (float f : v) AppendLe(ToBf16(f), 2, &data);
  return MakeTensor(v1::DTYPE_BF16, shape, std::move(data));
}

v1::Tensor U8(const std::vector<uint8_t>& v, const std::vector<int64_t>& shape) {
  return MakeTensor(v1::DTYPE_UINT8, shape, std::string(v.begin(), v.end()));
}

std::vector<int64_t> Shape(const v1::Tensor& t) { return {t.shape().begin(), t.shape().end()}; }

bool IsEmptyTensor(const v1::Tensor& t) {
  return t.dtype() == v1::DTYPE_UNSPECIFIED && t.shape_size() == 0 && t.data().empty();
}

std::vector<float> Floats(const v1::Tensor& t) {
  std::vector<float> out;
  if (t.dtype() == v1::DTYPE_FP32) {
    for (size_t i = 0; i + 4 <= t.data().size(); i += 4) {
      out.push_back(BitsFloat(static_cast<uint32_t>(ReadLe(t.data(), i, 4))));
    }
  } else if (t.dtype() == v1::DTYPE_BF16) {
    for (size_t i = 0; i + 2 <= t.data().size(); i += 2) {
      out.push_back(BitsFloat(static_cast<uint32_t>(ReadLe(t.data(), i, 2)) << 16));
    }
  } else {
    ADD_FAILURE() << "not a float tensor: dtype " << t.dtype();
  }
  return out;
}

std::vector<int32_t> Ints(const v1::Tensor& t) {
  EXPECT_EQ(t.dtype(), v1::DTYPE_INT32);
  std::vector<int32_t> out;
  for (size_t i = 0; i + 4 <= t.data().size(); i += 4) {
    out.push_back(static_cast<int32_t>(static_cast<uint32_t>(ReadLe(t.data(), i, 4))));
  }
  return out;
}

std::vector<float> RandomNormal(std::mt19937* rng, size_t n) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& f : v) f = dist(*rng);
  return v;
}

// Values of magnitude in [0.1, 1] with random signs: far from zero, so a first Adam step moves
// each element by almost exactly lr.
std::vector<float> RandomGrads(std::mt19937* rng, size_t n) {
  std::uniform_real_distribution<float> mag(0.1f, 1.0f);
  std::bernoulli_distribution sign(0.5);
  std::vector<float> v(n);
  for (float& f : v) f = sign(*rng) ? mag(*rng) : -mag(*rng);
  return v;
}

// ---------------------------------------------------------------------------------------------
// A server, its gRPC face and a client, in this process.

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "meft_rpc_test_XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) ADD_FAILURE() << "mkdtemp failed";
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

struct Harness {
  metrics::Registry registry;
  std::unique_ptr<server::ParamServer> server;
  std::unique_ptr<rpc::RunningServer> rpc;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::ParamServer::Stub> stub;
  // Serialized sizes of every request sent and every successful response received through the
  // methods below, for checking the bytes metrics.
  double request_bytes = 0;
  double response_bytes = 0;

  template <typename Request, typename Response, typename Method>
  grpc::Status Call(Method method, const Request& request, Response* response) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    response->Clear();
    grpc::Status s = ((*stub).*method)(&ctx, request, response);
    request_bytes += static_cast<double>(request.ByteSizeLong());
    if (s.ok()) response_bytes += static_cast<double>(response->ByteSizeLong());
    return s;
  }
  grpc::Status Lookup(const v1::LookupRequest& r, v1::LookupResponse* out) {
    return Call(&v1::ParamServer::Stub::Lookup, r, out);
  }
  grpc::Status Gradients(const v1::GradientsRequest& r, v1::GradientsResponse* out) {
    return Call(&v1::ParamServer::Stub::Gradients, r, out);
  }
  grpc::Status GradNorm(const v1::GradNormRequest& r, v1::GradNormResponse* out) {
    return Call(&v1::ParamServer::Stub::GradNorm, r, out);
  }
  grpc::Status Step(const v1::StepRequest& r, v1::StepResponse* out) {
    return Call(&v1::ParamServer::Stub::Step, r, out);
  }
  grpc::Status Save(const v1::SaveCheckpointRequest& r, v1::SaveCheckpointResponse* out) {
    return Call(&v1::ParamServer::Stub::SaveCheckpoint, r, out);
  }
  grpc::Status Restore(const v1::RestoreCheckpointRequest& r, v1::RestoreCheckpointResponse* out) {
    return Call(&v1::ParamServer::Stub::RestoreCheckpoint, r, out);
  }
  grpc::Status Info(v1::ServerInfoResponse* out) {
    return Call(&v1::ParamServer::Stub::ServerInfo, v1::ServerInfoRequest(), out);
  }
  uint64_t Digest() const { return server->StateDigest(); }
};

std::unique_ptr<Harness> StartHarness(const server::ServerOptions& options,
                                      int max_message_bytes = 64 << 20) {
  auto h = std::make_unique<Harness>();
  server::ServerOptions with_limit = options;
  with_limit.max_response_bytes = max_message_bytes;  // as meft-param-server's main() does
  auto server = server::ParamServer::Create(with_limit, &h->registry);
  if (!server.ok()) {
    ADD_FAILURE() << "ParamServer::Create: " << server.status();
    return nullptr;
  }
  h->server = *std::move(server);
  auto running = rpc::StartServer({.listen = "127.0.0.1:0", .max_message_bytes = max_message_bytes},
                                  h->server.get(), &h->registry);
  if (!running.ok()) {
    ADD_FAILURE() << "StartServer: " << running.status();
    return nullptr;
  }
  h->rpc = *std::move(running);
  h->channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(h->rpc->port()),
                                   grpc::InsecureChannelCredentials());
  h->stub = v1::ParamServer::NewStub(h->channel);
  return h;
}

#define ASSERT_RPC_OK(expr)                                                                 \
  do {                                                                                      \
    const grpc::Status rpc_status_ = (expr);                                                \
    ASSERT_TRUE(rpc_status_.ok()) << #expr << ": code " << rpc_status_.error_code() << ": " \
                                  << rpc_status_.error_message();                           \
  } while (false)

// ---------------------------------------------------------------------------------------------
// Requests and decoded responses.

struct Batch {
  int64_t tokens = 0;
  std::vector<float> x;       // [T, d]
  std::vector<uint8_t> mask;  // [T] or empty
};

Batch RandomBatch(std::mt19937* rng, int64_t tokens, std::vector<uint8_t> mask = {}) {
  return {tokens, RandomNormal(rng, static_cast<size_t>(tokens * kDim)), std::move(mask)};
}

v1::LookupRequest MakeLookup(const Batch& b, uint64_t step, uint32_t micro, uint32_t layer,
                             bool training, v1::DType row_dtype = v1::DTYPE_FP32) {
  v1::LookupRequest r;
  r.mutable_header()->set_step(step);
  r.mutable_header()->set_micro_step(micro);
  r.mutable_header()->set_layer(layer);
  *r.mutable_x() = Fp32(b.x, {b.tokens, kDim});
  if (!b.mask.empty()) *r.mutable_token_mask() = U8(b.mask, {b.tokens});
  r.set_training(training);
  r.set_row_dtype(row_dtype);
  return r;
}

struct Decoded {
  std::vector<int32_t> rows;
  std::vector<float> keys, values;
  std::vector<int32_t> token_rows, token_experts, expert_ids;
  std::vector<float> token_gates, router;
};

Decoded Decode(const v1::LookupResponse& r) {
  Decoded d;
  d.rows = Ints(r.row_ids());
  d.keys = Floats(r.keys());
  d.values = Floats(r.values());
  if (!IsEmptyTensor(r.token_rows())) d.token_rows = Ints(r.token_rows());
  if (!IsEmptyTensor(r.token_gates())) d.token_gates = Floats(r.token_gates());
  if (!IsEmptyTensor(r.token_experts())) d.token_experts = Ints(r.token_experts());
  if (!IsEmptyTensor(r.expert_ids())) d.expert_ids = Ints(r.expert_ids());
  if (!IsEmptyTensor(r.router_rows())) d.router = Floats(r.router_rows());
  return d;
}

struct Grads {
  std::vector<float> keys, values;  // [|S|, d]
  std::vector<float> gates;         // [T, top_k], zero on empty slots; empty when not sent
};

Grads RandomGradsFor(const Decoded& d, int64_t tokens, bool with_gates, std::mt19937* rng) {
  Grads g;
  const size_t n = d.rows.size() * kDim;
  g.keys = RandomGrads(rng, n);
  g.values = RandomGrads(rng, n);
  if (with_gates) {
    g.gates = RandomGrads(rng, static_cast<size_t>(tokens * kTopK));
    for (size_t s = 0; s < g.gates.size(); ++s) {
      if (d.token_rows[s] < 0) g.gates[s] = 0.0f;
    }
  }
  return g;
}

v1::GradientsRequest MakeGradients(const Grads& g, int64_t tokens, uint64_t step, uint32_t micro,
                                   uint32_t layer) {
  v1::GradientsRequest r;
  r.mutable_header()->set_step(step);
  r.mutable_header()->set_micro_step(micro);
  r.mutable_header()->set_layer(layer);
  const int64_t n = static_cast<int64_t>(g.keys.size()) / kDim;
  *r.mutable_key_grads() = Fp32(g.keys, {n, kDim});
  *r.mutable_value_grads() = Fp32(g.values, {n, kDim});
  if (!g.gates.empty()) *r.mutable_gate_grads() = Fp32(g.gates, {tokens, kTopK});
  return r;
}

// dG[p] for p indexing expert_ids: sum over tokens t of (sum of t's gate grads on slots of
// expert p) * x_t, in double.
std::vector<double> RouterGrad(const Decoded& d, const Batch& b, const Grads& g) {
  std::vector<double> dg(d.expert_ids.size() * kDim, 0.0);
  for (int64_t t = 0; t < b.tokens; ++t) {
    std::map<int32_t, double> per_expert;
    for (int64_t j = 0; j < kTopK; ++j) {
      const int64_t s = t * kTopK + j;
      if (d.token_experts[s] >= 0) per_expert[d.token_experts[s]] += g.gates[s];
    }
    for (const auto& [p, coeff] : per_expert) {
      for (int64_t k = 0; k < kDim; ++k) dg[p * kDim + k] += coeff * b.x[t * kDim + k];
    }
  }
  return dg;
}

double SumSquares(const std::vector<float>& v) {
  double s = 0;
  for (float f : v) s += double{f} * double{f};
  return s;
}

double SumSquares(const std::vector<double>& v) {
  double s = 0;
  for (double f : v) s += f * f;
  return s;
}

// The change a first SparseAdam step (default betas and eps, clip 1, no decay) makes to a
// parameter whose gradient is g.
double FirstAdamDelta(double g, double lr) {
  const double b1 = 0.9, b2 = 0.999, eps = 1e-8;
  const double m = (1 - b1) * g, v = (1 - b2) * g * g;
  return -lr * std::sqrt(1 - b2) / (1 - b1) * m / (std::sqrt(v) + eps);
}

// One layer's tensors from a checkpoint written by the server.
struct Snapshot {
  std::vector<float> keys, values, router;
};

Snapshot ReadSnapshot(const std::string& dir, uint32_t layer) {
  Snapshot snap;
  auto file = safetensors::File::Open(dir + "/adapter_model.safetensors");
  if (!file.ok()) {
    ADD_FAILURE() << file.status();
    return snap;
  }
  auto read = [&](const std::string& name, std::vector<float>* out) {
    auto bytes = (*file)->Data("layers." + std::to_string(layer) + "." + name);
    if (!bytes.ok()) {
      ADD_FAILURE() << bytes.status();
      return;
    }
    out->resize(bytes->size() / 4);
    std::memcpy(out->data(), bytes->data(), out->size() * 4);
  };
  read("keys", &snap.keys);
  read("values", &snap.values);
  read("router", &snap.router);
  EXPECT_EQ(snap.keys.size(), static_cast<size_t>(kRows * kDim));
  EXPECT_EQ(snap.router.size(), static_cast<size_t>(kExperts * kDim));
  return snap;
}

double Dot(const float* a, const float* b) {
  double s = 0;
  for (int64_t k = 0; k < kDim; ++k) s += double{a[k]} * double{b[k]};
  return s;
}

// Checks a gated per_token answer against a slow reference of DESIGN §2 computed from the
// store's K and G (read from a checkpoint): each real token's slots hold its top_k keys among
// the keys of its n_probe best experts, scored g_t[e] * (k_i . x_t), in decreasing order.
// Tolerances absorb float summation order only.
void CheckSelectionAgainstReference(const Decoded& d, const Batch& b, const Snapshot& snap) {
  constexpr double kTol = 1e-5;
  std::set<int32_t> union_rows;
  for (int64_t t = 0; t < b.tokens; ++t) {
    SCOPED_TRACE("token " + std::to_string(t));
    const float* xt = b.x.data() + t * kDim;
    const bool real = b.mask.empty() || b.mask[t] != 0;
    if (!real) {
      for (int64_t j = 0; j < kTopK; ++j) {
        EXPECT_EQ(d.token_rows[t * kTopK + j], -1);
        EXPECT_EQ(d.token_experts[t * kTopK + j], -1);
      }
      continue;
    }
    std::vector<double> gate(kExperts);
    for (int64_t e = 0; e < kExperts; ++e) gate[e] = Dot(snap.router.data() + e * kDim, xt);
    std::vector<int32_t> order(kExperts);
    for (int32_t e = 0; e < kExperts; ++e) order[e] = e;
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t c) { return gate[a] > gate[c]; });
    std::vector<double> all_scores;  // every candidate of the reference's probed experts
    std::set<int32_t> chosen;
    double prev = std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < kTopK; ++j) {
      const int64_t s = t * kTopK + j;
      ASSERT_GE(d.token_rows[s], 0) << "slot " << j << " empty though 64 candidates exist";
      ASSERT_LT(d.token_rows[s], static_cast<int32_t>(d.rows.size()));
      ASSERT_GE(d.token_experts[s], 0);
      ASSERT_LT(d.token_experts[s], static_cast<int32_t>(d.expert_ids.size()));
      const int32_t row = d.rows[d.token_rows[s]];
      const int32_t expert = row / static_cast<int32_t>(kRowsPerExpert);
      EXPECT_EQ(d.expert_ids[d.token_experts[s]], expert) << "slot " << j;
      EXPECT_GE(gate[expert], gate[order[kProbe - 1]] - kTol)
          << "expert " << expert << " is not among the best";
      EXPECT_NEAR(d.token_gates[s], gate[expert], kTol * (1 + std::abs(gate[expert])));
      const double score = gate[expert] * Dot(snap.keys.data() + int64_t{row} * kDim, xt);
      EXPECT_LE(score, prev + kTol) << "slot " << j << " out of order";
      prev = score;
      EXPECT_TRUE(chosen.insert(row).second) << "row " << row << " twice for one token";
      union_rows.insert(row);
    }
    // No candidate left out scores better than the worst chosen one.
    for (int64_t p = 0; p < kProbe; ++p) {
      const int32_t e = order[p];
      for (int64_t i = 0; i < kRowsPerExpert; ++i) {
        const int32_t row = e * static_cast<int32_t>(kRowsPerExpert) + static_cast<int32_t>(i);
        if (chosen.count(row)) continue;
        const double score = gate[e] * Dot(snap.keys.data() + int64_t{row} * kDim, xt);
        EXPECT_LE(score, prev + kTol) << "row " << row << " should have been selected";
      }
    }
  }
  EXPECT_EQ(std::vector<int32_t>(union_rows.begin(), union_rows.end()), d.rows)
      << "S is not the sorted union of the tokens' selections";
}

// ---------------------------------------------------------------------------------------------
// 1. One full training cycle.

TEST(RpcCycleTest, LookupGradientsGradNormStep) {
  auto h = StartHarness(SmallOptions());
  ASSERT_NE(h, nullptr);
  TempDir tmp;
  std::mt19937 rng(1234);
  constexpr int64_t T = 5;
  const Batch batch = RandomBatch(&rng, T, {1, 1, 0, 1, 1});  // token 2 is padding

  v1::LookupResponse resp;
  ASSERT_RPC_OK(h->Lookup(MakeLookup(batch, 0, 0, 0, /*training=*/true), &resp));
  EXPECT_FALSE(resp.replayed());
  EXPECT_EQ(resp.rows_dropped(), 0u);
  const Decoded d = Decode(resp);
  const int64_t n = static_cast<int64_t>(d.rows.size());
  ASSERT_GT(n, 0);
  EXPECT_LE(n, 4 * kTopK);  // four real tokens

  // Shapes and dtypes.
  EXPECT_EQ(resp.row_ids().dtype(), v1::DTYPE_INT32);
  EXPECT_EQ(Shape(resp.row_ids()), (std::vector<int64_t>{n}));
  EXPECT_TRUE(std::is_sorted(d.rows.begin(), d.rows.end()));
  EXPECT_EQ(std::adjacent_find(d.rows.begin(), d.rows.end()), d.rows.end()) << "row_ids repeat";
  for (int32_t r : d.rows) {
    EXPECT_GE(r, 0);
    EXPECT_LT(r, kRows);
  }
  for (const v1::Tensor* t : {&resp.keys(), &resp.values()}) {
    EXPECT_EQ(t->dtype(), v1::DTYPE_FP32);
    EXPECT_EQ(Shape(*t), (std::vector<int64_t>{n, kDim}));
    EXPECT_EQ(t->data().size(), static_cast<size_t>(n * kDim * 4));
  }
  EXPECT_EQ(Shape(resp.token_rows()), (std::vector<int64_t>{T, kTopK}));
  EXPECT_EQ(Shape(resp.token_gates()), (std::vector<int64_t>{T, kTopK}));
  EXPECT_EQ(Shape(resp.token_experts()), (std::vector<int64_t>{T, kTopK}));
  EXPECT_EQ(resp.token_gates().dtype(), v1::DTYPE_FP32);
  ASSERT_EQ(d.token_rows.size(), static_cast<size_t>(T * kTopK));
  ASSERT_EQ(d.token_gates.size(), static_cast<size_t>(T * kTopK));
  ASSERT_EQ(d.token_experts.size(), static_cast<size_t>(T * kTopK));
  for (int64_t j = 0; j < kTopK; ++j) {
    EXPECT_EQ(d.token_rows[2 * kTopK + j], -1) << "padding token got a row";
    EXPECT_EQ(d.token_experts[2 * kTopK + j], -1) << "padding token got an expert";
  }
  const int64_t n_e = static_cast<int64_t>(d.expert_ids.size());
  ASSERT_GT(n_e, 0);
  EXPECT_TRUE(std::is_sorted(d.expert_ids.begin(), d.expert_ids.end()));
  EXPECT_EQ(std::adjacent_find(d.expert_ids.begin(), d.expert_ids.end()), d.expert_ids.end());
  EXPECT_EQ(Shape(resp.expert_ids()), (std::vector<int64_t>{n_e}));
  EXPECT_EQ(Shape(resp.router_rows()), (std::vector<int64_t>{n_e, kDim}));
  EXPECT_EQ(resp.router_rows().dtype(), v1::DTYPE_FP32);

  // The rows are the store's: compare with a checkpoint of it (saving changes no state), and
  // the selection with a slow reference.
  const uint64_t digest = h->Digest();
  v1::SaveCheckpointRequest save;
  save.set_directory(tmp.path() + "/before");
  v1::SaveCheckpointResponse saved;
  ASSERT_RPC_OK(h->Save(save, &saved));
  EXPECT_EQ(saved.step(), 0u);
  EXPECT_EQ(h->Digest(), digest) << "SaveCheckpoint changed the state";
  const Snapshot before = ReadSnapshot(saved.path(), 0);
  ASSERT_FALSE(HasFailure());
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t k = 0; k < kDim; ++k) {
      ASSERT_EQ(FloatBits(d.keys[i * kDim + k]), FloatBits(before.keys[d.rows[i] * kDim + k]))
          << "key row " << d.rows[i];
      ASSERT_EQ(d.values[i * kDim + k], 0.0f) << "V is initialised to zero";
    }
  }
  for (int64_t p = 0; p < n_e; ++p) {
    for (int64_t k = 0; k < kDim; ++k) {
      ASSERT_EQ(FloatBits(d.router[p * kDim + k]),
                FloatBits(before.router[d.expert_ids[p] * kDim + k]));
    }
  }
  CheckSelectionAgainstReference(d, batch, before);

  // A second (evaluation) lookup with fp32 rows sees the same selection and bit-identical keys;
  // one with the default wire dtype gets the same rows rounded to bf16.
  v1::LookupResponse again;
  ASSERT_RPC_OK(h->Lookup(MakeLookup(batch, 0, 0, 0, /*training=*/false), &again));
  EXPECT_EQ(again.row_ids().data(), resp.row_ids().data());
  EXPECT_EQ(again.keys().data(), resp.keys().data());
  EXPECT_EQ(again.values().data(), resp.values().data());
  v1::LookupResponse bf16;
  ASSERT_RPC_OK(h->Lookup(MakeLookup(batch, 0, 0, 0, false, v1::DTYPE_UNSPECIFIED), &bf16));
  EXPECT_EQ(bf16.keys().dtype(), v1::DTYPE_BF16);
  EXPECT_EQ(bf16.row_ids().data(), resp.row_ids().data());
  ASSERT_EQ(bf16.keys().data().size(), static_cast<size_t>(n * kDim * 2));
  for (int64_t i = 0; i < n * kDim; ++i) {
    ASSERT_EQ(ReadLe(bf16.keys().data(), 2 * i, 2), ToBf16(d.keys[i])) << "element " << i;
  }
  EXPECT_EQ(h->Digest(), digest) << "an evaluation lookup changed the state";

  // Gradients, then the squared norm computed here from what was sent.
  const Grads g = RandomGradsFor(d, T, /*with_gates=*/true, &rng);
  v1::GradientsResponse gresp;
  ASSERT_RPC_OK(h->Gradients(MakeGradients(g, T, 0, 0, 0), &gresp));
  EXPECT_FALSE(gresp.duplicate());
  EXPECT_EQ(gresp.rows_accumulated(), static_cast<uint64_t>(n));
  const std::vector<double> dG = RouterGrad(d, batch, g);
  const double expected = SumSquares(g.keys) + SumSquares(g.values) + SumSquares(dG);
  v1::GradNormRequest norm_req;
  norm_req.set_step(0);
  v1::GradNormResponse norm;
  ASSERT_RPC_OK(h->GradNorm(norm_req, &norm));
  EXPECT_NEAR(norm.squared_norm(), expected, 1e-4 * expected);
  ASSERT_EQ(norm.layers_size(), 2);
  EXPECT_EQ(norm.layers(0), 0u);
  EXPECT_EQ(norm.layers(1), 2u);
  EXPECT_NEAR(norm.layer_squared_norms(0), expected, 1e-4 * expected);
  EXPECT_EQ(norm.layer_squared_norms(1), 0.0);
  norm_req.add_layers(0);
  ASSERT_RPC_OK(h->GradNorm(norm_req, &norm));
  EXPECT_NEAR(norm.squared_norm(), expected, 1e-4 * expected);

  // The Adam step.
  constexpr double kLr = 1e-2;
  v1::StepRequest step;
  step.set_step(0);
  step.set_lr(kLr);
  step.set_clip_factor(1.0);
  v1::StepResponse sresp;
  ASSERT_RPC_OK(h->Step(step, &sresp));
  EXPECT_FALSE(sresp.already_applied());
  EXPECT_EQ(sresp.server_step(), 1u);
  EXPECT_EQ(sresp.rows_updated(), static_cast<uint64_t>(n));
  EXPECT_EQ(sresp.router_rows_updated(), static_cast<uint64_t>(n_e));

  // Every touched parameter moved by one SparseAdam step, untouched ones did not.
  save.set_directory(tmp.path() + "/after");
  ASSERT_RPC_OK(h->Save(save, &saved));
  EXPECT_EQ(saved.step(), 1u);
  const Snapshot after = ReadSnapshot(saved.path(), 0);
  ASSERT_FALSE(HasFailure());
  std::vector<int> in_s(kRows, -1);
  for (int64_t i = 0; i < n; ++i) in_s[d.rows[i]] = static_cast<int>(i);
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t k = 0; k < kDim; ++k) {
      const int64_t e = r * kDim + k;
      if (in_s[r] < 0) {
        ASSERT_EQ(after.keys[e], before.keys[e]) << "untouched key row " << r << " moved";
        ASSERT_EQ(after.values[e], 0.0f) << "untouched value row " << r << " moved";
      } else {
        const int64_t ge = in_s[r] * kDim + k;
        ASSERT_NEAR(after.keys[e] - before.keys[e], FirstAdamDelta(g.keys[ge], kLr), 1e-6);
        ASSERT_NEAR(after.values[e], FirstAdamDelta(g.values[ge], kLr), 1e-6);
      }
    }
  }
  for (int64_t p = 0; p < n_e; ++p) {
    for (int64_t k = 0; k < kDim; ++k) {
      const int64_t e = d.expert_ids[p] * kDim + k;
      EXPECT_NEAR(after.router[e] - before.router[e], FirstAdamDelta(dG[p * kDim + k], kLr), 1e-5)
          << "router row " << d.expert_ids[p];
    }
  }

  // The lookup of step 1 sees the new parameters: value rows selected again moved by about lr
  // against their gradient's sign, rows new to S are still zero.
  v1::LookupResponse next;
  ASSERT_RPC_OK(h->Lookup(MakeLookup(batch, 1, 0, 0, /*training=*/true), &next));
  const Decoded d1 = Decode(next);
  int reselected = 0;
  for (size_t i = 0; i < d1.rows.size(); ++i) {
    const int32_t r = d1.rows[i];
    for (int64_t k = 0; k < kDim; ++k) {
      const float v = d1.values[i * kDim + k];
      if (in_s[r] < 0) {
        EXPECT_EQ(v, 0.0f) << "row " << r;
        continue;
      }
      const float grad = g.values[in_s[r] * kDim + k];
      EXPECT_NE(v, 0.0f);
      EXPECT_EQ(std::signbit(v), !std::signbit(grad)) << "row " << r << " moved along the gradient";
      EXPECT_NEAR(std::abs(v), kLr, 1e-4) << "row " << r;
      EXPECT_NEAR(d1.keys[i * kDim + k] - before.keys[r * kDim + k],
                  FirstAdamDelta(g.keys[in_s[r] * kDim + k], kLr), 1e-6);
    }
    if (in_s[r] >= 0) ++reselected;
  }
  EXPECT_GT(reselected, 0) << "no row of step 0 was selected again; the check saw nothing";
}

TEST(RpcCycleTest, AllPaddingMicroBatchSelectsNothing) {
  auto h = StartHarness(SmallOptions());
  ASSERT_NE(h, nullptr);
  std::mt19937 rng(77);
  constexpr int64_t T = 3;
  const Batch batch = RandomBatch(&rng, T, {0, 0, 0});
  v1::LookupResponse resp;
  ASSERT_RPC_OK(h->Lookup(MakeLookup(batch, 0, 0, 0, true), &resp));
  EXPECT_EQ(Shape(resp.row_ids()), (std::vector<int64_t>{0}));
  EXPECT_EQ(Shape(resp.keys()), (std::vector<int64_t>{0, kDim}));
  EXPECT_EQ(Shape(resp.values()), (std::vector<int64_t>{0, kDim}));
  EXPECT_EQ(Shape(resp.token_rows()), (std::vector<int64_t>{T, kTopK}));
  EXPECT_EQ(Shape(resp.expert_ids()), (std::vector<int64_t>{0}));
  EXPECT_EQ(Shape(resp.router_rows()), (std::vector<int64_t>{0, kDim}));
  const Decoded d = Decode(resp);
  for (int32_t pos : d.token_rows) EXPECT_EQ(pos, -1);
  for (int32_t pos : d.token_experts) EXPECT_EQ(pos, -1);

  const Grads g = RandomGradsFor(d, T, true, &rng);  // all gate grads zero: every slot is empty
  v1::GradientsResponse gresp;
  ASSERT_RPC_OK(h->Gradients(MakeGradients(g, T, 0, 0, 0), &gresp));
  EXPECT_EQ(gresp.rows_accumulated(), 0u);
  v1::GradNormRequest norm_req;
  norm_req.set_step(0);
  v1::GradNormResponse norm;
  ASSERT_RPC_OK(h->GradNorm(norm_req, &norm));
  EXPECT_EQ(norm.squared_norm(), 0.0);
  v1::StepRequest step;
  step.set_step(0);
  step.set_lr(1e-2);
  step.set_clip_factor(1.0);
  v1::StepResponse sresp;
  ASSERT_RPC_OK(h->Step(step, &sresp));
  EXPECT_EQ(sresp.rows_updated(), 0u);
  EXPECT_EQ(sresp.server_step(), 1u);
}

// DESIGN §3 ordering rule: a training lookup of step s+1 that arrives before Step(s) is held
// until the step is applied, then answered from the new parameters.
TEST(RpcCycleTest, EarlyLookupIsAnsweredAfterTheStep) {
  server::ServerOptions o = SmallOptions();
  o.step_wait_seconds = 60;
  auto h = StartHarness(o);
  ASSERT_NE(h, nullptr);
  std::mt19937 rng(31);
  constexpr int64_t T = 4;
  const Batch batch = RandomBatch(&rng, T);
  v1::LookupResponse resp;
  ASSERT_RPC_OK(h->Lookup(MakeLookup(batch, 0, 0, 0, true), &resp));
  const Decoded d = Decode(resp);
  const Grads g = RandomGradsFor(d, T, true, &rng);
  v1::GradientsResponse gresp;
  ASSERT_RPC_OK(h->Gradients(MakeGradients(g, T, 0, 0, 0), &gresp));

  // Whether the early lookup reaches the server before or after the Step, its answer must show
  // the parameters after Step(0).
  grpc::Status early_status;
  v1::LookupResponse early;
  std::thread client([&] {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    early_status = h->stub->Lookup(&ctx, MakeLookup(batch, 1, 0, 0, true), &early);
  });
  grpc::ClientContext ctx;
  v1::StepRequest step;
  step.set_step(0);
  step.set_lr(1e-2);
  step.set_clip_factor(1.0);
  v1::StepResponse sresp;
  const grpc::Status step_status = h->stub->Step(&ctx, step, &sresp);
  client.join();
  ASSERT_TRUE(step_status.ok()) << step_status.error_message();
  ASSERT_TRUE(early_status.ok()) << early_status.error_message();
  const Decoded d1 = Decode(early);
  std::set<int32_t> touched(d.rows.begin(), d.rows.end());
  int moved = 0;
  for (size_t i = 0; i < d1.rows.size(); ++i) {
    if (!touched.count(d1.rows[i])) continue;
    for (int64_t k = 0; k < kDim; ++k) EXPECT_NEAR(std::abs(d1.values[i * kDim + k]), 1e-2, 1e-4);
    ++moved;
  }
  EXPECT_GT(moved, 0);
}

// ---------------------------------------------------------------------------------------------
// 2. Replays.

TEST(RpcReplayTest, RepeatedRequestsAreIdempotent) {
  auto h = StartHarness(SmallOptions());
  ASSERT_NE(h, nullptr);
  std::mt19937 rng(99);
  constexpr int64_t T = 6;
  const Batch batch = RandomBatch(&rng, T, {1, 1, 1, 1, 0, 1});
  const v1::LookupRequest lookup = MakeLookup(batch, 0, 3, 2, true, v1::DTYPE_BF16);

  v1::LookupResponse first, second;
  ASSERT_RPC_OK(h->Lookup(lookup, &first));
  const uint64_t after_first = h->Digest();
  ASSERT_RPC_OK(h->Lookup(lookup, &second));
  EXPECT_FALSE(first.replayed());
  EXPECT_TRUE(second.replayed());
  EXPECT_EQ(h->Digest(), after_first) << "a replayed lookup changed the state";
  v1::LookupResponse a = first, b = second;
  a.set_replayed(false);
  b.set_replayed(false);
  EXPECT_EQ(a.SerializeAsString(), b.SerializeAsString()) << "the replay differs";

  const Decoded d = Decode(first);
  const Grads g = RandomGradsFor(d, T, true, &rng);
  const v1::GradientsRequest grads = MakeGradients(g, T, 0, 3, 2);
  v1::GradientsResponse g1, g2;
  ASSERT_RPC_OK(h->Gradients(grads, &g1));
  EXPECT_FALSE(g1.duplicate());
  v1::GradNormRequest norm_req;
  norm_req.set_step(0);
  v1::GradNormResponse n1, n2;
  ASSERT_RPC_OK(h->GradNorm(norm_req, &n1));
  const uint64_t after_grads = h->Digest();
  ASSERT_RPC_OK(h->Gradients(grads, &g2));
  EXPECT_TRUE(g2.duplicate());
  EXPECT_EQ(g2.rows_accumulated(), g1.rows_accumulated());
  ASSERT_RPC_OK(h->GradNorm(norm_req, &n2));
  EXPECT_EQ(n2.squared_norm(), n1.squared_norm()) << "duplicate gradients were applied";
  EXPECT_EQ(h->Digest(), after_grads);

  v1::StepRequest step;
  step.set_step(0);
  step.set_lr(1e-3);
  step.set_clip_factor(0.5);
  v1::StepResponse s1, s2;
  ASSERT_RPC_OK(h->Step(step, &s1));
  EXPECT_FALSE(s1.already_applied());
  EXPECT_EQ(s1.server_step(), 1u);
  const uint64_t after_step = h->Digest();
  EXPECT_NE(after_step, after_grads);
  ASSERT_RPC_OK(h->Step(step, &s2));
  EXPECT_TRUE(s2.already_applied());
  EXPECT_EQ(s2.server_step(), 1u);
  EXPECT_EQ(s2.rows_updated(), s1.rows_updated()) << "the replay must return the recorded result";
  EXPECT_EQ(s2.router_rows_updated(), s1.router_rows_updated());
  EXPECT_EQ(h->Digest(), after_step) << "a replayed Step changed the state";
}

// ---------------------------------------------------------------------------------------------
// 3. Malformed requests: the exact code, a message naming the field, and no state change.

class RpcMalformedTest : public ::testing::Test {
 protected:
  static constexpr int64_t kT = 4;
  static constexpr int64_t kMaxTokens = 32;

  void SetUp() override {
    server::ServerOptions o = SmallOptions();
    o.step_wait_seconds = 0.2;
    o.max_tokens = kMaxTokens;
    h_ = StartHarness(o);
    ASSERT_NE(h_, nullptr);
    batch_ = RandomBatch(&rng_, kT, {1, 0, 1, 1});  // token 1 is padding: empty slots
    // State to protect: a cached training lookup awaiting its gradients.
    v1::LookupResponse resp;
    ASSERT_RPC_OK(h_->Lookup(MakeLookup(batch_, 0, 0, 0, true), &resp));
    cached_ = Decode(resp);
    grads_ = RandomGradsFor(cached_, kT, true, &rng_);
  }

  // Runs `call` and checks the outcome. `field` must appear as "<field>:" in the message.
  template <typename Fn>
  void ExpectRejected(const std::string& what, grpc::StatusCode code, const std::string& field,
                      Fn call) {
    SCOPED_TRACE(what);
    const uint64_t before = h_->Digest();
    const grpc::Status s = call();
    EXPECT_EQ(s.error_code(), code) << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr(field + ":"));
    EXPECT_EQ(h_->Digest(), before) << "a rejected request changed the state";
  }

  void ExpectLookupRejected(const std::string& what, grpc::StatusCode code,
                            const std::string& field, const v1::LookupRequest& r) {
    ExpectRejected(what, code, field, [&] {
      v1::LookupResponse resp;
      return h_->Lookup(r, &resp);
    });
  }

  void ExpectGradientsRejected(const std::string& what, grpc::StatusCode code,
                               const std::string& field, const v1::GradientsRequest& r) {
    ExpectRejected(what, code, field, [&] {
      v1::GradientsResponse resp;
      return h_->Gradients(r, &resp);
    });
  }

  void ExpectStepRejected(const std::string& what, grpc::StatusCode code, const std::string& field,
                          const v1::StepRequest& r) {
    ExpectRejected(what, code, field, [&] {
      v1::StepResponse resp;
      return h_->Step(r, &resp);
    });
  }

  v1::GradientsRequest GoodGradients() const { return MakeGradients(grads_, kT, 0, 0, 0); }

  // Applies the cached lookup's gradients, so that a wrong Step would have something to do.
  void ApplyGradients() {
    v1::GradientsResponse resp;
    ASSERT_RPC_OK(h_->Gradients(GoodGradients(), &resp));
    ASSERT_FALSE(resp.duplicate());
  }

  std::mt19937 rng_{4321};
  std::unique_ptr<Harness> h_;
  Batch batch_;
  Decoded cached_;
  Grads grads_;
};

TEST_F(RpcMalformedTest, Lookup) {
  using grpc::StatusCode;
  const Batch fresh = RandomBatch(&rng_, kT);
  const v1::LookupRequest good = MakeLookup(fresh, 0, 1, 0, true);
  {
    v1::LookupResponse resp;
    const uint64_t before = h_->Digest();
    ASSERT_RPC_OK(h_->Lookup(MakeLookup(fresh, 0, 1, 0, false), &resp));
    EXPECT_EQ(h_->Digest(), before);
  }

  v1::LookupRequest r = good;
  r.mutable_header()->set_layer(1);
  ExpectLookupRejected("layer not owned", StatusCode::NOT_FOUND, "header.layer", r);
  r.set_training(false);
  ExpectLookupRejected("layer not owned, evaluation", StatusCode::NOT_FOUND, "header.layer", r);

  r = good;
  r.clear_x();
  ExpectLookupRejected("x missing", StatusCode::INVALID_ARGUMENT, "x", r);

  r = good;
  r.mutable_x()->set_dtype(v1::DTYPE_INT32);
  ExpectLookupRejected("x int32", StatusCode::INVALID_ARGUMENT, "x.dtype", r);
  r.mutable_x()->set_dtype(v1::DTYPE_UNSPECIFIED);
  ExpectLookupRejected("x dtype unspecified", StatusCode::INVALID_ARGUMENT, "x.dtype", r);
  r.mutable_x()->set_dtype(static_cast<v1::DType>(77));
  ExpectLookupRejected("x dtype unknown", StatusCode::INVALID_ARGUMENT, "x.dtype", r);

  r = good;
  *r.mutable_x() = Fp32(std::vector<float>(kT * 15, 0.5f), {kT, 15});
  ExpectLookupRejected("x [T, 15]", StatusCode::INVALID_ARGUMENT, "x.shape", r);
  *r.mutable_x() = Fp32(fresh.x, {kT * kDim});
  ExpectLookupRejected("x rank 1", StatusCode::INVALID_ARGUMENT, "x.shape", r);
  *r.mutable_x() = Fp32(fresh.x, {1, kT, kDim});
  ExpectLookupRejected("x rank 3", StatusCode::INVALID_ARGUMENT, "x.shape", r);
  *r.mutable_x() = Fp32(fresh.x, {-kT, kDim});
  ExpectLookupRejected("x negative dim", StatusCode::INVALID_ARGUMENT, "x.shape", r);

  r = good;
  r.mutable_x()->mutable_data()->pop_back();
  ExpectLookupRejected("x one byte short", StatusCode::INVALID_ARGUMENT, "x.data", r);
  r = good;
  r.mutable_x()->mutable_data()->append(4, '\0');
  ExpectLookupRejected("x one float too many", StatusCode::INVALID_ARGUMENT, "x.data", r);
  r = good;
  *r.mutable_x() = Bf16(fresh.x, {kT, kDim});
  r.mutable_x()->mutable_data()->append(2, '\0');
  ExpectLookupRejected("bf16 x one element too many", StatusCode::INVALID_ARGUMENT, "x.data", r);

  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    std::vector<float> x = fresh.x;
    x[kDim + 3] = bad;
    r = good;
    *r.mutable_x() = Fp32(x, {kT, kDim});
    ExpectLookupRejected("x holds " + std::to_string(bad), StatusCode::INVALID_ARGUMENT, "x.data",
                         r);
    r.set_training(false);
    ExpectLookupRejected("evaluation x holds " + std::to_string(bad), StatusCode::INVALID_ARGUMENT,
                         "x.data", r);
  }
  r = good;
  *r.mutable_x() = MakeTensor(v1::DTYPE_BF16, {1, kDim}, std::string(2 * kDim, '\0'));
  (*r.mutable_x()->mutable_data())[0] = static_cast<char>(0x80);  // element 0 = 0x7f80 = +inf
  (*r.mutable_x()->mutable_data())[1] = static_cast<char>(0x7f);
  ExpectLookupRejected("bf16 x holds inf", StatusCode::INVALID_ARGUMENT, "x.data", r);

  r = good;
  *r.mutable_x() = MakeTensor(v1::DTYPE_FP32, {0, kDim}, "");
  ExpectLookupRejected("T = 0", StatusCode::INVALID_ARGUMENT, "x.shape", r);

  r = good;
  const Batch big = RandomBatch(&rng_, kMaxTokens + 1);
  *r.mutable_x() = Fp32(big.x, {big.tokens, kDim});
  ExpectLookupRejected("T > max_tokens", StatusCode::RESOURCE_EXHAUSTED, "x.shape", r);
  {
    SCOPED_TRACE("absurd shape with little data");
    r = good;
    *r.mutable_x() = Fp32(fresh.x, {int64_t{1} << 50, kDim});
    const uint64_t before = h_->Digest();
    v1::LookupResponse resp;
    const grpc::Status s = h_->Lookup(r, &resp);
    EXPECT_TRUE(s.error_code() == StatusCode::INVALID_ARGUMENT ||
                s.error_code() == StatusCode::RESOURCE_EXHAUSTED)
        << s.error_code() << ": " << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr("x.shape:"));
    EXPECT_EQ(h_->Digest(), before);
  }

  r = good;
  *r.mutable_token_mask() = U8({1, 1, 1, 1, 1}, {kT + 1});
  ExpectLookupRejected("mask [T + 1]", StatusCode::INVALID_ARGUMENT, "token_mask.shape", r);
  *r.mutable_token_mask() = U8({1, 1, 1, 1}, {kT, 1});
  ExpectLookupRejected("mask [T, 1]", StatusCode::INVALID_ARGUMENT, "token_mask.shape", r);
  *r.mutable_token_mask() = U8({1, 1, 1}, {kT});
  ExpectLookupRejected("mask short data", StatusCode::INVALID_ARGUMENT, "token_mask.data", r);
  *r.mutable_token_mask() = U8({1, 2, 1, 1}, {kT});
  ExpectLookupRejected("mask value 2", StatusCode::INVALID_ARGUMENT, "token_mask.data", r);
  *r.mutable_token_mask() = Fp32({1, 1, 1, 1}, {kT});
  ExpectLookupRejected("mask fp32", StatusCode::INVALID_ARGUMENT, "token_mask.dtype", r);

  r = good;
  r.set_row_dtype(v1::DTYPE_INT32);
  ExpectLookupRejected("row_dtype int32", StatusCode::INVALID_ARGUMENT, "row_dtype", r);
  r.set_row_dtype(v1::DTYPE_UINT8);
  ExpectLookupRejected("row_dtype uint8", StatusCode::INVALID_ARGUMENT, "row_dtype", r);
  r.set_row_dtype(static_cast<v1::DType>(42));
  ExpectLookupRejected("row_dtype unknown", StatusCode::INVALID_ARGUMENT, "row_dtype", r);

  r = good;
  r.mutable_header()->set_step(5);
  // More than one step ahead: FAILED_PRECONDITION at once, not after step_wait_seconds.
  ExpectLookupRejected("step ahead of the server", StatusCode::FAILED_PRECONDITION, "header.step",
                       r);

  // Same (step, micro_step, layer) as the cached lookup, different x or mask.
  r = MakeLookup(fresh, 0, 0, 0, true);
  ExpectLookupRejected("cached key, different x", StatusCode::ALREADY_EXISTS, "header", r);
  Batch other_mask = batch_;
  other_mask.mask = {1, 1, 1, 1};
  ExpectLookupRejected("cached key, different mask", StatusCode::ALREADY_EXISTS, "header",
                       MakeLookup(other_mask, 0, 0, 0, true));

  // The cached lookup survived all of this: its replay still works.
  v1::LookupResponse replay;
  ASSERT_RPC_OK(h_->Lookup(MakeLookup(batch_, 0, 0, 0, true), &replay));
  EXPECT_TRUE(replay.replayed());
  EXPECT_EQ(Decode(replay).rows, cached_.rows);

  // A lookup of a step already applied, and one whose gradients were applied.
  ApplyGradients();
  ExpectLookupRejected("gradients already applied", StatusCode::FAILED_PRECONDITION, "header",
                       MakeLookup(batch_, 0, 0, 0, true));
  v1::StepRequest step;
  step.set_step(0);
  step.set_lr(1e-3);
  step.set_clip_factor(1.0);
  v1::StepResponse sresp;
  ASSERT_RPC_OK(h_->Step(step, &sresp));
  ExpectLookupRejected("step already applied", StatusCode::FAILED_PRECONDITION, "header.step",
                       MakeLookup(batch_, 0, 0, 0, true));
}

TEST_F(RpcMalformedTest, Gradients) {
  using grpc::StatusCode;
  const int64_t n = static_cast<int64_t>(cached_.rows.size());
  const v1::GradientsRequest good = GoodGradients();

  ExpectGradientsRejected("no prior lookup", StatusCode::FAILED_PRECONDITION, "header",
                          MakeGradients(grads_, kT, 0, 9, 0));
  ExpectGradientsRejected("no prior lookup, other layer", StatusCode::FAILED_PRECONDITION, "header",
                          MakeGradients(grads_, kT, 0, 0, 2));
  ExpectGradientsRejected("wrong step", StatusCode::FAILED_PRECONDITION, "header.step",
                          MakeGradients(grads_, kT, 1, 0, 0));
  ExpectGradientsRejected("unknown layer", StatusCode::NOT_FOUND, "header.layer",
                          MakeGradients(grads_, kT, 0, 0, 1));

  v1::GradientsRequest r = good;
  r.clear_key_grads();
  ExpectGradientsRejected("key_grads missing", StatusCode::INVALID_ARGUMENT, "key_grads", r);
  r = good;
  r.clear_value_grads();
  ExpectGradientsRejected("value_grads missing", StatusCode::INVALID_ARGUMENT, "value_grads", r);

  r = good;
  *r.mutable_key_grads() = Fp32(std::vector<float>((n + 1) * kDim, 0.1f), {n + 1, kDim});
  ExpectGradientsRejected("key_grads [|S| + 1, d]", StatusCode::INVALID_ARGUMENT, "key_grads.shape",
                          r);
  *r.mutable_key_grads() = Fp32(grads_.keys, {n * kDim});
  ExpectGradientsRejected("key_grads rank 1", StatusCode::INVALID_ARGUMENT, "key_grads.shape", r);
  *r.mutable_key_grads() = Fp32(grads_.keys, {kDim, n});
  if (n != kDim) {
    ExpectGradientsRejected("key_grads transposed", StatusCode::INVALID_ARGUMENT, "key_grads.shape",
                            r);
  }
  r = good;
  r.mutable_key_grads()->set_dtype(v1::DTYPE_INT32);
  ExpectGradientsRejected("key_grads int32", StatusCode::INVALID_ARGUMENT, "key_grads.dtype", r);

  r = good;
  *r.mutable_value_grads() = Bf16(grads_.values, {n, kDim});
  r.mutable_value_grads()->mutable_data()->resize(n * kDim * 2 - 2);
  ExpectGradientsRejected("value_grads bf16 short", StatusCode::INVALID_ARGUMENT,
                          "value_grads.data", r);
  *r.mutable_value_grads() = Bf16(grads_.values, {n, kDim});
  r.mutable_value_grads()->set_dtype(v1::DTYPE_FP32);  // bf16 bytes labelled fp32: half the size
  ExpectGradientsRejected("value_grads mislabelled", StatusCode::INVALID_ARGUMENT,
                          "value_grads.data", r);

  for (float bad :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    Grads g = grads_;
    g.keys[g.keys.size() - 1] = bad;
    ExpectGradientsRejected("key_grads hold " + std::to_string(bad), StatusCode::INVALID_ARGUMENT,
                            "key_grads.data", MakeGradients(g, kT, 0, 0, 0));
    g = grads_;
    g.values[0] = bad;
    ExpectGradientsRejected("value_grads hold " + std::to_string(bad), StatusCode::INVALID_ARGUMENT,
                            "value_grads.data", MakeGradients(g, kT, 0, 0, 0));
    g = grads_;
    g.gates[0] = bad;  // token 0 is real: slot 0 is not empty
    ExpectGradientsRejected("gate_grads hold " + std::to_string(bad), StatusCode::INVALID_ARGUMENT,
                            "gate_grads.data", MakeGradients(g, kT, 0, 0, 0));
  }

  r = good;
  r.clear_gate_grads();
  ExpectGradientsRejected("gate_grads missing", StatusCode::INVALID_ARGUMENT, "gate_grads", r);
  r = good;
  *r.mutable_gate_grads() = Fp32(grads_.gates, {kT * kTopK});
  ExpectGradientsRejected("gate_grads rank 1", StatusCode::INVALID_ARGUMENT, "gate_grads.shape", r);
  *r.mutable_gate_grads() = Fp32(std::vector<float>(kT * (kTopK + 1), 0.0f), {kT, kTopK + 1});
  ExpectGradientsRejected("gate_grads [T, top_k + 1]", StatusCode::INVALID_ARGUMENT,
                          "gate_grads.shape", r);
  *r.mutable_gate_grads() = Bf16(grads_.gates, {kT, kTopK});
  ExpectGradientsRejected("gate_grads bf16", StatusCode::INVALID_ARGUMENT, "gate_grads.dtype", r);

  Grads g = grads_;
  ASSERT_EQ(cached_.token_rows[1 * kTopK + 2], -1) << "token 1 is padding: its slots are empty";
  g.gates[1 * kTopK + 2] = 0.25f;
  ExpectGradientsRejected("gate grad on an empty slot", StatusCode::INVALID_ARGUMENT,
                          "gate_grads.data", MakeGradients(g, kT, 0, 0, 0));

  // After all those failures the cache entry is intact: the correct request is applied.
  v1::GradientsResponse resp;
  ASSERT_RPC_OK(h_->Gradients(good, &resp));
  EXPECT_FALSE(resp.duplicate());
  EXPECT_EQ(resp.rows_accumulated(), static_cast<uint64_t>(n));
  v1::GradNormRequest norm_req;
  norm_req.set_step(0);
  v1::GradNormResponse norm;
  ASSERT_RPC_OK(h_->GradNorm(norm_req, &norm));
  const double expected = SumSquares(grads_.keys) + SumSquares(grads_.values) +
                          SumSquares(RouterGrad(cached_, batch_, grads_));
  EXPECT_NEAR(norm.squared_norm(), expected, 1e-4 * expected);
}

TEST_F(RpcMalformedTest, GradNorm) {
  using grpc::StatusCode;
  ApplyGradients();
  auto norm = [&](uint64_t step, std::vector<uint32_t> layers) {
    v1::GradNormRequest r;
    r.set_step(step);
    for (uint32_t l : layers) r.add_layers(l);
    return r;
  };
  auto expect = [&](const std::string& what, StatusCode code, const std::string& field,
                    const v1::GradNormRequest& r) {
    ExpectRejected(what, code, field, [&] {
      v1::GradNormResponse resp;
      return h_->GradNorm(r, &resp);
    });
  };
  expect("wrong step", StatusCode::FAILED_PRECONDITION, "step", norm(1, {}));
  expect("wrong step, one layer", StatusCode::FAILED_PRECONDITION, "step", norm(3, {2}));
  expect("unknown layer", StatusCode::NOT_FOUND, "layers[0]", norm(0, {1}));
  expect("unknown second layer", StatusCode::NOT_FOUND, "layers[1]", norm(0, {0, 5}));
  expect("duplicate layer", StatusCode::INVALID_ARGUMENT, "layers[1]", norm(0, {2, 2}));

  v1::GradNormResponse resp;
  ASSERT_RPC_OK(h_->GradNorm(norm(0, {2, 0}), &resp));
  ASSERT_EQ(resp.layers_size(), 2);
  EXPECT_EQ(resp.layers(0), 2u) << "layers come back in the order asked";
  EXPECT_EQ(resp.layers(1), 0u);
  EXPECT_EQ(resp.layer_squared_norms(0), 0.0);
  EXPECT_GT(resp.layer_squared_norms(1), 0.0);
  EXPECT_EQ(resp.squared_norm(), resp.layer_squared_norms(1));
}

TEST_F(RpcMalformedTest, Step) {
  using grpc::StatusCode;
  ApplyGradients();
  v1::StepRequest good;
  good.set_step(0);
  good.set_lr(1e-3);
  good.set_clip_factor(1.0);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();

  v1::StepRequest r = good;
  for (double lr : {nan, -1e-3, inf, -inf}) {
    r = good;
    r.set_lr(lr);
    ExpectStepRejected("lr " + std::to_string(lr), StatusCode::INVALID_ARGUMENT, "lr", r);
  }
  for (double clip : {0.0, 1.5, nan, -0.5, inf}) {
    r = good;
    r.set_clip_factor(clip);
    ExpectStepRejected("clip_factor " + std::to_string(clip), StatusCode::INVALID_ARGUMENT,
                       "clip_factor", r);
  }
  r = good;
  r.set_step(1);
  ExpectStepRejected("step ahead", StatusCode::FAILED_PRECONDITION, "step", r);
  r.set_step(7);
  ExpectStepRejected("step far ahead", StatusCode::FAILED_PRECONDITION, "step", r);
  r = good;
  r.add_layers(0);
  r.add_layers(0);
  ExpectStepRejected("duplicate layer", StatusCode::INVALID_ARGUMENT, "layers[1]", r);
  r = good;
  r.add_layers(2);
  r.add_layers(1);
  ExpectStepRejected("unknown layer", StatusCode::NOT_FOUND, "layers[1]", r);
  r = good;
  r.add_layers(3);
  ExpectStepRejected("unknown first layer", StatusCode::NOT_FOUND, "layers[0]", r);

  // The accumulated gradients survived: the real Step updates every row of the lookup.
  v1::StepResponse resp;
  ASSERT_RPC_OK(h_->Step(good, &resp));
  EXPECT_FALSE(resp.already_applied());
  EXPECT_EQ(resp.rows_updated(), cached_.rows.size());
  EXPECT_EQ(resp.server_step(), 1u);
  r = good;
  r.set_step(2);
  ExpectStepRejected("step ahead after one step", StatusCode::FAILED_PRECONDITION, "step", r);
}

// Step(2^64 - 1) on a server at step 0: `call.step + 1` wraps to 0 in ParamServer::Step, which
// then takes the request for a replay of an applied step.
TEST_F(RpcMalformedTest, StepWithMaximalStepIsRejected) {
  v1::StepRequest r;
  r.set_step(std::numeric_limits<uint64_t>::max());
  r.set_lr(1e-3);
  r.set_clip_factor(1.0);
  ExpectStepRejected("step 2^64 - 1", grpc::StatusCode::FAILED_PRECONDITION, "step", r);
}

TEST_F(RpcMalformedTest, Checkpoints) {
  using grpc::StatusCode;
  ExpectRejected("save with no directory", StatusCode::INVALID_ARGUMENT, "directory", [&] {
    v1::SaveCheckpointResponse resp;
    return h_->Save(v1::SaveCheckpointRequest(), &resp);
  });
  ExpectRejected("restore with no path", StatusCode::INVALID_ARGUMENT, "path", [&] {
    v1::RestoreCheckpointResponse resp;
    return h_->Restore(v1::RestoreCheckpointRequest(), &resp);
  });
  {
    SCOPED_TRACE("restore of a nonexistent path");
    const uint64_t before = h_->Digest();
    v1::RestoreCheckpointRequest req;
    req.set_path("/nonexistent/meft/checkpoint-3");
    v1::RestoreCheckpointResponse resp;
    const grpc::Status s = h_->Restore(req, &resp);
    EXPECT_FALSE(s.ok());
    EXPECT_NE(s.error_code(), grpc::StatusCode::INTERNAL) << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr("/nonexistent/meft/checkpoint-3"));
    EXPECT_EQ(h_->Digest(), before);
  }

  // Checkpoints of servers shaped differently: rows, then dim, then layers.
  TempDir tmp;
  {
    SCOPED_TRACE("save while a Step is half applied");
    v1::StepRequest step;
    step.set_step(0);
    step.set_lr(1e-3);
    step.set_clip_factor(1.0);
    step.add_layers(2);
    v1::StepResponse sresp;
    ASSERT_RPC_OK(h_->Step(step, &sresp));
    const uint64_t before = h_->Digest();
    v1::SaveCheckpointRequest req;
    req.set_directory(tmp.path() + "/half");
    v1::SaveCheckpointResponse resp;
    const grpc::Status s = h_->Save(req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
    EXPECT_EQ(h_->Digest(), before);
    EXPECT_FALSE(std::filesystem::exists(tmp.path() + "/half/checkpoint-0"));
    EXPECT_FALSE(std::filesystem::exists(tmp.path() + "/half/checkpoint-1"));
  }
  auto write_other = [&](const std::string& name, auto edit) {
    server::ServerOptions o = SmallOptions();
    edit(&o);
    metrics::Registry registry;
    auto other = server::ParamServer::Create(o, &registry);
    if (!other.ok()) {
      ADD_FAILURE() << other.status();
      return std::string("/missing");
    }
    auto saved = (*other)->SaveCheckpoint(tmp.path() + "/" + name);
    EXPECT_TRUE(saved.ok()) << saved.status();
    return saved.ok() ? saved->path : std::string("/missing");
  };
  const std::string more_rows =
      write_other("rows", [](server::ServerOptions* o) { o->rows = 512; });
  const std::string other_dim = write_other("dim", [](server::ServerOptions* o) { o->dim = 8; });
  const std::string other_layers = write_other("layers", [](server::ServerOptions* o) {
    o->layers = {0, 1};
  });
  for (const auto& [path, field] : {std::pair<std::string, std::string>{more_rows, "\"rows\""},
                                    {other_dim, "\"dim\""},
                                    {other_layers, "\"layers\""}}) {
    SCOPED_TRACE(path);
    const uint64_t before = h_->Digest();
    v1::RestoreCheckpointRequest req;
    req.set_path(path);
    v1::RestoreCheckpointResponse resp;
    const grpc::Status s = h_->Restore(req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr(field));
    EXPECT_EQ(h_->Digest(), before);
  }
}

// ---------------------------------------------------------------------------------------------
// 4. Oversize messages.

TEST(RpcOversizeTest, LargeLookupIsRejectedByTheTransport) {
  auto h = StartHarness(SmallOptions(), /*max_message_bytes=*/64 << 10);
  ASSERT_NE(h, nullptr);
  std::mt19937 rng(5);
  const Batch big = RandomBatch(&rng, (100 << 10) / (4 * kDim));  // 100 KiB of x
  const v1::LookupRequest r = MakeLookup(big, 0, 0, 0, true);
  ASSERT_GT(r.ByteSizeLong(), 100u << 10);
  const uint64_t before = h->Digest();
  v1::LookupResponse resp;
  const grpc::Status s = h->Lookup(r, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_EQ(h->Digest(), before);

  // The server still answers a request within the limit.
  const Batch small = RandomBatch(&rng, 4);
  ASSERT_RPC_OK(h->Lookup(MakeLookup(small, 0, 0, 0, true), &resp));
  EXPECT_GT(resp.row_ids().data().size(), 0u);
}

// A small request whose answer would be larger than max_message_bytes: the server refuses it
// with RESOURCE_EXHAUSTED before caching or counting anything (DESIGN §7: a failed request
// changes no state).
TEST(RpcOversizeTest, LookupWhoseAnswerIsTooLargeChangesNoState) {
  server::ServerOptions o;
  o.layers = {0};
  o.rows = 1024;
  o.dim = 64;
  o.experts = 16;
  o.selector.n_probe = 4;
  o.selector.top_k = 64;
  auto h = StartHarness(o, /*max_message_bytes=*/64 << 10);
  ASSERT_NE(h, nullptr);
  std::mt19937 rng(6);
  constexpr int64_t T = 16;
  v1::LookupRequest r;
  r.mutable_header()->set_step(0);
  r.set_training(true);
  r.set_row_dtype(v1::DTYPE_FP32);
  *r.mutable_x() = Fp32(RandomNormal(&rng, T * 64), {T, 64});
  ASSERT_LT(r.ByteSizeLong(), 8u << 10);  // the request is small
  const uint64_t before = h->Digest();
  v1::LookupResponse resp;
  const grpc::Status s = h->Lookup(r, &resp);
  ASSERT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_EQ(h->Digest(), before) << "the failed lookup left a cache entry behind";
}

TEST(RpcStartTest, NonLoopbackListenerNeedsInsecure) {
  EXPECT_TRUE(rpc::IsLoopback("127.0.0.1:50051"));
  EXPECT_TRUE(rpc::IsLoopback("127.1.2.3:0"));
  EXPECT_TRUE(rpc::IsLoopback("localhost:50051"));
  EXPECT_TRUE(rpc::IsLoopback("[::1]:50051"));
  EXPECT_FALSE(rpc::IsLoopback("0.0.0.0:50051"));
  EXPECT_FALSE(rpc::IsLoopback("[::]:50051"));
  EXPECT_FALSE(rpc::IsLoopback("10.1.2.3:50051"));
  EXPECT_FALSE(rpc::IsLoopback("example.com:50051"));

  metrics::Registry registry;
  auto server = server::ParamServer::Create(SmallOptions(), &registry);
  ASSERT_TRUE(server.ok()) << server.status();
  auto running = rpc::StartServer({.listen = "0.0.0.0:0"}, server->get(), &registry);
  ASSERT_FALSE(running.ok());
  EXPECT_EQ(running.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(running.status().message()), HasSubstr("listen:"));
}

// A host name that merely starts with "127." can resolve to any address; only numeric 127/8
// addresses are loopback.
TEST(RpcStartTest, HostNameStartingWith127IsNotLoopback) {
  EXPECT_FALSE(rpc::IsLoopback("127.example.com:50051"));
  EXPECT_FALSE(rpc::IsLoopback("127.0.0.1.nip.io:50051"));
}

// ---------------------------------------------------------------------------------------------
// 5. Union mode and ungated selection.

TEST(RpcModeTest, UnionModeSendsNoPerTokenTensors) {
  server::ServerOptions o = SmallOptions();
  o.mode = server::Mode::kUnion;
  auto h = StartHarness(o);
  ASSERT_NE(h, nullptr);
  std::mt19937 rng(8);
  constexpr int64_t T = 5;
  const Batch batch = RandomBatch(&rng, T, {1, 1, 1, 0, 1});
  v1::LookupResponse resp;
  ASSERT_RPC_OK(h->Lookup(MakeLookup(batch, 0, 0, 0, true), &resp));
  const Decoded d = Decode(resp);
  const int64_t n = static_cast<int64_t>(d.rows.size());
  ASSERT_GT(n, 0);
  EXPECT_TRUE(std::is_sorted(d.rows.begin(), d.rows.end()));
  EXPECT_EQ(Shape(resp.keys()), (std::vector<int64_t>{n, kDim}));
  EXPECT_EQ(Shape(resp.values()), (std::vector<int64_t>{n, kDim}));
  EXPECT_TRUE(IsEmptyTensor(resp.token_rows()));
  EXPECT_TRUE(IsEmptyTensor(resp.token_gates()));
  EXPECT_TRUE(IsEmptyTensor(resp.token_experts()));
  EXPECT_TRUE(IsEmptyTensor(resp.expert_ids()));
  EXPECT_TRUE(IsEmptyTensor(resp.router_rows()));

  Grads g;
  g.keys = RandomGrads(&rng, n * kDim);
  g.values = RandomGrads(&rng, n * kDim);
  v1::GradientsRequest with_gates = MakeGradients(g, T, 0, 0, 0);
  *with_gates.mutable_gate_grads() = Fp32(std::vector<float>(T * kTopK, 0.0f), {T, kTopK});
  const uint64_t before = h->Digest();
  v1::GradientsResponse gresp;
  const grpc::Status s = h->Gradients(with_gates, &gresp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("gate_grads:"));
  EXPECT_EQ(h->Digest(), before);

  ASSERT_RPC_OK(h->Gradients(MakeGradients(g, T, 0, 0, 0), &gresp));
  v1::GradNormRequest norm_req;
  norm_req.set_step(0);
  v1::GradNormResponse norm;
  ASSERT_RPC_OK(h->GradNorm(norm_req, &norm));
  const double expected = SumSquares(g.keys) + SumSquares(g.values);  // no router gradient
  EXPECT_NEAR(norm.squared_norm(), expected, 1e-6 * expected);
  v1::StepRequest step;
  step.set_step(0);
  step.set_lr(1e-3);
  step.set_clip_factor(1.0);
  v1::StepResponse sresp;
  ASSERT_RPC_OK(h->Step(step, &sresp));
  EXPECT_EQ(sresp.rows_updated(), static_cast<uint64_t>(n));
  EXPECT_EQ(sresp.router_rows_updated(), 0u);
}

TEST(RpcModeTest, UngatedPerTokenSendsUnitGatesAndNoRouter) {
  server::ServerOptions o = SmallOptions();
  o.selector.gated = false;
  auto h = StartHarness(o);
  ASSERT_NE(h, nullptr);
  std::mt19937 rng(9);
  constexpr int64_t T = 5;
  const Batch batch = RandomBatch(&rng, T, {0, 1, 1, 1, 1});
  v1::LookupResponse resp;
  ASSERT_RPC_OK(h->Lookup(MakeLookup(batch, 0, 0, 2, true), &resp));
  const Decoded d = Decode(resp);
  const int64_t n = static_cast<int64_t>(d.rows.size());
  EXPECT_EQ(Shape(resp.token_rows()), (std::vector<int64_t>{T, kTopK}));
  EXPECT_EQ(Shape(resp.token_gates()), (std::vector<int64_t>{T, kTopK}));
  ASSERT_EQ(d.token_gates.size(), static_cast<size_t>(T * kTopK));
  ASSERT_EQ(d.token_rows.size(), static_cast<size_t>(T * kTopK));
  int filled = 0;
  for (int64_t s = 0; s < T * kTopK; ++s) {
    if (s < kTopK) {
      EXPECT_EQ(d.token_rows[s], -1) << "padding token 0 got a row";
      continue;
    }
    ASSERT_GE(d.token_rows[s], 0);
    ASSERT_LT(d.token_rows[s], n);
    EXPECT_EQ(d.token_gates[s], 1.0f) << "slot " << s;
    ++filled;
  }
  EXPECT_EQ(filled, (T - 1) * kTopK);
  EXPECT_TRUE(IsEmptyTensor(resp.token_experts()));
  EXPECT_TRUE(IsEmptyTensor(resp.expert_ids()));
  EXPECT_TRUE(IsEmptyTensor(resp.router_rows()));

  Grads g = RandomGradsFor(d, T, /*with_gates=*/true, &rng);
  const uint64_t before = h->Digest();
  v1::GradientsResponse gresp;
  const grpc::Status s = h->Gradients(MakeGradients(g, T, 0, 0, 2), &gresp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("gate_grads:"));
  EXPECT_EQ(h->Digest(), before);
  g.gates.clear();
  ASSERT_RPC_OK(h->Gradients(MakeGradients(g, T, 0, 0, 2), &gresp));
  EXPECT_EQ(gresp.rows_accumulated(), static_cast<uint64_t>(n));
}

// The max_rows cap keeps the rows chosen by the most tokens (ties: lower id) and empties the
// slots of the others; compared against the uncapped selection of an identical store.
TEST(RpcModeTest, MaxRowsCapKeepsTheMostChosenRows) {
  constexpr int64_t kCap = 12;
  server::ServerOptions capped_options = SmallOptions();
  capped_options.selector.max_rows = kCap;
  auto full = StartHarness(SmallOptions());
  auto capped = StartHarness(capped_options);
  ASSERT_NE(full, nullptr);
  ASSERT_NE(capped, nullptr);
  std::mt19937 rng(17);
  constexpr int64_t T = 12;
  const Batch batch = RandomBatch(&rng, T);
  v1::LookupResponse full_resp, capped_resp;
  ASSERT_RPC_OK(full->Lookup(MakeLookup(batch, 0, 0, 0, false), &full_resp));
  ASSERT_RPC_OK(capped->Lookup(MakeLookup(batch, 0, 0, 0, true), &capped_resp));
  const Decoded f = Decode(full_resp);
  const Decoded c = Decode(capped_resp);
  ASSERT_GT(static_cast<int64_t>(f.rows.size()), kCap);
  EXPECT_EQ(full_resp.rows_dropped(), 0u);
  EXPECT_EQ(capped_resp.rows_dropped(), f.rows.size() - kCap);

  std::map<int32_t, int> count;
  for (int32_t pos : f.token_rows) {
    if (pos >= 0) ++count[f.rows[pos]];
  }
  std::vector<int32_t> order = f.rows;
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return count[a] > count[b]; });
  std::vector<int32_t> kept(order.begin(), order.begin() + kCap);
  std::sort(kept.begin(), kept.end());
  EXPECT_EQ(c.rows, kept);
  EXPECT_EQ(Shape(capped_resp.keys()), (std::vector<int64_t>{kCap, kDim}));

  const std::set<int32_t> kept_set(kept.begin(), kept.end());
  std::set<int32_t> experts;
  for (int64_t s = 0; s < T * kTopK; ++s) {
    const int32_t row = f.rows[f.token_rows[s]];
    if (kept_set.count(row)) {
      ASSERT_GE(c.token_rows[s], 0) << "slot " << s;
      EXPECT_EQ(c.rows[c.token_rows[s]], row);
      EXPECT_EQ(c.token_gates[s], f.token_gates[s]);
      ASSERT_GE(c.token_experts[s], 0);
      EXPECT_EQ(c.expert_ids[c.token_experts[s]], row / kRowsPerExpert);
      experts.insert(row / static_cast<int32_t>(kRowsPerExpert));
    } else {
      EXPECT_EQ(c.token_rows[s], -1) << "slot " << s << " holds a dropped row";
      EXPECT_EQ(c.token_experts[s], -1);
    }
  }
  EXPECT_EQ(c.expert_ids, std::vector<int32_t>(experts.begin(), experts.end()));

  // A gate gradient on a slot emptied by the cap is rejected.
  Grads g = RandomGradsFor(c, T, true, &rng);
  const auto dropped = std::find(c.token_rows.begin(), c.token_rows.end(), -1);
  ASSERT_NE(dropped, c.token_rows.end());
  g.gates[dropped - c.token_rows.begin()] = 0.5f;
  const uint64_t before = capped->Digest();
  v1::GradientsResponse gresp;
  const grpc::Status s = capped->Gradients(MakeGradients(g, T, 0, 0, 0), &gresp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("gate_grads.data:"));
  EXPECT_EQ(capped->Digest(), before);
  g.gates[dropped - c.token_rows.begin()] = 0.0f;
  ASSERT_RPC_OK(capped->Gradients(MakeGradients(g, T, 0, 0, 0), &gresp));
  EXPECT_EQ(gresp.rows_accumulated(), static_cast<uint64_t>(kCap));
}

// ---------------------------------------------------------------------------------------------
// 6. Standard health checking, through a generic stub (the health stubs are not installed).

// HealthCheckRequest {service = 1: string} in, HealthCheckResponse {status = 1: enum} out.
grpc::Status HealthCheck(const std::shared_ptr<grpc::Channel>& channel, const std::string& service,
                         int* serving_status) {
  std::string request;
  if (!service.empty()) {
    request.push_back(0x0a);  // field 1, length-delimited
    request.push_back(static_cast<char>(service.size()));
    request += service;
  }
  grpc::Slice slice(request);
  grpc::ByteBuffer request_buffer(&slice, 1);
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  grpc::CompletionQueue cq;
  auto call = stub.PrepareUnaryCall(&ctx, "/grpc.health.v1.Health/Check", request_buffer, &cq);
  call->StartCall();
  grpc::ByteBuffer response_buffer;
  grpc::Status status;
  call->Finish(&response_buffer, &status, reinterpret_cast<void*>(1));
  void* tag = nullptr;
  bool ok = false;
  EXPECT_TRUE(cq.Next(&tag, &ok));
  EXPECT_EQ(tag, reinterpret_cast<void*>(1));
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  *serving_status = -1;
  if (!status.ok()) return status;
  std::vector<grpc::Slice> slices;
  EXPECT_TRUE(response_buffer.Dump(&slices).ok());
  std::string bytes;
  for (const grpc::Slice& s : slices) {
    bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  *serving_status = 0;  // proto3 default: UNKNOWN when the field is absent
  size_t i = 0;
  while (i < bytes.size()) {
    const uint8_t key = static_cast<uint8_t>(bytes[i++]);
    if (key == 0x08) {  // field 1, varint
      uint64_t v = 0;
      for (int shift = 0; i < bytes.size(); shift += 7) {
        const uint8_t b = static_cast<uint8_t>(bytes[i++]);
        v |= uint64_t{b & 0x7fu} << shift;
        if ((b & 0x80) == 0) break;
      }
      *serving_status = static_cast<int>(v);
    } else {
      ADD_FAILURE() << "unexpected field key " << int{key} << " in HealthCheckResponse";
      break;
    }
  }
  return status;
}

TEST(RpcHealthTest, ReportsServing) {
  auto h = StartHarness(SmallOptions());
  ASSERT_NE(h, nullptr);
  constexpr int kServing = 1;
  for (const char* service : {"meft.v1.ParamServer", ""}) {
    SCOPED_TRACE(std::string("service \"") + service + "\"");
    int status = -1;
    const grpc::Status s = HealthCheck(h->channel, service, &status);
    ASSERT_TRUE(s.ok()) << s.error_code() << ": " << s.error_message();
    EXPECT_EQ(status, kServing);
  }
  int status = -1;
  const grpc::Status s = HealthCheck(h->channel, "no.such.Service", &status);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND) << s.error_message();
}

TEST(RpcHealthTest, NotServingUntilTheStoreIsReady) {
  // meft-param-server listens before it initialises or restores its store: until SetReady the
  // health check says NOT_SERVING and every call gets UNAVAILABLE "store loading".
  metrics::Registry registry;
  auto running = rpc::StartServer({.listen = "127.0.0.1:0"}, nullptr, &registry);
  ASSERT_TRUE(running.ok()) << running.status();
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string((*running)->port()),
                                     grpc::InsecureChannelCredentials());
  auto stub = v1::ParamServer::NewStub(channel);
  constexpr int kServing = 1, kNotServing = 2;
  for (const char* service : {"meft.v1.ParamServer", ""}) {
    int status = -1;
    const grpc::Status s = HealthCheck(channel, service, &status);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(status, kNotServing) << service;
  }
  {
    grpc::ClientContext ctx;
    v1::ServerInfoResponse info;
    const grpc::Status s = stub->ServerInfo(&ctx, v1::ServerInfoRequest(), &info);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_THAT(s.error_message(), HasSubstr("store loading"));
  }
  auto server = server::ParamServer::Create(SmallOptions(), &registry);
  ASSERT_TRUE(server.ok()) << server.status();
  (*running)->SetReady(server->get());
  for (const char* service : {"meft.v1.ParamServer", ""}) {
    int status = -1;
    ASSERT_TRUE(HealthCheck(channel, service, &status).ok());
    EXPECT_EQ(status, kServing) << service;
  }
  grpc::ClientContext ctx;
  v1::ServerInfoResponse info;
  ASSERT_TRUE(stub->ServerInfo(&ctx, v1::ServerInfoRequest(), &info).ok());
  EXPECT_EQ(info.rows(), static_cast<uint32_t>(kRows));
  (*running)->Shutdown(1.0);  // before `server` goes away
}

// ---------------------------------------------------------------------------------------------
// 7. ServerInfo.

TEST(RpcServerInfoTest, DescribesTheStore) {
  server::ServerOptions o = SmallOptions();
  o.layers = {2, 0};  // any order; reported ascending
  o.max_tokens = 1000;
  auto h = StartHarness(o);
  ASSERT_NE(h, nullptr);
  v1::ServerInfoResponse info;
  ASSERT_RPC_OK(h->Info(&info));
  EXPECT_FALSE(info.version().empty());
  EXPECT_EQ(std::vector<uint32_t>(info.layers().begin(), info.layers().end()),
            (std::vector<uint32_t>{0, 2}));
  EXPECT_EQ(info.rows(), static_cast<uint32_t>(kRows));
  EXPECT_EQ(info.dim(), static_cast<uint32_t>(kDim));
  EXPECT_EQ(info.experts(), static_cast<uint32_t>(kExperts));
  EXPECT_EQ(info.n_probe(), static_cast<uint32_t>(kProbe));
  EXPECT_EQ(info.top_k(), static_cast<uint32_t>(kTopK));
  EXPECT_EQ(info.max_rows(), 0u);
  EXPECT_EQ(info.mode(), v1::SELECTION_MODE_PER_TOKEN);
  EXPECT_TRUE(info.gated());
  EXPECT_EQ(info.wire_dtype(), v1::DTYPE_BF16);
  EXPECT_EQ(info.step(), 0u);
  EXPECT_EQ(info.max_tokens(), 1000u);
  EXPECT_DOUBLE_EQ(info.beta1(), 0.9);
  EXPECT_DOUBLE_EQ(info.beta2(), 0.999);
  EXPECT_DOUBLE_EQ(info.eps(), 1e-8);
  EXPECT_DOUBLE_EQ(info.weight_decay(), 0.0);

  // The step is the lowest over owned layers.
  v1::StepRequest step;
  step.set_step(0);
  step.set_lr(1e-3);
  step.set_clip_factor(1.0);
  step.add_layers(2);
  v1::StepResponse sresp;
  ASSERT_RPC_OK(h->Step(step, &sresp));
  ASSERT_RPC_OK(h->Info(&info));
  EXPECT_EQ(info.step(), 0u);
  step.clear_layers();
  ASSERT_RPC_OK(h->Step(step, &sresp));
  EXPECT_FALSE(sresp.already_applied()) << "layer 0 had not applied step 0";
  ASSERT_RPC_OK(h->Info(&info));
  EXPECT_EQ(info.step(), 1u);

  server::ServerOptions u = SmallOptions();
  u.mode = server::Mode::kUnion;
  u.selector.gated = false;
  u.wire_dtype = wire::DType::kFp32;
  auto hu = StartHarness(u);
  ASSERT_NE(hu, nullptr);
  ASSERT_RPC_OK(hu->Info(&info));
  EXPECT_EQ(info.mode(), v1::SELECTION_MODE_UNION);
  EXPECT_FALSE(info.gated());
  EXPECT_EQ(info.wire_dtype(), v1::DTYPE_FP32);
}

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

// ---------------------------------------------------------------------------------------------
// 9. Metrics.

// The value of the sample `series` (name plus rendered labels, e.g. `x_bucket{le="1"}`), or NaN.
double Sample(const std::string& text, const std::string& series) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(series, 0) == 0 && line.size() > series.size() &&
        (line[series.size()] == ' ' || line[series.size()] == '{')) {
      // Unlabelled series only match a space; labelled ones are looked up with their labels.
      if (line[series.size()] == '{') continue;
      return std::stod(line.substr(line.rfind(' ') + 1));
    }
  }
  return std::nan("");
}

TEST(RpcMetricsTest, ServerExportsPlausibleMetrics) {
  auto h = StartHarness(SmallOptions());
  ASSERT_NE(h, nullptr);
  std::mt19937 rng(21);
  double lookups = 0, rows_served = 0;
  int64_t rows_step = 0;
  for (uint32_t micro = 0; micro < 3; ++micro) {
    const Batch b = RandomBatch(&rng, 7, {1, 1, 1, 1, 1, 1, 0});
    v1::LookupResponse resp;
    ASSERT_RPC_OK(h->Lookup(MakeLookup(b, 0, micro, 0, true), &resp));
    const Decoded d = Decode(resp);
    lookups += 1;
    rows_served += static_cast<double>(d.rows.size());
    if (micro == 0) {  // a replay serves its rows again
      ASSERT_RPC_OK(h->Lookup(MakeLookup(b, 0, micro, 0, true), &resp));
      lookups += 1;
      rows_served += static_cast<double>(d.rows.size());
    }
    const Grads g = RandomGradsFor(d, b.tokens, true, &rng);
    v1::GradientsResponse gresp;
    ASSERT_RPC_OK(h->Gradients(MakeGradients(g, b.tokens, 0, micro, 0), &gresp));
    rows_step = static_cast<int64_t>(gresp.rows_accumulated());
  }
  {
    v1::LookupResponse resp;  // a rejected request counts bytes in, but serves nothing
    v1::LookupRequest bad = MakeLookup(RandomBatch(&rng, 2), 0, 9, 0, true);
    bad.mutable_x()->mutable_data()->pop_back();
    EXPECT_FALSE(h->Lookup(bad, &resp).ok());
  }
  v1::StepRequest step;
  step.set_step(0);
  step.set_lr(1e-3);
  step.set_clip_factor(1.0);
  v1::StepResponse sresp;
  ASSERT_RPC_OK(h->Step(step, &sresp));
  EXPECT_EQ(sresp.rows_updated(), static_cast<uint64_t>(rows_step));
  v1::ServerInfoResponse info;
  ASSERT_RPC_OK(h->Info(&info));

  const std::string text = h->registry.SerializeText();
  SCOPED_TRACE(text);
  EXPECT_EQ(Sample(text, "meft_ps_lookup_seconds_count"), lookups);
  EXPECT_EQ(Sample(text, "meft_ps_rows_served_total"), rows_served);
  EXPECT_EQ(Sample(text, "meft_ps_unique_rows_per_lookup_count"), lookups);
  EXPECT_EQ(Sample(text, "meft_ps_unique_rows_per_lookup_sum"), rows_served);
  EXPECT_EQ(Sample(text, "meft_ps_bytes_received_total"), h->request_bytes);
  EXPECT_EQ(Sample(text, "meft_ps_bytes_sent_total"), h->response_bytes);
  EXPECT_GT(h->response_bytes, rows_served * kDim * 4 * 2) << "keys and values were sent as fp32";
  EXPECT_EQ(Sample(text, "meft_ps_optimizer_step_seconds_count"), 1.0);
  EXPECT_EQ(Sample(text, "meft_ps_rows_updated_total"), static_cast<double>(rows_step));
  const double imbalance = Sample(text, "meft_ps_expert_load_imbalance");
  EXPECT_GE(imbalance, 1.0);
  EXPECT_LE(imbalance, static_cast<double>(kExperts) / kProbe);  // all tokens on n_probe experts
  EXPECT_EQ(Sample(text, "meft_ps_optimizer_step"), 1.0);
  EXPECT_THAT(text, HasSubstr("# TYPE meft_ps_lookup_seconds histogram"));
  EXPECT_THAT(text, HasSubstr("# TYPE meft_ps_rows_served_total counter"));
  EXPECT_THAT(text, HasSubstr("# TYPE meft_ps_expert_load_imbalance gauge"));
  EXPECT_THAT(text, HasSubstr("meft_ps_lookup_seconds_bucket{le=\"+Inf\"} " +
                              std::to_string(static_cast<int>(lookups))));

  TempDir tmp;
  const std::string metrics_file = tmp.path() + "/metrics.txt";
  const std::string out_file = tmp.path() + "/promtool.out";
  {
    std::ofstream out(metrics_file);
    out << text;
  }
  const std::string cmd =
      "/usr/bin/promtool check metrics < " + metrics_file + " > " + out_file + " 2>&1";
  const int rc = std::system(cmd.c_str());
  std::ifstream promtool_out(out_file);
  const std::string promtool_text((std::istreambuf_iterator<char>(promtool_out)),
                                  std::istreambuf_iterator<char>());
  ASSERT_NE(rc, -1);
  EXPECT_TRUE(WIFEXITED(rc) && WEXITSTATUS(rc) == 0) << "promtool check metrics failed:\n"
                                                     << promtool_text;
}

}  // namespace
}  // namespace meft
