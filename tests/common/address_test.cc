// gRPC addresses as both processes read them: the host part, and whether a listener is loopback.

#include "common/rpc/address.h"

#include "gtest/gtest.h"

namespace meft::rpc {
namespace {

TEST(HostOfTest, SplitsHostFromPort) {
  EXPECT_EQ(HostOf("127.0.0.1:50051"), "127.0.0.1");
  EXPECT_EQ(HostOf("example.com:0"), "example.com");
  EXPECT_EQ(HostOf("[::1]:50051"), "::1");
  EXPECT_EQ(HostOf("[fe80::1%eth0]:1"), "fe80::1%eth0");
  EXPECT_EQ(HostOf("localhost"), "localhost");  // no port: the whole string
}

TEST(IsLoopbackTest, LoopbackAddressesOnly) {
  EXPECT_TRUE(IsLoopback("127.0.0.1:50051"));
  EXPECT_TRUE(IsLoopback("127.1.2.3:0"));
  EXPECT_TRUE(IsLoopback("localhost:50051"));
  EXPECT_TRUE(IsLoopback("[::1]:50051"));
  EXPECT_FALSE(IsLoopback("0.0.0.0:50051"));
  EXPECT_FALSE(IsLoopback("[::]:50051"));
  EXPECT_FALSE(IsLoopback("10.1.2.3:50051"));
  EXPECT_FALSE(IsLoopback("example.com:50051"));
}

// A host name that merely starts with "127." can resolve to any address; only numeric 127/8
// addresses are loopback.
TEST(IsLoopbackTest, HostNameStartingWith127IsNotLoopback) {
  EXPECT_FALSE(IsLoopback("127.example.com:50051"));
  EXPECT_FALSE(IsLoopback("127.0.0.1.nip.io:50051"));
}

}  // namespace
}  // namespace meft::rpc
