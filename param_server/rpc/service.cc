#include "param_server/rpc/service.h"

#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>

#include <algorithm>
#include <atomic>
#include <new>
#include <chrono>
#include <exception>
#include <fstream>
#include <initializer_list>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string_view>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/rpc/address.h"
#include "common/rpc/status_convert.h"
#include "common/status.h"
#include "meft/v1/param_server.grpc.pb.h"
#include "param_server/rpc/arena_registry.h"
#include "param_server/rpc/param_server_convert.h"

namespace meft::rpc {
namespace {

constexpr char kServiceName[] = "meft.v1.ParamServer";

// The whole of `path`; `key` (the setting that named it) and the path appear in errors.
absl::StatusOr<std::string> ReadSecretFile(const char* key, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat(key, ": cannot read ", path));
  std::ostringstream content;
  content << in.rdbuf();
  if (in.bad()) return absl::InvalidArgumentError(absl::StrCat(key, ": cannot read ", path));
  return content.str();
}

// Equal contents, in time that depends on `expected`'s length only (not on where `got` differs).
bool ConstantTimeEquals(std::string_view expected, std::string_view got) {
  unsigned char diff = expected.size() == got.size() ? 0 : 1;
  for (size_t i = 0; i < expected.size(); ++i) {
    const unsigned char g = i < got.size() ? static_cast<unsigned char>(got[i]) : 0;
    diff |= static_cast<unsigned char>(static_cast<unsigned char>(expected[i]) ^ g);
  }
  return diff == 0;
}

// Bytes of a message's tensors that lie in the shared-memory arena (their arena spans).
uint64_t ArenaBytes(std::initializer_list<const v1::Tensor*> tensors) {
  uint64_t bytes = 0;
  for (const v1::Tensor* t : tensors) {
    if (t->has_arena()) bytes += t->arena().bytes();
  }
  return bytes;
}
uint64_t ArenaBytes(const v1::LookupRequest& r) { return ArenaBytes({&r.x(), &r.token_mask()}); }
uint64_t ArenaBytes(const v1::GradientsRequest& r) {
  return ArenaBytes({&r.key_grads(), &r.value_grads(), &r.gate_grads()});
}
uint64_t ArenaBytes(const v1::LookupResponse& r) {
  return ArenaBytes({&r.row_ids(), &r.keys(), &r.values(), &r.token_rows(), &r.token_gates(),
                     &r.token_experts(), &r.expert_ids(), &r.router_rows()});
}
// Messages without tensors.
template <typename Message>
uint64_t ArenaBytes(const Message&) {
  return 0;
}

}  // namespace

bool ShmAttachAllowed(const RpcOptions& options) {
  return options.shm_attach == ShmAttach::kOn ||
         (options.shm_attach == ShmAttach::kAuto && IsLoopback(options.listen));
}

absl::Status CheckListenAddress(const RpcOptions& options) {
  const bool has_cert = !options.tls_cert_file.empty();
  const bool has_key = !options.tls_key_file.empty();
  if (has_cert != has_key) {
    return absl::InvalidArgumentError(has_cert ? "tls.key: needed with tls.cert"
                                               : "tls.cert: needed with tls.key");
  }
  if (!options.tls_client_ca_file.empty() && !has_cert) {
    return absl::InvalidArgumentError("tls.client_ca: needs tls.cert and tls.key");
  }
  if (IsLoopback(options.listen) || options.insecure) return absl::OkStatus();
  std::vector<std::string> missing;
  if (!has_cert) missing.push_back("TLS (tls.cert and tls.key)");
  if (options.token_file.empty()) missing.push_back("a token (auth.token_file)");
  if (missing.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "listen: ", options.listen, " is not a loopback address and ",
      absl::StrJoin(missing, " and "),
      " is not set; a non-loopback listener needs TLS and a token, or --insecure (trusted "
      "networks only)"));
}

