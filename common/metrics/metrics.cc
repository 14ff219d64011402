#include "common/metrics/metrics.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <prometheus/check_names.h>
#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/metric_family.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace meft::metrics {

namespace {

constexpr char kResidentMemoryName[] = "meft_process_resident_memory_bytes";

// A map key that cannot be confused between different label sets: '\0' never occurs in a
// metric or label name, and label values are length-prefixed.
std::string Key(const std::string& name, const std::map<std::string, std::string>& labels) {
  std::string key = name;
  for (const auto& [label, value] : labels) {
    absl::StrAppend(&key, absl::string_view("\0", 1), label, absl::string_view("\0", 1),
                    value.size(), ":", value);
  }
  return key;
}

}  // namespace

namespace internal {

// The prometheus registry plus the process gauges that are refreshed on every collection. The
// Exposer's endpoint holds it through a weak_ptr.
class RegistryCollectable : public prometheus::Collectable {
 public:
  RegistryCollectable()
      : resident_memory_(prometheus::BuildGauge()
                             .Name(kResidentMemoryName)
                             .Help("Resident set size of this process in bytes.")
                             .Register(registry_)
                             .Add({})) {}

  std::vector<prometheus::MetricFamily> Collect() const override {
    resident_memory_.Set(static_cast<double>(ResidentMemoryBytes()));
    return registry_.Collect();
  }

  prometheus::Registry& registry() { return registry_; }

 private:
  prometheus::Registry registry_;  // Internally synchronized.
  prometheus::Gauge& resident_memory_;
};

}  // namespace internal

// --------------------------------------------------------------------------------------------
// Metric handles

Counter::Counter() = default;
Counter::~Counter() = default;

void Counter::Increment(double v) {
  if (v >= 0) impl_->Increment(v);  // Also false for NaN.
}

double Counter::Value() const { return impl_->Value(); }

Gauge::Gauge() = default;
Gauge::~Gauge() = default;

void Gauge::Set(double v) { impl_->Set(v); }
void Gauge::Increment(double v) { impl_->Increment(v); }
double Gauge::Value() const { return impl_->Value(); }

Histogram::Histogram() = default;
Histogram::~Histogram() = default;

void Histogram::Observe(double v) { impl_->Observe(v); }

// --------------------------------------------------------------------------------------------
// Registry

Registry::Registry() : collectable_(std::make_shared<internal::RegistryCollectable>()) {
  types_[kResidentMemoryName] = Type::kGauge;
}

Registry::~Registry() = default;

void Registry::RecordError(std::string message) {
  spdlog::error("metrics: {}", message);
  errors_.push_back(std::move(message));
}

std::vector<std::string> Registry::registration_errors() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return errors_;
}

bool Registry::CheckRegistration(Type type, const std::string& name,
                                 const std::map<std::string, std::string>& labels,
                                 const std::vector<double>* bucket_bounds) {
  bool exportable = true;
  if (!prometheus::CheckMetricName(name)) {
    RecordError(absl::StrCat("\"", name, "\" is not a valid metric name; not exported"));
    exportable = false;
  } else if (!absl::StartsWith(name, "meft_")) {
    RecordError(absl::StrCat("metric \"", name, "\" does not start with \"meft_\""));
  }
  if (name == kResidentMemoryName) {
    RecordError(absl::StrCat("\"", name, "\" is reserved for the registry; not exported"));
    exportable = false;
  }
  auto it = types_.find(name);
  if (it != types_.end() && it->second != type) {
    RecordError(absl::StrCat("metric \"", name,
                             "\" is already registered with another type; not exported"));
    exportable = false;
  }
  for (const auto& [label, value] : labels) {
    if (!prometheus::CheckLabelName(label) || (type == Type::kHistogram && label == "le")) {
      RecordError(absl::StrCat("metric \"", name, "\": \"", label,
                               "\" is not a valid label name; not exported"));
      exportable = false;
    }
  }
  if (bucket_bounds != nullptr) {
    for (size_t i = 0; i < bucket_bounds->size(); ++i) {
      double bound = (*bucket_bounds)[i];
      if (!std::isfinite(bound) || (i > 0 && !(bound > (*bucket_bounds)[i - 1]))) {
        RecordError(absl::StrCat("histogram \"", name,
                                 "\": bucket bounds must be finite and strictly increasing; "
                                 "not exported"));
        exportable = false;
        break;
      }
    }
  }
  return exportable;
}

