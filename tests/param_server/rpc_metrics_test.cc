// The parameter server's Prometheus metrics after traffic through its gRPC face, checked for
// plausibility and by promtool (see rpc_test_util.h for the harness).

#include <gmock/gmock.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <random>
#include <sstream>
#include <string>

#include "tests/param_server/rpc_test_util.h"
#include "tests/testing/temp_dir.h"

namespace meft::rpc_test {
namespace {

using ::meft::testing::TempDir;
using ::testing::HasSubstr;

// ---------------------------------------------------------------------------------------------
// 9. Metrics.

// The value of the sample `series` (name plus rendered labels, e.g. `x_bucket{le="1"}`), or NaN.
double Sample(const std::string& text, const std::string& series) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(series, 0) == 0 && line.size() > series.size() &&
        (line[series.size()] == ' ' || line[series.size()] == '{')) {
      // Unlabelled series only match a space; labelled ones are looked up with their labels.
      if (line[series.size()] == '{') continue;
      return std::stod(line.substr(line.rfind(' ') + 1));
    }
  }
  return std::nan("");
}

TEST(RpcMetricsTest, ServerExportsPlausibleMetrics) {
  auto h = StartHarness(SmallOptions());
  ASSERT_NE(h, nullptr);
  std::mt19937 rng(21);
  double lookups = 0, rows_served = 0;
  int64_t rows_step = 0;
  for (uint32_t micro = 0; micro < 3; ++micro) {
    const Batch b = RandomBatch(&rng, 7, {1, 1, 1, 1, 1, 1, 0});
    v1::LookupResponse resp;
    ASSERT_RPC_OK(h->Lookup(MakeLookup(b, 0, micro, 0, true), &resp));
    const Decoded d = Decode(resp);
    lookups += 1;
    rows_served += static_cast<double>(d.rows.size());
    if (micro == 0) {  // a replay serves its rows again
      ASSERT_RPC_OK(h->Lookup(MakeLookup(b, 0, micro, 0, true), &resp));
      lookups += 1;
      rows_served += static_cast<double>(d.rows.size());
    }
    const Grads g = RandomGradsFor(d, b.tokens, true, &rng);
    v1::GradientsResponse gresp;
    ASSERT_RPC_OK(h->Gradients(MakeGradients(g, b.tokens, 0, micro, 0), &gresp));
    rows_step = static_cast<int64_t>(gresp.rows_accumulated());
  }
  {
    v1::LookupResponse resp;  // a rejected request counts bytes in, but serves nothing
    v1::LookupRequest bad = MakeLookup(RandomBatch(&rng, 2), 0, 9, 0, true);
    bad.mutable_x()->mutable_data()->pop_back();
    EXPECT_FALSE(h->Lookup(bad, &resp).ok());
  }
  v1::StepRequest step;
  step.set_step(0);
  step.set_lr(1e-3);
  step.set_clip_factor(1.0);
  v1::StepResponse sresp;
  ASSERT_RPC_OK(h->Step(step, &sresp));
  EXPECT_EQ(sresp.rows_updated(), static_cast<uint64_t>(rows_step));
  v1::ServerInfoResponse info;
  ASSERT_RPC_OK(h->Info(&info));

  const std::string text = h->registry.SerializeText();
  SCOPED_TRACE(text);
  EXPECT_EQ(Sample(text, "meft_ps_lookup_seconds_count"), lookups);
  EXPECT_EQ(Sample(text, "meft_ps_rows_served_total"), rows_served);
  EXPECT_EQ(Sample(text, "meft_ps_unique_rows_per_lookup_count"), lookups);
  EXPECT_EQ(Sample(text, "meft_ps_unique_rows_per_lookup_sum"), rows_served);
  EXPECT_EQ(Sample(text, "meft_ps_bytes_received_total"), h->request_bytes);
  EXPECT_EQ(Sample(text, "meft_ps_bytes_sent_total"), h->response_bytes);
  EXPECT_GT(h->response_bytes, rows_served * kDim * 4 * 2) << "keys and values were sent as fp32";
  EXPECT_EQ(Sample(text, "meft_ps_optimizer_step_seconds_count"), 1.0);
  EXPECT_EQ(Sample(text, "meft_ps_rows_updated_total"), static_cast<double>(rows_step));
  const double imbalance = Sample(text, "meft_ps_expert_load_imbalance");
  EXPECT_GE(imbalance, 1.0);
  EXPECT_LE(imbalance, static_cast<double>(kExperts) / kProbe);  // all tokens on n_probe experts
  EXPECT_EQ(Sample(text, "meft_ps_optimizer_step"), 1.0);
  EXPECT_THAT(text, HasSubstr("# TYPE meft_ps_lookup_seconds histogram"));
  EXPECT_THAT(text, HasSubstr("# TYPE meft_ps_rows_served_total counter"));
  EXPECT_THAT(text, HasSubstr("# TYPE meft_ps_expert_load_imbalance gauge"));
  EXPECT_THAT(text, HasSubstr("meft_ps_lookup_seconds_bucket{le=\"+Inf\"} " +
                              std::to_string(static_cast<int>(lookups))));

  TempDir tmp;
  const std::string metrics_file = tmp.path() + "/metrics.txt";
  const std::string out_file = tmp.path() + "/promtool.out";
  {
    std::ofstream out(metrics_file);
    out << text;
  }
  const std::string cmd =
      "/usr/bin/promtool check metrics < " + metrics_file + " > " + out_file + " 2>&1";
  const int rc = std::system(cmd.c_str());
  std::ifstream promtool_out(out_file);
  const std::string promtool_text((std::istreambuf_iterator<char>(promtool_out)),
                                  std::istreambuf_iterator<char>());
  ASSERT_NE(rc, -1);
  EXPECT_TRUE(WIFEXITED(rc) && WEXITSTATUS(rc) == 0) << "promtool check metrics failed:\n"
                                                     << promtool_text;
}

}  // namespace
}  // namespace meft::rpc_test
