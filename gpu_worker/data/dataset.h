#pragma once

// Instruction-tuning data (DESIGN §5): the deterministic, resumable loader of training
// micro-batches. It includes the rest of the data module, so this one header gives JSONL
// examples (jsonl.h), prompt templates (prompt.h), and tokenization and collation (collate.h).

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gpu_worker/data/collate.h"
#include "gpu_worker/data/jsonl.h"
#include "gpu_worker/data/prompt.h"

namespace meft::worker {

// The order in which epoch `epoch` visits examples 0..n-1: identity without shuffling, otherwise a
// Fisher-Yates shuffle driven by SplitMix64 seeded from (seed, epoch), with unbiased bounded draws
// by rejection. Pure integer arithmetic, so identical on every platform and LibTorch version.
std::vector<int64_t> EpochOrder(int64_t n, uint64_t seed, int64_t epoch, bool shuffle);

struct DataLoaderOptions {
  // Examples per micro-batch; at least 1.
  int64_t micro_batch_size = 4;
  // Shuffle each epoch (a different order per epoch, fixed by `seed`).
  bool shuffle = true;
  uint64_t seed = 0;
  // Drop the last, smaller micro-batch of each epoch.
  bool drop_last = false;
};

// Where a DataLoader stands: Next() returns batch `index` (0-based, in micro-batches) of epoch
// `epoch`. Saved in the training state so that a resumed run continues with the same batches.
struct DataPosition {
  int64_t epoch = 0;
  int64_t index = 0;
  bool operator==(const DataPosition&) const = default;
};

// Endless, deterministic iterator over training micro-batches: epoch e visits the examples in
// EpochOrder(n, seed, e, shuffle), cut into consecutive micro-batches; after the last batch of an
// epoch it continues with batch 0 of the next. The batches depend only on (examples, pad_id,
// options, position), so Seek to a saved position reproduces the same batch sequence.
// Thread-safety: none; one thread drives a loader.
class DataLoader {
 public:
  // INVALID_ARGUMENT for no examples, micro_batch_size < 1, or drop_last with fewer examples
  // than one micro-batch.
  static absl::StatusOr<std::unique_ptr<DataLoader>> Create(std::vector<TokenizedExample> examples,
                                                            int64_t pad_id,
                                                            const DataLoaderOptions& options);

  // The batch at position() (carrying that position), then advances. Fails only if LibTorch does.
  absl::StatusOr<Batch> Next();

  DataPosition position() const { return position_; }

  // Moves to batch `index` of epoch `epoch`. INVALID_ARGUMENT (position unchanged) unless
  // epoch >= 0 and 0 <= index < batches_per_epoch(); index == batches_per_epoch() is accepted
  // and means batch 0 of the next epoch.
  absl::Status Seek(int64_t epoch, int64_t index);

  int64_t batches_per_epoch() const;
  int64_t num_examples() const { return static_cast<int64_t>(examples_.size()); }
  const std::vector<TokenizedExample>& examples() const { return examples_; }

 private:
  DataLoader(std::vector<TokenizedExample> examples, int64_t pad_id,
             const DataLoaderOptions& options);
  void EnsureOrder();

  std::vector<TokenizedExample> examples_;
  int64_t pad_id_;
  DataLoaderOptions options_;
  DataPosition position_;
  // EpochOrder of order_epoch_; recomputed when position_.epoch moves.
  std::vector<int64_t> order_;
  int64_t order_epoch_ = -1;
};

}  // namespace meft::worker