class RunningServer::Service final : public v1::ParamServer::Service {
 public:
  // `token` empty = calls need no authorization metadata.
  Service(server::ParamServer* domain, metrics::Registry* registry, std::string token,
          bool shm_allowed)
      : domain_(domain), registry_(registry), token_(std::move(token)), shm_allowed_(shm_allowed) {
    if (registry_ != nullptr) {
      bytes_in_ = &registry_->AddCounter("meft_ps_bytes_received_total",
                                         "Serialized request bytes received");
      bytes_out_ =
          &registry_->AddCounter("meft_ps_bytes_sent_total", "Serialized response bytes sent");
      arena_bytes_in_ = &registry_->AddCounter(
          "meft_ps_arena_bytes_received_total",
          "Tensor bytes named by the arena spans of served requests");
      arena_bytes_out_ = &registry_->AddCounter(
          "meft_ps_arena_bytes_sent_total",
          "Tensor bytes of answers written into the worker's shared-memory arena");
    }
  }

  grpc::Status Lookup(grpc::ServerContext* context, const v1::LookupRequest* request,
                      v1::LookupResponse* response) override {
    return Handle(context, "Lookup", *request, response, [&]() -> absl::Status {
      MEFT_ASSIGN_OR_RETURN(std::shared_ptr<const shm::Arena> arena,
                            FindArena(request->arena_id()));
      // `arena` stays mapped while the answer is written into it.
      MEFT_ASSIGN_OR_RETURN(server::LookupCall call, FromProto(*request, arena.get()));
      call.is_cancelled = [context] { return context->IsCancelled(); };
      MEFT_ASSIGN_OR_RETURN(server::LookupReply reply, domain_->Lookup(call));
      ToProto(std::move(reply), response);
      return absl::OkStatus();
    });
  }

  grpc::Status Gradients(grpc::ServerContext* context, const v1::GradientsRequest* request,
                         v1::GradientsResponse* response) override {
    return Handle(context, "Gradients", *request, response, [&]() -> absl::Status {
      MEFT_ASSIGN_OR_RETURN(std::shared_ptr<const shm::Arena> arena,
                            FindArena(request->arena_id()));
      MEFT_ASSIGN_OR_RETURN(server::GradientsCall call, FromProto(*request, arena.get()));
      MEFT_ASSIGN_OR_RETURN(server::GradientsReply reply, domain_->Gradients(call));
      ToProto(reply, response);
      return absl::OkStatus();
    });
  }

  grpc::Status GradNorm(grpc::ServerContext* context, const v1::GradNormRequest* request,
                        v1::GradNormResponse* response) override {
    return Handle(context, "GradNorm", *request, response, [&]() -> absl::Status {
      std::vector<uint32_t> layers(request->layers().begin(), request->layers().end());
      MEFT_ASSIGN_OR_RETURN(server::GradNormReply reply,
                            domain_->GradNorm(request->step(), layers));
      ToProto(reply, response);
      return absl::OkStatus();
    });
  }

  grpc::Status Step(grpc::ServerContext* context, const v1::StepRequest* request,
                    v1::StepResponse* response) override {
    return Handle(context, "Step", *request, response, [&]() -> absl::Status {
      MEFT_ASSIGN_OR_RETURN(server::StepReply reply, domain_->Step(FromProto(*request)));
      ToProto(reply, response);
      return absl::OkStatus();
    });
  }

  grpc::Status SaveCheckpoint(grpc::ServerContext* context,
                              const v1::SaveCheckpointRequest* request,
                              v1::SaveCheckpointResponse* response) override {
    return Handle(context, "SaveCheckpoint", *request, response, [&]() -> absl::Status {
      MEFT_ASSIGN_OR_RETURN(server::CheckpointReply reply,
                            domain_->SaveCheckpoint(request->directory()));
      response->set_path(reply.path);
      response->set_step(reply.step);
      response->set_bytes_written(reply.bytes_written);
      return absl::OkStatus();
    });
  }

  grpc::Status RestoreCheckpoint(grpc::ServerContext* context,
                                 const v1::RestoreCheckpointRequest* request,
                                 v1::RestoreCheckpointResponse* response) override {
    return Handle(context, "RestoreCheckpoint", *request, response, [&]() -> absl::Status {
      MEFT_ASSIGN_OR_RETURN(server::CheckpointReply reply,
                            domain_->RestoreCheckpoint(request->path()));
      response->set_path(reply.path);
      response->set_step(reply.step);
      return absl::OkStatus();
    });
  }

