#pragma once

// The one place where gRPC and absl statuses are translated, one function per direction.
// Codes map one to one (both follow google.rpc.Code); the message is kept.

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace meft::rpc {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace meft::rpc
