// What the C++ binding's tests share: a check counter that exits on the first failure, the
// expectation that a call throws fdmoe::Error with a status and the argument named, and a
// small seeded generator (xorshift64*) so inputs are random yet repeatable.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "fdmoe.hpp"

namespace check {

inline int count = 0;

inline void expect(bool ok, const std::string& what) {
    ++count;
    if (!ok) {
        std::fprintf(stderr, "FAILED: %s\n", what.c_str());
        std::exit(1);
    }
}

// Runs `call`, which must throw fdmoe::Error with `status` and a message containing `needle`.
template <class F>
void expect_error(F call, FdmoeStatus status, const std::string& needle, const std::string& what) {
    try {
        call();
    } catch (const fdmoe::Error& e) {
        expect(e.status() == status, what + ": status " + fdmoe_status_string(e.status()));
        expect(std::string(e.what()).find(needle) != std::string::npos,
               what + ": message \"" + e.what() + "\" lacks \"" + needle + "\"");
        return;
    }
    expect(false, what + ": no fdmoe::Error thrown");
}

// Uniform values in [-scale, scale).
struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed) {}
    float next(double scale) {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        const double u = static_cast<double>((s * 2685821657736338717ull) >> 11) / 9007199254740992.0;
        return static_cast<float>((2.0 * u - 1.0) * scale);
    }
};

}  // namespace check
