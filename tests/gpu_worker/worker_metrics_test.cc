// The worker's metrics: the metered client forwards calls unchanged and counts bytes exactly;
// WorkerMetrics' series equal the values computed here from the recorded steps; and a real
// training run (make-facts model, parallel adapter) exports exactly what the trainer reported.

#include "gpu_worker/metrics/worker_metrics.h"

#include <torch/torch.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gpu_worker/app/worker_config.h"
#include "gpu_worker/data/dataset.h"
#include "gpu_worker/facts/make_facts.h"
#include "gtest/gtest.h"

namespace meft::worker {
namespace {

// Samples of the text exposition format: "name{labels}" (as written) -> value.
std::map<std::string, double> Samples(const std::string& text) {
  std::map<std::string, double> out;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.empty() || line[0] == '#') continue;
    const size_t space = line.rfind(' ');
    out[line.substr(0, space)] = std::strtod(line.c_str() + space + 1, nullptr);
  }
  return out;
}

double Sample(const metrics::Registry& registry, const std::string& series) {
  const auto samples = Samples(registry.SerializeText());
  auto it = samples.find(series);
  EXPECT_NE(it, samples.end()) << series << " missing in\n" << registry.SerializeText();
  return it == samples.end() ? -1 : it->second;
}

// Records the tensors it was given; answers lookups with fixed tensors, or `failure`.
class FakeClient : public ParamClient {
 public:
  absl::StatusOr<LookupReply> Lookup(const RequestHeader&, const torch::Tensor& x,
                                      const torch::Tensor& mask, bool) override {
    seen_x = x;
    seen_mask = mask;
    if (!failure.ok()) return failure;
    return answer;
  }
  absl::Status Gradients(const RequestHeader&, const torch::Tensor& k, const torch::Tensor& v,
                         const torch::Tensor& g) override {
    seen_k = k;
    seen_v = v;
    seen_g = g;
    return failure;
  }
  absl::StatusOr<double> GradNorm(uint64_t) override { return 2.5; }
  absl::Status Step(uint64_t, double, double) override { return failure; }
  absl::StatusOr<std::string> SaveCheckpoint(const std::string& d) override { return d; }
  absl::Status RestoreCheckpoint(const std::string&) override { return failure; }
  absl::StatusOr<ServerInfo> Describe() override { return ServerInfo{.dim = 7}; }

  LookupReply answer;
  absl::Status failure;
  torch::Tensor seen_x, seen_mask, seen_k, seen_v, seen_g;
};

TEST(MeteredParamClientTest, ForwardsCallsAndCountsPayloadBytes) {
  auto fake_owner = std::make_unique<FakeClient>();
  FakeClient* fake = fake_owner.get();
  fake->answer.row_ids = torch::arange(5, torch::kInt64);         // 40 bytes
  fake->answer.keys = torch::zeros({5, 8}, torch::kBFloat16);     // 80
  fake->answer.values = torch::zeros({5, 8}, torch::kBFloat16);   // 80
  fake->answer.token_rows = torch::zeros({3, 2}, torch::kInt64);  // 48
  fake->answer.token_gates = torch::zeros({3, 2});                // 24
  ClientMeter meter;
  MeteredParamClient client(std::move(fake_owner), &meter);

  const torch::Tensor x = torch::randn({3, 8});               // 96 bytes
  const torch::Tensor mask = torch::ones({3}, torch::kBool);  // 3
  absl::StatusOr<LookupReply> got = client.Lookup({1, 0, 2}, x, mask, true);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(torch::equal(fake->seen_x, x));
  EXPECT_TRUE(torch::equal(fake->seen_mask, mask));
  EXPECT_TRUE(torch::equal(got->keys, fake->answer.keys));
  EXPECT_EQ(meter.bytes_sent.load(), 96 + 3);
  EXPECT_EQ(meter.bytes_received.load(), 40 + 80 + 80 + 48 + 24);

  const torch::Tensor k = torch::randn({5, 8}), v = torch::randn({5, 8});  // 160 + 160
  ASSERT_TRUE(client.Gradients({1, 0, 2}, k, v, torch::Tensor()).ok());
  EXPECT_TRUE(torch::equal(fake->seen_k, k));
  EXPECT_TRUE(torch::equal(fake->seen_v, v));
  EXPECT_FALSE(fake->seen_g.defined());
  EXPECT_EQ(meter.bytes_sent.load(), 96 + 3 + 320);
  EXPECT_EQ(*client.GradNorm(1), 2.5);
  EXPECT_EQ(client.Describe()->dim, 7);
  EXPECT_EQ(meter.calls.load(), 4);

  // Errors pass through unchanged; a failed lookup received nothing.
  fake->failure = absl::UnavailableError("server gone");
  EXPECT_EQ(client.Lookup({1, 0, 2}, x, mask, true).status(), fake->failure);
  EXPECT_EQ(client.Step(1, 0.1, 1.0), fake->failure);
  EXPECT_EQ(meter.bytes_received.load(), 40 + 80 + 80 + 48 + 24);
  EXPECT_EQ(meter.calls.load(), 6);
  EXPECT_GE(meter.wait_nanos.load(), 0);
  EXPECT_EQ(meter.transfer_nanos.load(), 0);  // CPU tensors are not staged
}

