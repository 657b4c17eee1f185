/*
 * workload.h: what the C workloads of the tests and benchmarks share (tests/contrib/lazy-workload.c,
 * tests/contrib/ipc-live-workload.c, benchmarks/memory-workload.c): the page pattern, a clock, atomic
 * result files and the step that leaves the starter's pipes before a checkpoint.
 *
 * Header only; every function is static inline, so a workload that uses a few compiles without warnings
 * about the rest. Build with -I tests/contrib (containerd_support.build_static passes it).
 */
#ifndef CER_WORKLOAD_H
#define CER_WORKLOAD_H

#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Word i of a patterned area: every page differs from every other page and from a zero page. */
static inline uint64_t splitmix64(uint64_t i)
{
    uint64_t z = i + 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* Seconds on the monotonic clock, for the time a check took. */
static inline double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Writes text to tmp and renames it to path, so a reader never sees half a report. A report that cannot be
 * written is left out: the test waiting for it times out and says so. */
static inline void write_atomically(const char *path, const char *tmp, const char *text)
{
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return;
    size_t length = strlen(text);
    if (write(fd, text, length) == (ssize_t)length)
        rename(tmp, path);
    close(fd);
}

/* Moves to /, prints the ready line and points stdin/stdout/stderr at /dev/null, so that a checkpoint holds
 * no pipe of whoever started the workload. 0, or -1 when any step failed. */
static inline int announce_ready(const char *ready_line)
{
    if (chdir("/") < 0 || fputs(ready_line, stdout) < 0 || fflush(stdout) != 0)
        return -1;
    int devnull = open("/dev/null", O_RDWR);
    if (devnull < 0)
        return -1;
    for (int fd = 0; fd < 3; fd++)
        dup2(devnull, fd);
    if (devnull > 2)
        close(devnull);
    return 0;
}

#endif
