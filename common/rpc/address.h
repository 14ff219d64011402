#pragma once

// gRPC addresses ("HOST:PORT", "[V6]:PORT") as both processes read them.

#include <string>

namespace meft::rpc {

// The host part of "HOST:PORT" or "[V6]:PORT" (brackets removed); the whole string without a
// colon.
std::string HostOf(const std::string& address);

// True when the host is "localhost" or a numeric address in 127.0.0.0/8 or ::1. DNS names are
// never loopback here: "127.example.com" may resolve anywhere.
bool IsLoopback(const std::string& address);

}  // namespace meft::rpc
