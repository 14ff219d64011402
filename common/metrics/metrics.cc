#include "common/metrics/metrics.h"

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
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <exception>
#include <utility>

#include "absl/strings/match.h"
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

std::function<std::optional<std::string>()> Registry::Scraper() const {
  std::weak_ptr<internal::RegistryCollectable> weak = collectable_;
  return [weak]() -> std::optional<std::string> {
    std::shared_ptr<internal::RegistryCollectable> collectable = weak.lock();
    if (collectable == nullptr) return std::nullopt;
    return prometheus::TextSerializer().Serialize(collectable->Collect());
  };
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
