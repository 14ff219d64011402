#pragma once

// The HTTP endpoint Prometheus scrapes: GET /metrics answered with a Registry's metrics
// (metrics.h).

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "common/metrics/metrics.h"

namespace meft::metrics {

// Serves GET /metrics over HTTP/1.1 (one response per connection, then close) on its own thread,
// until destroyed.
//
// A small server of our own rather than prometheus-cpp's civetweb one: Debian's civetweb is built
// with USE_STACK_SIZE=102400 and creates every thread with a 100 KiB stack, and glibc carves the
// static TLS of all loaded libraries out of each thread's stack. With LibTorch loaded (OpenBLAS,
// glog and libtorch_cpu bring about 106 KiB of static TLS) pthread_create fails with EINVAL, so
// civetweb could never start inside meft-worker. This thread gets the default stack.
class Exposer {
 public:
  // `bind_address` is "host:port" ("127.0.0.1:9464", "0.0.0.0:0", "[::1]:0"); port 0 picks a
  // free port, see port(). INVALID_ARGUMENT for a malformed address, UNAVAILABLE if the server
  // cannot listen there. `registry` need not outlive the Exposer (a scrape after the registry
  // is gone returns no metrics).
  static absl::StatusOr<std::unique_ptr<Exposer>> Start(const std::string& bind_address,
                                                        Registry& registry);
  // Stops the server; a request being answered is cut off, the port is free afterwards.
  ~Exposer();
  Exposer(const Exposer&) = delete;
  Exposer& operator=(const Exposer&) = delete;

  // The port actually listened on.
  int port() const { return port_; }

 private:
  Exposer(int listen_fd, int wake_read_fd, int wake_write_fd, int port,
          std::function<std::optional<std::string>()> scrape);
  void Serve();                 // The accept loop, on thread_.
  void Answer(int connection);  // Reads one request from `connection` and answers it.
  const int listen_fd_;
  const int wake_read_fd_;  // Readable once the destructor asks the thread to stop.
  const int wake_write_fd_;
  const int port_;
  const std::function<std::optional<std::string>()> scrape_;  // Registry::Scraper()
  std::thread thread_;
};

}  // namespace meft::metrics
