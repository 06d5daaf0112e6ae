#include "metrics/registry.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace kraken::metrics {
namespace {

std::atomic<uint64_t> g_errors{0};

void Fatal(const std::string& msg) {
  std::fprintf(stderr, "metrics registry: %s\n", msg.c_str());
  std::abort();
}

void AppendLabels(std::string& out, const std::vector<std::string>& names, const std::vector<std::string>& values,
                  const char* extra_name = nullptr, const std::string& extra_value = "") {
  if (names.empty() && extra_name == nullptr) return;
  out += '{';
  bool first = true;
  for (size_t i = 0; i < names.size(); ++i) {
    if (!first) out += ',';
    first = false;
    out += names[i];
    out += "=\"";
    out += EscapeLabelValue(values[i]);
    out += '"';
  }
  if (extra_name != nullptr) {
    if (!first) out += ',';
    out += extra_name;
    out += "=\"";
    out += extra_value;
    out += '"';
  }
  out += '}';
}

}  // namespace

uint64_t MetricsErrors() {
  return g_errors.load();
}

void Counter::Inc(double v) {
  if (!(v >= 0.0) || !std::isfinite(v)) {
    ++g_errors;
    return;
  }
  v_.fetch_add(v, std::memory_order_relaxed);
}

void Counter::SetTotal(double total) {
  if (!std::isfinite(total)) {
    ++g_errors;
    return;
  }
  double cur = v_.load(std::memory_order_relaxed);
  while (total > cur && !v_.compare_exchange_weak(cur, total, std::memory_order_relaxed)) {
  }
}

Histogram::Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)) {
  for (size_t i = 0; i < bounds_.size(); ++i) {
    if (!std::isfinite(bounds_[i]) || (i > 0 && bounds_[i] <= bounds_[i - 1]))
      Fatal("histogram bounds must be finite and strictly increasing");
  }
  buckets_ = std::make_unique<std::atomic<uint64_t>[]>(bounds_.size() + 1);
  for (size_t i = 0; i <= bounds_.size(); ++i) buckets_[i].store(0);
}

void Histogram::Observe(double v) {
  if (!std::isfinite(v)) {
    ++g_errors;
    return;
  }
  // Bucket i counts bounds[i-1] < v <= bounds[i] (Prometheus' "le" is inclusive).
  const size_t i = static_cast<size_t>(std::lower_bound(bounds_.begin(), bounds_.end(), v) - bounds_.begin());
  buckets_[i].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(v, std::memory_order_relaxed);
  count_.fetch_add(1, std::memory_order_relaxed);
}

std::vector<uint64_t> Histogram::CumulativeCounts() const {
  std::vector<uint64_t> out(bounds_.size() + 1);
  uint64_t acc = 0;
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    acc += buckets_[i].load(std::memory_order_relaxed);
    out[i] = acc;
  }
  return out;
}

template <typename T>
T& Family<T>::With(const std::vector<std::string>& values) {
  if (values.size() != label_names_.size())
    Fatal(name_ + ": " + std::to_string(values.size()) + " label values for " + std::to_string(label_names_.size()) +
          " labels");
  std::lock_guard<std::mutex> l(mu_);
  auto it = children_.find(values);
  if (it != children_.end()) return *it->second;
  std::unique_ptr<T> child;
  if constexpr (std::is_same_v<T, Histogram>) {
    child = std::make_unique<T>(bounds_);
  } else {
    child = std::make_unique<T>();
  }
  T& ref = *child;
  children_.emplace(values, std::move(child));
  return ref;
}

template <typename T>
void Family<T>::ForEach(const std::function<void(const std::vector<std::string>&, const T&)>& f) const {
  std::lock_guard<std::mutex> l(mu_);
  for (const auto& [values, child] : children_) f(values, *child);
}

template class Family<Counter>;
template class Family<Gauge>;
template class Family<Histogram>;

std::string EscapeLabelValue(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '"')
      out += "\\\"";
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out;
}

std::string EscapeHelp(std::string_view v) {
  std::string out;
  for (char c : v) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out;
}

std::string FormatValue(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof(buf), v);
  return std::string(buf, r.ptr);
}

Registry::Registry() = default;

namespace {

// [a-zA-Z_:][a-zA-Z0-9_:]* for metric names (colon allowed), [a-zA-Z_][a-zA-Z0-9_]* for labels.
bool ValidName(const std::string& s, bool colon) {
  if (s.empty()) return false;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (colon && c == ':');
    if (!alpha && !(i > 0 && c >= '0' && c <= '9')) return false;
  }
  return true;
}

}  // namespace

