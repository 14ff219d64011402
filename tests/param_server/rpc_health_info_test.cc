// The parameter server's standard health checking (grpc.health.v1) and ServerInfo through its
// gRPC face (see rpc_test_util.h for the harness).

#include <gmock/gmock.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/generic/generic_stub.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tests/param_server/rpc_test_util.h"

namespace meft::rpc_test {
namespace {

using ::testing::HasSubstr;

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

}  // namespace
}  // namespace meft::rpc_test
