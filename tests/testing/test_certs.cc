#include "tests/testing/test_certs.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "tests/testing/temp_dir.h"

namespace meft::testing {

std::string TestCerts::Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

void MakeTestCerts(TestCerts* certs) {
  ASSERT_EQ(std::system("command -v openssl >/dev/null 2>&1"), 0)
      << "the openssl CLI is needed to generate test certificates (scripts/install-deps.sh "
         "installs it)";
  const std::string d = MakeTempDir("meft-tls");
  ASSERT_FALSE(d.empty());
  certs->dir = d;
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

}  // namespace meft::testing
