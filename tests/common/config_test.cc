#include "common/config/config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

namespace meft::config {
namespace {

using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

// One field of every supported type.
struct SampleOptions {
  bool verbose = false;
  int32_t retries = 3;
  uint32_t threads = 4;
  int64_t offset = -7;
  uint64_t max_bytes = 1 << 20;
  double beta1 = 0.9;
  double lr = 1e-3;
  std::string name = "run";
  std::string mode = "adam";
  std::vector<uint32_t> gpus = {0, 1};
};

void Register(FieldSet& fields, SampleOptions& o) {
  fields.Add("verbose", &o.verbose, "Log more.");
  fields.Add("retries", &o.retries, "Retries per request.");
  fields.Add("server.threads", &o.threads, "Worker threads.");
  fields.Add("server.offset", &o.offset, "Offset in rows.");
  fields.Add("server.max_bytes", &o.max_bytes, "Largest message in bytes.");
  fields.Add("optimizer.beta1", &o.beta1, "Adam first-moment decay.");
  fields.SetRange("optimizer.beta1", 0.0, 1.0);
  fields.Add("optimizer.lr", &o.lr, "Learning rate.");
  fields.Add("name", &o.name, "Run name.");
  fields.AddChoice("optimizer.mode", &o.mode, {"sgd", "adam"}, "Update rule.");
  fields.Add("gpus", &o.gpus, "CUDA device ordinals.");
}

class ConfigTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Register(fields_, options_);
    ASSERT_TRUE(fields_.registration_status().ok()) << fields_.registration_status();
  }

  // Loads `yaml` as "run.yaml" and returns the status.
  absl::Status Load(const std::string& yaml) { return fields_.LoadYamlString(yaml, "run.yaml"); }

  // Binds a fresh CLI::App, parses `args` (without argv[0]) and applies the flags.
  absl::Status ParseFlags(std::vector<std::string> args) {
    app_ = std::make_unique<CLI::App>("test");
    fields_.BindCli(*app_);
    std::vector<const char*> argv = {"prog"};
    for (const std::string& a : args) argv.push_back(a.c_str());
    try {
      app_->parse(static_cast<int>(argv.size()), argv.data());
    } catch (const CLI::ParseError& e) {
      ADD_FAILURE() << "CLI11 parse failed: " << e.what();
      return absl::InternalError(e.what());
    }
    return fields_.ApplyCli();
  }

  SampleOptions options_;
  FieldSet fields_;
  std::unique_ptr<CLI::App> app_;
};

// Asserts an INVALID_ARGUMENT whose message names run.yaml, `line` and `key`.
void ExpectYamlError(const absl::Status& status, int line, const std::string& key) {
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_THAT(std::string(status.message()),
              AllOf(HasSubstr("run.yaml:" + std::to_string(line) + ":"), HasSubstr(key)))
      << status;
}

TEST_F(ConfigTest, EmptyYamlKeepsDefaults) {
  ASSERT_TRUE(Load("").ok());
  ASSERT_TRUE(Load("# only a comment\n").ok());
  ASSERT_TRUE(Load("---\n").ok());
  SampleOptions defaults;
  EXPECT_EQ(options_.verbose, defaults.verbose);
  EXPECT_EQ(options_.retries, defaults.retries);
  EXPECT_EQ(options_.threads, defaults.threads);
  EXPECT_EQ(options_.offset, defaults.offset);
  EXPECT_EQ(options_.max_bytes, defaults.max_bytes);
  EXPECT_EQ(options_.beta1, defaults.beta1);
  EXPECT_EQ(options_.name, defaults.name);
  EXPECT_EQ(options_.mode, defaults.mode);
  EXPECT_EQ(options_.gpus, defaults.gpus);
}