TEST(MeterReaderTest, ReturnsDifferencesSinceTheLastTake) {
  ClientMeter meter;
  meter.bytes_sent = 10;
  MeterReader reader(&meter);  // Starts from what is there.
  meter.bytes_sent += 5;
  meter.bytes_received += 7;
  meter.wait_nanos += 1500000000;
  meter.transfer_nanos += 250000000;
  ServerTimings first = reader.Take();
  EXPECT_EQ(first.bytes_sent, 5);
  EXPECT_EQ(first.bytes_received, 7);
  EXPECT_DOUBLE_EQ(first.wait_seconds, 1.5);
  EXPECT_DOUBLE_EQ(first.transfer_seconds, 0.25);
  meter.bytes_sent += 1;
  ServerTimings second = reader.Take();
  EXPECT_EQ(second.bytes_sent, 1);
  EXPECT_EQ(second.bytes_received, 0);
  EXPECT_DOUBLE_EQ(second.wait_seconds, 0.0);
}

TEST(WorkerMetricsTest, SeriesEqualTheRecordedSteps) {
  metrics::Registry registry;
  WorkerMetrics m(&registry, torch::kCPU);
  std::mt19937 rng(3);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  double tokens = 0, compute = 0, wait = 0, transfer = 0, sent = 0, received = 0;
  StepStats last;
  ServerTimings last_server;
  const int n = 20;
  for (int i = 0; i < n; ++i) {
    StepStats s{.step = 100 + i,
                .loss = 5 * u(rng),
                .grad_norm = u(rng),
                .lr = 1e-3 * u(rng),
                .tokens = static_cast<int64_t>(1 + 1000 * u(rng)),
                .seconds = 0.01 + u(rng)};
    // Sometimes the server time exceeds the step (measured with another clock): compute is 0.
    ServerTimings t{.wait_seconds = 1.2 * u(rng),
                    .transfer_seconds = 0.1 * u(rng),
                    .bytes_sent = static_cast<int64_t>(1e6 * u(rng)),
                    .bytes_received = static_cast<int64_t>(1e6 * u(rng))};
    m.RecordStep(s, t);
    tokens += static_cast<double>(s.tokens);
    compute += std::max(0.0, s.seconds - t.wait_seconds - t.transfer_seconds);
    wait += t.wait_seconds;
    transfer += t.transfer_seconds;
    sent += static_cast<double>(t.bytes_sent);
    received += static_cast<double>(t.bytes_received);
    last = s;
    last_server = t;
  }
  auto near = [](double want) { return ::testing::DoubleNear(want, 1e-9 * (1 + std::abs(want))); };
  EXPECT_THAT(Sample(registry, "meft_worker_steps_total"), near(n));
  EXPECT_THAT(Sample(registry, "meft_worker_step"), near(static_cast<double>(last.step)));
  EXPECT_THAT(Sample(registry, "meft_worker_tokens_total"), near(tokens));
  EXPECT_THAT(Sample(registry, "meft_worker_loss"), near(last.loss));
  EXPECT_THAT(Sample(registry, "meft_worker_grad_norm"), near(last.grad_norm));
  EXPECT_THAT(Sample(registry, "meft_worker_learning_rate"), near(last.lr));
  EXPECT_THAT(Sample(registry, "meft_worker_tokens_per_second"),
              near(static_cast<double>(last.tokens) / last.seconds));
  EXPECT_THAT(Sample(registry, "meft_worker_step_phase_seconds_total{phase=\"compute\"}"),
              near(compute));
  EXPECT_THAT(Sample(registry, "meft_worker_step_phase_seconds_total{phase=\"wait\"}"), near(wait));
  EXPECT_THAT(Sample(registry, "meft_worker_step_phase_seconds_total{phase=\"transfer\"}"),
              near(transfer));
  EXPECT_THAT(Sample(registry, "meft_worker_bytes_total{direction=\"sent\"}"), near(sent));
  EXPECT_THAT(Sample(registry, "meft_worker_bytes_total{direction=\"received\"}"), near(received));
  EXPECT_THAT(Sample(registry, "meft_worker_step_seconds_count"), near(n));
  EXPECT_THAT(Sample(registry, "meft_worker_gpu_memory_bytes{kind=\"allocated\"}"), near(0));
  EXPECT_THAT(Sample(registry, "meft_worker_gpu_memory_bytes{kind=\"peak\"}"), near(0));
  EXPECT_THAT(registry.registration_errors(), ::testing::IsEmpty());
}

