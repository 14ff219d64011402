#include "gpu_worker/data/dataset.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/random.h"
#include "common/status.h"

namespace meft::worker {

std::vector<int64_t> EpochOrder(int64_t n, uint64_t seed, int64_t epoch, bool shuffle) {
  std::vector<int64_t> order(static_cast<size_t>(std::max<int64_t>(n, 0)));
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  if (!shuffle || order.size() < 2) return order;
  // Derive the epoch's stream from (seed, epoch) through one SplitMix64 step of each, so that
  // neighbouring seeds or epochs give unrelated streams.
  SplitMix64 seeder(seed);
  const uint64_t mixed =
      seeder.Next() ^ SplitMix64(static_cast<uint64_t>(epoch) + 0x632BE59BD9B4E019ULL).Next();
  SplitMix64 rng(mixed);
  for (size_t i = order.size() - 1; i > 0; --i) {
    const size_t j = static_cast<size_t>(rng.Below(static_cast<uint64_t>(i) + 1));
    std::swap(order[i], order[j]);
  }
  return order;
}

DataLoader::DataLoader(std::vector<TokenizedExample> examples, int64_t pad_id,
                       const DataLoaderOptions& options)
    : examples_(std::move(examples)), pad_id_(pad_id), options_(options) {}

absl::StatusOr<std::unique_ptr<DataLoader>> DataLoader::Create(
    std::vector<TokenizedExample> examples, int64_t pad_id, const DataLoaderOptions& options) {
  if (examples.empty()) return absl::InvalidArgumentError("DataLoader: no examples");
  if (options.micro_batch_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "DataLoader: micro_batch_size must be at least 1, got ", options.micro_batch_size));
  }
  if (options.drop_last && static_cast<int64_t>(examples.size()) < options.micro_batch_size) {
    return absl::InvalidArgumentError(absl::StrCat("DataLoader: drop_last with ", examples.size(),
                                                   " examples and micro_batch_size ",
                                                   options.micro_batch_size, " leaves no batch"));
  }
  for (size_t i = 0; i < examples.size(); ++i) {
    if (examples[i].input_ids.empty() ||
        examples[i].input_ids.size() != examples[i].labels.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "DataLoader: example ", i, " is empty or its labels differ in length from its ids"));
    }
  }
  return std::unique_ptr<DataLoader>(new DataLoader(std::move(examples), pad_id, options));
}

int64_t DataLoader::batches_per_epoch() const {
  const int64_t n = num_examples();
  const int64_t b = options_.micro_batch_size;
  return options_.drop_last ? n / b : (n + b - 1) / b;
}

void DataLoader::EnsureOrder() {
  if (order_epoch_ == position_.epoch) return;
  order_ = EpochOrder(num_examples(), options_.seed, position_.epoch, options_.shuffle);
  order_epoch_ = position_.epoch;
}

absl::StatusOr<Batch> DataLoader::Next() {
  EnsureOrder();
  const int64_t begin = position_.index * options_.micro_batch_size;
  const int64_t end = std::min<int64_t>(begin + options_.micro_batch_size, num_examples());
  std::span<const int64_t> indices(order_.data() + begin, static_cast<size_t>(end - begin));
  MEFT_ASSIGN_OR_RETURN(Batch batch, CollateRightPadded(examples_, indices, pad_id_));
  batch.epoch = position_.epoch;
  batch.index = position_.index;
  if (++position_.index >= batches_per_epoch()) {
    position_.index = 0;
    ++position_.epoch;
  }
  return batch;
}

absl::Status DataLoader::Seek(int64_t epoch, int64_t index) {
  if (epoch < 0 || index < 0 || index > batches_per_epoch()) {
    return absl::InvalidArgumentError(absl::StrCat("DataLoader::Seek: position (epoch ", epoch,
                                                   ", batch ", index, ") is invalid; an epoch has ",
                                                   batches_per_epoch(), " batches"));
  }
  position_ =
      index == batches_per_epoch() ? DataPosition{epoch + 1, 0} : DataPosition{epoch, index};
  return absl::OkStatus();
}

}  // namespace meft::worker