TEST_F(ConfigTest, NestedYamlSetsEveryType) {
  absl::Status status = Load(R"(
verbose: true
retries: -2
server:
  threads: 16
  offset: -9000000000
  max_bytes: 18446744073709551615
optimizer:
  beta1: 0.95
  lr: 3e-4
  mode: sgd
name: "my run"
gpus: [2, 3, 5]
)");
  ASSERT_TRUE(status.ok()) << status;
  EXPECT_TRUE(options_.verbose);
  EXPECT_EQ(options_.retries, -2);
  EXPECT_EQ(options_.threads, 16u);
  EXPECT_EQ(options_.offset, -9000000000LL);
  EXPECT_EQ(options_.max_bytes, std::numeric_limits<uint64_t>::max());
  EXPECT_DOUBLE_EQ(options_.beta1, 0.95);
  EXPECT_DOUBLE_EQ(options_.lr, 3e-4);
  EXPECT_EQ(options_.mode, "sgd");
  EXPECT_EQ(options_.name, "my run");
  EXPECT_THAT(options_.gpus, ElementsAre(2, 3, 5));
}

TEST_F(ConfigTest, FieldsNotMentionedKeepTheirValue) {
  ASSERT_TRUE(Load("optimizer:\n  lr: 0.5\n").ok());
  EXPECT_DOUBLE_EQ(options_.lr, 0.5);
  EXPECT_DOUBLE_EQ(options_.beta1, 0.9);
  EXPECT_EQ(options_.threads, 4u);
}

TEST_F(ConfigTest, RangeStringAndDottedKeys) {
  ASSERT_TRUE(Load("gpus: \"0-3,5\"\noptimizer.lr: 2\n").ok());
  EXPECT_THAT(options_.gpus, ElementsAre(0, 1, 2, 3, 5));
  EXPECT_DOUBLE_EQ(options_.lr, 2.0);
  ASSERT_TRUE(Load("gpus: 7\n").ok());
  EXPECT_THAT(options_.gpus, ElementsAre(7));
  ASSERT_TRUE(Load("gpus: []\n").ok());
  EXPECT_THAT(options_.gpus, IsEmpty());
  ASSERT_TRUE(Load("gpus: \"\"\n").ok());
  EXPECT_THAT(options_.gpus, IsEmpty());
}

TEST_F(ConfigTest, EmptyGroupIsAccepted) { EXPECT_TRUE(Load("optimizer:\n  # lr: 1\n").ok()); }

TEST_F(ConfigTest, FlagsOverrideYaml) {
  ASSERT_TRUE(Load("optimizer:\n  beta1: 0.5\n  lr: 0.25\nserver:\n  threads: 8\n").ok());
  absl::Status status =
      ParseFlags({"--optimizer-beta1", "0.7", "--server-max-bytes=123", "--verbose", "--gpus",
                  "1-2", "--name", "from flag", "--optimizer-mode=sgd", "--server-offset", "-5",
                  "--retries", "1", "--retries", "9"});
  ASSERT_TRUE(status.ok()) << status;
  EXPECT_DOUBLE_EQ(options_.beta1, 0.7);  // flag beats YAML
  EXPECT_DOUBLE_EQ(options_.lr, 0.25);    // YAML beats default
  EXPECT_EQ(options_.threads, 8u);        // YAML beats default
  EXPECT_EQ(options_.max_bytes, 123u);
  EXPECT_TRUE(options_.verbose);
  EXPECT_THAT(options_.gpus, ElementsAre(1, 2));
  EXPECT_EQ(options_.name, "from flag");
  EXPECT_EQ(options_.mode, "sgd");
  EXPECT_EQ(options_.offset, -5);
  EXPECT_EQ(options_.retries, 9);  // last occurrence wins
}

TEST_F(ConfigTest, BoolFlagTakesExplicitValue) {
  options_.verbose = true;
  ASSERT_TRUE(ParseFlags({"--verbose=false"}).ok());
  EXPECT_FALSE(options_.verbose);
  ASSERT_TRUE(ParseFlags({"--verbose", "true"}).ok());
  EXPECT_TRUE(options_.verbose);
}

