#include "gpu_worker/rpc/grpc_param_client.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <torch/torch.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/rpc/address.h"
#include "common/rpc/status_convert.h"
#include "common/status.h"
#include "common/wire/tensor_codec.h"
#include "gpu_worker/rpc/answer_tensor.h"
#include "gpu_worker/rpc/shm_transport.h"
#include "meft/v1/param_server.grpc.pb.h"
#include "spdlog/spdlog.h"

namespace meft::worker {
namespace {

// float or bf16 CPU tensor -> wire Tensor (bf16 rounding to nearest even, as the server does).
void FloatsToProto(const torch::Tensor& t, bool bf16, v1::Tensor* out) {
  const torch::Tensor cpu = t.detach().to(torch::kCPU, torch::kFloat32).contiguous();
  out->set_dtype(bf16 ? v1::DTYPE_BF16 : v1::DTYPE_FP32);
  for (int64_t d : cpu.sizes()) out->add_shape(d);
  std::string data;
  wire::EncodeFloats(
      std::span<const float>(cpu.data_ptr<float>(), static_cast<size_t>(cpu.numel())),
      bf16 ? wire::DType::kBf16 : wire::DType::kFp32, &data);
  out->set_data(std::move(data));
}

// An inline answer tensor; float tensors alias the message's bytes (see AnswerTensor). An absent
// tensor gives an undefined tensor.
absl::StatusOr<torch::Tensor> FromProto(const v1::Tensor& t, const char* field,
                                        const std::shared_ptr<const v1::LookupResponse>& owner) {
  if (t.dtype() == v1::DTYPE_UNSPECIFIED && t.shape_size() == 0) return torch::Tensor();
  // std::string's heap buffer is aligned for any scalar type; an empty one is never read.
  return AnswerTensor(t, field, const_cast<char*>(t.data().data()), t.data().size(), owner);
}

void SetHeader(const StepHeader& h, v1::RequestHeader* out) {
  out->set_step(h.step);
  out->set_micro_step(h.micro_step);
  out->set_layer(h.layer);
}

absl::StatusOr<std::string> ReadWholeFile(const char* option, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat(option, ": cannot read ", path));
  std::ostringstream content;
  content << in.rdbuf();
  if (in.bad()) return absl::InvalidArgumentError(absl::StrCat(option, ": cannot read ", path));
  return content.str();
}

class GrpcParamClient final : public ParamClient {
 public:
  // `authorization` is the full metadata value ("Bearer <token>"), "" = none.
  GrpcParamClient(const GrpcClientOptions& options,
                  std::shared_ptr<grpc::ChannelCredentials> credentials, std::string authorization)
      : options_(options), authorization_(std::move(authorization)) {
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
        grpc::CreateCustomChannel(options.address, std::move(credentials), args));
  }