Counter& Registry::AddCounter(const std::string& name, const std::string& help,
                              const std::map<std::string, std::string>& labels) {
  std::lock_guard<std::mutex> lock(mutex_);
  std::unique_ptr<Counter>& slot = counters_[Key(name, labels)];
  if (slot != nullptr) return *slot;
  slot.reset(new Counter());
  if (CheckRegistration(Type::kCounter, name, labels, nullptr)) {
    try {
      slot->impl_ = &prometheus::BuildCounter()
                         .Name(name)
                         .Help(help)
                         .Register(collectable_->registry())
                         .Add(labels);
      types_[name] = Type::kCounter;
    } catch (const std::exception& e) {
      RecordError(absl::StrCat("metric \"", name, "\": ", e.what(), "; not exported"));
    }
  }
  if (slot->impl_ == nullptr) {
    slot->detached_ = std::make_unique<prometheus::Counter>();
    slot->impl_ = slot->detached_.get();
  }
  return *slot;
}

Gauge& Registry::AddGauge(const std::string& name, const std::string& help,
                          const std::map<std::string, std::string>& labels) {
  std::lock_guard<std::mutex> lock(mutex_);
  std::unique_ptr<Gauge>& slot = gauges_[Key(name, labels)];
  if (slot != nullptr) return *slot;
  slot.reset(new Gauge());
  if (CheckRegistration(Type::kGauge, name, labels, nullptr)) {
    try {
      slot->impl_ = &prometheus::BuildGauge()
                         .Name(name)
                         .Help(help)
                         .Register(collectable_->registry())
                         .Add(labels);
      types_[name] = Type::kGauge;
    } catch (const std::exception& e) {
      RecordError(absl::StrCat("metric \"", name, "\": ", e.what(), "; not exported"));
    }
  }
  if (slot->impl_ == nullptr) {
    slot->detached_ = std::make_unique<prometheus::Gauge>();
    slot->impl_ = slot->detached_.get();
  }
  return *slot;
}

Histogram& Registry::AddHistogram(const std::string& name, const std::string& help,
                                  std::vector<double> bucket_bounds,
                                  const std::map<std::string, std::string>& labels) {
  std::lock_guard<std::mutex> lock(mutex_);
  std::unique_ptr<Histogram>& slot = histograms_[Key(name, labels)];
  if (slot != nullptr) return *slot;
  slot.reset(new Histogram());
  bool valid_bounds = true;
  for (size_t i = 0; i < bucket_bounds.size(); ++i) {
    if (!std::isfinite(bucket_bounds[i]) || (i > 0 && !(bucket_bounds[i] > bucket_bounds[i - 1]))) {
      valid_bounds = false;
    }
  }
  if (CheckRegistration(Type::kHistogram, name, labels, &bucket_bounds)) {
    try {
      slot->impl_ = &prometheus::BuildHistogram()
                         .Name(name)
                         .Help(help)
                         .Register(collectable_->registry())
                         .Add(labels, bucket_bounds);
      types_[name] = Type::kHistogram;
    } catch (const std::exception& e) {
      RecordError(absl::StrCat("histogram \"", name, "\": ", e.what(), "; not exported"));
    }
  }
  if (slot->impl_ == nullptr) {
    // Unexported; keep the caller's bounds when they are usable so Observe stays meaningful.
    slot->detached_ = std::make_unique<prometheus::Histogram>(
        valid_bounds ? bucket_bounds : prometheus::Histogram::BucketBoundaries{});
    slot->impl_ = slot->detached_.get();
  }
  return *slot;
}

std::string Registry::SerializeText() const {
  return prometheus::TextSerializer().Serialize(collectable_->Collect());
}

// --------------------------------------------------------------------------------------------
// Exposer

namespace {

// Accepts "host:port" and "[v6-host]:port" with a decimal port in [0, 65535].
absl::Status CheckBindAddress(const std::string& address) {
  size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics bind address \"", address, "\" is not host:port"));
  }
  absl::string_view host(address.data(), colon);
  absl::string_view port(address.data() + colon + 1, address.size() - colon - 1);
  uint32_t port_number = 0;
  bool digits = !port.empty() && std::all_of(port.begin(), port.end(), absl::ascii_isdigit);
  if (!digits || !absl::SimpleAtoi(port, &port_number) || port_number > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("metrics bind address \"", address,
                                                   "\": port must be a number in [0, 65535]"));
  }
  bool bracketed = host.size() >= 2 && host.front() == '[' && host.back() == ']';
  if (!bracketed && host.find(':') != absl::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat("metrics bind address \"", address,
                                                   "\": write IPv6 hosts in brackets, [::1]:port"));
  }
  if (host.find_first_of(",") != absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics bind address \"", address, "\" names more than one address"));
  }
  return absl::OkStatus();
}

