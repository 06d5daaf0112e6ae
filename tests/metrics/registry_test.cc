// The registry's text exposition, exactly; recording rules (counters only go up, bad values are
// skipped, "le" is inclusive); the HTTP endpoint.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "metrics/registry.h"

namespace kraken::metrics {
namespace {

TEST(Registry, SerializesTheTextFormatExactly) {
  Registry reg;
  auto& req = reg.AddCounter("demo_requests_total", "Requests.\nSecond line with a \\ backslash.", {"code"});
  req.With({"ok"}).Inc(3);
  req.With({"a\"b\\c\nd"}).Inc();
  reg.AddGauge("demo_temperature", "A gauge.", {}).With({}).Set(-1.5);
  auto& h = reg.AddHistogram("demo_latency_seconds", "A histogram.", {"rank"}, {0.1, 1, 2.5}).With({"0"});
  for (double v : {0.05, 0.1, 0.7, 3.0}) h.Observe(v);
  const std::string want =
      "# HELP demo_requests_total Requests.\\nSecond line with a \\\\ backslash.\n"
      "# TYPE demo_requests_total counter\n"
      "demo_requests_total{code=\"a\\\"b\\\\c\\nd\"} 1\n"
      "demo_requests_total{code=\"ok\"} 3\n"
      "# HELP demo_temperature A gauge.\n"
      "# TYPE demo_temperature gauge\n"
      "demo_temperature -1.5\n"
      "# HELP demo_latency_seconds A histogram.\n"
      "# TYPE demo_latency_seconds histogram\n"
      "demo_latency_seconds_bucket{rank=\"0\",le=\"0.1\"} 2\n"
      "demo_latency_seconds_bucket{rank=\"0\",le=\"1\"} 3\n"
      "demo_latency_seconds_bucket{rank=\"0\",le=\"2.5\"} 3\n"
      "demo_latency_seconds_bucket{rank=\"0\",le=\"+Inf\"} 4\n"
      "demo_latency_seconds_sum{rank=\"0\"} 3.85\n"
      "demo_latency_seconds_count{rank=\"0\"} 4\n";
  EXPECT_EQ(reg.Serialize(), want);
}

TEST(Registry, RecordingNeverFailsAndCountersNeverGoDown) {
  Registry reg;
  Counter& c = reg.AddCounter("c_total", "c", {}).With({});
  const uint64_t errors = MetricsErrors();
  c.Inc(2);
  c.Inc(-1);
  c.Inc(std::nan(""));
  c.Inc(std::numeric_limits<double>::infinity());
  EXPECT_EQ(c.value(), 2);
  c.SetTotal(5);
  c.SetTotal(4);  // lower: ignored
  EXPECT_EQ(c.value(), 5);
  Histogram& h = reg.AddHistogram("h", "h", {}, {1}).With({});
  h.Observe(std::nan(""));
  EXPECT_EQ(h.count(), 0u);
  EXPECT_EQ(MetricsErrors() - errors, 4u);
}

TEST(Registry, FormatsValuesShortestRoundTrip) {
  EXPECT_EQ(FormatValue(0.001), "0.001");
  EXPECT_EQ(FormatValue(2560), "2560");
  EXPECT_EQ(FormatValue(1e-9), "1e-09");
  EXPECT_EQ(FormatValue(std::numeric_limits<double>::infinity()), "+Inf");
  EXPECT_EQ(FormatValue(std::nan("")), "NaN");
}

TEST(Registry, CollectorsRunBeforeEachScrape) {
  Registry reg;
  Gauge& g = reg.AddGauge("g", "g", {}).With({});
  int runs = 0;
  reg.AddCollector([&] { g.Set(++runs); });
  EXPECT_NE(reg.Serialize().find("\ng 1\n"), std::string::npos);
  EXPECT_NE(reg.Serialize().find("\ng 2\n"), std::string::npos);
}

}  // namespace
}  // namespace kraken::metrics
