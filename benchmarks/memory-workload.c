/*
 * memory-workload: a process that holds MIB MiB of private, written memory, for the benchmarks
 * (benchmarks/bench_restore.py, bench_runtime.py, bench_extract.py): its CRIU checkpoint is about MIB MiB of
 * pages.
 *
 *   memory-workload MIB
 *
 * Every page is written with an xorshift64 stream (no zero pages for CRIU to skip, nothing that
 * compresses), then it prints "ready\n", points stdin/stdout/stderr at /dev/null (so that a checkpoint
 * holds no pipe of whoever started it) and sleeps forever.
 *
 * Build: gcc -static -O2 -Wall -I ../tests/contrib -o memory-workload memory-workload.c
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "workload.h"

int main(int argc, char **argv)
{
    char *end;
    unsigned long mib = argc == 2 ? strtoul(argv[1], &end, 10) : 0;
    if (argc != 2 || *end != '\0' || mib == 0) {
        fprintf(stderr, "usage: %s MIB\n", argv[0]);
        return 2;
    }
    size_t size = mib << 20;
    uint64_t *memory = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) {
        fprintf(stderr, "memory-workload: mmap %lu MiB: %s\n", mib, strerror(errno));
        return 1;
    }
    uint64_t x = 0x9e3779b97f4a7c15ULL;
    for (size_t i = 0; i < size / sizeof(*memory); i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memory[i] = x;
    }
    if (announce_ready("ready\n") < 0)
        return 1;
    for (;;)
        pause();
}