  absl::StatusOr<LookupResult> Lookup(const StepHeader& header, const torch::Tensor& x,
                                      const torch::Tensor& token_mask, bool training) override {
    try {
      MEFT_ASSIGN_OR_RETURN(ShmTransport * shm, Transport());
      v1::LookupRequest request;
      SetHeader(header, request.mutable_header());
      ArenaHold hold(shm);
      PutFloats(shm, x, /*bf16=*/false, request.mutable_x(), &hold);
      if (token_mask.defined()) {
        const torch::Tensor m =
            token_mask.detach().to(torch::kCPU).ne(0).to(torch::kUInt8).contiguous();
        v1::Tensor* mt = request.mutable_token_mask();
        mt->set_dtype(v1::DTYPE_UINT8);
        mt->add_shape(m.numel());
        mt->set_data(std::string(reinterpret_cast<const char*>(m.data_ptr<uint8_t>()),
                                 static_cast<size_t>(m.numel())));
      }
      request.set_training(training);
      request.set_row_dtype(options_.bf16_rows ? v1::DTYPE_BF16 : v1::DTYPE_FP32);
      std::shared_ptr<ResponseLease> lease;
      if (shm != nullptr) {
        MEFT_ASSIGN_OR_RETURN(lease, AllocateResponse(shm, x.size(0)));
        if (lease) {
          request.mutable_response_region()->set_offset(lease->region().offset);
          request.mutable_response_region()->set_bytes(lease->region().bytes);
        }
      }
      // Shared: the answer's float tensors alias its bytes (see FromProto).
      auto owned = std::make_shared<v1::LookupResponse>();
      v1::LookupResponse& response = *owned;
      const absl::Status called =
          CallWithArena(shm, "Lookup", &v1::ParamServer::Stub::Lookup, &request, &response);
      if (MayStillRun(called)) {
        hold.Leak();
        Leak(std::move(lease));
      }
      MEFT_RETURN_IF_ERROR(called);
      hold.Release();
      if (lease) {
        uint64_t used = 0;
        for (const v1::Tensor* t :
             {&response.row_ids(), &response.keys(), &response.values(), &response.token_rows(),
              &response.token_gates(), &response.token_experts(), &response.expert_ids(),
              &response.router_rows()}) {
          if (t->has_arena() && t->arena().offset() >= lease->region().offset) {
            used =
                std::max(used, t->arena().offset() + t->arena().bytes() - lease->region().offset);
          }
        }
        lease->Shrink(std::min(used, lease->region().bytes));
      }
      auto take = [&](const v1::Tensor& t, const char* field) -> absl::StatusOr<torch::Tensor> {
        if (!t.has_arena()) {
          return FromProto(t, field, owned);
        }
        if (!lease) {
          return absl::DataLossError(
              absl::StrCat("server answer ", field, ": an arena span, but no region was offered"));
        }
        return shm->FromArena(t, field, lease);
      };
      LookupResult r;
      MEFT_ASSIGN_OR_RETURN(r.row_ids, take(response.row_ids(), "row_ids"));
      MEFT_ASSIGN_OR_RETURN(r.keys, take(response.keys(), "keys"));
      MEFT_ASSIGN_OR_RETURN(r.values, take(response.values(), "values"));
      MEFT_ASSIGN_OR_RETURN(r.token_rows, take(response.token_rows(), "token_rows"));
      MEFT_ASSIGN_OR_RETURN(r.token_gates, take(response.token_gates(), "token_gates"));
      MEFT_ASSIGN_OR_RETURN(r.token_experts, take(response.token_experts(), "token_experts"));
      MEFT_ASSIGN_OR_RETURN(r.expert_ids, take(response.expert_ids(), "expert_ids"));
      MEFT_ASSIGN_OR_RETURN(r.router_rows, take(response.router_rows(), "router_rows"));
      r.replayed = response.replayed();
      return r;
    } catch (const c10::Error& e) {
      return absl::InternalError(absl::StrCat("Lookup: ", e.what_without_backtrace()));
    }
  }

