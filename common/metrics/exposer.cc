#include "common/metrics/exposer.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
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
                 std::function<std::optional<std::string>()> scrape)
    : listen_fd_(listen_fd),
      wake_read_fd_(wake_read_fd),
      wake_write_fd_(wake_write_fd),
      port_(port),
      scrape_(std::move(scrape)) {
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
      const std::string body = scrape_().value_or("");
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
      new Exposer(listen_fd, wake[0], wake[1], bound_port, registry.Scraper()));
}

}  // namespace meft::metrics