// One thread answers one connection at a time, so a client that trickles its request or stops
// reading must not hold the scrape up for long: it gets this long to send the request, and this
// long more to read the answer.
constexpr auto kRequestTimeout = std::chrono::seconds(2);
constexpr auto kResponseTimeout = std::chrono::seconds(10);
// After accept fails for lack of descriptors or memory, wait this long before trying again
// (poll would report the pending connection at once and the thread would spin).
constexpr int kAcceptBackoffMs = 100;
constexpr size_t kMaxRequestBytes = 16 * 1024;

std::string ErrnoText(int error) { return std::strerror(error); }

// Waits until `fd` is ready for `events` or the wake fd becomes readable (stop) or `deadline`
// passes. True only when `fd` is ready.
bool WaitReady(int fd, short events, int wake_fd, std::chrono::steady_clock::time_point deadline) {
  while (true) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return false;
    pollfd fds[2] = {{fd, events, 0}, {wake_fd, POLLIN, 0}};
    int n = ::poll(fds, 2, static_cast<int>(left.count()));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0 || fds[1].revents != 0) return false;
    return (fds[0].revents & (events | POLLERR | POLLHUP)) != 0;
  }
}

std::string HttpResponse(int code, const char* reason, const std::string& content_type,
                         const std::string& body, bool head_only) {
  std::string out =
      absl::StrCat("HTTP/1.1 ", code, " ", reason, "\r\nContent-Type: ", content_type,
                   "\r\nContent-Length: ", body.size(), "\r\nConnection: close\r\n\r\n");
  if (!head_only) out += body;
  return out;
}

}  // namespace

Exposer::Exposer(int listen_fd, int wake_read_fd, int wake_write_fd, int port,
                 std::weak_ptr<internal::RegistryCollectable> collectable)
    : listen_fd_(listen_fd),
      wake_read_fd_(wake_read_fd),
      wake_write_fd_(wake_write_fd),
      port_(port),
      collectable_(std::move(collectable)) {
  thread_ = std::thread([this] { Serve(); });
}

Exposer::~Exposer() {
  const char byte = 0;
  while (::write(wake_write_fd_, &byte, 1) < 0 && errno == EINTR) {
  }
  thread_.join();
  ::close(listen_fd_);
  ::close(wake_read_fd_);
  ::close(wake_write_fd_);
}

void Exposer::Serve() {
  while (true) {
    pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {wake_read_fd_, POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      spdlog::error("metrics: poll failed: {}", ErrnoText(errno));
      return;
    }
    if (fds[1].revents != 0) return;
    if ((fds[0].revents & POLLIN) == 0) continue;
    int connection = ::accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (connection < 0) {
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        pollfd wake = {wake_read_fd_, POLLIN, 0};
        ::poll(&wake, 1, kAcceptBackoffMs);
      }
      continue;  // The client gave up, or out of descriptors: try again.
    }
    try {
      Answer(connection);
    } catch (const std::exception& e) {  // e.g. bad_alloc while serializing: drop this scrape
      spdlog::warn("metrics: answering a scrape failed: {}", e.what());
    }
    ::close(connection);
  }
}

