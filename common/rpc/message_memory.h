#pragma once

// A process-wide allocator setting for the programs that move tensor messages of tens of MB.

#include <string>

namespace meft::rpc {

// glibc serves an allocation above its mmap threshold (128 KiB, raised on the fly up to 32 MiB)
// with a fresh mmap() and gives it back with munmap() when freed, and returns freed heap tops
// above its trim threshold to the kernel. A lookup's answer is tens of MB of buffers (the encoded
// rows, the protobuf message, gRPC's slices, the decoded tensors), allocated and freed on every
// call, so without this the kernel faults in and zeroes every page of them again on every call
// (bench/README.md, meft_transport_bench). This fixes the mmap threshold at 32 MiB (glibc's
// largest) and the trim threshold at 1 GiB, so freed message buffers are reused. In exchange a
// process returns less freed memory to the kernel: the main heap keeps up to 1 GiB of it, and
// each thread's arena stays at its high-water mark.
//
// Leaves the allocator alone when `environment_tunes_allocator` (config::
// AllocatorTunedByEnvironment(): the user set MALLOC_* or GLIBC_TUNABLES), and does nothing
// without glibc. Call once, early. Returns one line saying what it did, for the log.
std::string KeepMessageBuffersInHeap(bool environment_tunes_allocator);

}  // namespace meft::rpc
