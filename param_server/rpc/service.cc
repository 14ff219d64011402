#include "param_server/rpc/service.h"

#include <arpa/inet.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>
#include <netinet/in.h>

#include <chrono>
#include <exception>
#include <map>

#include "absl/strings/str_cat.h"
#include "common/rpc/status_convert.h"
#include "common/status.h"
#include "meft/v1/param_server.grpc.pb.h"
#include "param_server/rpc/param_server_convert.h"

namespace meft::rpc {
namespace {

constexpr char kServiceName[] = "meft.v1.ParamServer";

std::string HostOf(const std::string& listen) {
  if (!listen.empty() && listen.front() == '[') {
    const size_t close = listen.find(']');
    return close == std::string::npos ? listen : listen.substr(1, close - 1);
  }
  const size_t colon = listen.rfind(':');
  return colon == std::string::npos ? listen : listen.substr(0, colon);
}

}  // namespace

bool IsLoopback(const std::string& listen) {
  const std::string host = HostOf(listen);
  if (host == "localhost") return true;
  // Numeric addresses only: a DNS name such as "127.example.com" may resolve anywhere.
  in_addr v4;
  if (::inet_pton(AF_INET, host.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
  in6_addr v6;
  return ::inet_pton(AF_INET6, host.c_str(), &v6) == 1 && IN6_IS_ADDR_LOOPBACK(&v6);
}

absl::Status CheckListenAddress(const RpcOptions& options) {
  if (IsLoopback(options.listen) || options.insecure) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("listen: ", options.listen,
                   " is not a loopback address; TLS with a token is not implemented yet, so a "
                   "non-loopback listener needs --insecure (trusted networks only)"));
}

class RunningServer::Service final : public v1::ParamServer::Service {
 public:
  Service(server::ParamServer* domain, metrics::Registry* registry)
      : domain_(domain), registry_(registry) {
    if (registry_ != nullptr) {
      bytes_in_ = &registry_->AddCounter("meft_ps_bytes_received_total",
                                         "Serialized request bytes received");
      bytes_out_ =
          &registry_->AddCounter("meft_ps_bytes_sent_total", "Serialized response bytes sent");
    }
  }

  grpc::Status Lookup(grpc::ServerContext* context, const v1::LookupRequest* request,
                      v1::LookupResponse* response) override {
    return Handle("Lookup", *request, response, [&]() -> absl::Status {
      MEFT_ASSIGN_OR_RETURN(server::LookupCall call, FromProto(*request));
      call.is_cancelled = [context] { return context->IsCancelled(); };
      MEFT_ASSIGN_OR_RETURN(server::LookupReply reply, domain_->Lookup(call));
      ToProto(std::move(reply), response);
      return absl::OkStatus();
    });
  }

  grpc::Status Gradients(grpc::ServerContext*, const v1::GradientsRequest* request,
                         v1::GradientsResponse* response) override {
    return Handle("Gradients", *request, response, [&]() -> absl::Status {
      MEFT_ASSIGN_OR_RETURN(server::GradientsCall call, FromProto(*request));
      MEFT_ASSIGN_OR_RETURN(server::GradientsReply reply, domain_->Gradients(call));
      ToProto(reply, response);
      return absl::OkStatus();
    });
  }

  grpc::Status GradNorm(grpc::ServerContext*, const v1::GradNormRequest* request,
                        v1::GradNormResponse* response) override {
    return Handle("GradNorm", *request, response, [&]() -> absl::Status {
      std::vector<uint32_t> layers(request->layers().begin(), request->layers().end());
      MEFT_ASSIGN_OR_RETURN(server::GradNormReply reply,
                            domain_->GradNorm(request->step(), layers));
      ToProto(reply, response);
      return absl::OkStatus();
    });
  }

  grpc::Status Step(grpc::ServerContext*, const v1::StepRequest* request,
                    v1::StepResponse* response) override {
    return Handle("Step", *request, response, [&]() -> absl::Status {
      MEFT_ASSIGN_OR_RETURN(server::StepReply reply, domain_->Step(FromProto(*request)));
      ToProto(reply, response);
      return absl::OkStatus();
    });
  }

  grpc::Status SaveCheckpoint(grpc::ServerContext*, const v1::SaveCheckpointRequest* request,
                              v1::SaveCheckpointResponse* response) override {
    return Handle("SaveCheckpoint", *request, response, [&]() -> absl::Status {
      MEFT_ASSIGN_OR_RETURN(server::CheckpointReply reply,
                            domain_->SaveCheckpoint(request->directory()));
      response->set_path(reply.path);
      response->set_step(reply.step);
      response->set_bytes_written(reply.bytes_written);
      return absl::OkStatus();
    });
  }

  grpc::Status RestoreCheckpoint(grpc::ServerContext*, const v1::RestoreCheckpointRequest* request,
                                 v1::RestoreCheckpointResponse* response) override {
    return Handle("RestoreCheckpoint", *request, response, [&]() -> absl::Status {
      MEFT_ASSIGN_OR_RETURN(server::CheckpointReply reply,
                            domain_->RestoreCheckpoint(request->path()));
      response->set_path(reply.path);
      response->set_step(reply.step);
      return absl::OkStatus();
    });
  }

  grpc::Status ServerInfo(grpc::ServerContext*, const v1::ServerInfoRequest* request,
                          v1::ServerInfoResponse* response) override {
    return Handle("ServerInfo", *request, response, [&]() -> absl::Status {
      ToProto(domain_->Info(), response);
      return absl::OkStatus();
    });
  }

 private:
  // Runs `body`, turns any escaping exception into INTERNAL (none is expected: domain code
  // returns statuses), and records bytes and the outcome.
  template <typename Request, typename Response, typename Body>
  grpc::Status Handle(const char* method, const Request& request, Response* response, Body body) {
    absl::Status status;
    try {
      status = body();
    } catch (const std::exception& e) {
      status = absl::InternalError(absl::StrCat(method, ": ", e.what()));
    }
    if (!status.ok()) response->Clear();
    if (registry_ != nullptr) {
      bytes_in_->Increment(static_cast<double>(request.ByteSizeLong()));
      bytes_out_->Increment(static_cast<double>(response->ByteSizeLong()));
      registry_
          ->AddCounter("meft_ps_requests_total", "Requests by method and status code",
                       {{"method", method}, {"code", absl::StatusCodeToString(status.code())}})
          .Increment();
    }
    return ToGrpcStatus(status);
  }

  server::ParamServer* domain_;
  metrics::Registry* registry_;
  metrics::Counter* bytes_in_ = nullptr;
  metrics::Counter* bytes_out_ = nullptr;
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
  grpc::EnableDefaultHealthCheckService(true);
  std::unique_ptr<RunningServer> running(new RunningServer());
  running->service_ = std::make_unique<RunningServer::Service>(domain, registry);
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen, grpc::InsecureServerCredentials(), &running->port_);
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  builder.SetMaxSendMessageSize(options.max_message_bytes);
  builder.RegisterService(running->service_.get());
  running->server_ = builder.BuildAndStart();
  if (!running->server_ || running->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("listen: cannot bind ", options.listen));
  }
  grpc::HealthCheckServiceInterface* health = running->server_->GetHealthCheckService();
  if (health != nullptr) {
    health->SetServingStatus("", true);
    health->SetServingStatus(kServiceName, true);
  }
  return running;
}

}  // namespace meft::rpc
