// Tests of the meft-param-server binary as a user runs it: a child process on loopback.

#include <arpa/inet.h>
#include <fcntl.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/security/credentials.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <regex>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "meft/v1/param_server.grpc.pb.h"

namespace meft {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
namespace fs = std::filesystem;

// A meft-param-server child with its stderr captured.
class ServerProcess {
 public:
  explicit ServerProcess(std::vector<std::string> args) {
    int fds[2];
    EXPECT_EQ(::pipe(fds), 0);
    pid_ = ::fork();
    if (pid_ == 0) {
      ::dup2(fds[1], STDERR_FILENO);
      ::dup2(fds[1], STDOUT_FILENO);
      ::close(fds[0]);
      std::vector<char*> argv;
      std::string bin = MEFT_PARAM_SERVER_BIN;
      argv.push_back(bin.data());
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(bin.c_str(), argv.data());
      ::_exit(127);
    }
    ::close(fds[1]);
    out_ = fds[0];
  }
  ~ServerProcess() {
    if (pid_ > 0 && !exited_) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    ::close(out_);
  }

  // Reads output until `pattern` matches (returns the match) or the process ends / times out.
  std::smatch WaitFor(const std::string& pattern, double seconds = 60) {
    const std::regex re(pattern);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    std::smatch m;
    while (!std::regex_search(output_, m, re)) {
      const int left = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                            deadline - std::chrono::steady_clock::now())
                                            .count());
      if (left <= 0 || ReadSome(left) == kEof) break;
    }
    return m;
  }

  // Waits for exit; returns the exit code (or 128 + signal).
  int Wait() {
    // Read to EOF: the pipe closes when the child exits.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (std::chrono::steady_clock::now() < deadline && ReadSome(1000) != kEof) {
    }
    int status = 0;
    ::waitpid(pid_, &status, 0);
    exited_ = true;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

  void Signal(int sig) { ::kill(pid_, sig); }
  const std::string& output() const { return output_; }

 private:
  enum ReadResult { kNothing = 0, kData = 1, kEof = 2 };
  ReadResult ReadSome(int timeout_ms) {
    pollfd p{out_, POLLIN, 0};
    if (::poll(&p, 1, timeout_ms) <= 0) return kNothing;
    char buf[4096];
    const ssize_t n = ::read(out_, buf, sizeof(buf));
    if (n <= 0) return kEof;
    output_.append(buf, static_cast<size_t>(n));
    return kData;
  }

  pid_t pid_ = -1;
  int out_ = -1;
  bool exited_ = false;
  std::string output_;
};

std::string HttpGet(int port, const std::string& path) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  ::inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return "";
  }
  const std::string req = "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
  (void)::write(fd, req.data(), req.size());
  std::string resp;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(fd, buf, sizeof(buf))) > 0) resp.append(buf, static_cast<size_t>(n));
  ::close(fd);
  return resp;
}

class ProcessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) /
           ("meft_proc_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

constexpr char kServing[] =
    R"(serving meft\.v1\.ParamServer on \S+ \(port (\d+)\), metrics on http://[^:]+:(\d+)/metrics)";

std::unique_ptr<v1::ParamServer::Stub> Connect(int port) {
  return v1::ParamServer::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));
}

v1::Tensor FloatTensor(const std::vector<float>& v, std::vector<int64_t> shape) {
  v1::Tensor t;
  t.set_dtype(v1::DTYPE_FP32);
  for (int64_t d : shape) t.add_shape(d);
  t.set_data(std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float)));
  return t;
}