TEST_F(ConfigTest, NoFlagsChangeNothing) {
  ASSERT_TRUE(ParseFlags({}).ok());
  EXPECT_DOUBLE_EQ(options_.beta1, 0.9);
  EXPECT_FALSE(options_.verbose);
}

TEST_F(ConfigTest, ApplyCliWithoutBindIsNoop) { EXPECT_TRUE(fields_.ApplyCli().ok()); }

TEST_F(ConfigTest, FlagErrorsNameTheFlag) {
  struct Case {
    std::vector<std::string> args;
    std::string expected;
  };
  const Case cases[] = {
      {{"--optimizer-beta1=abc"}, "--optimizer-beta1: expected a number, got \"abc\""},
      {{"--optimizer-beta1=1.5"}, "--optimizer-beta1: 1.5 is out of range [0, 1]"},
      {{"--server-threads=-1"}, "--server-threads: expected a non-negative integer"},
      {{"--retries=3000000000"}, "--retries: \"3000000000\" is out of range for int32"},
      {{"--verbose=yes"}, "--verbose: expected true or false, got \"yes\""},
      {{"--optimizer-mode=rmsprop"}, "--optimizer-mode: \"rmsprop\" is not one of"},
      {{"--gpus=3-1"}, "--gpus: bad range \"3-1\""},
  };
  for (const Case& c : cases) {
    SampleOptions before = options_;
    absl::Status status = ParseFlags(c.args);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.args[0];
    EXPECT_THAT(std::string(status.message()), HasSubstr(c.expected));
    EXPECT_DOUBLE_EQ(options_.beta1, before.beta1);
  }
}

TEST_F(ConfigTest, FailedFlagsChangeNothing) {
  absl::Status status = ParseFlags({"--optimizer-lr=5", "--server-threads=x"});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_DOUBLE_EQ(options_.lr, 1e-3);
}

TEST_F(ConfigTest, UnknownKeyNamesLineAndSuggests) {
  absl::Status status = Load("verbose: true\n\noptimiser:\n  beta1: 0.5\n");
  ExpectYamlError(status, 3, "optimiser");
  EXPECT_THAT(std::string(status.message()),
              HasSubstr("run.yaml:3: unknown key \"optimiser\" (did you mean \"optimizer\"?)"));
  EXPECT_FALSE(options_.verbose);  // all-or-nothing

  status = Load("optimizer:\n  beta1: 0.5\n  betaa: 1\n");
  ExpectYamlError(status, 3, "optimizer.betaa");
  EXPECT_THAT(std::string(status.message()), HasSubstr("did you mean \"optimizer.beta1\""));
  EXPECT_DOUBLE_EQ(options_.beta1, 0.9);

  ExpectYamlError(Load("zzz_totally_else: 1\n"), 1, "zzz_totally_else");
}

TEST_F(ConfigTest, WrongTypeNamesLineAndKey) {
  absl::Status status = Load("name: x\noptimizer:\n  lr: 0.1\n  beta1: abc\n");
  ExpectYamlError(status, 4, "optimizer.beta1");
  EXPECT_THAT(std::string(status.message()),
              HasSubstr("run.yaml:4: optimizer.beta1: expected a number, got \"abc\""));
  EXPECT_DOUBLE_EQ(options_.lr, 1e-3);  // all-or-nothing
  EXPECT_EQ(options_.name, "run");

  ExpectYamlError(Load("server:\n  threads: [1, 2]\n"), 2, "server.threads");
  ExpectYamlError(Load("\nname: {a: 1}\n"), 2, "name");
  ExpectYamlError(Load("verbose: yes\n"), 1, "verbose");
  ExpectYamlError(Load("verbose: 1\n"), 1, "verbose");
  ExpectYamlError(Load("retries: 1.5\n"), 1, "retries");
  ExpectYamlError(Load("name: ~\n"), 1, "name");
  ExpectYamlError(Load("optimizer: 3\n"), 1, "optimizer");
  ExpectYamlError(Load("gpus: [0, x]\n"), 1, "gpus");
  ExpectYamlError(Load("gpus:\n  - 0\n  - [1]\n"), 3, "gpus");
}

