#include "common/metrics/metrics.h"

#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "common/metrics/exposer.h"

namespace meft::metrics {
namespace {

using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;
using ::testing::SizeIs;
using ::testing::StartsWith;

// ---------------------------------------------------------------------------------------------
// A small, independent parser for the text exposition format: enough to check what we emit.

struct Exposition {
  std::map<std::string, std::string> help;  // family -> help text
  std::map<std::string, std::string> type;  // family -> type
  // Series "name{a="x",b="y"}" (labels sorted, values unescaped) -> value.
  std::map<std::string, double> samples;
  std::vector<std::string> errors;
};

double ParseSampleValue(const std::string& text, bool* ok) {
  *ok = true;
  if (text == "+Inf") return INFINITY;
  if (text == "-Inf") return -INFINITY;
  if (text == "NaN") return NAN;
  char* end = nullptr;
  double v = std::strtod(text.c_str(), &end);
  *ok = !text.empty() && end == text.c_str() + text.size();
  return v;
}

Exposition ParseExposition(const std::string& text) {
  Exposition out;
  size_t start = 0;
  while (start < text.size()) {
    size_t newline = text.find('\n', start);
    if (newline == std::string::npos) {
      out.errors.push_back("last line has no newline");
      newline = text.size();
    }
    std::string line = text.substr(start, newline - start);
    start = newline + 1;
    if (line.empty()) continue;
    if (line.rfind("# HELP ", 0) == 0 || line.rfind("# TYPE ", 0) == 0) {
      std::string rest = line.substr(7);
      size_t space = rest.find(' ');
      if (space == std::string::npos) {
        out.errors.push_back("bad comment: " + line);
        continue;
      }
      (line[2] == 'H' ? out.help : out.type)[rest.substr(0, space)] = rest.substr(space + 1);
      continue;
    }
    if (line[0] == '#') continue;
    size_t i = 0;
    while (i < line.size() && line[i] != '{' && line[i] != ' ') ++i;
    std::string name = line.substr(0, i);
    std::map<std::string, std::string> labels;
    if (i < line.size() && line[i] == '{') {
      ++i;
      while (i < line.size() && line[i] != '}') {
        size_t eq = line.find('=', i);
        if (eq == std::string::npos || eq + 1 >= line.size() || line[eq + 1] != '"') {
          out.errors.push_back("bad label in: " + line);
          break;
        }
        std::string label = line.substr(i, eq - i);
        std::string value;
        size_t j = eq + 2;
        for (; j < line.size() && line[j] != '"'; ++j) {
          if (line[j] == '\\' && j + 1 < line.size()) {
            ++j;
            value += line[j] == 'n' ? '\n' : line[j];
          } else {
            value += line[j];
          }
        }
        labels[label] = value;
        i = j + 1;
        if (i < line.size() && line[i] == ',') ++i;
      }
      ++i;  // '}'
    }
    if (i >= line.size() || line[i] != ' ') {
      out.errors.push_back("no value in: " + line);
      continue;
    }
    std::string value_text = line.substr(i + 1);
    size_t space = value_text.find(' ');  // optional timestamp
    if (space != std::string::npos) value_text.resize(space);
    bool ok = false;
    double value = ParseSampleValue(value_text, &ok);
    if (!ok) {
      out.errors.push_back("bad value in: " + line);
      continue;
    }
    std::string series = name;
    if (!labels.empty()) {
      series += "{";
      bool first = true;
      for (const auto& [k, v] : labels) {
        if (!first) series += ",";
        first = false;
        series += k + "=\"" + v + "\"";
      }
      series += "}";
    }
    out.samples[series] = value;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Helpers for the HTTP and promtool checks.

struct HttpResponse {
  std::string status_line;
  std::string body;
};

// Plain HTTP/1.0 GET from 127.0.0.1:`port`; fails the test on socket errors.
HttpResponse HttpGet(int port, const std::string& path) {
  HttpResponse response;
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  EXPECT_GE(fd, 0);
  if (fd < 0) return response;
  timeval timeout{};
  timeout.tv_sec = 10;
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ADD_FAILURE() << "connect to port " << port << " failed";
    close(fd);
    return response;
  }
  std::string request = "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
  EXPECT_EQ(send(fd, request.data(), request.size(), 0), static_cast<ssize_t>(request.size()));
  std::string raw;
  char buf[4096];
  while (true) {
    ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) {
      EXPECT_EQ(n, 0) << "recv failed or timed out";
      break;
    }
    raw.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  size_t line_end = raw.find("\r\n");
  size_t header_end = raw.find("\r\n\r\n");
  EXPECT_NE(header_end, std::string::npos) << raw;
  if (line_end == std::string::npos || header_end == std::string::npos) return response;
  response.status_line = raw.substr(0, line_end);
  response.body = raw.substr(header_end + 4);
  return response;
}

// Runs `promtool check metrics` on `text`; returns its exit code and output.
int PromtoolCheck(const std::string& text, std::string* output) {
  if (std::system("command -v promtool > /dev/null 2>&1") != 0) {
    *output = "promtool not found; run scripts/install-deps.sh";
    return -1;
  }
  char path[] = "/tmp/meft_metrics_test_XXXXXX";
  int fd = mkstemp(path);
  if (fd < 0) {
    *output = "mkstemp failed";
    return -1;
  }
  close(fd);
  {
    std::ofstream file(path, std::ios::binary);
    file << text;
  }
  std::string command = std::string("promtool check metrics < ") + path + " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) {
    std::remove(path);
    *output = "popen failed";
    return -1;
  }
  char buf[512];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) output->append(buf, n);
  int status = pclose(pipe);
  std::remove(path);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// Registers a few series that follow the Prometheus naming conventions.
void RegisterSample(Registry& registry) {
  registry.AddCounter("meft_test_requests_total", "Requests served.", {{"method", "push"}})
      .Increment(3);
  registry.AddCounter("meft_test_requests_total", "Requests served.", {{"method", "pull"}})
      .Increment(2);
  registry.AddGauge("meft_test_queue_depth", "Requests waiting.").Set(7);
  Histogram& latency =
      registry.AddHistogram("meft_test_latency_seconds", "Request latency.", {0.1, 1, 10});
  latency.Observe(0.05);
  latency.Observe(0.5);
  latency.Observe(100);
}

// ---------------------------------------------------------------------------------------------

TEST(MetricsTest, CounterGaugeValues) {
  Registry registry;
  Counter& counter = registry.AddCounter("meft_test_events_total", "Events.");
  EXPECT_EQ(counter.Value(), 0);
  counter.Increment();
  counter.Increment(2.5);
  counter.Increment(-10);  // ignored
  counter.Increment(NAN);  // ignored
  EXPECT_DOUBLE_EQ(counter.Value(), 3.5);

  Gauge& gauge = registry.AddGauge("meft_test_level", "Level.");
  gauge.Set(10);
  gauge.Increment();
  gauge.Increment(-4);
  EXPECT_DOUBLE_EQ(gauge.Value(), 7);
  EXPECT_THAT(registry.registration_errors(), IsEmpty());
}

TEST(MetricsTest, SameNameAndLabelsReturnSameObject) {
  Registry registry;
  Counter& a = registry.AddCounter("meft_test_total", "T.", {{"shard", "0"}});
  Counter& b = registry.AddCounter("meft_test_total", "T.", {{"shard", "0"}});
  Counter& c = registry.AddCounter("meft_test_total", "T.", {{"shard", "1"}});
  EXPECT_EQ(&a, &b);
  EXPECT_NE(&a, &c);
  Gauge& g1 = registry.AddGauge("meft_test_gauge", "G.");
  Gauge& g2 = registry.AddGauge("meft_test_gauge", "G.");
  EXPECT_EQ(&g1, &g2);
  Histogram& h1 = registry.AddHistogram("meft_test_hist", "H.", {1, 2});
  Histogram& h2 = registry.AddHistogram("meft_test_hist", "H.", {5});
  EXPECT_EQ(&h1, &h2);
  EXPECT_THAT(registry.registration_errors(), IsEmpty());
}

TEST(MetricsTest, SerializeTextParses) {
  Registry registry;
  RegisterSample(registry);
  registry.AddGauge("meft_test_labels", "Odd label values.", {{"path", "a\"b\\c\nd"}}).Set(1);
  std::string text = registry.SerializeText();
  Exposition parsed = ParseExposition(text);
  EXPECT_THAT(parsed.errors, IsEmpty()) << text;

  for (const char* family :
       {"meft_test_requests_total", "meft_test_queue_depth", "meft_test_latency_seconds",
        "meft_process_resident_memory_bytes", "meft_test_labels"}) {
    EXPECT_TRUE(parsed.help.count(family)) << family << "\n" << text;
  }
  EXPECT_EQ(parsed.help["meft_test_queue_depth"], "Requests waiting.");
  // prometheus-cpp names the counter family without the _total suffix in TYPE; accept both.
  EXPECT_TRUE(parsed.type["meft_test_requests_total"] == "counter" ||
              parsed.type["meft_test_requests"] == "counter")
      << text;
  EXPECT_EQ(parsed.type["meft_test_queue_depth"], "gauge");
  EXPECT_EQ(parsed.type["meft_test_latency_seconds"], "histogram");
  EXPECT_EQ(parsed.type["meft_process_resident_memory_bytes"], "gauge");

  const auto& s = parsed.samples;
  auto value = [&s, &text](const std::string& series) {
    auto it = s.find(series);
    EXPECT_NE(it, s.end()) << series << " missing from\n" << text;
    return it == s.end() ? NAN : it->second;
  };
  EXPECT_EQ(value("meft_test_requests_total{method=\"push\"}"), 3);
  EXPECT_EQ(value("meft_test_requests_total{method=\"pull\"}"), 2);
  EXPECT_EQ(value("meft_test_queue_depth"), 7);
  EXPECT_EQ(value("meft_test_latency_seconds_bucket{le=\"0.1\"}"), 1);
  EXPECT_EQ(value("meft_test_latency_seconds_bucket{le=\"1\"}"), 2);
  EXPECT_EQ(value("meft_test_latency_seconds_bucket{le=\"10\"}"), 2);
  EXPECT_EQ(value("meft_test_latency_seconds_bucket{le=\"+Inf\"}"), 3);
  EXPECT_EQ(value("meft_test_latency_seconds_count"), 3);
  EXPECT_DOUBLE_EQ(value("meft_test_latency_seconds_sum"), 100.55);
  EXPECT_EQ(value("meft_test_labels{path=\"a\"b\\c\nd\"}"), 1);
  EXPECT_GT(value("meft_process_resident_memory_bytes"), 0);
}

TEST(MetricsTest, SerializeTextPassesPromtool) {
  Registry registry;
  RegisterSample(registry);
  std::string text = registry.SerializeText();
  std::string output;
  int code = PromtoolCheck(text, &output);
  ASSERT_NE(code, -1) << output;
  EXPECT_EQ(code, 0) << output << "\n" << text;
}

TEST(MetricsTest, MisuseIsReportedNotFatal) {
  Registry registry;
  // Missing prefix: registered and exported anyway.
  Counter& unprefixed = registry.AddCounter("other_total", "No prefix.");
  unprefixed.Increment();
  EXPECT_THAT(registry.registration_errors(), SizeIs(1));
  EXPECT_THAT(registry.SerializeText(), HasSubstr("other_total 1"));

  // Invalid name: a working but unexported counter.
  Counter& invalid = registry.AddCounter("meft bad name", "Invalid.");
  invalid.Increment(4);
  EXPECT_EQ(invalid.Value(), 4);
  EXPECT_THAT(registry.registration_errors(), SizeIs(2));

  // Same name, other type.
  registry.AddCounter("meft_test_x_total", "Counter.");
  Gauge& clash = registry.AddGauge("meft_test_x_total", "Gauge.");
  clash.Set(3);
  EXPECT_EQ(clash.Value(), 3);
  EXPECT_THAT(registry.registration_errors(), SizeIs(3));

  // Bad bounds, bad label names, the reserved name.
  registry.AddHistogram("meft_test_h", "H.", {2, 1}).Observe(1);
  registry.AddHistogram("meft_test_h2", "H.", {1}, {{"le", "x"}}).Observe(1);
  registry.AddGauge("meft_test_g", "G.", {{"bad-label", "x"}}).Set(1);
  registry.AddGauge("meft_process_resident_memory_bytes", "Mine.").Set(1);
  EXPECT_THAT(registry.registration_errors(), SizeIs(7));
  std::string text = registry.SerializeText();
  EXPECT_THAT(text, Not(HasSubstr("meft_test_h")));
  EXPECT_THAT(text, Not(HasSubstr("bad-label")));
  EXPECT_THAT(text, Not(HasSubstr("Mine.")));
  EXPECT_THAT(ParseExposition(text).errors, IsEmpty());
}

TEST(MetricsTest, ExposerServesMetricsOverHttp) {
  Registry registry;
  RegisterSample(registry);
  absl::StatusOr<std::unique_ptr<Exposer>> exposer = Exposer::Start("127.0.0.1:0", registry);
  ASSERT_TRUE(exposer.ok()) << exposer.status();
  int port = (*exposer)->port();
  ASSERT_GT(port, 0);

  HttpResponse response = HttpGet(port, "/metrics");
  EXPECT_THAT(response.status_line, StartsWith("HTTP/1."));
  EXPECT_THAT(response.status_line, HasSubstr(" 200 "));
  EXPECT_THAT(response.body, HasSubstr("meft_test_requests_total{method=\"push\"} 3"));
  EXPECT_THAT(response.body, HasSubstr("meft_test_queue_depth 7"));
  EXPECT_THAT(response.body, HasSubstr("meft_test_latency_seconds_count 3"));
  EXPECT_THAT(response.body, HasSubstr("meft_process_resident_memory_bytes "));
  EXPECT_THAT(ParseExposition(response.body).errors, IsEmpty());

  std::string output;
  int code = PromtoolCheck(response.body, &output);
  ASSERT_NE(code, -1) << output;
  EXPECT_EQ(code, 0) << output << "\n" << response.body;

  // Updates show up in the next scrape.
  registry.AddGauge("meft_test_queue_depth", "Requests waiting.").Set(8);
  EXPECT_THAT(HttpGet(port, "/metrics").body, HasSubstr("meft_test_queue_depth 8"));
}

// As much static TLS as LibTorch's libraries bring into meft-worker, and more: every thread of
// this test binary carries it on its stack. civetweb's fixed 100 KiB thread stacks could not hold
// it (pthread_create failed with EINVAL and the Exposer never started).
thread_local char large_static_tls[256 * 1024];

TEST(MetricsTest, ExposerServesWithLargeStaticTls) {
  large_static_tls[0] = 1;  // Keeps the TLS block referenced.
  Registry registry;
  registry.AddGauge("meft_test_g", "G.").Set(large_static_tls[0]);
  absl::StatusOr<std::unique_ptr<Exposer>> exposer = Exposer::Start("127.0.0.1:0", registry);
  ASSERT_TRUE(exposer.ok()) << exposer.status();
  HttpResponse response = HttpGet((*exposer)->port(), "/metrics");
  EXPECT_THAT(response.status_line, HasSubstr(" 200 "));
  EXPECT_THAT(response.body, HasSubstr("meft_test_g 1"));
}

TEST(MetricsTest, ExposerAnswersOtherPathsAndMethods) {
  Registry registry;
  absl::StatusOr<std::unique_ptr<Exposer>> exposer = Exposer::Start("127.0.0.1:0", registry);
  ASSERT_TRUE(exposer.ok()) << exposer.status();
  EXPECT_THAT(HttpGet((*exposer)->port(), "/other").status_line, HasSubstr(" 404 "));
  EXPECT_THAT(HttpGet((*exposer)->port(), "/metrics?x=1").status_line, HasSubstr(" 200 "));
}

// Clients that connect and never send a request must not hold the single serving thread for
// long: two of them ahead of a real scrape must still leave it inside HttpGet's 10 s socket
// timeout (with a 10 s allowance per request, as before the fix, the scrape timed out).
TEST(MetricsTest, IdleConnectionsDoNotStallAScrape) {
  Registry registry;
  absl::StatusOr<std::unique_ptr<Exposer>> exposer = Exposer::Start("127.0.0.1:0", registry);
  ASSERT_TRUE(exposer.ok()) << exposer.status();
  std::vector<int> idle;
  for (int i = 0; i < 2; ++i) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    ASSERT_GE(fd, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>((*exposer)->port()));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    idle.push_back(fd);
  }
  EXPECT_THAT(HttpGet((*exposer)->port(), "/metrics").status_line, HasSubstr(" 200 "));
  for (int fd : idle) close(fd);
}

TEST(MetricsTest, ExposerOutlivingRegistryDoesNotCrash) {
  auto registry = std::make_unique<Registry>();
  registry->AddGauge("meft_test_g", "G.").Set(1);
  absl::StatusOr<std::unique_ptr<Exposer>> exposer = Exposer::Start("127.0.0.1:0", *registry);
  ASSERT_TRUE(exposer.ok()) << exposer.status();
  registry.reset();
  HttpResponse response = HttpGet((*exposer)->port(), "/metrics");
  EXPECT_THAT(response.status_line, HasSubstr(" 200 "));
  EXPECT_THAT(response.body, Not(HasSubstr("meft_test_g")));
}

TEST(MetricsTest, ExposerRejectsUnusableAddresses) {
  Registry registry;
  for (const char* address : {"", "not-an-address", "127.0.0.1", "127.0.0.1:99999",
                              "127.0.0.1:http", "::1:0", "127.0.0.1:1,127.0.0.1:2"}) {
    absl::StatusOr<std::unique_ptr<Exposer>> exposer = Exposer::Start(address, registry);
    EXPECT_EQ(exposer.status().code(), absl::StatusCode::kInvalidArgument) << address;
    EXPECT_THAT(std::string(exposer.status().message()), HasSubstr(address));
  }

  // 192.0.2.0/24 is TEST-NET-1: never a local address, so bind() fails.
  absl::StatusOr<std::unique_ptr<Exposer>> foreign = Exposer::Start("192.0.2.1:0", registry);
  EXPECT_EQ(foreign.status().code(), absl::StatusCode::kUnavailable) << foreign.status();
  EXPECT_THAT(std::string(foreign.status().message()), HasSubstr("192.0.2.1:0"));

  // A port someone else listens on.
  absl::StatusOr<std::unique_ptr<Exposer>> first = Exposer::Start("127.0.0.1:0", registry);
  ASSERT_TRUE(first.ok()) << first.status();
  std::string taken = "127.0.0.1:" + std::to_string((*first)->port());
  absl::StatusOr<std::unique_ptr<Exposer>> second = Exposer::Start(taken, registry);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable) << second.status();
  EXPECT_THAT(std::string(second.status().message()), HasSubstr(taken));
}

