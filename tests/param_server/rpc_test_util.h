#pragma once

// Shared by the rpc_*_test.cc files, the end-to-end tests of the parameter server's gRPC face:
// the real server runs in-process on a loopback port picked by the kernel, and every request is
// built by hand as raw little-endian tensor bytes, the way a worker written in another language
// would build it (independently of common/wire).

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/metrics/metrics.h"
#include "meft/v1/param_server.grpc.pb.h"
#include "meft/v1/param_server.pb.h"
#include "param_server/rpc/service.h"
#include "param_server/server/param_server.h"
#include "tests/testing/in_process_server.h"

namespace meft::rpc_test {

// The store of SmallOptions(): layers 0 and 2.
inline constexpr int64_t kDim = 16;
inline constexpr int64_t kRows = 256;
inline constexpr int64_t kExperts = 16;
inline constexpr int64_t kRowsPerExpert = kRows / kExperts;
inline constexpr int64_t kProbe = 4;
inline constexpr int64_t kTopK = 8;

// Layers {0, 2} of kRows x kDim in kExperts experts, n_probe kProbe, top_k kTopK, seed 7.
server::ServerOptions SmallOptions();

// ---------------------------------------------------------------------------------------------
// Tensors on the wire, encoded and decoded byte by byte (little-endian).

uint32_t FloatBits(float f);
float BitsFloat(uint32_t b);
void AppendLe(uint64_t value, int bytes, std::string* out);
uint64_t ReadLe(const std::string& data, size_t offset, int bytes);
// fp32 -> bf16, round to nearest even (finite inputs).
uint16_t ToBf16(float f);
v1::Tensor MakeTensor(v1::DType dtype, const std::vector<int64_t>& shape, std::string data);
v1::Tensor Fp32(const std::vector<float>& v, const std::vector<int64_t>& shape);
v1::Tensor Bf16(const std::vector<float>& v, const std::vector<int64_t>& shape);
v1::Tensor U8(const std::vector<uint8_t>& v, const std::vector<int64_t>& shape);
std::vector<int64_t> Shape(const v1::Tensor& t);
bool IsEmptyTensor(const v1::Tensor& t);
// The elements of an fp32 or bf16 tensor (any other dtype fails the test and gives none).
std::vector<float> Floats(const v1::Tensor& t);
// The elements of an int32 tensor (expects that dtype).
std::vector<int32_t> Ints(const v1::Tensor& t);
std::vector<float> RandomNormal(std::mt19937* rng, size_t n);
// Values of magnitude in [0.1, 1] with random signs: far from zero, so a first Adam step moves
// each element by almost exactly lr.
std::vector<float> RandomGrads(std::mt19937* rng, size_t n);

// ---------------------------------------------------------------------------------------------
// A server, its gRPC face and a client, in this process.

// The server (registry, domain, running) and a stub on a channel to it.
struct Harness : testing::InProcessServer {
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
  uint64_t Digest() const { return domain->StateDigest(); }
};

// Serves `options` with responses and messages limited to `max_message_bytes`, as
// meft-param-server's main() does; null (and a test failure) when the server does not start.
std::unique_ptr<Harness> StartHarness(const server::ServerOptions& options,
                                      int max_message_bytes = 64 << 20);

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

Batch RandomBatch(std::mt19937* rng, int64_t tokens, std::vector<uint8_t> mask = {});

v1::LookupRequest MakeLookup(const Batch& b, uint64_t step, uint32_t micro, uint32_t layer,
                             bool training, v1::DType row_dtype = v1::DTYPE_FP32);

struct Decoded {
  std::vector<int32_t> rows;
  std::vector<float> keys, values;
  std::vector<int32_t> token_rows, token_experts, expert_ids;
  std::vector<float> token_gates, router;
};

Decoded Decode(const v1::LookupResponse& r);

struct Grads {
  std::vector<float> keys, values;  // [|S|, d]
  std::vector<float> gates;         // [T, top_k], zero on empty slots; empty when not sent
};

Grads RandomGradsFor(const Decoded& d, int64_t tokens, bool with_gates, std::mt19937* rng);

v1::GradientsRequest MakeGradients(const Grads& g, int64_t tokens, uint64_t step, uint32_t micro,
                                   uint32_t layer);

// dG[p] for p indexing expert_ids: sum over tokens t of (sum of t's gate grads on slots of
// expert p) * x_t, in double.
std::vector<double> RouterGrad(const Decoded& d, const Batch& b, const Grads& g);

double SumSquares(const std::vector<float>& v);
double SumSquares(const std::vector<double>& v);

// The change a first SparseAdam step (default betas and eps, clip 1, no decay) makes to a
// parameter whose gradient is g.
double FirstAdamDelta(double g, double lr);

// One layer's tensors from a checkpoint written by the server.
struct Snapshot {
  std::vector<float> keys, values, router;
};

Snapshot ReadSnapshot(const std::string& dir, uint32_t layer);

// The dot product of two kDim vectors, in double.
double Dot(const float* a, const float* b);

// Checks a gated per_token answer against a slow reference of DESIGN §2 computed from the
// store's K and G (read from a checkpoint): each real token's slots hold its top_k keys among
// the keys of its n_probe best experts, scored g_t[e] * (k_i . x_t), in decreasing order.
// Tolerances absorb float summation order only.
void CheckSelectionAgainstReference(const Decoded& d, const Batch& b, const Snapshot& snap);

}  // namespace meft::rpc_test
