#pragma once

// Test certificates made at test time with the openssl CLI: a CA, a server certificate for
// 127.0.0.1 and localhost, a client certificate for mutual TLS, and a bearer token file.

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include "absl/status/statusor.h"
#include "common/metrics/metrics.h"
#include "param_server/rpc/service.h"
#include "param_server/server/param_server.h"

namespace meft::tls_test {

struct TestCerts {
  std::filesystem::path dir;
  std::string ca, server_cert, server_key, client_cert, client_key, token_file;
  std::string token = "s3cret-token-for-tests-0123456789";

  static std::string Slurp(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
  }
};

// Fills `certs` under a fresh temporary folder; fails the test (with openssl's output) when
// openssl is missing or a step fails. Call through ASSERT_NO_FATAL_FAILURE.
inline void MakeTestCerts(TestCerts* certs) {
  ASSERT_EQ(std::system("command -v openssl >/dev/null 2>&1"), 0)
      << "the openssl CLI is needed to generate test certificates (scripts/install-deps.sh "
         "installs it)";
  char pattern[] = "/tmp/meft-tls-XXXXXX";
  ASSERT_NE(::mkdtemp(pattern), nullptr);
  certs->dir = pattern;
  const std::string d = certs->dir.string();
  const std::string script =
      "set -e; cd '" + d +
      "'\n"
      "key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:prime256v1 -out $1; }\n"
      "key ca.key; key server.key; key client.key\n"
      "openssl req -x509 -new -key ca.key -out ca.pem -days 2 -subj /CN=meft-test-ca "
      "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign\n"
      "openssl req -new -key server.key -out server.csr -subj /CN=localhost\n"
      "printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' "
      "> server.ext\n"
      "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 "
      "-extfile server.ext -out server.pem\n"
      "openssl req -new -key client.key -out client.csr -subj /CN=meft-worker\n"
      "printf 'extendedKeyUsage=clientAuth\\n' > client.ext\n"
      "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 "
      "-extfile client.ext -out client.pem\n";
  std::ofstream(d + "/make.sh") << script;
  const int rc = std::system(("bash '" + d + "/make.sh' > '" + d + "/openssl.log' 2>&1").c_str());
  ASSERT_EQ(rc, 0) << "openssl failed:\n" << TestCerts::Slurp(d + "/openssl.log");
  certs->ca = d + "/ca.pem";
  certs->server_cert = d + "/server.pem";
  certs->server_key = d + "/server.key";
  certs->client_cert = d + "/client.pem";
  certs->client_key = d + "/client.key";
  certs->token_file = d + "/token";
  std::ofstream(certs->token_file) << certs->token << "\n";
}

// Serves `domain` on 127.0.0.1:0 over TLS with the certificates and token of `certs`; `mutual`
// also requires client certificates signed by the test CA.
inline absl::StatusOr<std::unique_ptr<rpc::RunningServer>> StartTlsServer(
    const TestCerts& certs, bool mutual, server::ParamServer* domain, metrics::Registry* registry) {
  rpc::RpcOptions o;
  o.listen = "127.0.0.1:0";
  o.tls_cert_file = certs.server_cert;
  o.tls_key_file = certs.server_key;
  if (mutual) o.tls_client_ca_file = certs.ca;
  o.token_file = certs.token_file;
  return rpc::StartServer(o, domain, registry);
}

}  // namespace meft::tls_test
