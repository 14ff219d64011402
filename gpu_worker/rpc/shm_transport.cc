#include "gpu_worker/rpc/shm_transport.h"

#include <torch/torch.h>

#include <algorithm>
#include <cstring>
#include <span>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "common/wire/lookup_layout.h"
#include "common/wire/tensor_codec.h"
#include "gpu_worker/rpc/answer_tensor.h"

namespace meft::worker {
namespace {

using shm::AlignUp;

constexpr uint64_t kMinArenaBytes = uint64_t{64} << 20;
constexpr uint64_t kMaxDefaultArenaBytes = uint64_t{4} << 30;

// Rows one lookup of `tokens` tokens can select at most.
int64_t MaxRows(const ServerInfo& s, int64_t tokens) {
  int64_t rows = std::min(tokens * s.top_k, s.rows);
  if (s.max_rows > 0) rows = std::min(rows, s.max_rows);
  return std::max<int64_t>(rows, 0);
}

}  // namespace

uint64_t ResponseBytesBound(const ServerInfo& s, int64_t tokens,
                            int64_t row_bytes_per_element) {
  const bool gated = s.per_token && s.gated;
  const std::vector<wire::AnswerTensorLayout> layout = wire::LookupAnswerLayout(
      {.rows = static_cast<uint64_t>(MaxRows(s, tokens)),
       .row_bytes = static_cast<uint64_t>(s.dim * row_bytes_per_element),
       .tokens = static_cast<uint64_t>(tokens),
       .top_k = static_cast<uint64_t>(s.top_k),
       .experts = gated ? static_cast<uint64_t>(std::min(tokens * s.n_probe,
                                                         std::max<int64_t>(s.experts, 0)))
                        : 0,
       .per_token = s.per_token,
       .gated = gated});
  // The region's start is aligned by the allocator; the slack covers a server that aligns it
  // again.
  return wire::kAnswerAlignment + wire::PlacedBytes(layout);
}

uint64_t DefaultArenaBytes(const ServerInfo& s, int64_t row_bytes_per_element) {
  const int64_t tokens = std::max<int64_t>(s.max_tokens, 1);
  const uint64_t rows = static_cast<uint64_t>(MaxRows(s, tokens));
  const uint64_t x = AlignUp(static_cast<uint64_t>(tokens * s.dim) * 4);
  const uint64_t grads = 2 * AlignUp(rows * static_cast<uint64_t>(s.dim) * 4) +
                         AlignUp(static_cast<uint64_t>(tokens * s.top_k) * 4);
  const uint64_t one = x + ResponseBytesBound(s, tokens, row_bytes_per_element) + grads;
  return std::clamp<uint64_t>(shm::kHeaderBytes + 2 * one, kMinArenaBytes, kMaxDefaultArenaBytes);
}

ResponseLease::~ResponseLease() { owner_->allocator_.Free(region_); }

void ResponseLease::Shrink(uint64_t bytes) { owner_->allocator_.Shrink(&region_, bytes); }

absl::StatusOr<std::shared_ptr<ShmTransport>> ShmTransport::Create(uint64_t bytes, bool pin) {
  MEFT_ASSIGN_OR_RETURN(std::unique_ptr<shm::Arena> arena, shm::Arena::Create(bytes));
  std::shared_ptr<ShmTransport> t(new ShmTransport(std::move(arena)));
  if (pin && CanPinHostMemory()) {
    MEFT_ASSIGN_OR_RETURN(t->pin_, PinHostMemory(t->arena_->data(), t->arena_->size()));
  }
  return t;
}

v1::AttachArenaRequest ShmTransport::AttachRequest() const {
  v1::AttachArenaRequest r;
  r.set_name(arena_->name());
  r.set_size(arena_->size());
  r.set_nonce(arena_->Nonce());
  return r;
}

bool ShmTransport::PutFloats(const torch::Tensor& t, bool bf16, v1::Tensor* out,
                             std::vector<shm::Region>* held) {
  const int64_t numel = t.numel();
  const uint64_t bytes = static_cast<uint64_t>(numel) * (bf16 ? 2 : 4);
  std::optional<shm::Region> region = allocator_.Allocate(bytes);
  if (!region.has_value()) return false;
  uint8_t* dst = arena_->data() + region->offset;
  if (bf16) {
    const torch::Tensor cpu = t.detach().to(torch::kCPU, torch::kFloat32).contiguous();
    wire::EncodeFloatsTo(std::span<const float>(cpu.data_ptr<float>(), static_cast<size_t>(numel)),
                         wire::DType::kBf16, reinterpret_cast<char*>(dst));
  } else if (numel > 0) {
    // One pass from the source (a device-to-host copy for a CUDA tensor) into the arena.
    torch::from_blob(dst, t.sizes(), torch::kFloat32).copy_(t.detach());
  }
  out->set_dtype(bf16 ? v1::DTYPE_BF16 : v1::DTYPE_FP32);
  for (int64_t d : t.sizes()) out->add_shape(d);
  out->mutable_arena()->set_offset(region->offset);
  out->mutable_arena()->set_bytes(bytes);
  held->push_back(*region);
  return true;
}

void ShmTransport::Free(const std::vector<shm::Region>& regions) {
  for (const shm::Region& r : regions) allocator_.Free(r);
}

std::shared_ptr<ResponseLease> ShmTransport::AllocateResponse(uint64_t bytes) {
  std::optional<shm::Region> region = allocator_.Allocate(bytes);
  if (!region.has_value()) return nullptr;
  return std::make_shared<ResponseLease>(shared_from_this(), *region);
}

absl::StatusOr<torch::Tensor> ShmTransport::FromArena(
    const v1::Tensor& t, const char* field, const std::shared_ptr<ResponseLease>& lease) const {
  const uint64_t offset = t.arena().offset();
  const uint64_t bytes = t.arena().bytes();
  const shm::Region& region = lease->region();
  // The server starts every tensor of an answer on a kAlignment boundary (proto: response_region).
  if (offset < region.offset || offset > region.offset + region.bytes ||
      bytes > region.offset + region.bytes - offset || offset % shm::kAlignment != 0) {
    return absl::DataLossError(absl::StrCat("server answer ", field, ".arena: ", bytes,
                                            " bytes at offset ", offset,
                                            " lie outside the response region or are unaligned"));
  }
  return AnswerTensor(t, absl::StrCat(field, ".arena").c_str(), arena_->data() + offset, bytes,
                      lease);
}

}  // namespace meft::worker
