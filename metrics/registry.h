// A small Prometheus metrics registry: counters, gauges and histograms with labels and explicit
// buckets, serialized in the Prometheus text exposition format 0.0.4
// (prometheus.io/docs/instrumenting/exposition_formats: HELP and TYPE lines, label-value escaping
// of \ " and newline, histogram `_bucket{le=...}` cumulative counts ending with +Inf, `_sum`,
// `_count`). No Prometheus C++ client is packaged for Debian 12, so this one is ours.
//
//   Registry reg;
//   auto& ttft = reg.AddHistogram("kraken_time_to_first_token_seconds", "...", {}, TtftBuckets()).With({});
//   ttft.Observe(0.042);                                  // lock-free
//   auto& ok = reg.AddCounter("kraken_request_success_total", "...", {"finish_reason"});
//   ok.With({"stop"}).Inc();
//   std::string text = reg.Serialize();
//
// Recording never fails and never throws: a negative or non-finite counter increment, or a
// non-finite observation, is skipped and counted in kraken_metrics_errors_total. Label values must come from fixed sets
// (finish reasons, ranks), never from requests: every child is created once and kept.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace kraken::metrics {

class Counter {
 public:
  /// Adds `v` >= 0 (finite); anything else is skipped and counted as a metrics error.
  void Inc(double v = 1.0);
  /// For totals kept elsewhere (e.g. per-rank seconds): raises the value to `total`; a smaller or
  /// non-finite `total` is skipped (a counter never goes down).
  void SetTotal(double total);
  double value() const { return v_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> v_{0.0};
};

class Gauge {
 public:
  void Set(double v) { v_.store(v, std::memory_order_relaxed); }
  void Inc(double v = 1.0) { v_.fetch_add(v, std::memory_order_relaxed); }
  void Dec(double v = 1.0) { v_.fetch_sub(v, std::memory_order_relaxed); }
  double value() const { return v_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> v_{0.0};
};

class Histogram {
 public:
  /// `bounds`: finite, strictly increasing upper bounds; +Inf is implicit.
  explicit Histogram(std::vector<double> bounds);
  /// Records one observation; a non-finite value is skipped and counted as a metrics error.
  void Observe(double v);
  const std::vector<double>& bounds() const { return bounds_; }
  /// Observations <= bounds()[i] (cumulative), then the total count last.
  std::vector<uint64_t> CumulativeCounts() const;
  double sum() const { return sum_.load(std::memory_order_relaxed); }
  uint64_t count() const { return count_.load(std::memory_order_relaxed); }

 private:
  std::vector<double> bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> buckets_;  // per bucket, not cumulative; last = +Inf
  std::atomic<double> sum_{0.0};
  std::atomic<uint64_t> count_{0};
};

enum class MetricType { kCounter, kGauge, kHistogram };

/// All children of one metric name, one per combination of label values.
template <typename T>
class Family {
 public:
  Family(std::string name, std::string help, std::vector<std::string> label_names, std::vector<double> bounds = {})
      : name_(std::move(name)),
        help_(std::move(help)),
        label_names_(std::move(label_names)),
        bounds_(std::move(bounds)) {}
  /// The child for these label values (one per label name), created on first use. Keep the
  /// reference: it stays valid for the registry's lifetime.
  T& With(const std::vector<std::string>& values);
  const std::string& name() const { return name_; }
  const std::string& help() const { return help_; }
  const std::vector<std::string>& label_names() const { return label_names_; }
  /// Calls `f(values, child)` for every child, in label-value order.
  void ForEach(const std::function<void(const std::vector<std::string>&, const T&)>& f) const;

 private:
  std::string name_, help_;
  std::vector<std::string> label_names_;
  std::vector<double> bounds_;
  mutable std::mutex mu_;
  std::map<std::vector<std::string>, std::unique_ptr<T>> children_;
};

class Registry {
 public:
  Registry();
  /// Names must match [a-zA-Z_:][a-zA-Z0-9_:]*, label names [a-zA-Z_][a-zA-Z0-9_]* (not starting
  /// with "__", not "le" for histograms); a duplicate or invalid name is a programming error and
  /// aborts at start-up.
  Family<Counter>& AddCounter(const std::string& name, const std::string& help, std::vector<std::string> labels);
  Family<Gauge>& AddGauge(const std::string& name, const std::string& help, std::vector<std::string> labels);
  Family<Histogram>& AddHistogram(const std::string& name, const std::string& help, std::vector<std::string> labels,
                                  std::vector<double> bounds);
  /// Runs before each Serialize (to refresh values read from elsewhere). Must not throw.
  void AddCollector(std::function<void()> collector);
  /// The whole registry in text format 0.0.4, families in registration order.
  std::string Serialize();

 private:
  struct Entry {
    MetricType type;
    void* family;
  };
  void CheckNew(const std::string& name, const std::vector<std::string>& labels, bool histogram);
  std::mutex mu_;
  std::vector<Entry> entries_;
  std::vector<std::unique_ptr<Family<Counter>>> counters_;
  std::vector<std::unique_ptr<Family<Gauge>>> gauges_;
  std::vector<std::unique_ptr<Family<Histogram>>> histograms_;
  std::vector<std::function<void()>> collectors_;
};

/// Escapes a label value for the text format: backslash, double quote and newline.
std::string EscapeLabelValue(std::string_view v);
/// Escapes HELP text: backslash and newline.
std::string EscapeHelp(std::string_view v);
/// Shortest decimal that reads back as `v`; "+Inf", "-Inf", "NaN" for the special values.
std::string FormatValue(double v);

/// Errors recorded instead of thrown (bad observations); exported as kraken_metrics_errors_total.
uint64_t MetricsErrors();

}  // namespace kraken::metrics