TEST_F(ConfigTest, OutOfRange) {
  absl::Status status = Load("optimizer:\n  beta1: 1.5\n");
  ExpectYamlError(status, 2, "optimizer.beta1");
  EXPECT_THAT(std::string(status.message()), HasSubstr("out of range [0, 1]"));
  ExpectYamlError(Load("optimizer:\n  beta1: -0.1\n"), 2, "optimizer.beta1");
  EXPECT_TRUE(Load("optimizer:\n  beta1: 1\n").ok());
}

TEST_F(ConfigTest, NegativeIntoUnsigned) {
  absl::Status status = Load("server:\n  threads: -1\n");
  ExpectYamlError(status, 2, "server.threads");
  EXPECT_THAT(std::string(status.message()), HasSubstr("non-negative"));
  ExpectYamlError(Load("server:\n  max_bytes: -18446744073709551615\n"), 2, "server.max_bytes");
  ExpectYamlError(Load("gpus: [1, -2]\n"), 1, "gpus");
  ExpectYamlError(Load("gpus: \"-1\"\n"), 1, "gpus");
}

TEST_F(ConfigTest, IntegerOverflow) {
  ExpectYamlError(Load("retries: 2147483648\n"), 1, "retries");
  ExpectYamlError(Load("retries: -2147483649\n"), 1, "retries");
  ExpectYamlError(Load("server:\n  threads: 4294967296\n"), 2, "server.threads");
  ExpectYamlError(Load("server:\n  offset: 9223372036854775808\n"), 2, "server.offset");
  absl::Status status = Load("server:\n  max_bytes: 18446744073709551616\n");
  ExpectYamlError(status, 2, "server.max_bytes");
  EXPECT_THAT(std::string(status.message()), HasSubstr("out of range for uint64"));
  EXPECT_TRUE(Load("retries: 2147483647\n").ok());
  EXPECT_EQ(options_.retries, 2147483647);
  EXPECT_TRUE(Load("retries: -2147483648\n").ok());
  EXPECT_EQ(options_.retries, std::numeric_limits<int32_t>::min());
}

TEST_F(ConfigTest, NonFiniteDoublesRejected) {
  ExpectYamlError(Load("optimizer:\n  lr: .inf\n"), 2, "optimizer.lr");
  ExpectYamlError(Load("optimizer:\n  lr: inf\n"), 2, "optimizer.lr");
  ExpectYamlError(Load("optimizer:\n  lr: nan\n"), 2, "optimizer.lr");
  ExpectYamlError(Load("optimizer:\n  lr: 1e999\n"), 2, "optimizer.lr");
}

TEST_F(ConfigTest, BadRangeString) {
  absl::Status status = Load("name: a\ngpus: \"3-1\"\n");
  ExpectYamlError(status, 2, "gpus");
  EXPECT_THAT(std::string(status.message()), HasSubstr("bad range \"3-1\""));
  ExpectYamlError(Load("gpus: \"1,,2\"\n"), 1, "gpus");
  ExpectYamlError(Load("gpus: \"1-x\"\n"), 1, "gpus");
  ExpectYamlError(Load("gpus: \"0-2,1\"\n"), 1, "gpus");         // duplicate
  ExpectYamlError(Load("gpus: \"0-4294967295\"\n"), 1, "gpus");  // absurdly large
}

TEST_F(ConfigTest, BadChoice) {
  absl::Status status = Load("optimizer:\n  mode: rmsprop\n");
  ExpectYamlError(status, 2, "optimizer.mode");
  EXPECT_THAT(std::string(status.message()), HasSubstr("{\"sgd\", \"adam\"}"));
}

