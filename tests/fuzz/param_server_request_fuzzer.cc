// Fuzzes request validation of the parameter server: the bytes after the first are parsed as a
// meft.v1 LookupRequest, GradientsRequest or StepRequest (chosen by the first byte), converted
// with rpc::FromProto and handed to one small domain ParamServer that lives for the whole run.
// A request must never crash the server, and a rejected request must leave StateDigest()
// unchanged. Accepted requests do change the state, so later inputs meet a server that has
// served lookups, accumulated gradients and taken steps. A request with a non-zero arena_id is
// converted against a real shared-memory arena whose bytes are the input itself, so tensor
// spans and response regions (the same-host transport) are fuzzed too.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>

#include "common/shm/arena.h"
#include "meft/v1/param_server.pb.h"
#include "param_server/rpc/param_server_convert.h"
#include "param_server/server/param_server.h"
#include "spdlog/spdlog.h"

namespace {

[[noreturn]] void Fail(const char* what, const absl::Status& status) {
  std::fprintf(stderr, "param_server_request_fuzzer: %s (%s)\n", what, status.ToString().c_str());
  std::abort();
}

meft::server::ParamServer& Server() {
  static meft::server::ParamServer* server = [] {
    spdlog::set_level(spdlog::level::off);
    meft::server::ServerOptions options;
    options.layers = {0};
    options.rows = 64;
    options.dim = 8;
    options.experts = 8;
    options.selector.top_k = 4;
    options.selector.n_probe = 2;
    options.step_wait_seconds = 0;
    auto created = meft::server::ParamServer::Create(options, nullptr);
    if (!created.ok()) Fail("ParamServer::Create failed", created.status());
    return created->release();  // Lives for the process: libFuzzer never returns from main.
  }();
  return *server;
}

// The arena every request with an arena_id refers to; its bytes after the header are refilled
// from each input.
meft::shm::Arena& FuzzArena() {
  static meft::shm::Arena* arena = [] {
    auto created = meft::shm::Arena::Create(1 << 16);
    if (!created.ok()) Fail("Arena::Create failed", created.status());
    return created->release();
  }();
  return *arena;
}

const meft::shm::Arena* ArenaFor(uint64_t arena_id, const uint8_t* data, size_t size) {
  if (arena_id == 0) return nullptr;
  meft::shm::Arena& arena = FuzzArena();
  for (uint64_t at = meft::shm::kHeaderBytes; at < arena.size(); at += size) {
    std::memcpy(arena.data() + at, data, std::min<uint64_t>(size, arena.size() - at));
  }
  return &arena;
}

// Runs `call` and checks that a rejection left the state untouched.
template <typename Call>
void Expect(meft::server::ParamServer& server, Call call) {
  const uint64_t before = server.StateDigest();
  const absl::Status status = call();
  if (status.ok()) return;
  if (status.message().empty()) Fail("rejection without a message", status);
  if (server.StateDigest() != before) Fail("rejected request changed the server state", status);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  meft::server::ParamServer& server = Server();
  const uint8_t kind = data[0] % 3;
  const void* bytes = data + 1;
  const int len = static_cast<int>(size - 1);

  if (kind == 0) {
    meft::v1::LookupRequest request;
    if (!request.ParseFromArray(bytes, len)) return 0;
    const meft::shm::Arena* arena = ArenaFor(request.arena_id(), data, size);
    Expect(server, [&]() -> absl::Status {
      auto call = meft::rpc::FromProto(request, arena);
      if (!call.ok()) return call.status();
      auto reply = server.Lookup(*call);
      if (!reply.ok()) return reply.status();
      meft::v1::LookupResponse response;
      meft::rpc::ToProto(std::move(*reply), &response);
      return absl::OkStatus();
    });
  } else if (kind == 1) {
    meft::v1::GradientsRequest request;
    if (!request.ParseFromArray(bytes, len)) return 0;
    const meft::shm::Arena* arena = ArenaFor(request.arena_id(), data, size);
    Expect(server, [&]() -> absl::Status {
      auto call = meft::rpc::FromProto(request, arena);
      if (!call.ok()) return call.status();
      auto reply = server.Gradients(*call);
      if (!reply.ok()) return reply.status();
      return absl::OkStatus();
    });
  } else {
    meft::v1::StepRequest request;
    if (!request.ParseFromArray(bytes, len)) return 0;
    Expect(server, [&]() -> absl::Status {
      auto reply = server.Step(meft::rpc::FromProto(request));
      return reply.status();
    });
    // Also exercise the norm query of the step the request names.
    (void)server.GradNorm(request.step(), {request.layers().begin(), request.layers().end()});
  }
  return 0;
}