void Registry::CheckNew(const std::string& name, const std::vector<std::string>& labels, bool histogram) {
  if (!ValidName(name, true)) Fatal("invalid metric name '" + name + "'");
  for (const auto& l : labels) {
    if (!ValidName(l, false) || l.rfind("__", 0) == 0 || (histogram && l == "le"))
      Fatal("invalid label name '" + l + "' of " + name);
  }
  auto taken = [&](const auto& fams) {
    return std::any_of(fams.begin(), fams.end(), [&](const auto& f) { return f->name() == name; });
  };
  if (taken(counters_) || taken(gauges_) || taken(histograms_)) Fatal("duplicate metric name '" + name + "'");
}

Family<Counter>& Registry::AddCounter(const std::string& name, const std::string& help,
                                      std::vector<std::string> labels) {
  std::lock_guard<std::mutex> l(mu_);
  CheckNew(name, labels, false);
  if (name.size() < 6 || name.compare(name.size() - 6, 6, "_total") != 0)
    Fatal("counter '" + name + "' must end in _total");
  counters_.push_back(std::make_unique<Family<Counter>>(name, help, std::move(labels)));
  entries_.push_back({MetricType::kCounter, counters_.back().get()});
  return *counters_.back();
}

Family<Gauge>& Registry::AddGauge(const std::string& name, const std::string& help, std::vector<std::string> labels) {
  std::lock_guard<std::mutex> l(mu_);
  CheckNew(name, labels, false);
  gauges_.push_back(std::make_unique<Family<Gauge>>(name, help, std::move(labels)));
  entries_.push_back({MetricType::kGauge, gauges_.back().get()});
  return *gauges_.back();
}

Family<Histogram>& Registry::AddHistogram(const std::string& name, const std::string& help,
                                          std::vector<std::string> labels, std::vector<double> bounds) {
  std::lock_guard<std::mutex> l(mu_);
  CheckNew(name, labels, true);
  histograms_.push_back(std::make_unique<Family<Histogram>>(name, help, std::move(labels), std::move(bounds)));
  entries_.push_back({MetricType::kHistogram, histograms_.back().get()});
  return *histograms_.back();
}

void Registry::AddCollector(std::function<void()> collector) {
  std::lock_guard<std::mutex> l(mu_);
  collectors_.push_back(std::move(collector));
}

std::string Registry::Serialize() {
  std::vector<std::function<void()>> collectors;
  std::vector<Entry> entries;
  {
    std::lock_guard<std::mutex> l(mu_);
    collectors = collectors_;
    entries = entries_;
  }
  for (auto& c : collectors) c();
  std::string out;
  out.reserve(8192);
  auto header = [&](const std::string& name, const std::string& help, const char* type) {
    out += "# HELP " + name + " " + EscapeHelp(help) + "\n";
    out += "# TYPE " + name + " " + type + "\n";
  };
  for (const Entry& e : entries) {
    if (e.type == MetricType::kCounter) {
      auto* f = static_cast<Family<Counter>*>(e.family);
      header(f->name(), f->help(), "counter");
      f->ForEach([&](const std::vector<std::string>& values, const Counter& c) {
        out += f->name();
        AppendLabels(out, f->label_names(), values);
        out += ' ' + FormatValue(c.value()) + '\n';
      });
    } else if (e.type == MetricType::kGauge) {
      auto* f = static_cast<Family<Gauge>*>(e.family);
      header(f->name(), f->help(), "gauge");
      f->ForEach([&](const std::vector<std::string>& values, const Gauge& g) {
        out += f->name();
        AppendLabels(out, f->label_names(), values);
        out += ' ' + FormatValue(g.value()) + '\n';
      });
    } else {
      auto* f = static_cast<Family<Histogram>*>(e.family);
      header(f->name(), f->help(), "histogram");
      f->ForEach([&](const std::vector<std::string>& values, const Histogram& h) {
        const std::vector<uint64_t> cum = h.CumulativeCounts();
        for (size_t i = 0; i < cum.size(); ++i) {
          out += f->name() + "_bucket";
          AppendLabels(out, f->label_names(), values, "le",
                       i < h.bounds().size() ? FormatValue(h.bounds()[i]) : "+Inf");
          out += ' ' + std::to_string(cum[i]) + '\n';
        }
        out += f->name() + "_sum";
        AppendLabels(out, f->label_names(), values);
        out += ' ' + FormatValue(h.sum()) + '\n';
        out += f->name() + "_count";
        AppendLabels(out, f->label_names(), values);
        out += ' ' + std::to_string(cum.back()) + '\n';
      });
    }
  }
  return out;
}

}  // namespace kraken::metrics
