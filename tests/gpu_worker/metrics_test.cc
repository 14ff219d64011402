#include "gpu_worker/eval/metrics.h"
#include "tests/testing/temp_dir.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

namespace meft::worker {
namespace {

using Golds = std::vector<std::string>;

TEST(MetricsTest, NormalizeWhitespace) {
  EXPECT_EQ(NormalizeWhitespace("  a \t\n b\r\n\fc  "), "a b c");
  EXPECT_EQ(NormalizeWhitespace(""), "");
  EXPECT_EQ(NormalizeWhitespace(" \n "), "");
  EXPECT_EQ(AsciiLower("PaRiS Ä"), "paris Ä");
}

TEST(MetricsTest, NqSubstringIsCaseSensitiveAfterWhitespaceNormalisation) {
  EXPECT_EQ(NqSubstringMatch("The answer is Paris, France.", Golds{"Paris"}), 1.0);
  EXPECT_EQ(NqSubstringMatch("The answer is paris.", Golds{"Paris"}), 0.0);
  EXPECT_EQ(NqSubstringMatch("George\n  Washington was first", Golds{"George Washington"}), 1.0);
  EXPECT_EQ(NqSubstringMatch("George Washington", Golds{" George\tWashington "}), 1.0);
  EXPECT_EQ(NqSubstringMatch("Lyon", Golds{"Paris", "Lyon"}), 1.0);
  EXPECT_EQ(NqSubstringMatch("Par", Golds{"Paris"}), 0.0);
  EXPECT_EQ(NqSubstringMatch("anything", Golds{"", "  "}), 0.0);
  EXPECT_EQ(NqSubstringMatch("anything", Golds{}), 0.0);
  EXPECT_EQ(NqSubstringMatch("", Golds{"Paris"}), 0.0);
}

TEST(MetricsTest, SquadLowercaseSubstring) {
  EXPECT_EQ(SquadLowercaseSubstringMatch("The answer is PARIS.", Golds{"paris"}), 1.0);
  EXPECT_EQ(SquadLowercaseSubstringMatch("the eiffel\ntower", Golds{"Eiffel Tower"}), 1.0);
  EXPECT_EQ(SquadLowercaseSubstringMatch("Lyon", Golds{"Paris", "LYON"}), 1.0);
  EXPECT_EQ(SquadLowercaseSubstringMatch("Lyon", Golds{"Paris"}), 0.0);
  EXPECT_EQ(SquadLowercaseSubstringMatch("x", Golds{""}), 0.0);
}

TEST(MetricsTest, ExtractLastNumber) {
  EXPECT_EQ(ExtractLastNumber("She has 3 apples and 5 pears."), "5");
  EXPECT_EQ(ExtractLastNumber("It costs $1,234,567.00 in total"), "1234567");
  EXPECT_EQ(ExtractLastNumber("The answer is 3.50"), "3.5");
  EXPECT_EQ(ExtractLastNumber("answer: 42."), "42");
  EXPECT_EQ(ExtractLastNumber("x = -7"), "-7");
  EXPECT_EQ(ExtractLastNumber("from 5-3"), "3");
  EXPECT_EQ(ExtractLastNumber("-0.0"), "0");
  EXPECT_EQ(ExtractLastNumber("007"), "7");
  EXPECT_EQ(ExtractLastNumber("0.25"), "0.25");
  EXPECT_EQ(ExtractLastNumber("-1,000.50 dollars"), "-1000.5");
  EXPECT_EQ(ExtractLastNumber("values 3,4"), "4");
  EXPECT_EQ(ExtractLastNumber("1,23456"), "23456");
  EXPECT_EQ(ExtractLastNumber("12,345"), "12345");
  EXPECT_EQ(ExtractLastNumber("no number here"), std::nullopt);
  EXPECT_EQ(ExtractLastNumber(""), std::nullopt);
  EXPECT_EQ(ExtractLastNumber("- and ."), std::nullopt);
}

TEST(MetricsTest, Gsm8kFinalNumber) {
  const std::string gold = "She sold 48/2 = 24 clips in May.\n#### 72";
  EXPECT_EQ(Gsm8kGoldNumber(gold), "72");
  EXPECT_EQ(Gsm8kGoldNumber("The total is 1,000 and then 5"), "5");
  EXPECT_EQ(Gsm8kGoldNumber("#### 1,000"), "1000");
  EXPECT_EQ(Gsm8kGoldNumber("12 #### none"), std::nullopt);

  EXPECT_EQ(Gsm8kFinalNumberMatch("Natalia sold 48 + 24 = 72 clips.", Golds{gold}), 1.0);
  EXPECT_EQ(Gsm8kFinalNumberMatch("72 clips, 24 in May", Golds{gold}), 0.0);
  EXPECT_EQ(Gsm8kFinalNumberMatch("The answer is 3.50", Golds{"#### 3.5"}), 1.0);
  EXPECT_EQ(Gsm8kFinalNumberMatch("The answer is 3.5", Golds{"#### 3.50"}), 1.0);
  EXPECT_EQ(Gsm8kFinalNumberMatch("The answer is 3.05", Golds{"#### 3.5"}), 0.0);
  EXPECT_EQ(Gsm8kFinalNumberMatch("It is 1,000.", Golds{"#### 1000"}), 1.0);
  EXPECT_EQ(Gsm8kFinalNumberMatch("It is -5 degrees", Golds{"#### -5"}), 1.0);
  EXPECT_EQ(Gsm8kFinalNumberMatch("It is 5 degrees", Golds{"#### -5"}), 0.0);
  EXPECT_EQ(Gsm8kFinalNumberMatch("I do not know", Golds{"#### 7"}), 0.0);
  EXPECT_EQ(Gsm8kFinalNumberMatch("7", Golds{"no number"}), 0.0);
  EXPECT_EQ(Gsm8kFinalNumberMatch("7", Golds{"#### 8", "#### 7"}), 1.0);
}

TEST(MetricsTest, ApiSetParsingAndIoU) {
  using Set = std::set<std::string>;
  EXPECT_EQ(ParseApiSet("[\"search_flights\", \"book_hotel\", \"search_flights\"]"),
            (Set{"search_flights", "book_hotel"}));
  EXPECT_EQ(ParseApiSet(" search_flights ,book_hotel,, "), (Set{"search_flights", "book_hotel"}));
  EXPECT_EQ(ParseApiSet("['a', \"b\"]"), (Set{"a", "b"}));  // not JSON: comma fallback
  EXPECT_EQ(ParseApiSet("[1, \"b\"]"), (Set{"1", "b"}));
  EXPECT_EQ(ParseApiSet("[]"), Set{});
  EXPECT_EQ(ParseApiSet(""), Set{});
  EXPECT_EQ(ParseApiSet("  "), Set{});
  EXPECT_EQ(ParseApiSet("[\"a,b\"]"), Set{"a,b"});

  EXPECT_EQ(ApiSetIoU({}, {}), 1.0);
  EXPECT_EQ(ApiSetIoU({"a"}, {}), 0.0);
  EXPECT_EQ(ApiSetIoU({}, {"a"}), 0.0);
  EXPECT_EQ(ApiSetIoU({"a", "b"}, {"b", "c"}), 1.0 / 3.0);
  EXPECT_EQ(ApiSetIoU({"a", "b"}, {"b", "a"}), 1.0);
  EXPECT_EQ(ApiSetIoU({"A"}, {"a"}), 0.0);  // case-sensitive

  EXPECT_EQ(ToolBenchApiIoU("a, b", Golds{"[\"b\", \"c\"]"}), 1.0 / 3.0);
  EXPECT_EQ(ToolBenchApiIoU("", Golds{"[]"}), 1.0);
  EXPECT_EQ(ToolBenchApiIoU("a", Golds{"b", "a"}), 1.0);
  EXPECT_EQ(ToolBenchApiIoU("a", Golds{}), 0.0);
}

TEST(MetricsTest, MetricNamesAndScore) {
  for (Metric metric : {Metric::kNqSubstring, Metric::kSquadLowercaseSubstring,
                        Metric::kGsm8kFinalNumber, Metric::kToolBenchApiIoU}) {
    auto parsed = ParseMetric(MetricName(metric));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, metric);
  }
  auto bad = ParseMetric("bleu");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), ::testing::HasSubstr("\"bleu\""));
  EXPECT_EQ(Score(Metric::kSquadLowercaseSubstring, "PARIS", Golds{"paris"}), 1.0);
  EXPECT_EQ(Score(Metric::kNqSubstring, "PARIS", Golds{"paris"}), 0.0);
}

