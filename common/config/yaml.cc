// FieldSet's YAML side: LoadYamlFile, LoadYamlString and DumpYaml (config.h).

#include <fcntl.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <cerrno>
#include <exception>
#include <map>
#include <memory>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/config/config.h"
#include "common/config/field.h"
#include "common/status.h"

namespace meft::config {
namespace {

using internal::Assign;
using internal::EditDistance;
using internal::ExpectedText;
using internal::Field;
using internal::FormatDouble;
using internal::kList;
using internal::KindOf;
using internal::kMaxListElements;
using internal::kStringList;
using internal::ParseText;
using internal::ParseUint32;
using internal::Quote;
using internal::Validate;
using internal::Value;

// ---------------------------------------------------------------------------------------------
// YAML loading.

struct Pending {
  const Field* field;
  Value value;
  int line;  // 1-based; 0 if unknown.
};

class YamlLoader {
 public:
  YamlLoader(const std::vector<std::unique_ptr<Field>>& fields, absl::string_view source)
      : fields_(fields), source_(source) {}

  absl::Status Load(absl::string_view text) {
    std::vector<YAML::Node> documents = YAML::LoadAll(std::string(text));
    if (documents.size() > 1) {
      return Error(documents[1].Mark(),
                   absl::StrCat("expected one YAML document, found ", documents.size()));
    }
    if (documents.empty() || documents[0].IsNull()) return absl::OkStatus();
    const YAML::Node& root = documents[0];
    if (!root.IsMap()) {
      return Error(root.Mark(),
                   absl::StrCat("expected a map at the top level, got ", Describe(root)));
    }
    MEFT_RETURN_IF_ERROR(WalkMap(root, ""));
    for (Pending& p : pending_) Assign(*p.field, std::move(p.value));
    return absl::OkStatus();
  }

  absl::Status Error(const YAML::Mark& mark, absl::string_view message) const {
    if (mark.is_null()) return absl::InvalidArgumentError(absl::StrCat(source_, ": ", message));
    return absl::InvalidArgumentError(absl::StrCat(source_, ":", mark.line + 1, ": ", message));
  }

 private:
  static std::string Describe(const YAML::Node& node) {
    switch (node.Type()) {
      case YAML::NodeType::Null:
        return "null";
      case YAML::NodeType::Sequence:
        return "a list";
      case YAML::NodeType::Map:
        return "a map";
      case YAML::NodeType::Scalar:
        return Quote(node.Scalar());
      case YAML::NodeType::Undefined:
        break;
    }
    return "nothing";
  }

  // The mark of `value`, or of its key where yaml-cpp has none for the value.
  static YAML::Mark MarkOf(const YAML::Node& value, const YAML::Node& key) {
    YAML::Mark mark = value.Mark();
    return mark.is_null() ? key.Mark() : mark;
  }

  const Field* FindField(absl::string_view name) const {
    for (const auto& f : fields_) {
      if (f->name == name) return f.get();
    }
    return nullptr;
  }

  // Names of the keys allowed directly below `prefix` ("" for the top level).
  std::vector<std::string> ChildrenOf(absl::string_view prefix) const {
    std::vector<std::string> children;
    for (const auto& f : fields_) {
      absl::string_view rest = f->name;
      if (!prefix.empty() &&
          !(absl::ConsumePrefix(&rest, prefix) && absl::ConsumePrefix(&rest, "."))) {
        continue;
      }
      std::string child(rest.substr(0, rest.find('.')));
      if (std::find(children.begin(), children.end(), child) == children.end()) {
        children.push_back(std::move(child));
      }
    }
    return children;
  }

  bool IsGroup(absl::string_view name) const {
    for (const auto& f : fields_) {
      absl::string_view rest = f->name;
      if (absl::ConsumePrefix(&rest, name) && absl::ConsumePrefix(&rest, ".")) return true;
    }
    return false;
  }