// A real run: the make-facts tiny model with the parallel adapter (no server), the trainer's
// after_step feeding WorkerMetrics as meft-worker does.
TEST(WorkerMetricsTest, TrainingRunExportsWhatTheTrainerReported) {
  const std::string dir = ::testing::TempDir() + "/worker_metrics_" + std::to_string(::getpid());
  FactsOptions facts;
  facts.output_dir = dir;
  facts.num_entities = 8;
  facts.tokenizer_vocab_size = 320;
  ASSERT_TRUE(MakeFacts(facts).ok());
  WorkerConfig c;
  c.model_dir = dir + "/model";
  c.train_file = dir + "/train.jsonl";
  c.device = "cpu";
  c.adapter = "parallel";
  c.parallel_rows = 16;
  c.max_steps = 4;
  c.micro_batch_size = 4;
  c.template_without_input = "{instruction}";
  c.output_dir = "";
  auto s = OpenSession(c);
  ASSERT_TRUE(s.ok()) << s.status();
  auto examples = LoadJsonl(c.train_file);
  ASSERT_TRUE(examples.ok()) << examples.status();
  auto tokenized =
      TokenizeExamples(*examples, (*s)->formatter, *(*s)->tokenizer, {.max_length = c.max_length});
  ASSERT_TRUE(tokenized.ok()) << tokenized.status();
  auto loader = DataLoader::Create(std::move(tokenized->examples), (*s)->tokenizer->pad_id(),
                                   {.micro_batch_size = c.micro_batch_size, .seed = 1});
  ASSERT_TRUE(loader.ok()) << loader.status();
  TrainerOptions options = MakeTrainerOptions(c);
  options.progress = false;
  auto trainer = Trainer::Create((*s)->model.get(), (*s)->target, loader->get(), options);
  ASSERT_TRUE(trainer.ok()) << trainer.status();

  metrics::Registry registry;
  WorkerMetrics m(&registry, (*s)->model->device());
  MeterReader meter(&(*s)->client_meter);
  auto history = (*trainer)->Run([&](const StepStats& stats) {
    m.RecordStep(stats, meter.Take());
    return absl::OkStatus();
  });
  ASSERT_TRUE(history.ok()) << history.status();
  ASSERT_EQ(history->size(), 4u);
  double tokens = 0, seconds = 0;
  for (const StepStats& h : *history) {
    tokens += static_cast<double>(h.tokens);
    seconds += h.seconds;
  }
  EXPECT_GT(tokens, 0);
  EXPECT_DOUBLE_EQ(Sample(registry, "meft_worker_loss"), history->back().loss);
  EXPECT_DOUBLE_EQ(Sample(registry, "meft_worker_tokens_total"), tokens);
  EXPECT_DOUBLE_EQ(Sample(registry, "meft_worker_steps_total"), 4);
  EXPECT_DOUBLE_EQ(Sample(registry, "meft_worker_step"), 4);
  // No server: all of every step is compute, nothing was sent.
  EXPECT_NEAR(Sample(registry, "meft_worker_step_phase_seconds_total{phase=\"compute\"}"), seconds,
              1e-9 * seconds);
  EXPECT_DOUBLE_EQ(Sample(registry, "meft_worker_step_phase_seconds_total{phase=\"wait\"}"), 0);
  EXPECT_DOUBLE_EQ(Sample(registry, "meft_worker_bytes_total{direction=\"sent\"}"), 0);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace meft::worker
