#include "gpu_worker/rpc/channel_credentials.h"

#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace meft::worker {
namespace {

absl::StatusOr<std::string> ReadWholeFile(const char* option, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat(option, ": cannot read ", path));
  std::ostringstream content;
  content << in.rdbuf();
  if (in.bad()) return absl::InvalidArgumentError(absl::StrCat(option, ": cannot read ", path));
  return content.str();
}

}  // namespace

absl::StatusOr<ChannelAuth> LoadChannelAuth(const GrpcClientOptions& options) {
  if (options.tls_cert_file.empty() != options.tls_key_file.empty()) {
    return absl::InvalidArgumentError("client TLS: tls_cert_file and tls_key_file go together");
  }
  if (!options.tls_cert_file.empty() && options.tls_ca_file.empty()) {
    return absl::InvalidArgumentError("client TLS: a client certificate needs tls_ca_file");
  }
  ChannelAuth auth;
  auth.credentials = grpc::InsecureChannelCredentials();
  if (!options.tls_ca_file.empty()) {
    grpc::SslCredentialsOptions ssl;
    MEFT_ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadWholeFile("tls_ca_file", options.tls_ca_file));
    if (!options.tls_cert_file.empty()) {
      MEFT_ASSIGN_OR_RETURN(ssl.pem_cert_chain,
                            ReadWholeFile("tls_cert_file", options.tls_cert_file));
      MEFT_ASSIGN_OR_RETURN(ssl.pem_private_key,
                            ReadWholeFile("tls_key_file", options.tls_key_file));
    }
    auth.credentials = grpc::SslCredentials(ssl);
  }
  if (!options.token_file.empty()) {
    MEFT_ASSIGN_OR_RETURN(std::string content, ReadWholeFile("token_file", options.token_file));
    const std::string token(absl::StripAsciiWhitespace(content));
    if (token.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("token_file: ", options.token_file, " holds no token"));
    }
    auth.authorization = absl::StrCat("Bearer ", token);
  }
  return auth;
}

}  // namespace meft::worker
