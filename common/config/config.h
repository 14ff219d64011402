#pragma once

// Table-driven configuration. Every field of a component's options struct is registered once in
// a FieldSet with a dotted name, a pointer to the member and a one-line doc; the member's value
// at registration is its default. The same table drives the YAML loader, the command-line flags
// and the help text, so the three can never disagree.
//
//   struct TrainerOptions { double beta1 = 0.9; std::vector<uint32_t> gpus; };
//   TrainerOptions options;
//   meft::config::FieldSet fields;
//   fields.Add("optimizer.beta1", &options.beta1, "Adam first-moment decay");
//   fields.SetRange("optimizer.beta1", 0.0, 1.0);
//   fields.Add("gpus", &options.gpus, "CUDA device ordinals");
//
//   CLI::App app;
//   std::string config_path;
//   app.add_option("--config", config_path, "YAML configuration file");
//   fields.BindCli(app);
//   CLI11_PARSE(app, argc, argv);
//   if (!config_path.empty()) MEFT_RETURN_IF_ERROR(fields.LoadYamlFile(config_path));
//   MEFT_RETURN_IF_ERROR(fields.ApplyCli());   // precedence: defaults < YAML < flags
//
// Names are dotted paths of segments made of [A-Za-z0-9_]. In YAML they are nested maps
// (`optimizer: {beta1: 0.9}`; a dotted key `optimizer.beta1: 0.9` is accepted too); on the
// command line they become `--optimizer-beta1` ('.' and '_' become '-').
//
// Value syntax, identical in YAML and on the command line:
//   bool                 `true` or `false` (nothing else; on the command line a bare `--flag`
//                        means true)
//   integers             decimal, optional sign; out-of-range values and negative values for
//                        unsigned fields are rejected, never wrapped
//   double               decimal or exponent notation; must be finite
//   string               any scalar; YAML null (`~`, `null`, empty) is rejected, write ""
//   std::vector<uint32_t> a YAML list `[0, 1, 2]` or a range string "0-3,5" (ranges inclusive,
//                        no duplicates); on the command line the range string
//   std::vector<std::string> a YAML list `[a, b]` or a comma-separated string "a,b" (elements
//                        non-empty and distinct); on the command line the comma-separated string
//
// Loading is all-or-nothing: when LoadYaml* or ApplyCli returns an error, no target was
// modified. Errors are INVALID_ARGUMENT (NOT_FOUND for a missing file) and name the source and
// 1-based line (`run.yaml:12: optimizer.beta1: expected a number, got "abc"`) or the flag
// (`--optimizer-beta1: ...`).
//
// Registration mistakes (duplicate or malformed names, a name that is both a field and a group,
// SetRange on an unknown or non-numeric field, a default outside its range or choices, a flag
// name CLI11 refuses) are programming errors. They do not abort: the first one is kept in
// registration_status() and returned by every later LoadYaml*/ApplyCli call, so a binary fails
// at startup with a clear message.
//
// Thread-safety: none. Build, load and apply from one thread before the targets are shared.
// Targets must outlive the FieldSet's use of them.

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"

namespace CLI {
class App;
}  // namespace CLI

namespace meft::config {

namespace internal {
struct Field;  // One registered field; defined in config.cc.
}  // namespace internal

class FieldSet {
 public:
  FieldSet();
  ~FieldSet();
  FieldSet(const FieldSet&) = delete;
  FieldSet& operator=(const FieldSet&) = delete;

  // Registers a field. `target` must stay valid while this FieldSet is used; its current value
  // is the default shown by HelpText().
  void Add(std::string name, bool* target, std::string doc);
  void Add(std::string name, int32_t* target, std::string doc);
  void Add(std::string name, uint32_t* target, std::string doc);
  void Add(std::string name, int64_t* target, std::string doc);
  void Add(std::string name, uint64_t* target, std::string doc);
  void Add(std::string name, double* target, std::string doc);
  void Add(std::string name, std::string* target, std::string doc);
  // A list of non-negative integers; see the value syntax above.
  void Add(std::string name, std::vector<uint32_t>* target, std::string doc);
  // A list of non-empty, distinct strings: a YAML list `[a, b]`, or (YAML scalar and command
  // line) a comma-separated string "a,b" (whitespace around elements ignored; "" = empty list).
  void Add(std::string name, std::vector<std::string>* target, std::string doc);
  // A string restricted to `choices` (non-empty); the current value must be one of them.
  void AddChoice(std::string name, std::string* target, std::vector<std::string> choices,
                 std::string doc);

  // Restricts an already registered numeric field (or every element of a list field) to the
  // inclusive range [min, max], checked whenever a value comes from YAML or the command line.
  void SetRange(std::string_view name, double min, double max);

  // OK, or the first registration mistake (INTERNAL).
  absl::Status registration_status() const { return registration_status_; }

  // Reads `path` and applies it like LoadYamlString with the path as source name. NOT_FOUND if
  // the file does not exist.
  absl::Status LoadYamlFile(const std::string& path);
  // Applies a YAML document whose top level is a map (or empty). Fields not mentioned keep their
  // value; unknown keys and keys given twice are errors. `source_name` prefixes every message.
  absl::Status LoadYamlString(std::string_view text, std::string_view source_name);

  // Registers one string-typed option per field on `app` (with the doc, type and default in its
  // description) so that values go through the same parser as YAML. Call before app.parse().
  // `app` must outlive the next ApplyCli() call. A CLI11 error (such as a clashing option name)
  // is recorded as a registration mistake.
  void BindCli(CLI::App& app);
  // After app.parse() (and after LoadYaml*), applies the flags that were given on the command
  // line; the last occurrence of a repeated flag wins. OK and a no-op if BindCli was not called.
  absl::Status ApplyCli();

  // One line per field, in registration order: name, flag, type, current value, doc.
  std::string HelpText() const;
  // The current values as a YAML document with nested maps, loadable by LoadYamlString.
  std::string DumpYaml() const;

 private:
  void AddField(std::unique_ptr<internal::Field> field);
  internal::Field* Find(std::string_view name) const;
  void RecordError(std::string message);

  // Registration order. Field objects never move, so they can hold the CLI11 options bound to
  // them.
  std::vector<std::unique_ptr<internal::Field>> fields_;
  absl::Status registration_status_;
};

// Whether the environment tunes glibc's allocator: MALLOC_MMAP_THRESHOLD_,
// MALLOC_TRIM_THRESHOLD_ or GLIBC_TUNABLES is set (see rpc::KeepMessageBuffersInHeap).
bool AllocatorTunedByEnvironment();

}  // namespace meft::config