TEST_F(ConfigTest, DuplicateKeyRejected) {
  ExpectYamlError(Load("retries: 1\nretries: 2\n"), 2, "retries");
  ExpectYamlError(Load("optimizer:\n  lr: 1\noptimizer.lr: 2\n"), 3, "optimizer.lr");
}

TEST_F(ConfigTest, YamlSyntaxErrorNamesLine) {
  absl::Status status = Load("name: a\nretries: 1\noptimizer: {lr: 1\n");
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("run.yaml:"));
  EXPECT_THAT(std::string(status.message()), HasSubstr("YAML syntax error"));

  status = Load("name: a\n  bad: indentation: here\n");
  ExpectYamlError(status, 2, "syntax");
  status = Load("name: a\nretries: [1, 2\nverbose: true\n");
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("run.yaml:"));
}

TEST_F(ConfigTest, TopLevelMustBeAMap) {
  ExpectYamlError(Load("- 1\n- 2\n"), 1, "top level");
  ExpectYamlError(Load("name: a\n---\nname: b\n"), 3, "document");
}

TEST_F(ConfigTest, MissingFileIsNotFound) {
  absl::Status status = fields_.LoadYamlFile("/nonexistent/dir/run.yaml");
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("/nonexistent/dir/run.yaml"));
}

TEST_F(ConfigTest, LoadsFileAndErrorsNameIt) {
  char path[] = "/tmp/meft_config_test_XXXXXX";
  int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  close(fd);
  {
    std::ofstream out(path);
    out << "optimizer:\n  lr: 0.125\n";
  }
  ASSERT_TRUE(fields_.LoadYamlFile(path).ok());
  EXPECT_DOUBLE_EQ(options_.lr, 0.125);
  {
    std::ofstream out(path);
    out << "optimizer:\n  lr: 0.5\n  beta1: abc\n";
  }
  absl::Status status = fields_.LoadYamlFile(path);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()),
              HasSubstr(std::string(path) + ":3: optimizer.beta1: expected a number"));
  std::remove(path);
}

TEST_F(ConfigTest, HelpTextMentionsEveryField) {
  std::string help = fields_.HelpText();
  for (const char* expected : {"verbose",
                               "Log more.",
                               "retries",
                               "Retries per request.",
                               "server.threads",
                               "Worker threads.",
                               "server.offset",
                               "Offset in rows.",
                               "server.max_bytes",
                               "Largest message in bytes.",
                               "optimizer.beta1",
                               "Adam first-moment decay.",
                               "optimizer.lr",
                               "Learning rate.",
                               "name",
                               "Run name.",
                               "optimizer.mode",
                               "Update rule.",
                               "gpus",
                               "CUDA device ordinals.",
                               "--server-max-bytes",
                               "{sgd,adam}",
                               "0.9",
                               "[0, 1]",
                               "\"0-1\""}) {
    EXPECT_THAT(help, HasSubstr(expected));
  }
  int lines = 0;
  for (char c : help) lines += c == '\n';
  EXPECT_EQ(lines, 10);
  EXPECT_THAT(help, HasSubstr("optimizer.beta1 (--optimizer-beta1, double in [0, 1], default "
                              "0.9): Adam first-moment decay."));
}

TEST_F(ConfigTest, HelpShowsRegistrationDefaultsAfterLoad) {
  ASSERT_TRUE(Load("optimizer:\n  beta1: 0.25\n").ok());
  EXPECT_THAT(fields_.HelpText(), HasSubstr("default 0.9)"));
}

TEST_F(ConfigTest, CliHelpListsFlags) {
  CLI::App app("test");
  fields_.BindCli(app);
  std::string help = app.help();
  EXPECT_THAT(help, HasSubstr("--optimizer-beta1"));
  EXPECT_THAT(help, HasSubstr("Adam first-moment decay."));
  EXPECT_THAT(help, HasSubstr("--gpus"));
}

