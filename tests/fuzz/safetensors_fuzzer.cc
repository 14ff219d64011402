// Fuzzes safetensors::File::Open with arbitrary file contents. The bytes are put in an anonymous
// memory file (memfd) and opened through /proc/self/fd, so production code reads a real path
// and nothing touches the disk. Every tensor an accepted file exposes is read in full, so a
// header that lets a view escape the mapping is caught by ASan.

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "common/safetensors/safetensors.h"

namespace {

[[noreturn]] void Fail(const char* what) {
  std::fprintf(stderr, "safetensors_fuzzer: %s\n", what);
  std::abort();
}

bool WriteAll(int fd, const uint8_t* data, size_t size) {
  while (size > 0) {
    const ssize_t n = write(fd, data, size);
    if (n <= 0) return false;
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using meft::safetensors::File;
  const int fd = memfd_create("safetensors_fuzz", MFD_CLOEXEC);
  if (fd < 0) Fail("memfd_create failed");
  if (!WriteAll(fd, data, size)) Fail("write to memfd failed");
  const std::string path = "/proc/self/fd/" + std::to_string(fd);

  auto file = File::Open(path);
  close(fd);
  if (!file.ok()) {
    if (file.status().message().empty()) Fail("error without a message");
    return 0;
  }
  const File& f = **file;
  if (size < 8 || f.data_size() > size - 8) Fail("data_size beyond the file");

  uint64_t covered = 0;
  volatile uint8_t sink = 0;
  for (const auto& t : f.tensors()) {
    if (t.begin > t.end || t.end > f.data_size()) Fail("tensor range outside the data buffer");
    if (t.begin != covered) Fail("tensors leave a gap or overlap");
    covered = t.end;
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      if (d < 0) Fail("negative dimension accepted");
      numel *= static_cast<uint64_t>(d);
    }
    if (numel * meft::safetensors::DTypeSize(t.dtype) != t.end - t.begin) {
      Fail("byte range does not match shape and dtype");
    }
    if (f.Find(t.name) != &t) Fail("Find does not return the listed tensor");
    auto bytes = f.Data(t.name);
    if (!bytes.ok() || bytes->size() != t.end - t.begin) Fail("Data disagrees with the header");
    for (uint8_t b : *bytes) sink = sink ^ b;
    if (!f.CheckTensor(t.name, t.dtype, t.shape).ok()) Fail("CheckTensor rejects its own shape");
  }
  if (covered != f.data_size()) Fail("tensors do not cover the data buffer");
  if (f.Find("__metadata__") != nullptr) Fail("__metadata__ listed as a tensor");
  (void)f.Data("no such tensor");
  return 0;
}
