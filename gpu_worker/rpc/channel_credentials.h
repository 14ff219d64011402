#pragma once

// What the worker's channel to a parameter server presents: TLS credentials (server CA, client
// certificate for mutual TLS) and the bearer token, read once from the files GrpcClientOptions
// names.

#include <grpcpp/security/credentials.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "gpu_worker/rpc/grpc_param_client.h"

namespace meft::worker {

struct ChannelAuth {
  std::shared_ptr<grpc::ChannelCredentials> credentials;  // insecure without tls_ca_file
  std::string authorization;  // the metadata value "Bearer <token>"; "" = none
};

// Checks the TLS options (tls_cert_file and tls_key_file together, and only with tls_ca_file) and
// reads the files. INVALID_ARGUMENT naming the option and file for a file that cannot be read or
// a token file holding no token.
absl::StatusOr<ChannelAuth> LoadChannelAuth(const GrpcClientOptions& options);

}  // namespace meft::worker