TEST_F(ProcessTest, TrainsStepCheckpointsOnSigtermAndResumes) {
  const std::vector<std::string> common = {"--listen",         "127.0.0.1:0",
                                           "--metrics-port",   "0",
                                           "--adapter-layers", "0-1",
                                           "--adapter-rows",   "512",
                                           "--adapter-dim",    "16",
                                           "--adapter-top-k",  "4",
                                           "--checkpoint-dir", (dir_ / "ckpt").string(),
                                           "--restore",        "latest"};
  int64_t rows_after_step = 0;
  {
    ServerProcess server(common);
    const std::smatch m = server.WaitFor(kServing);
    ASSERT_FALSE(m.empty()) << server.output();
    EXPECT_THAT(server.output(), HasSubstr("starting fresh"));
    const int port = std::stoi(m[1]);
    const int metrics_port = std::stoi(m[2]);
    auto stub = Connect(port);

    // One training step on layer 1.
    std::vector<float> x(3 * 16);
    for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i));
    v1::LookupRequest lookup;
    lookup.mutable_header()->set_layer(1);
    *lookup.mutable_x() = FloatTensor(x, {3, 16});
    lookup.set_training(true);
    v1::LookupResponse looked;
    grpc::ClientContext c1;
    ASSERT_TRUE(stub->Lookup(&c1, lookup, &looked).ok());
    const int64_t n = looked.row_ids().shape(0);
    ASSERT_GT(n, 0);
    EXPECT_EQ(looked.keys().dtype(), v1::DTYPE_BF16);  // the default wire dtype
    v1::GradientsRequest grads;
    grads.mutable_header()->set_layer(1);
    *grads.mutable_key_grads() = FloatTensor(std::vector<float>(n * 16, 0.5f), {n, 16});
    *grads.mutable_value_grads() = FloatTensor(std::vector<float>(n * 16, -0.5f), {n, 16});
    *grads.mutable_gate_grads() = FloatTensor(std::vector<float>(3 * 4, 0.25f), {3, 4});
    v1::GradientsResponse g;
    grpc::ClientContext c2;
    ASSERT_TRUE(stub->Gradients(&c2, grads, &g).ok());
    v1::StepRequest step;
    step.set_lr(0.01);
    step.set_clip_factor(1.0);
    v1::StepResponse stepped;
    grpc::ClientContext c3;
    ASSERT_TRUE(stub->Step(&c3, step, &stepped).ok());
    EXPECT_EQ(stepped.server_step(), 1u);
    rows_after_step = static_cast<int64_t>(stepped.rows_updated());
    EXPECT_EQ(rows_after_step, n);

    // Standard health service over a generic stub: HealthCheckRequest{service}, status 1 = SERVING.
    grpc::GenericStub generic(grpc::CreateChannel("127.0.0.1:" + std::to_string(port),
                                                  grpc::InsecureChannelCredentials()));
    const std::string service = "meft.v1.ParamServer";
    std::string request = std::string(1, '\x0a') + static_cast<char>(service.size()) + service;
    grpc::Slice slice(request);
    grpc::ByteBuffer req_buf(&slice, 1), resp_buf;
    grpc::ClientContext c4;
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    grpc::Status health_status;
    generic.UnaryCall(&c4, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &req_buf, &resp_buf,
                      [&](grpc::Status s) {
                        std::lock_guard l(mu);
                        health_status = s;
                        done = true;
                        cv.notify_all();
                      });
    {
      std::unique_lock l(mu);
      cv.wait_for(l, std::chrono::seconds(10), [&] { return done; });
    }
    ASSERT_TRUE(done);
    ASSERT_TRUE(health_status.ok()) << health_status.error_message();
    std::vector<grpc::Slice> slices;
    ASSERT_TRUE(resp_buf.Dump(&slices).ok());
    std::string resp;
    for (auto& s : slices) resp.append(reinterpret_cast<const char*>(s.begin()), s.size());
    EXPECT_EQ(resp, std::string("\x08\x01", 2));

    // The live metrics endpoint: valid exposition with the server's series.
    const std::string http = HttpGet(metrics_port, "/metrics");
    EXPECT_THAT(http, HasSubstr("200 OK"));
    const std::string body = http.substr(http.find("\r\n\r\n") + 4);
    EXPECT_THAT(body, HasSubstr("meft_ps_rows_served_total " + std::to_string(n)));
    EXPECT_THAT(body, HasSubstr("meft_ps_lookup_seconds_count 1"));
    EXPECT_THAT(body, HasSubstr("meft_process_resident_memory_bytes"));
    const fs::path scrape = dir_ / "scrape.txt";
    std::ofstream(scrape) << body;
    const std::string cmd = "promtool check metrics < " + scrape.string() + " > /dev/null 2>&1";
    EXPECT_EQ(std::system(cmd.c_str()), 0) << body;

    server.Signal(SIGTERM);
    EXPECT_EQ(server.Wait(), 0) << server.output();
    EXPECT_THAT(server.output(), HasSubstr("final checkpoint"));
  }
  ASSERT_TRUE(fs::exists(dir_ / "ckpt" / "checkpoint-1" / "adapter_model.safetensors"));

  // A restart resumes at step 1.
  ServerProcess again(common);
  const std::smatch m = again.WaitFor(kServing);
  ASSERT_FALSE(m.empty()) << again.output();
  EXPECT_THAT(again.output(), HasSubstr("resumed from"));
  auto stub = Connect(std::stoi(m[1]));
  v1::ServerInfoResponse info;
  grpc::ClientContext ctx;
  ASSERT_TRUE(stub->ServerInfo(&ctx, v1::ServerInfoRequest(), &info).ok());
  EXPECT_EQ(info.step(), 1u);
  EXPECT_EQ(info.rows(), 512u);
  again.Signal(SIGINT);
  EXPECT_EQ(again.Wait(), 0) << again.output();
}