TEST_F(ConfigTest, DumpYamlRoundTrips) {
  ASSERT_TRUE(Load("optimizer: {lr: 0.1, mode: sgd}\nname: \"null\"\ngpus: \"0-3,7\"\n"
                   "server: {max_bytes: 18446744073709551615, offset: -3}\n")
                  .ok());
  options_.verbose = true;
  options_.beta1 = 0.1 + 0.2;  // needs all 17 digits
  std::string dump = fields_.DumpYaml();
  EXPECT_THAT(dump, HasSubstr("optimizer:"));
  EXPECT_THAT(dump, HasSubstr("beta1:"));

  SampleOptions copy;
  FieldSet other;
  Register(other, copy);
  absl::Status status = other.LoadYamlString(dump, "dump");
  ASSERT_TRUE(status.ok()) << status << "\n" << dump;
  EXPECT_EQ(copy.verbose, true);
  EXPECT_EQ(copy.beta1, options_.beta1);
  EXPECT_EQ(copy.lr, 0.1);
  EXPECT_EQ(copy.mode, "sgd");
  EXPECT_EQ(copy.name, "null");
  EXPECT_EQ(copy.max_bytes, std::numeric_limits<uint64_t>::max());
  EXPECT_EQ(copy.offset, -3);
  EXPECT_THAT(copy.gpus, ElementsAre(0, 1, 2, 3, 7));
}

TEST(FieldSetRegistrationTest, MistakesAreReportedByLoad) {
  {
    int32_t a = 0, b = 0;
    FieldSet fields;
    fields.Add("a", &a, "");
    fields.Add("a", &b, "");
    EXPECT_EQ(fields.registration_status().code(), absl::StatusCode::kInternal);
    EXPECT_EQ(fields.LoadYamlString("", "x").code(), absl::StatusCode::kInternal);
    EXPECT_EQ(fields.ApplyCli().code(), absl::StatusCode::kInternal);
  }
  {
    int32_t a = 0, b = 0;
    FieldSet fields;
    fields.Add("group", &a, "");
    fields.Add("group.child", &b, "");
    EXPECT_THAT(std::string(fields.registration_status().message()), HasSubstr("group"));
  }
  {
    int32_t a = 0, b = 0;
    FieldSet fields;
    fields.Add("a_b", &a, "");
    fields.Add("a.b", &b, "");  // same flag --a-b
    EXPECT_FALSE(fields.registration_status().ok());
  }
  {
    std::string s;
    FieldSet fields;
    fields.Add("bad name", &s, "");
    EXPECT_FALSE(fields.registration_status().ok());
  }
  {
    std::string s = "c";
    FieldSet fields;
    fields.AddChoice("mode", &s, {"a", "b"}, "");
    EXPECT_FALSE(fields.registration_status().ok());
  }
  {
    double d = 5;
    std::string s;
    FieldSet fields;
    fields.Add("d", &d, "");
    fields.Add("s", &s, "");
    fields.SetRange("d", 0, 1);  // default outside the range
    EXPECT_FALSE(fields.registration_status().ok());
    FieldSet more;
    more.Add("s", &s, "");
    more.SetRange("s", 0, 1);  // not numeric
    EXPECT_FALSE(more.registration_status().ok());
    FieldSet unknown;
    unknown.SetRange("nope", 0, 1);
    EXPECT_FALSE(unknown.registration_status().ok());
  }
  {
    int32_t a = 0;
    FieldSet fields;
    fields.Add("help", &a, "");  // clashes with CLI11's --help
    CLI::App app;
    fields.BindCli(app);
    EXPECT_FALSE(fields.registration_status().ok());
  }
}

