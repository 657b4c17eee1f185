/*
 * lazy-workload: holds MIB MiB of private memory filled with a known pattern and, on SIGUSR1, checks
 * every page of it and reports the outcome itself. For the lazy-restore tests (tests/contrib/test_lazy.py)
 * and benchmarks/bench_lazy.py: a page that a lazy restore lost, zeroed or put at the wrong address makes
 * the check fail.
 *
 *   lazy-workload MIB [RESULT_DIR]
 *
 * Word i (8 bytes) of the area holds splitmix64(i): every page differs from every other page and from a
 * zero page, so a missing, zero-filled or misplaced page is caught. Once written it prints "ready\n",
 * points stdin/stdout/stderr at /dev/null (a checkpoint must hold no pipe of whoever started it) and
 * waits for signals. On each SIGUSR1 it reads every word of the area and writes, atomically (a temporary
 * file renamed), RESULT_DIR/lazy-result (RESULT_DIR defaults to /dev/shm; the tests bind-mount a host
 * directory there, so that what a process wrote outlives it):
 *
 *   OK <round> pages=<n> seconds=<check time>
 *   FAIL <round> pages=<n> bad_pages=<k> first_bad=<page index>
 *
 * A FAIL is written as soon as the first bad page is read (then completed at the end of the check).
 *
 * <round> counts the checks, so a reader tells a fresh result from an old one. The area is never written
 * after "ready", so the check only reads.
 *
 * Build: gcc -static -O2 -Wall -o lazy-workload lazy-workload.c
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define WORDS_PER_PAGE (4096 / sizeof(uint64_t))

static char result_file[4096], result_tmp[4096];

static volatile sig_atomic_t check_requested;

static void on_usr1(int signum)
{
    (void)signum;
    check_requested = 1;
}

static uint64_t splitmix64(uint64_t i)
{
    uint64_t z = i + 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void report(const char *text)
{
    int fd = open(result_tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return;
    size_t length = strlen(text);
    if (write(fd, text, length) == (ssize_t)length)
        rename(result_tmp, result_file);
    close(fd);
}

static void check(const uint64_t *memory, size_t pages, unsigned long round)
{
    double started = now();
    size_t bad_pages = 0, first_bad = 0;
    for (size_t page = 0; page < pages; page++) {
        const uint64_t *words = memory + page * WORDS_PER_PAGE;
        for (size_t w = 0; w < WORDS_PER_PAGE; w++) {
            if (words[w] != splitmix64(page * WORDS_PER_PAGE + w)) {
                if (bad_pages++ == 0) {
                    /* Said at once, as a program acting on what it read would: a hole seen for an instant
                     * is on record even if the process is killed before the check ends. */
                    char early[128];
                    first_bad = page;
                    snprintf(early, sizeof(early), "FAIL %lu pages=%zu first_bad=%zu (checking on)\n", round, pages,
                             page);
                    report(early);
                }
                break;
            }
        }
    }
    char text[160];
    if (bad_pages == 0)
        snprintf(text, sizeof(text), "OK %lu pages=%zu seconds=%.3f\n", round, pages, now() - started);
    else
        snprintf(text, sizeof(text), "FAIL %lu pages=%zu bad_pages=%zu first_bad=%zu\n", round, pages, bad_pages,
                 first_bad);
    report(text);
}

int main(int argc, char **argv)
{
    char *end;
    unsigned long mib = argc == 2 || argc == 3 ? strtoul(argv[1], &end, 10) : 0;
    if (mib == 0 || *end != '\0') {
        fprintf(stderr, "usage: %s MIB [RESULT_DIR]\n", argv[0]);
        return 2;
    }
    const char *dir = argc == 3 ? argv[2] : "/dev/shm";
    snprintf(result_file, sizeof(result_file), "%s/lazy-result", dir);
    snprintf(result_tmp, sizeof(result_tmp), "%s/.lazy-result.tmp", dir);
    size_t pages = (mib << 20) / 4096;
    uint64_t *memory = mmap(NULL, mib << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) {
        fprintf(stderr, "lazy-workload: mmap %lu MiB: %s\n", mib, strerror(errno));
        return 1;
    }
    for (size_t i = 0; i < pages * WORDS_PER_PAGE; i++)
        memory[i] = splitmix64(i);

    sigset_t usr1, waiting;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    sigprocmask(SIG_BLOCK, &usr1, &waiting);
    sigdelset(&waiting, SIGUSR1);
    struct sigaction action = {.sa_handler = on_usr1};
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGUSR1, &action, NULL) < 0)
        return 1;

    if (chdir("/") < 0 || printf("ready\n") < 0 || fflush(stdout) != 0)
        return 1;
    int devnull = open("/dev/null", O_RDWR);
    if (devnull < 0)
        return 1;
    for (int fd = 0; fd < 3; fd++)
        dup2(devnull, fd);
    if (devnull > 2)
        close(devnull);

    for (unsigned long round = 1;; round++) {
        while (!check_requested)
            sigsuspend(&waiting);
        check_requested = 0;
        check(memory, pages, round);
    }
}