TEST_F(ProcessTest, BadConfigurationExitsWithAClearError) {
  const fs::path yaml = dir_ / "server.yaml";
  std::ofstream(yaml) << "adapter:\n  rows: 1024\n  top_kk: 3\n";
  {
    ServerProcess p({"--config", yaml.string(), "--metrics-port", "0"});
    EXPECT_EQ(p.Wait(), 2);
    EXPECT_THAT(p.output(), HasSubstr("server.yaml:3"));
    EXPECT_THAT(p.output(), HasSubstr("top_kk"));
  }
  {
    ServerProcess p({"--adapter-rows", "100", "--adapter-experts", "7", "--metrics-port", "0"});
    EXPECT_EQ(p.Wait(), 2);
    EXPECT_THAT(p.output(), HasSubstr("adapter.experts"));
  }
  {
    ServerProcess p({"--listen", "0.0.0.0:0", "--metrics-port", "0"});
    EXPECT_EQ(p.Wait(), 2);
    EXPECT_THAT(p.output(), HasSubstr("--insecure"));
  }
  {
    ServerProcess p({"--optimizer-beta1", "1.5"});
    EXPECT_EQ(p.Wait(), 2);
    EXPECT_THAT(p.output(), HasSubstr("--optimizer-beta1"));
  }
  {
    ServerProcess p({"--restore", (dir_ / "nothing-here").string(), "--metrics-port", "0",
                     "--listen", "127.0.0.1:0"});
    EXPECT_NE(p.Wait(), 0);
    EXPECT_THAT(p.output(), HasSubstr("nothing-here"));
  }
}

// Host memory admission: a store that cannot fit is refused before anything is allocated, with
// the need, the limit and the settings that change them; the override lets it start.
TEST_F(ProcessTest, RefusesAStoreLargerThanTheMemoryLimit) {
  const std::vector<std::string> big = {"--adapter-layers", "0-31",  "--adapter-dim",
                                        "4096",             "--adapter-rows", "16384",
                                        "--metrics-port",   "0",     "--listen",
                                        "127.0.0.1:0"};
  {
    std::vector<std::string> args = big;
    args.insert(args.end(), {"--memory-limit-mb", "1024"});
    ServerProcess p(args);
    EXPECT_EQ(p.Wait(), 1) << p.output();
    EXPECT_THAT(p.output(), HasSubstr("host memory: the store needs 73.51 GiB"));
    EXPECT_THAT(p.output(), HasSubstr("adapter with Adam state 65.00 GiB"));
    EXPECT_THAT(p.output(), HasSubstr("this host can give 1.00 GiB (memory_limit_mb)"));
    EXPECT_THAT(p.output(), HasSubstr("adapter_rows"));
    EXPECT_THAT(p.output(), Not(HasSubstr("initialising")));
  }
  {
    ServerProcess p({"--adapter-rows", "1024", "--memory-limit-mb", "64", "--metrics-port", "0",
                     "--listen", "127.0.0.1:0"});
    EXPECT_FALSE(p.WaitFor(R"(serving meft\.v1\.ParamServer)").empty()) << p.output();
    EXPECT_THAT(p.output(), HasSubstr("of 64.0 MiB available (memory_limit_mb)"));
    p.Signal(SIGINT);
    EXPECT_EQ(p.Wait(), 0) << p.output();
  }
}

}  // namespace
}  // namespace meft
