#pragma once

// C interface of libmeft_spm_shim.so, the loadable module that wraps SentencePiece.
//
// Why a separately loaded module: Debian's libsentencepiece.so.0 carries its own copy of
// protobuf-lite 3.14 and exports those symbols (google::protobuf::MessageLite::ParseFromArray,
// ...). Every worker process also loads the system libprotobuf.so.32 (through LibTorch and gRPC).
// With both in the global symbol scope, one library's protobuf calls bind to the other's
// incompatible implementation and the process crashes during static initialisation
// (google/sentencepiece#927 and friends). So no meft target links SentencePiece; the module does,
// and sentencepiece_bridge.cc dlopen()s it with RTLD_LOCAL | RTLD_DEEPBIND: SentencePiece then
// binds to its own protobuf copy and its symbols never enter the global scope. One price of
// RTLD_DEEPBIND: SentencePiece's logging would write to an unconstructed std::cerr, so the module
// disables every SentencePiece log level below FATAL (errors still come back as messages).
//
// Only plain C types cross the boundary. Output is handed to caller-supplied sinks that copy it,
// so no memory allocated on one side is freed on the other. Every function returns 0 on success;
// on failure it passes a message to `error` (when non-null) and returns non-zero. No function
// throws. This header is included by both sides and must stay free of C++ library types.

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MEFT_SPM_SHIM_ABI_VERSION 1

// Receives `size` bytes at `data` (valid only during the call).
typedef void (*MeftSpmBytesSink)(void* context, const char* data, size_t size);
// Receives `count` ids at `ids` (valid only during the call).
typedef void (*MeftSpmIdsSink)(void* context, const int* ids, size_t count);

// Which special id MeftSpmApi::special_id returns.
enum MeftSpmSpecial { kMeftSpmUnk = 0, kMeftSpmBos = 1, kMeftSpmEos = 2, kMeftSpmPad = 3 };

typedef struct MeftSpmError {
  MeftSpmBytesSink sink;
  void* context;
} MeftSpmError;

// Function table returned by meft_spm_shim_api(). A processor handle comes from create() and is
// released by destroy(); the const functions may be called concurrently on a loaded processor.
typedef struct MeftSpmApi {
  int abi_version;  // MEFT_SPM_SHIM_ABI_VERSION
  void* (*create)(void);
  void (*destroy)(void* processor);
  // Parses a serialized ModelProto. Call once, before the functions below.
  int (*load)(void* processor, const char* data, size_t size, MeftSpmError error);
  int (*encode)(const void* processor, const char* text, size_t size, MeftSpmIdsSink out,
                void* out_context, MeftSpmError error);
  // Ids must lie in [0, piece_size).
  int (*decode)(const void* processor, const int* ids, size_t count, MeftSpmBytesSink out,
                void* out_context, MeftSpmError error);
  int (*piece_size)(const void* processor);
  int (*special_id)(const void* processor, int which);  // MeftSpmSpecial; -1 when undefined
  // `id` must lie in [0, piece_size).
  void (*id_to_piece)(const void* processor, int id, MeftSpmBytesSink out, void* out_context);
  // Trains with SentencePiece's flags (keys[i] = values[i]; "minloglevel" is forced to FATAL) on
  // the sentences, after seeding SentencePiece's global random generator; hands the serialized
  // model to `model_out`. Not thread-safe (process-wide SentencePiece state).
  int (*train)(const char* const* keys, const char* const* values, size_t option_count,
               const char* const* sentences, const size_t* sentence_sizes, size_t sentence_count,
               uint32_t seed, MeftSpmBytesSink model_out, void* model_context, MeftSpmError error);
} MeftSpmApi;

// The module's single exported symbol.
const MeftSpmApi* meft_spm_shim_api(void);
typedef const MeftSpmApi* (*MeftSpmShimApiFn)(void);

#ifdef __cplusplus
}  // extern "C"
#endif