TEST(FieldSetRegistrationTest, RangeAppliesToListElements) {
  std::vector<uint32_t> gpus;
  FieldSet fields;
  fields.Add("gpus", &gpus, "");
  fields.SetRange("gpus", 0, 7);
  ASSERT_TRUE(fields.registration_status().ok());
  EXPECT_TRUE(fields.LoadYamlString("gpus: [0, 7]", "x").ok());
  absl::Status status = fields.LoadYamlString("gpus: \"6-8\"", "x");
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr("x:1: gpus: element 8 is out of range"));
}

TEST(FieldSetStringListTest, YamlListCommaStringFlagsAndDump) {
  std::vector<std::string> servers = {"127.0.0.1:50051"};
  FieldSet fields;
  fields.Add("meft.servers", &servers, "parameter servers");
  ASSERT_TRUE(fields.registration_status().ok()) << fields.registration_status();
  EXPECT_THAT(fields.HelpText(), HasSubstr("string list"));
  ASSERT_TRUE(fields.LoadYamlString("meft:\n  servers: [a:1, \"b:2\"]\n", "x").ok());
  EXPECT_THAT(servers, ElementsAre("a:1", "b:2"));
  ASSERT_TRUE(fields.LoadYamlString("meft:\n  servers:\n    - c:3\n    - d:4\n", "x").ok());
  EXPECT_THAT(servers, ElementsAre("c:3", "d:4"));
  ASSERT_TRUE(fields.LoadYamlString("meft.servers: \" e:5 , f:6\"\n", "x").ok());
  EXPECT_THAT(servers, ElementsAre("e:5", "f:6"));
  ASSERT_TRUE(fields.LoadYamlString("meft.servers: []\n", "x").ok());
  EXPECT_THAT(servers, IsEmpty());
  ASSERT_TRUE(fields.LoadYamlString("meft.servers: \"\"\n", "x").ok());
  EXPECT_THAT(servers, IsEmpty());

  servers = {"g:7", "h:8"};
  FieldSet reloaded_fields;
  std::vector<std::string> reloaded;
  reloaded_fields.Add("meft.servers", &reloaded, "");
  ASSERT_TRUE(reloaded_fields.LoadYamlString(fields.DumpYaml(), "dump").ok()) << fields.DumpYaml();
  EXPECT_THAT(reloaded, ElementsAre("g:7", "h:8"));

  CLI::App app("test");
  fields.BindCli(app);
  const char* argv[] = {"prog", "--meft-servers", "i:9,j:10"};
  app.parse(3, argv);
  ASSERT_TRUE(fields.ApplyCli().ok());
  EXPECT_THAT(servers, ElementsAre("i:9", "j:10"));
}

TEST(FieldSetStringListTest, BadListsNameTheLineAndChangeNothing) {
  std::vector<std::string> servers = {"a:1"};
  FieldSet fields;
  fields.Add("servers", &servers, "");
  const struct {
    const char* yaml;
    const char* message;
  } cases[] = {
      {"servers: [a:1, a:1]\n", "x:1: servers: element \"a:1\" is listed twice"},
      {"servers: \"a:1,,b:2\"\n", "x:1: servers: empty element in string list"},
      {"servers:\n  - [a]\n", "x:2: servers: expected a string as list element"},
      {"servers: {a: 1}\n", "x:1: servers: expected a list of strings"},
  };
  for (const auto& c : cases) {
    absl::Status status = fields.LoadYamlString(c.yaml, "x");
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.yaml;
    EXPECT_THAT(std::string(status.message()), HasSubstr(c.message)) << c.yaml;
    EXPECT_THAT(servers, ElementsAre("a:1")) << c.yaml;
  }
  std::vector<std::string> twice = {"a", "a"};
  FieldSet bad_default;
  bad_default.Add("twice", &twice, "");
  EXPECT_THAT(std::string(bad_default.registration_status().message()),
              HasSubstr("default of \"twice\": element \"a\" is listed twice"));
}

}  // namespace
}  // namespace meft::config
