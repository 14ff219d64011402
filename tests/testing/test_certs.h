#pragma once

// Test certificates made at test time with the openssl CLI: a CA, a server certificate for
// 127.0.0.1 and localhost, a client certificate for mutual TLS, and a bearer token file.

#include <filesystem>
#include <string>

namespace meft::testing {

// Paths of the PEM files and the token file MakeTestCerts writes, all under `dir`.
struct TestCerts {
  std::filesystem::path dir;  // the folder holding every file below; the caller removes it
  std::string ca, server_cert, server_key, client_cert, client_key, token_file;
  std::string token = "s3cret-token-for-tests-0123456789";  // the content of token_file

  // The whole content of the file at `path`; "" when it cannot be read.
  static std::string Slurp(const std::string& path);
};

// Fills `certs` under a fresh temporary folder; fails the test (with openssl's output) when
// openssl is missing or a step fails. Call through ASSERT_NO_FATAL_FAILURE.
void MakeTestCerts(TestCerts* certs);

}  // namespace meft::testing