  absl::Status Gradients(const StepHeader& header, const torch::Tensor& key_grads,
                         const torch::Tensor& value_grads,
                         const torch::Tensor& gate_grads) override {
    try {
      MEFT_ASSIGN_OR_RETURN(ShmTransport * shm, Transport());
      v1::GradientsRequest request;
      SetHeader(header, request.mutable_header());
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
    if (response.layers_size() != response.layer_squared_norms_size()) {
      return absl::DataLossError(
          absl::StrCat("server answer layer_squared_norms: ", response.layer_squared_norms_size(),
                       " norms for ", response.layers_size(), " layers"));
    }
    std::vector<std::pair<uint32_t, double>> out;
    for (int i = 0; i < response.layers_size(); ++i) {
      out.emplace_back(response.layers(i), response.layer_squared_norms(i));
    }
    return out;
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

  absl::StatusOr<ServerDescription> Describe() override {
    v1::ServerInfoResponse r;
    MEFT_RETURN_IF_ERROR(
        Call("ServerInfo", &v1::ParamServer::Stub::ServerInfo, v1::ServerInfoRequest(), &r));
    ServerDescription d;
    d.layers.assign(r.layers().begin(), r.layers().end());
    d.rows = r.rows();
    d.dim = r.dim();
    d.experts = r.experts();
    d.n_probe = r.n_probe();
    d.top_k = r.top_k();
    d.max_rows = r.max_rows();
    d.max_tokens = r.max_tokens();
    d.per_token = r.mode() != v1::SELECTION_MODE_UNION;
    d.gated = r.gated();
    d.step = r.step();
    return d;
  }

 private:
  // Regions holding one request's tensors; freed by Release or on destruction.
  class ArenaHold {
   public:
    explicit ArenaHold(ShmTransport* shm) : shm_(shm) {}
    ~ArenaHold() { Release(); }
    ArenaHold(const ArenaHold&) = delete;
    ArenaHold& operator=(const ArenaHold&) = delete;
    void Release() {
      if (shm_ != nullptr) shm_->Free(regions_);
      regions_.clear();
    }
    // Forgets the regions without returning them to the allocator (see MayStillRun).
    void Leak() { regions_.clear(); }
    std::vector<shm::Region>* regions() { return &regions_; }

   private:
    ShmTransport* const shm_;
    std::vector<shm::Region> regions_;
  };

  // Whether the server's handler may still be running after a call ended with `s` (the deadline
  // passed, the connection broke, or the outcome is unknown), and so may still read the request's
  // arena regions or write its answer into the response region. Such regions must not be handed
  // out again; only OK and definite rejections prove that the handler is done with them.
  static bool MayStillRun(const absl::Status& s) {
    switch (s.code()) {
      case absl::StatusCode::kOk:
      case absl::StatusCode::kInvalidArgument:
      case absl::StatusCode::kFailedPrecondition:
      case absl::StatusCode::kNotFound:
      case absl::StatusCode::kOutOfRange:
      case absl::StatusCode::kResourceExhausted:
      case absl::StatusCode::kUnauthenticated:
      case absl::StatusCode::kPermissionDenied:
      case absl::StatusCode::kAlreadyExists:
        return false;
      default:
        return true;
    }
  }

  // Keeps the response region of a call the server may still be answering out of the allocator
  // until the client is destroyed: a deliberate leak (rare: timeouts and broken connections),
  // bounded by the arena, which a new client's arena replaces.
  void Leak(std::shared_ptr<ResponseLease> lease) {
    if (!lease) return;
    std::lock_guard lock(leaked_mu_);
    leaked_.push_back(std::move(lease));
  }

  // `t` into the arena when there is one with room, else inline.
  static void PutFloats(ShmTransport* shm, const torch::Tensor& t, bool bf16, v1::Tensor* out,
                        ArenaHold* hold) {
    if (shm == nullptr || !shm->PutFloats(t, bf16, out, hold->regions())) {
      FloatsToProto(t, bf16, out);
    }
  }

  // A region for the answer to `tokens` tokens; null (answer inline) when the arena is busy.
  // An answer that could never fit is an error with meft.transport: shm, inline with auto.
  absl::StatusOr<std::shared_ptr<ResponseLease>> AllocateResponse(ShmTransport* shm,
                                                                  int64_t tokens) {
    const uint64_t bound = ResponseBytesBound(server_, tokens, options_.bf16_rows ? 2 : 4);
    if (bound > shm->capacity()) {
      if (options_.transport == GrpcClientOptions::Transport::kShm) {
        return absl::ResourceExhaustedError(
            absl::StrCat("meft.shm_arena_mb: the shared-memory arena (", shm->capacity() >> 20,
                         " MiB) is too small for the answer to ", tokens, " tokens (up to ",
                         bound >> 20, " MiB); raise meft.shm_arena_mb"));
      }
      return std::shared_ptr<ResponseLease>();
    }
    return shm->AllocateResponse(bound);
  }

  // The shared-memory transport, or null for inline tensors; decided at the first call that
  // gets a definite answer (a transient failure, such as the server being down or still
  // loading, is decided again at the next call).
  absl::StatusOr<ShmTransport*> Transport() {
    std::lock_guard lock(transport_mu_);
    if (transport_decided_) {
      if (!transport_error_.ok()) return transport_error_;
      return shm_.get();
    }
    if (options_.transport == GrpcClientOptions::Transport::kGrpc) {
      transport_decided_ = true;
      spdlog::info("transport to {}: gRPC (meft.transport: grpc)", options_.address);
      return nullptr;
    }
    const bool required = options_.transport == GrpcClientOptions::Transport::kShm;
    absl::Status status;
    // With auto, only loopback addresses try the arena. With shm, any address does (a compose
    // service name, say): AttachArena's nonce check proves that both share the host.
    if (!required && !rpc::IsLoopback(options_.address)) {
      status = absl::FailedPreconditionError(
          absl::StrCat(options_.address, " is not a loopback address"));
    } else {
      status = SetUpShm();
    }
    const bool transient = absl::IsUnavailable(status) || absl::IsDeadlineExceeded(status) ||
                           absl::IsCancelled(status) || absl::IsAborted(status);
    transport_decided_ = !transient;
    if (status.ok()) {
      spdlog::info("transport to {}: shared memory (arena {}, {} MiB{})", options_.address,
                   shm_->arena().name(), shm_->arena().size() >> 20,
                   shm_->pinned() ? ", pinned for CUDA" : "");
      return shm_.get();
    }
    shm_.reset();
    if (required) {
      const absl::Status error = absl::Status(
          status.code(),
          absl::StrCat("meft.transport: shm, but the shared-memory arena cannot be used: ",
                       status.message()));
      if (!transient) transport_error_ = error;
      return error;
    }
    if (transient) {
      spdlog::debug("transport to {}: gRPC for now (shared memory not set up yet: {})",
                    options_.address, std::string(status.message()));
      return nullptr;
    }
    spdlog::info("transport to {}: gRPC (shared memory not used: {})", options_.address,
                 std::string(status.message()));
    return nullptr;
  }

  absl::Status SetUpShm() {
    MEFT_ASSIGN_OR_RETURN(server_, Describe());
    uint64_t bytes = options_.shm_arena_bytes;
    if (bytes == 0) bytes = DefaultArenaBytes(server_, options_.bf16_rows ? 2 : 4);
    MEFT_ASSIGN_OR_RETURN(shm_, ShmTransport::Create(bytes, options_.shm_pin));
    return Attach(shm_.get());
  }

  absl::Status Attach(ShmTransport* shm) {
    v1::AttachArenaResponse response;
    MEFT_RETURN_IF_ERROR(
        Call("AttachArena", &v1::ParamServer::Stub::AttachArena, shm->AttachRequest(), &response));
    shm->set_arena_id(response.arena_id());
    return absl::OkStatus();
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
    {
      std::lock_guard lock(attach_mu_);
      // Another thread may have attached again already.
      if (shm->arena_id() == id) MEFT_RETURN_IF_ERROR(Attach(shm));
    }
    spdlog::info("parameter server {} had lost the shared-memory arena; attached it again",
                 options_.address);
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

  GrpcClientOptions options_;
  const std::string authorization_;
  std::unique_ptr<v1::ParamServer::Stub> stub_;
  std::mutex transport_mu_;            // guards the four members below until decided
  bool transport_decided_ = false;     // Transport() reached a lasting decision
  absl::Status transport_error_;       // why meft.transport: shm cannot work
  std::shared_ptr<ShmTransport> shm_;  // null = inline tensors; fixed once decided
  ServerDescription server_;           // the server's description when shm_ was set up
  std::mutex attach_mu_;               // serialises re-attaching
  std::mutex leaked_mu_;
  std::vector<std::shared_ptr<ResponseLease>> leaked_;  // see Leak
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
  if (options.tls_cert_file.empty() != options.tls_key_file.empty()) {
    return absl::InvalidArgumentError("client TLS: tls_cert_file and tls_key_file go together");
  }
  if (!options.tls_cert_file.empty() && options.tls_ca_file.empty()) {
    return absl::InvalidArgumentError("client TLS: a client certificate needs tls_ca_file");
  }
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (!options.tls_ca_file.empty()) {
    grpc::SslCredentialsOptions ssl;
    MEFT_ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadWholeFile("tls_ca_file", options.tls_ca_file));
    if (!options.tls_cert_file.empty()) {
      MEFT_ASSIGN_OR_RETURN(ssl.pem_cert_chain,
                            ReadWholeFile("tls_cert_file", options.tls_cert_file));
      MEFT_ASSIGN_OR_RETURN(ssl.pem_private_key,
                            ReadWholeFile("tls_key_file", options.tls_key_file));
    }
    credentials = grpc::SslCredentials(ssl);
  }
  std::string authorization;
  if (!options.token_file.empty()) {
    MEFT_ASSIGN_OR_RETURN(std::string content, ReadWholeFile("token_file", options.token_file));
    const std::string token(absl::StripAsciiWhitespace(content));
    if (token.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("token_file: ", options.token_file, " holds no token"));
    }
    authorization = absl::StrCat("Bearer ", token);
  }
  return std::unique_ptr<ParamClient>(
      new GrpcParamClient(options, std::move(credentials), std::move(authorization)));
}

}  // namespace meft::worker
