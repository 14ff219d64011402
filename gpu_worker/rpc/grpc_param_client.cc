#include "gpu_worker/rpc/grpc_param_client.h"

#include <grpcpp/create_channel.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/rpc/status_convert.h"
#include "common/status.h"
#include "common/wire/lookup_layout.h"
#include "gpu_worker/rpc/arena_session.h"
#include "gpu_worker/rpc/channel_credentials.h"
#include "gpu_worker/rpc/param_client_convert.h"
#include "gpu_worker/rpc/shm_transport.h"
#include "meft/v1/param_server.grpc.pb.h"

namespace meft::worker {
namespace {

class GrpcParamClient final : public ParamClient {
 public:
  // `auth`: the channel's credentials and authorization metadata (channel_credentials.h).
  GrpcParamClient(const GrpcClientOptions& options, ChannelAuth auth)
      : options_(options),
        authorization_(std::move(auth.authorization)),
        session_(options, {.describe = [this] { return Describe(); },
                           .attach = [this](const v1::AttachArenaRequest& request)
                               -> absl::StatusOr<uint64_t> {
                             v1::AttachArenaResponse response;
                             MEFT_RETURN_IF_ERROR(Call("AttachArena",
                                                       &v1::ParamServer::Stub::AttachArena,
                                                       request, &response));
                             return response.arena_id();
                           }}) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(options.max_message_bytes);
    args.SetMaxSendMessageSize(options.max_message_bytes);
    // Calls fail fast with UNAVAILABLE while the server is down (no wait_for_ready), and the
    // channel retries the connection at least every second, so a restarted server on the same
    // address is found soon (gRPC's default backoff grows to two minutes).
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 250);
    args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 250);
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
    stub_ = v1::ParamServer::NewStub(
        grpc::CreateCustomChannel(options.address, std::move(auth.credentials), args));
  }

  absl::StatusOr<LookupReply> Lookup(const RequestHeader& header, const torch::Tensor& x,
                                      const torch::Tensor& token_mask, bool training) override {
    try {
      MEFT_ASSIGN_OR_RETURN(ShmTransport * shm, session_.Transport());
      v1::LookupRequest request;
      HeaderToProto(header, request.mutable_header());
      ArenaHold hold(shm);
      PutFloats(shm, x, /*bf16=*/false, request.mutable_x(), &hold);
      if (token_mask.defined()) TokenMaskToProto(token_mask, request.mutable_token_mask());
      request.set_training(training);
      request.set_row_dtype(options_.bf16_rows ? v1::DTYPE_BF16 : v1::DTYPE_FP32);
      std::shared_ptr<ResponseLease> lease;
      if (shm != nullptr) {
        MEFT_ASSIGN_OR_RETURN(lease, session_.AllocateResponse(shm, x.size(0)));
        if (lease) {
          request.mutable_response_region()->set_offset(lease->region().offset);
          request.mutable_response_region()->set_bytes(lease->region().bytes);
        }
      }
      // Shared: the answer's float tensors alias its bytes (see InlineAnswerTensor).
      auto owned = std::make_shared<v1::LookupResponse>();
      v1::LookupResponse& response = *owned;
      const absl::Status called =
          CallWithArena(shm, "Lookup", &v1::ParamServer::Stub::Lookup, &request, &response);
      if (MayStillRun(called)) {
        hold.Leak();
        session_.Leak(std::move(lease));
      }
      MEFT_RETURN_IF_ERROR(called);
      hold.Release();
      if (lease) {
        uint64_t used = 0;
        for (wire::AnswerField field : wire::kAnswerFields) {
          const v1::Tensor& t = AnswerTensorProto(response, field);
          if (t.has_arena() && t.arena().offset() >= lease->region().offset) {
            used = std::max(used, t.arena().offset() + t.arena().bytes() - lease->region().offset);
          }
        }
        lease->Shrink(std::min(used, lease->region().bytes));
      }
      return LookupResultFromProto(
          response, [&](const v1::Tensor& t, const char* field) -> absl::StatusOr<torch::Tensor> {
            if (!t.has_arena()) return InlineAnswerTensor(t, field, owned);
            if (!lease) {
              return absl::DataLossError(absl::StrCat(
                  "server answer ", field, ": an arena span, but no region was offered"));
            }
            return shm->FromArena(t, field, lease);
          });
    } catch (const c10::Error& e) {
      return absl::InternalError(absl::StrCat("Lookup: ", e.what_without_backtrace()));
    }
  }

  absl::Status Gradients(const RequestHeader& header, const torch::Tensor& key_grads,
                         const torch::Tensor& value_grads,
                         const torch::Tensor& gate_grads) override {
    try {
      MEFT_ASSIGN_OR_RETURN(ShmTransport * shm, session_.Transport());
      v1::GradientsRequest request;
      HeaderToProto(header, request.mutable_header());
      ArenaHold hold(shm);
      PutFloats(shm, key_grads, options_.bf16_grads, request.mutable_key_grads(), &hold);
      PutFloats(shm, value_grads, options_.bf16_grads, request.mutable_value_grads(), &hold);
      if (gate_grads.defined()) {
        PutFloats(shm, gate_grads, false, request.mutable_gate_grads(), &hold);
      }
      v1::GradientsResponse response;
      const absl::Status called =
          CallWithArena(shm, "Gradients", &v1::ParamServer::Stub::Gradients, &request, &response);
      if (MayStillRun(called)) hold.Leak();
      return called;
    } catch (const c10::Error& e) {
      return absl::InternalError(absl::StrCat("Gradients: ", e.what_without_backtrace()));
    }
  }

  absl::StatusOr<double> GradNorm(uint64_t step) override {
    v1::GradNormRequest request;
    request.set_step(step);
    v1::GradNormResponse response;
    MEFT_RETURN_IF_ERROR(Call("GradNorm", &v1::ParamServer::Stub::GradNorm, request, &response));
    return response.squared_norm();
  }

  absl::StatusOr<std::vector<std::pair<uint32_t, double>>> LayerGradNorms(uint64_t step) override {
    v1::GradNormRequest request;
    request.set_step(step);
    v1::GradNormResponse response;
    MEFT_RETURN_IF_ERROR(Call("GradNorm", &v1::ParamServer::Stub::GradNorm, request, &response));
    return LayerNormsFromProto(response);
  }

  absl::Status Step(uint64_t step, double lr, double clip_factor) override {
    v1::StepRequest request;
    request.set_step(step);
    request.set_lr(lr);
    request.set_clip_factor(clip_factor);
    v1::StepResponse response;
    return Call("Step", &v1::ParamServer::Stub::Step, request, &response);
  }

  absl::StatusOr<std::string> SaveCheckpoint(const std::string& directory) override {
    v1::SaveCheckpointRequest request;
    request.set_directory(directory);
    v1::SaveCheckpointResponse response;
    MEFT_RETURN_IF_ERROR(
        Call("SaveCheckpoint", &v1::ParamServer::Stub::SaveCheckpoint, request, &response));
    return response.path();
  }

  absl::Status RestoreCheckpoint(const std::string& path) override {
    v1::RestoreCheckpointRequest request;
    request.set_path(path);
    v1::RestoreCheckpointResponse response;
    return Call("RestoreCheckpoint", &v1::ParamServer::Stub::RestoreCheckpoint, request, &response);
  }

  absl::StatusOr<ServerInfo> Describe() override {
    v1::ServerInfoResponse r;
    MEFT_RETURN_IF_ERROR(
        Call("ServerInfo", &v1::ParamServer::Stub::ServerInfo, v1::ServerInfoRequest(), &r));
    return ServerInfoFromProto(r);
  }

 private:
  // `t` into the arena when there is one with room, else inline.
  static void PutFloats(ShmTransport* shm, const torch::Tensor& t, bool bf16, v1::Tensor* out,
                        ArenaHold* hold) {
    if (shm == nullptr || !shm->PutFloats(t, bf16, out, hold->regions())) {
      FloatsToProto(t, bf16, out);
    }
  }

  // Call with the arena's id set. When the server no longer knows the arena (it restarted),
  // attaches again and retries once.
  template <typename Request, typename Response>
  absl::Status CallWithArena(ShmTransport* shm, const char* method,
                             grpc::Status (v1::ParamServer::Stub::*fn)(grpc::ClientContext*,
                                                                       const Request&, Response*),
                             Request* request, Response* response) {
    if (shm == nullptr) return Call(method, fn, *request, response);
    const uint64_t id = shm->arena_id();
    request->set_arena_id(id);
    absl::Status s = Call(method, fn, *request, response);
    if (!absl::IsFailedPrecondition(s) ||
        s.message().find("arena not attached") == absl::string_view::npos) {
      return s;
    }
    MEFT_RETURN_IF_ERROR(session_.Reattach(shm, id));
    request->set_arena_id(shm->arena_id());
    response->Clear();
    return Call(method, fn, *request, response);
  }

  template <typename Request, typename Response>
  absl::Status Call(const char* method,
                    grpc::Status (v1::ParamServer::Stub::*fn)(grpc::ClientContext*, const Request&,
                                                              Response*),
                    const Request& request, Response* response) {
    grpc::ClientContext context;
    context.set_deadline(
        std::chrono::system_clock::now() +
        std::chrono::milliseconds(static_cast<int64_t>(options_.deadline_seconds * 1000)));
    if (!authorization_.empty()) context.AddMetadata("authorization", authorization_);
    const grpc::Status s = (stub_.get()->*fn)(&context, request, response);
    if (s.ok()) return absl::OkStatus();
    const absl::Status a = rpc::FromGrpcStatus(s);
    return absl::Status(a.code(), absl::StrCat("parameter server ", options_.address, " ", method,
                                               ": ", a.message()));
  }

  const GrpcClientOptions options_;
  const std::string authorization_;
  std::unique_ptr<v1::ParamServer::Stub> stub_;
  ArenaSession session_;  // calls Describe and AttachArena through this client
};

}  // namespace

absl::StatusOr<GrpcClientOptions::Transport> ParseTransport(const std::string& name) {
  if (name == "auto") return GrpcClientOptions::Transport::kAuto;
  if (name == "shm") return GrpcClientOptions::Transport::kShm;
  if (name == "grpc") return GrpcClientOptions::Transport::kGrpc;
  return absl::InvalidArgumentError(
      absl::StrCat("meft.transport: \"", name, "\" is not one of auto, shm, grpc"));
}

absl::StatusOr<std::unique_ptr<ParamClient>> CreateGrpcParamClient(
    const GrpcClientOptions& options) {
  if (options.address.empty()) return absl::InvalidArgumentError("server address: empty");
  if (options.shm_arena_bytes != 0 && options.shm_arena_bytes < (uint64_t{1} << 20)) {
    return absl::InvalidArgumentError(absl::StrCat("meft.shm_arena_mb: ", options.shm_arena_bytes,
                                                   " bytes is too small (at least 1 MiB)"));
  }
  MEFT_ASSIGN_OR_RETURN(ChannelAuth auth, LoadChannelAuth(options));
  return std::unique_ptr<ParamClient>(
      new GrpcParamClient(options, std::move(auth)));
}

}  // namespace meft::worker