TEST(MetricsTest, ExposerStopsOnDestruction) {
  Registry registry;
  int port = 0;
  {
    absl::StatusOr<std::unique_ptr<Exposer>> exposer = Exposer::Start("127.0.0.1:0", registry);
    ASSERT_TRUE(exposer.ok()) << exposer.status();
    port = (*exposer)->port();
  }
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_NE(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  close(fd);
  // The port can be served again.
  absl::StatusOr<std::unique_ptr<Exposer>> again =
      Exposer::Start("127.0.0.1:" + std::to_string(port), registry);
  EXPECT_TRUE(again.ok()) << again.status();
}

TEST(MetricsTest, ExponentialBuckets) {
  EXPECT_THAT(ExponentialBuckets(1, 2, 4), ::testing::ElementsAre(1, 2, 4, 8));
  EXPECT_THAT(ExponentialBuckets(0.001, 10, 3),
              ::testing::ElementsAre(::testing::DoubleEq(0.001), ::testing::DoubleEq(0.01),
                                     ::testing::DoubleEq(0.1)));
  EXPECT_THAT(ExponentialBuckets(0, 2, 4), IsEmpty());
  EXPECT_THAT(ExponentialBuckets(1, 1, 4), IsEmpty());
  EXPECT_THAT(ExponentialBuckets(1, 2, 0), IsEmpty());
  EXPECT_THAT(ExponentialBuckets(1e300, 1e10, 5), SizeIs(1));
}

TEST(MetricsTest, ResidentMemoryIsPlausible) {
  int64_t rss = ResidentMemoryBytes();
  EXPECT_GT(rss, 1 << 20);           // a gtest binary uses more than 1 MiB
  EXPECT_LT(rss, int64_t{1} << 40);  // and less than 1 TiB
}

}  // namespace
}  // namespace meft::metrics