  // From now on calls are answered by `domain` (not null), which must outlive the service.
  void SetReady(server::ParamServer* domain) {
    domain_ = domain;
    ready_.store(true, std::memory_order_release);
  }

  size_t ReleaseUnlinkedArenas() { return arenas_.ReleaseUnlinked(); }

  grpc::Status ServerInfo(grpc::ServerContext* context, const v1::ServerInfoRequest* request,
                          v1::ServerInfoResponse* response) override {
    return Handle(context, "ServerInfo", *request, response, [&]() -> absl::Status {
      ToProto(domain_->Info(), response);
      return absl::OkStatus();
    });
  }

  grpc::Status AttachArena(grpc::ServerContext* context, const v1::AttachArenaRequest* request,
                           v1::AttachArenaResponse* response) override {
    return Handle(context, "AttachArena", *request, response, [&]() -> absl::Status {
      if (!shm_allowed_) {
        return absl::FailedPreconditionError(
            "shared memory is off on this server (shm.attach: off, or auto on a non-loopback "
            "listener); send tensors inline");
      }
      MEFT_ASSIGN_OR_RETURN(uint64_t id,
                            arenas_.Attach(request->name(), request->size(), request->nonce()));
      response->set_arena_id(id);
      return absl::OkStatus();
    });
  }

 private:
  // The arena a request names; null for id 0 (none).
  absl::StatusOr<std::shared_ptr<const shm::Arena>> FindArena(uint64_t id) const {
    if (id == 0) return std::shared_ptr<const shm::Arena>();
    return arenas_.Find(id);
  }

  // UNAUTHENTICATED unless the call carries `authorization: Bearer <token_>` (or no token is
  // configured). The message never echoes what the client sent.
  absl::Status Authorize(const grpc::ServerContext& context) const {
    if (token_.empty()) return absl::OkStatus();
    const auto& metadata = context.client_metadata();
    const auto found = metadata.find("authorization");
    if (found == metadata.end()) {
      return absl::UnauthenticatedError(
          "missing authorization metadata; send \"authorization: Bearer <token>\"");
    }
    constexpr std::string_view kScheme = "Bearer ";
    const std::string_view value(found->second.data(), found->second.size());
    if (value.substr(0, kScheme.size()) != kScheme ||
        !ConstantTimeEquals(token_, value.substr(std::min(value.size(), kScheme.size())))) {
      return absl::UnauthenticatedError("invalid bearer token");
    }
    return absl::OkStatus();
  }

  // Checks the token, runs `body`, turns an escaping std::bad_alloc into RESOURCE_EXHAUSTED and
  // any other exception into INTERNAL (none is expected: domain code returns statuses), and
  // records bytes and the outcome.
  template <typename Request, typename Response, typename Body>
  grpc::Status Handle(const grpc::ServerContext* context, const char* method,
                      const Request& request, Response* response, Body body) {
    absl::Status status = Authorize(*context);
    if (status.ok() && !ready_.load(std::memory_order_acquire)) {
      status = absl::UnavailableError(
          "store loading: the parameter server is initialising or restoring its store; retry "
          "when the health check reports SERVING");
    }
    if (status.ok()) {
      try {
        status = body();
      } catch (const std::bad_alloc&) {
        status = absl::ResourceExhaustedError(
            absl::StrCat(method, ": out of host memory while serving this request"));
      } catch (const std::exception& e) {
        status = absl::InternalError(absl::StrCat(method, ": ", e.what()));
      }
    }
    if (!status.ok()) response->Clear();
    if (registry_ != nullptr) {
      bytes_in_->Increment(static_cast<double>(request.ByteSizeLong()));
      bytes_out_->Increment(static_cast<double>(response->ByteSizeLong()));
      // Spans of a rejected request may be anything; only served ones count.
      if (status.ok()) arena_bytes_in_->Increment(static_cast<double>(ArenaBytes(request)));
      arena_bytes_out_->Increment(static_cast<double>(ArenaBytes(*response)));
      registry_
          ->AddCounter("meft_ps_requests_total", "Requests by method and status code",
                       {{"method", method}, {"code", absl::StatusCodeToString(status.code())}})
          .Increment();
    }
    return ToGrpcStatus(status);
  }

