/* Tiny test harness shared by the header-driven C tests: pass/fail counters, status checks
 * that print the library's own status name and message on a mismatch, a seeded normal
 * random generator, and output poisoning helpers.
 *
 * Each test program includes this once, calls CHECK* as it goes, and ends with
 * `return check_finish();`, which prints the final "N passed, M failed" line and returns the
 * process exit status (non-zero when anything failed). Everything here is `static inline` so
 * a program that uses only part of it compiles cleanly under -Wall -Wextra -Werror.
 */
#ifndef FDMOE_TEST_CHECK_H
#define FDMOE_TEST_CHECK_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fdmoe.h"

/* The counters live in a function so that every program gets one pair without an unused
 * static variable warning. */
static inline long *check_counter(int failed) {
    static long counts[2];
    return &counts[failed ? 1 : 0];
}

static inline int check_record(int ok, const char *file, int line, const char *what) {
    if (ok) {
        ++*check_counter(0);
    } else {
        ++*check_counter(1);
        printf("FAIL %s:%d: %s\n", file, line, what);
    }
    return ok;
}

/* CHECK(cond, "printf format", ...): one check; the message is printed only on failure. */
#define CHECK(cond, ...)                                                                   \
    do {                                                                                   \
        if (!check_record(!!(cond), __FILE__, __LINE__, #cond)) {                          \
            printf("     ");                                                              \
            printf(__VA_ARGS__);                                                           \
            printf("\n");                                                                  \
            fflush(stdout);                                                                \
        }                                                                                  \
    } while (0)

static inline int check_status_at(uint32_t got, uint32_t expected, const char *call,
                                  const char *file, int line) {
    int ok = got == expected;
    if (!check_record(ok, file, line, call)) {
        printf("     expected %s, got %s: \"%s\"\n", fdmoe_status_string(expected),
               fdmoe_status_string(got), fdmoe_last_error_message());
        fflush(stdout);
    }
    return ok;
}

/* CHECK_STATUS(call, FDMOE_STATUS_X): the call returns exactly that status. Evaluates to
 * whether it did, so a test can stop early when a set-up step failed. */
#define CHECK_STATUS(call, expected) \
    check_status_at((uint32_t)(call), (uint32_t)(expected), #call, __FILE__, __LINE__)
#define CHECK_OK(call) CHECK_STATUS(call, FDMOE_STATUS_OK)

/* The last error message contains `needle` (e.g. the name of the field at fault). */
#define CHECK_MESSAGE_HAS(needle)                                                          \
    CHECK(strstr(fdmoe_last_error_message(), (needle)) != NULL,                            \
          "message \"%s\" should mention \"%s\"", fdmoe_last_error_message(), (needle))

/* Prints the final line and returns the exit status of the program. */
static inline int check_finish(void) {
    long passed = *check_counter(0), failed = *check_counter(1);
    printf("%ld passed, %ld failed\n", passed, failed);
    fflush(stdout);
    return failed == 0 ? 0 : 1;
}

/* ---- Random numbers: xorshift64* and Box-Muller, reproducible from a seed. ---- */

typedef struct {
    uint64_t state;
} Rng;

/* FDMOE_TEST_SEED in the environment varies every program's inputs (default: fixed). */
static inline uint64_t test_seed(void) {
    const char *s = getenv("FDMOE_TEST_SEED");
    return s != NULL ? strtoull(s, NULL, 10) : 20240611u;
}

/* A generator for one named test: the global seed mixed with the name. */
static inline Rng rng_for(const char *name) {
    uint64_t h = 1469598103934665603ull ^ test_seed();
    for (const char *c = name; *c != '\0'; ++c) {
        h = (h ^ (uint8_t)*c) * 1099511628211ull;
    }
    Rng r = {h != 0 ? h : 1};
    return r;
}

static inline uint64_t rng_next(Rng *r) {
    r->state ^= r->state >> 12;
    r->state ^= r->state << 25;
    r->state ^= r->state >> 27;
    return r->state * 2685821657736338717ull;
}

/* Uniform in (0, 1), never 0 (safe for log). */
static inline double rng_uniform(Rng *r) {
    return ((double)(rng_next(r) >> 11) + 0.5) / 9007199254740992.0;
}

static inline double rng_normal(Rng *r) {
    double u = rng_uniform(r), v = rng_uniform(r);
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

/* n normal(0, scale) floats. */
static inline void fill_normal(Rng *r, float *dst, size_t n, double scale) {
    for (size_t i = 0; i < n; ++i) {
        dst[i] = (float)(rng_normal(r) * scale);
    }
}

static inline uint32_t rng_below(Rng *r, uint32_t n) {
    return (uint32_t)(rng_next(r) % n);
}

/* ---- Allocation and poisoning. ---- */

/* malloc that aborts the test on failure (tests never run out of memory by design). */
static inline void *xmalloc(size_t bytes) {
    void *p = malloc(bytes != 0 ? bytes : 1);
    if (p == NULL) {
        fprintf(stderr, "out of memory allocating %zu bytes\n", bytes);
        exit(2);
    }
    return p;
}

static inline float *alloc_f32(size_t n) { return (float *)xmalloc(n * sizeof(float)); }

/* NaN everywhere: an element the library forgets to write stays NaN. */
static inline void poison_f32(float *p, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        p[i] = NAN;
    }
}

static inline void poison_i32(int32_t *p, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        p[i] = INT32_MIN;
    }
}

static inline size_t count_non_finite(const float *p, size_t n) {
    size_t bad = 0;
    for (size_t i = 0; i < n; ++i) {
        bad += isfinite(p[i]) ? 0u : 1u;
    }
    return bad;
}

/* Relative L2 error ||got - ref|| / ||ref|| (ref in double). */
static inline double rel_l2(const float *got, const double *ref, size_t n) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; ++i) {
        double d = (double)got[i] - ref[i];
        num += d * d;
        den += ref[i] * ref[i];
    }
    return den > 0.0 ? sqrt(num / den) : sqrt(num);
}

/* Relative L2 distance between two float arrays. */
static inline double rel_l2_f32(const float *a, const float *b, size_t n) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; ++i) {
        double d = (double)a[i] - (double)b[i];
        num += d * d;
        den += (double)b[i] * (double)b[i];
    }
    return den > 0.0 ? sqrt(num / den) : sqrt(num);
}

#endif /* FDMOE_TEST_CHECK_H */
