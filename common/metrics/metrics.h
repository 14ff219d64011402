#pragma once

// Metrics facade over prometheus-cpp, so that domain code never includes prometheus headers.
//
//   meft::metrics::Registry registry;
//   meft::metrics::Counter& pushes =
//       registry.AddCounter("meft_ps_push_total", "Gradient pushes received.", {{"shard", "0"}});
//   pushes.Increment();
//   // exposer.h serves it over HTTP:
//   MEFT_ASSIGN_OR_RETURN(auto exposer, meft::metrics::Exposer::Start("0.0.0.0:9464", registry));
//
// Every Registry also exports `meft_process_resident_memory_bytes`, refreshed on each scrape
// and each SerializeText() call.
//
// Thread-safety: everything here may be used from any number of threads. Counter, Gauge and
// Histogram updates are atomic or take a short internal lock, and never allocate.

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace prometheus {
class Counter;
class Gauge;
class Histogram;
}  // namespace prometheus

namespace meft::metrics {

namespace internal {
class RegistryCollectable;  // Owns the prometheus registry; defined in metrics.cc.
}  // namespace internal

// A monotonically increasing value. Owned by its Registry.
class Counter {
 public:
  ~Counter();
  Counter(const Counter&) = delete;
  Counter& operator=(const Counter&) = delete;

  // Adds `v`; negative and NaN increments are ignored (a counter never decreases).
  void Increment(double v = 1.0);
  double Value() const;

 private:
  friend class Registry;
  Counter();
  // Null unless this counter could not be registered (see Registry); then it owns `impl_`.
  std::unique_ptr<prometheus::Counter> detached_;
  prometheus::Counter* impl_ = nullptr;
};

// A value that can go up and down. Owned by its Registry.
class Gauge {
 public:
  ~Gauge();
  Gauge(const Gauge&) = delete;
  Gauge& operator=(const Gauge&) = delete;

  void Set(double v);
  // Adds `v`, which may be negative.
  void Increment(double v = 1.0);
  double Value() const;

 private:
  friend class Registry;
  Gauge();
  std::unique_ptr<prometheus::Gauge> detached_;
  prometheus::Gauge* impl_ = nullptr;
};

// Counts observations into cumulative buckets. Owned by its Registry.
class Histogram {
 public:
  ~Histogram();
  Histogram(const Histogram&) = delete;
  Histogram& operator=(const Histogram&) = delete;

  void Observe(double v);

 private:
  friend class Registry;
  Histogram();
  std::unique_ptr<prometheus::Histogram> detached_;
  prometheus::Histogram* impl_ = nullptr;
};

// Owns metrics and serializes them. Metric references returned by Add* stay valid for the
// Registry's lifetime.
//
// Names must start with "meft_" and be valid Prometheus names; label names must be valid
// Prometheus label names ("le" is reserved on histograms); histogram bounds must be finite and
// strictly increasing; one name has one metric type. Breaking these rules is a programming error
// but never aborts: a name that is merely missing the prefix is registered anyway, anything
// Prometheus cannot export yields a working but unexported ("detached") metric. Either way the
// mistake is logged with spdlog::error and kept in registration_errors().
class Registry {
 public:
  Registry();
  ~Registry();
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  // The same name and labels twice return the same object; `help` (and, for histograms,
  // `bucket_bounds`) of the later calls are then ignored.
  Counter& AddCounter(const std::string& name, const std::string& help,
                      const std::map<std::string, std::string>& labels = {});
  Gauge& AddGauge(const std::string& name, const std::string& help,
                  const std::map<std::string, std::string>& labels = {});
  // `bucket_bounds` are the finite upper bounds; the +Inf bucket is implicit.
  Histogram& AddHistogram(const std::string& name, const std::string& help,
                          std::vector<double> bucket_bounds,
                          const std::map<std::string, std::string>& labels = {});

  // Everything registered, in the Prometheus text exposition format 0.0.4.
  std::string SerializeText() const;

  // SerializeText as a function for an HTTP endpoint (exposer.h) that may outlive the registry:
  // it holds the registry's metrics weakly and returns nullopt once the registry is gone. Safe to
  // call from any thread.
  std::function<std::optional<std::string>()> Scraper() const;

  // One message per misuse of the Add* rules above, oldest first.
  std::vector<std::string> registration_errors() const;

 private:
  enum class Type { kCounter, kGauge, kHistogram };
  // Checks the naming rules; returns false if Prometheus cannot export the metric. Appends to
  // errors_. Requires mutex_.
  bool CheckRegistration(Type type, const std::string& name,
                         const std::map<std::string, std::string>& labels,
                         const std::vector<double>* bucket_bounds);
  void RecordError(std::string message);  // Requires mutex_.

  // Shared with every Exposer serving this registry; an Exposer holds it weakly, so it may
  // outlive the Registry.
  std::shared_ptr<internal::RegistryCollectable> collectable_;

  mutable std::mutex mutex_;
  // Keyed by name and rendered labels. Guarded by mutex_ (the metrics themselves are not).
  std::map<std::string, std::unique_ptr<Counter>> counters_;
  std::map<std::string, std::unique_ptr<Gauge>> gauges_;
  std::map<std::string, std::unique_ptr<Histogram>> histograms_;
  std::map<std::string, Type> types_;  // Type of every exported name. Guarded by mutex_.
  std::vector<std::string> errors_;    // Guarded by mutex_.
};

// The bounds start, start*factor, ..., start*factor^(count-1), stopping early at the first that
// would be infinite. Empty unless start > 0, factor > 1 (both finite) and count >= 1.
std::vector<double> ExponentialBuckets(double start, double factor, int count);

// Resident set size of this process in bytes, from /proc/self/statm; 0 if unavailable.
int64_t ResidentMemoryBytes();

}  // namespace meft::metrics