  server::ParamServer* domain_;  // written once, before ready_ is set
  std::atomic<bool> ready_{false};
  metrics::Registry* registry_;
  const std::string token_;  // "" = no authorization required
  const bool shm_allowed_;   // AttachArena allowed
  ArenaRegistry arenas_;
  metrics::Counter* bytes_in_ = nullptr;
  metrics::Counter* bytes_out_ = nullptr;
  metrics::Counter* arena_bytes_in_ = nullptr;
  metrics::Counter* arena_bytes_out_ = nullptr;
};

RunningServer::~RunningServer() {
  if (server_) Shutdown(1.0);
}

void RunningServer::Shutdown(double grace_seconds) {
  if (!server_) return;
  server_->Shutdown(std::chrono::system_clock::now() +
                    std::chrono::milliseconds(static_cast<int64_t>(grace_seconds * 1000)));
  server_->Wait();
  server_.reset();
}

void RunningServer::Wait() {
  if (server_) server_->Wait();
}

absl::StatusOr<std::unique_ptr<RunningServer>> StartServer(const RpcOptions& options,
                                                           server::ParamServer* domain,
                                                           metrics::Registry* registry) {
  MEFT_RETURN_IF_ERROR(CheckListenAddress(options));
  std::string token;
  if (!options.token_file.empty()) {
    MEFT_ASSIGN_OR_RETURN(std::string content,
                          ReadSecretFile("auth.token_file", options.token_file));
    token = std::string(absl::StripAsciiWhitespace(content));
    if (token.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("auth.token_file: ", options.token_file, " holds no token"));
    }
  }
  std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials();
  if (!options.tls_cert_file.empty()) {
    grpc::SslServerCredentialsOptions ssl(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
    grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
    MEFT_ASSIGN_OR_RETURN(pair.private_key, ReadSecretFile("tls.key", options.tls_key_file));
    MEFT_ASSIGN_OR_RETURN(pair.cert_chain, ReadSecretFile("tls.cert", options.tls_cert_file));
    ssl.pem_key_cert_pairs.push_back(std::move(pair));
    if (!options.tls_client_ca_file.empty()) {
      MEFT_ASSIGN_OR_RETURN(ssl.pem_root_certs,
                            ReadSecretFile("tls.client_ca", options.tls_client_ca_file));
      ssl.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
    }
    credentials = grpc::SslServerCredentials(ssl);
  }
  grpc::EnableDefaultHealthCheckService(true);
  std::unique_ptr<RunningServer> running(new RunningServer());
  running->service_ = std::make_unique<RunningServer::Service>(domain, registry, std::move(token),
                                                               ShmAttachAllowed(options));
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen, credentials, &running->port_);
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  builder.SetMaxSendMessageSize(options.max_message_bytes);
  builder.RegisterService(running->service_.get());
  running->server_ = builder.BuildAndStart();
  if (!running->server_ || running->port_ == 0) {
    return absl::UnavailableError(absl::StrCat(
        "listen: cannot bind ", options.listen,
        options.tls_cert_file.empty() ? "" : " (or tls.cert/tls.key are not valid PEM)"));
  }
  grpc::HealthCheckServiceInterface* health = running->server_->GetHealthCheckService();
  if (health != nullptr) {
    health->SetServingStatus("", false);
    health->SetServingStatus(kServiceName, false);
  }
  if (domain != nullptr) running->SetReady(domain);
  return running;
}

void RunningServer::SetReady(server::ParamServer* domain) {
  service_->SetReady(domain);
  grpc::HealthCheckServiceInterface* health = server_ ? server_->GetHealthCheckService() : nullptr;
  if (health != nullptr) {
    health->SetServingStatus("", true);
    health->SetServingStatus(kServiceName, true);
  }
}

size_t RunningServer::ReleaseUnlinkedArenas() { return service_->ReleaseUnlinkedArenas(); }

}  // namespace meft::rpc