std::vector<std::string> ReadLines(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

TEST(MetricsTest, SummaryAndWriters) {
  const std::vector<Metric> metrics = {Metric::kNqSubstring, Metric::kSquadLowercaseSubstring};
  std::vector<PredictionRecord> records(3);
  records[0] = {"q0", "Capital of France?", "It is Paris.", {"Paris"}, {}};
  records[1] = {"q1", "Capital of Italy?", "rome", {"Rome"}, {}};
  records[2] = {"q2", "Broken \"bytes\"\n", "bad \xff byte", {"zz", "qq"}, {}};
  for (PredictionRecord& record : records) ScoreRecord(metrics, &record);
  EXPECT_EQ(records[0].scores.at("nq_substring_em"), 1.0);
  EXPECT_EQ(records[1].scores.at("nq_substring_em"), 0.0);
  EXPECT_EQ(records[1].scores.at("squad_lower_substring"), 1.0);

  const MetricsSummary summary = Summarize(records);
  EXPECT_EQ(summary.num_examples, 3);
  EXPECT_DOUBLE_EQ(summary.means.at("nq_substring_em"), 1.0 / 3.0);
  EXPECT_DOUBLE_EQ(summary.means.at("squad_lower_substring"), 2.0 / 3.0);
  EXPECT_EQ(summary.counts.at("nq_substring_em"), 3);
  const MetricsSummary empty = Summarize({});
  EXPECT_EQ(empty.num_examples, 0);
  EXPECT_TRUE(empty.means.empty());

  const testing::TempDir tmp("meft_metrics");
  const std::string dir = tmp.path();
  ASSERT_TRUE(WritePredictionsJsonl(dir + "/predictions.jsonl", records).ok());
  const std::vector<std::string> lines = ReadLines(dir + "/predictions.jsonl");
  ASSERT_EQ(lines.size(), 3u);
  for (size_t i = 0; i < lines.size(); ++i) {
    const nlohmann::json line = nlohmann::json::parse(lines[i]);
    EXPECT_EQ(line.at("id"), records[i].id);
    EXPECT_EQ(line.at("prompt"), records[i].prompt);
    EXPECT_EQ(line.at("references").get<std::vector<std::string>>(), records[i].references);
    for (const auto& [name, score] : records[i].scores) {
      EXPECT_EQ(line.at("scores").at(name).get<double>(), score);
    }
    if (i < 2) {
      EXPECT_EQ(line.at("prediction"), records[i].prediction);
    }
  }
  // Invalid UTF-8 became U+FFFD.
  EXPECT_EQ(nlohmann::json::parse(lines[2]).at("prediction"), "bad \xEF\xBF\xBD byte");
  // Keys in the documented order.
  EXPECT_EQ(lines[0].rfind("{\"id\":\"q0\",\"prompt\":", 0), 0u);

  ASSERT_TRUE(WriteMetricsJson(dir + "/metrics.json", summary, {{"model", "tiny"}}).ok());
  std::ifstream in(dir + "/metrics.json");
  const nlohmann::json root = nlohmann::json::parse(in);
  EXPECT_EQ(root.at("num_examples"), 3);
  EXPECT_EQ(root.at("model"), "tiny");
  EXPECT_DOUBLE_EQ(root.at("metrics").at("nq_substring_em").get<double>(), 1.0 / 3.0);
  EXPECT_DOUBLE_EQ(root.at("metrics").at("squad_lower_substring").get<double>(), 2.0 / 3.0);
  EXPECT_EQ(root.at("counts").at("squad_lower_substring"), 3);

  EXPECT_EQ(WriteMetricsJson(dir + "/m.json", summary, {{"metrics", "x"}}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(WritePredictionsJsonl(dir + "/no/such/dir/p.jsonl", records).ok());
}

}  // namespace
}  // namespace meft::worker