  std::string UnknownKeyMessage(absl::string_view prefix, absl::string_view key) const {
    std::string full = prefix.empty() ? std::string(key) : absl::StrCat(prefix, ".", key);
    std::string message = absl::StrCat("unknown key ", Quote(full));
    std::string best;
    size_t best_distance = std::numeric_limits<size_t>::max();
    for (const std::string& child : ChildrenOf(prefix)) {
      size_t distance = EditDistance(key, child);
      if (distance < best_distance) {
        best_distance = distance;
        best = child;
      }
    }
    if (!best.empty() && best_distance <= 2 && best_distance < key.size()) {
      std::string suggestion = prefix.empty() ? best : absl::StrCat(prefix, ".", best);
      absl::StrAppend(&message, " (did you mean ", Quote(suggestion), "?)");
    }
    return message;
  }

  absl::Status WalkMap(const YAML::Node& map, const std::string& prefix) {
    for (const auto& entry : map) {
      // Copies: yaml-cpp nodes are handles, and its iterators' operator-> returns a temporary.
      const YAML::Node key = entry.first;
      const YAML::Node value = entry.second;
      if (!key.IsScalar()) {
        return Error(key.Mark(), absl::StrCat("keys must be strings, got ", Describe(key)));
      }
      const std::string full =
          prefix.empty() ? key.Scalar() : absl::StrCat(prefix, ".", key.Scalar());
      if (const Field* field = FindField(full)) {
        MEFT_RETURN_IF_ERROR(SetField(*field, key, value));
      } else if (IsGroup(full)) {
        if (value.IsMap()) {
          MEFT_RETURN_IF_ERROR(WalkMap(value, full));
        } else if (!value.IsNull()) {  // An empty group (all children commented out) is fine.
          return Error(MarkOf(value, key), absl::StrCat(full, ": expected a map with keys {",
                                                        absl::StrJoin(ChildrenOf(full), ", "),
                                                        "}, got ", Describe(value)));
        }
      } else {
        return Error(key.Mark(), UnknownKeyMessage(prefix, key.Scalar()));
      }
    }
    return absl::OkStatus();
  }

  absl::Status SetField(const Field& field, const YAML::Node& key, const YAML::Node& value) {
    const YAML::Mark mark = MarkOf(value, key);
    for (const Pending& p : pending_) {
      if (p.field == &field) {
        return Error(key.Mark(),
                     absl::StrCat(field.name, ": set twice (first on line ", p.line, ")"));
      }
    }
    auto fail = [&](const YAML::Mark& at, absl::string_view message) {
      return Error(at, absl::StrCat(field.name, ": ", message));
    };
    Value parsed;
    if (value.IsScalar()) {
      absl::StatusOr<Value> v = ParseText(field, value.Scalar());
      if (!v.ok()) return fail(mark, v.status().message());
      parsed = *std::move(v);
    } else if (value.IsSequence() && KindOf(field) == kList) {
      std::vector<uint32_t> list;
      for (const YAML::Node& element : value) {
        if (!element.IsScalar()) {
          return fail(MarkOf(element, value),
                      absl::StrCat("expected a non-negative integer as list element, got ",
                                   Describe(element)));
        }
        absl::StatusOr<uint32_t> v = ParseUint32(element.Scalar());
        if (!v.ok()) return fail(MarkOf(element, value), v.status().message());
        list.push_back(*v);
        if (list.size() > kMaxListElements) {
          return fail(mark, absl::StrCat("more than ", kMaxListElements, " elements"));
        }
      }
      parsed = std::move(list);
      absl::Status valid = Validate(field, parsed);
      if (!valid.ok()) return fail(mark, valid.message());
    } else if (value.IsSequence() && KindOf(field) == kStringList) {
      std::vector<std::string> list;
      for (const YAML::Node& element : value) {
        if (!element.IsScalar()) {
          return fail(MarkOf(element, value),
                      absl::StrCat("expected a string as list element, got ", Describe(element)));
        }
        list.push_back(element.Scalar());
        if (list.size() > kMaxListElements) {
          return fail(mark, absl::StrCat("more than ", kMaxListElements, " elements"));
        }
      }
      parsed = std::move(list);
      absl::Status valid = Validate(field, parsed);
      if (!valid.ok()) return fail(mark, valid.message());
    } else {
      return fail(mark, absl::StrCat("expected ", ExpectedText(field), ", got ", Describe(value)));
    }
    pending_.push_back(Pending{&field, std::move(parsed), mark.is_null() ? 0 : mark.line + 1});
    return absl::OkStatus();
  }