void Exposer::Answer(int connection) {
  auto deadline = std::chrono::steady_clock::now() + kRequestTimeout;
  std::string request;
  char buffer[4096];
  while (request.find("\r\n\r\n") == std::string::npos) {
    if (request.size() > kMaxRequestBytes) return;
    if (!WaitReady(connection, POLLIN, wake_read_fd_, deadline)) return;
    ssize_t n = ::recv(connection, buffer, sizeof(buffer), 0);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) return;
    request.append(buffer, static_cast<size_t>(n));
  }
  // "METHOD TARGET VERSION"; the query string and headers do not matter here.
  const std::string line = request.substr(0, request.find("\r\n"));
  const size_t first_space = line.find(' ');
  const size_t second_space = line.find(' ', first_space + 1);
  std::string response;
  if (first_space == std::string::npos || second_space == std::string::npos) {
    response = HttpResponse(400, "Bad Request", "text/plain", "bad request line\n", false);
  } else {
    const std::string method = line.substr(0, first_space);
    std::string target = line.substr(first_space + 1, second_space - first_space - 1);
    target = target.substr(0, target.find('?'));
    const bool head = method == "HEAD";
    if (method != "GET" && !head) {
      response = HttpResponse(405, "Method Not Allowed", "text/plain", "GET only\n", false);
    } else if (target != "/metrics") {
      response = HttpResponse(404, "Not Found", "text/plain", "try /metrics\n", head);
    } else {
      std::string body;
      if (std::shared_ptr<internal::RegistryCollectable> collectable = collectable_.lock()) {
        body = prometheus::TextSerializer().Serialize(collectable->Collect());
      }
      response = HttpResponse(200, "OK", "text/plain; version=0.0.4; charset=utf-8", body, head);
    }
  }
  deadline = std::chrono::steady_clock::now() + kResponseTimeout;
  size_t sent = 0;
  while (sent < response.size()) {
    if (!WaitReady(connection, POLLOUT, wake_read_fd_, deadline)) return;
    ssize_t n = ::send(connection, response.data() + sent, response.size() - sent, MSG_NOSIGNAL);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) return;
    sent += static_cast<size_t>(n);
  }
  ::shutdown(connection, SHUT_WR);
}

absl::StatusOr<std::unique_ptr<Exposer>> Exposer::Start(const std::string& bind_address,
                                                        Registry& registry) {
  absl::Status valid = CheckBindAddress(bind_address);
  if (!valid.ok()) return valid;
  const size_t colon = bind_address.rfind(':');
  std::string host = bind_address.substr(0, colon);
  const std::string port = bind_address.substr(colon + 1);
  if (host.size() >= 2 && host.front() == '[') host = host.substr(1, host.size() - 2);
  auto unavailable = [&](const std::string& why) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on \"", bind_address, "\": ", why));
  };

  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  if (int rc = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &found); rc != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics bind address \"", bind_address,
                     "\": cannot resolve the host: ", ::gai_strerror(rc)));
  }
  int listen_fd = -1;
  std::string why = "no usable address";
  for (addrinfo* a = found; a != nullptr && listen_fd < 0; a = a->ai_next) {
    int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      why = ErrnoText(errno);
      continue;
    }
    const int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, a->ai_addr, a->ai_addrlen) != 0 || ::listen(fd, 64) != 0) {
      why = ErrnoText(errno);
      ::close(fd);
      continue;
    }
    listen_fd = fd;
  }
  ::freeaddrinfo(found);
  if (listen_fd < 0) return unavailable(why);

  sockaddr_storage bound{};
  socklen_t bound_size = sizeof(bound);
  int bound_port = 0;
  if (::getsockname(listen_fd, reinterpret_cast<sockaddr*>(&bound), &bound_size) == 0) {
    if (bound.ss_family == AF_INET) {
      bound_port = ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
    } else if (bound.ss_family == AF_INET6) {
      bound_port = ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port);
    }
  }
  int wake[2];
  if (bound_port == 0 || ::pipe2(wake, O_CLOEXEC) != 0) {
    why = bound_port == 0 ? "no port" : ErrnoText(errno);
    ::close(listen_fd);
    return unavailable(why);
  }
  return std::unique_ptr<Exposer>(
      new Exposer(listen_fd, wake[0], wake[1], bound_port, registry.collectable_));
}

// --------------------------------------------------------------------------------------------
// Helpers

std::vector<double> ExponentialBuckets(double start, double factor, int count) {
  std::vector<double> bounds;
  if (!(start > 0) || !(factor > 1) || count < 1 || !std::isfinite(start) ||
      !std::isfinite(factor)) {
    return bounds;
  }
  bounds.reserve(static_cast<size_t>(count));
  double bound = start;
  for (int i = 0; i < count && std::isfinite(bound); ++i) {
    bounds.push_back(bound);
    bound *= factor;
  }
  return bounds;
}

int64_t ResidentMemoryBytes() {
  std::FILE* file = std::fopen("/proc/self/statm", "re");
  if (file == nullptr) return 0;
  long long size_pages = 0;
  long long resident_pages = 0;
  int fields = std::fscanf(file, "%lld %lld", &size_pages, &resident_pages);
  std::fclose(file);
  long page_size = ::sysconf(_SC_PAGESIZE);
  if (fields != 2 || page_size <= 0 || resident_pages < 0) return 0;
  return static_cast<int64_t>(resident_pages) * page_size;
}

}  // namespace meft::metrics
