#include "tests/param_server/rpc_test_util.h"

#include <grpcpp/create_channel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <set>
#include <utility>

#include "common/safetensors/safetensors.h"

namespace meft::rpc_test {

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

std::unique_ptr<Harness> StartHarness(const server::ServerOptions& options, int max_message_bytes) {
  auto h = std::make_unique<Harness>();
  server::ServerOptions with_limit = options;
  with_limit.max_response_bytes = max_message_bytes;  // as meft-param-server's main() does
  rpc::RpcOptions rpc_options = testing::LoopbackRpcOptions();
  rpc_options.max_message_bytes = max_message_bytes;
  const absl::Status started = h->Start(with_limit, rpc_options);
  if (!started.ok()) {
    ADD_FAILURE() << "start: " << started;
    return nullptr;
  }
  h->channel = grpc::CreateChannel(h->address(), grpc::InsecureChannelCredentials());
  h->stub = v1::ParamServer::NewStub(h->channel);
  return h;
}

// ---------------------------------------------------------------------------------------------
// Requests and decoded responses.

Batch RandomBatch(std::mt19937* rng, int64_t tokens, std::vector<uint8_t> mask) {
  return {tokens, RandomNormal(rng, static_cast<size_t>(tokens * kDim)), std::move(mask)};
}

v1::LookupRequest MakeLookup(const Batch& b, uint64_t step, uint32_t micro, uint32_t layer,
                             bool training, v1::DType row_dtype) {
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

}  // namespace meft::rpc_test