  const std::vector<std::unique_ptr<Field>>& fields_;
  const absl::string_view source_;
  std::vector<Pending> pending_;
};

// Nested view of the dotted names, in registration order, for DumpYaml.
struct DumpTree {
  std::vector<std::pair<std::string, DumpTree>> children;
  const Field* field = nullptr;

  DumpTree& Child(absl::string_view name) {
    for (auto& [child_name, child] : children) {
      if (child_name == name) return child;
    }
    children.emplace_back(std::string(name), DumpTree{});
    return children.back().second;
  }
};

void EmitValue(YAML::Emitter& out, const Field& field) {
  std::visit(
      [&out](const auto* target) {
        using T = std::remove_cv_t<std::remove_pointer_t<decltype(target)>>;
        if constexpr (std::is_same_v<T, bool>) {
          out << (*target ? "true" : "false");
        } else if constexpr (std::is_same_v<T, double>) {
          out << FormatDouble(*target);
        } else if constexpr (std::is_same_v<T, std::string>) {
          out << YAML::DoubleQuoted << *target;
        } else if constexpr (std::is_same_v<T, std::vector<uint32_t>>) {
          out << YAML::Flow << YAML::BeginSeq;
          for (uint32_t v : *target) out << absl::StrCat(v);
          out << YAML::EndSeq;
        } else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
          out << YAML::Flow << YAML::BeginSeq;
          for (const std::string& v : *target) out << YAML::DoubleQuoted << v;
          out << YAML::EndSeq;
        } else {
          out << absl::StrCat(*target);
        }
      },
      field.target);
}

void EmitTree(YAML::Emitter& out, const DumpTree& tree) {
  out << YAML::BeginMap;
  for (const auto& [name, child] : tree.children) {
    out << YAML::Key << name << YAML::Value;
    if (child.field != nullptr) {
      EmitValue(out, *child.field);
    } else {
      EmitTree(out, child);
    }
  }
  out << YAML::EndMap;
}

}  // namespace

absl::Status FieldSet::LoadYamlFile(const std::string& path) {
  MEFT_RETURN_IF_ERROR(registration_status_);
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int error = errno;
    if (error == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    return absl::ErrnoToStatus(error, absl::StrCat(path, ": cannot open"));
  }
  std::string text;
  char buf[1 << 16];
  while (true) {
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int error = errno;
      ::close(fd);
      return absl::ErrnoToStatus(error, absl::StrCat(path, ": cannot read"));
    }
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return LoadYamlString(text, path);
}

absl::Status FieldSet::LoadYamlString(std::string_view std_text, std::string_view std_source_name) {
  MEFT_RETURN_IF_ERROR(registration_status_);
  const absl::string_view text(std_text.data(), std_text.size());
  const absl::string_view source_name(std_source_name.data(), std_source_name.size());
  YamlLoader loader(fields_, source_name);
  try {
    return loader.Load(text);
  } catch (const YAML::ParserException& e) {
    return loader.Error(e.mark, absl::StrCat("YAML syntax error: ", e.msg));
  } catch (const YAML::Exception& e) {
    return loader.Error(e.mark, absl::StrCat("YAML error: ", e.msg));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(source_name, ": ", e.what()));
  }
}

std::string FieldSet::DumpYaml() const {
  DumpTree root;
  for (const auto& field : fields_) {
    DumpTree* node = &root;
    for (absl::string_view segment : absl::StrSplit(field->name, '.')) {
      node = &node->Child(segment);
    }
    node->field = field.get();
  }
  YAML::Emitter out;
  EmitTree(out, root);
  return absl::StrCat(out.c_str(), "\n");
}

}  // namespace meft::config
