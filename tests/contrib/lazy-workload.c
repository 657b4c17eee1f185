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
 * On SIGUSR2 it makes the kernel tell a lazy-pages server everything a process can do to its memory, then
 * checks every page as SIGUSR1 does, and writes the outcome to RESULT_DIR/lazy-events:
 *   fork:    a child checks every page (its pages come through a userfaultfd of its own) and exits; the
 *            parent waits and reports the child's outcome;
 *   mremap:  the last quarter of the area moves to a new address (the check reads it there);
 *   madvise: MADV_DONTNEED on 16 pages of the second quarter (they must read as zeros from then on);
 *   munmap:  16 pages of the third quarter are unmapped (the check skips them).
 *   EVENTS <round> OK pages=<n> | EVENTS <round> FAIL <what>
 *
 * On SIGRTMIN it answers a request: it reads one word of a fixed, scattered 10% of its pages (page
 * (k * 7919) mod n for k < n/10), checks them, and writes "ANSWER <round> OK|FAIL\n" to the FIFO
 * RESULT_DIR/answer (opened for that answer only: a checkpoint must hold no pipe), for
 * benchmarks/bench_lazy.py's time to first response.
 *
 * <round> counts the checks, so a reader tells a fresh result from an old one. The area is never written
 * after "ready", so the check only reads.
 *
 * Build: gcc -static -O2 -Wall -I . -o lazy-workload lazy-workload.c
 */
#define _GNU_SOURCE /* mremap */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "workload.h"

#define WORDS_PER_PAGE (4096 / sizeof(uint64_t))

static char result_file[4096], result_tmp[4096];

static volatile sig_atomic_t check_requested, events_requested, answer_requested;

static void on_signal(int signum)
{
    if (signum == SIGUSR1)
        check_requested = 1;
    else if (signum == SIGUSR2)
        events_requested = 1;
    else
        answer_requested = 1;
}

/* What the events round changed: the check follows it. */
static uint64_t *moved;             /* the last quarter's new place, or NULL */
static size_t moved_from;           /* its first page */
static size_t removed_from, removed_pages, unmapped_from, unmapped_pages;
static char dir_path[4096];

static void report(const char *text)
{
    write_atomically(result_file, result_tmp, text);
}

static const uint64_t *page_at(const uint64_t *memory, size_t page)
{
    if (moved != NULL && page >= moved_from)
        return moved + (page - moved_from) * WORDS_PER_PAGE;
    return memory + page * WORDS_PER_PAGE;
}

static uint64_t expected(size_t page, size_t w)
{
    if (page >= removed_from && page < removed_from + removed_pages)
        return 0;
    return splitmix64(page * WORDS_PER_PAGE + w);
}

/* Checks every page still mapped; the number of bad ones. With a round, the first bad page is reported at once,
 * as a program acting on what it read would: a hole seen for an instant is on record even if the process is
 * killed before the check ends. */
static size_t check_pages(const uint64_t *memory, size_t pages, size_t *first_bad, unsigned long round)
{
    size_t bad_pages = 0;
    for (size_t page = 0; page < pages; page++) {
        if (page >= unmapped_from && page < unmapped_from + unmapped_pages)
            continue;
        const uint64_t *words = page_at(memory, page);
        for (size_t w = 0; w < WORDS_PER_PAGE; w++) {
            if (words[w] != expected(page, w)) {
                if (bad_pages++ == 0) {
                    *first_bad = page;
                    if (round) {
                        char early[128];
                        snprintf(early, sizeof(early), "FAIL %lu pages=%zu first_bad=%zu (checking on)\n", round,
                                 pages, page);
                        report(early);
                    }
                }
                break;
            }
        }
    }
    return bad_pages;
}

static void check(const uint64_t *memory, size_t pages, unsigned long round)
{
    double started = now();
    size_t first_bad = 0;
    size_t bad_pages = check_pages(memory, pages, &first_bad, round);
    char text[160];
    if (bad_pages == 0)
        snprintf(text, sizeof(text), "OK %lu pages=%zu seconds=%.3f\n", round, pages, now() - started);
    else
        snprintf(text, sizeof(text), "FAIL %lu pages=%zu bad_pages=%zu first_bad=%zu\n", round, pages, bad_pages,
                 first_bad);
    report(text);
}

static void write_file(const char *name, const char *text)
{
    char path[4200], tmp[4200];
    snprintf(path, sizeof(path), "%s/%s", dir_path, name);
    snprintf(tmp, sizeof(tmp), "%s/.%s.tmp", dir_path, name);
    write_atomically(path, tmp, text);
}

static void exercise_events(uint64_t *memory, size_t pages, unsigned long round)
{
    char text[256];
    size_t first_bad = 0;
    if (pages < 64 || moved != NULL) {
        snprintf(text, sizeof(text), "EVENTS %lu FAIL needs 64 pages and runs once\n", round);
        write_file("lazy-events", text);
        return;
    }
    /* fork: the child reads every page through its own userfaultfd. */
    pid_t child = fork();
    if (child == 0)
        _exit(check_pages(memory, pages, &first_bad, 0) == 0 ? 0 : 1);
    int status = 0;
    if (child < 0 || waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        snprintf(text, sizeof(text), "EVENTS %lu FAIL fork: the child found bad pages (status %d)\n", round, status);
        write_file("lazy-events", text);
        return;
    }
    /* mremap: the last quarter moves to a place of its own. */
    size_t quarter = pages / 4;
    void *target = mmap(NULL, quarter * 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    void *now_at = target == MAP_FAILED ? MAP_FAILED
                                        : mremap(memory + 3 * quarter * WORDS_PER_PAGE, (pages - 3 * quarter) * 4096,
                                                 (pages - 3 * quarter) * 4096, MREMAP_MAYMOVE | MREMAP_FIXED, target);
    if (now_at == MAP_FAILED) {
        snprintf(text, sizeof(text), "EVENTS %lu FAIL mremap: %s\n", round, strerror(errno));
        write_file("lazy-events", text);
        return;
    }
    moved = now_at;
    moved_from = 3 * quarter;
    /* madvise(DONTNEED): 16 pages of the second quarter read as zeros from now on. */
    removed_from = quarter + quarter / 2;
    removed_pages = 16;
    if (madvise(memory + removed_from * WORDS_PER_PAGE, removed_pages * 4096, MADV_DONTNEED) < 0) {
        snprintf(text, sizeof(text), "EVENTS %lu FAIL madvise: %s\n", round, strerror(errno));
        write_file("lazy-events", text);
        return;
    }
    /* munmap: 16 pages of the third quarter are gone. */
    unmapped_from = 2 * quarter + quarter / 2;
    unmapped_pages = 16;
    if (munmap(memory + unmapped_from * WORDS_PER_PAGE, unmapped_pages * 4096) < 0) {
        snprintf(text, sizeof(text), "EVENTS %lu FAIL munmap: %s\n", round, strerror(errno));
        write_file("lazy-events", text);
        return;
    }
    size_t bad = check_pages(memory, pages, &first_bad, 0);
    if (bad == 0)
        snprintf(text, sizeof(text), "EVENTS %lu OK pages=%zu\n", round, pages);
    else
        snprintf(text, sizeof(text), "EVENTS %lu FAIL bad_pages=%zu first_bad=%zu\n", round, bad, first_bad);
    write_file("lazy-events", text);
}

static void answer(const uint64_t *memory, size_t pages, unsigned long round)
{
    size_t bad = 0;
    for (size_t k = 0; k < pages / 10; k++) {
        size_t page = (k * 7919) % pages;
        if (page >= unmapped_from && page < unmapped_from + unmapped_pages)
            continue;
        if (page_at(memory, page)[k % WORDS_PER_PAGE] != expected(page, k % WORDS_PER_PAGE))
            bad++;
    }
    char path[4200], text[64];
    snprintf(path, sizeof(path), "%s/answer", dir_path);
    snprintf(text, sizeof(text), "ANSWER %lu %s\n", round, bad ? "FAIL" : "OK");
    int fd = open(path, O_WRONLY | O_NONBLOCK);
    if (fd < 0)
        return;
    if (write(fd, text, strlen(text)) < 0) {
    }
    close(fd);
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
    snprintf(dir_path, sizeof(dir_path), "%s", dir);
    size_t pages = (mib << 20) / 4096;
    uint64_t *memory = mmap(NULL, mib << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) {
        fprintf(stderr, "lazy-workload: mmap %lu MiB: %s\n", mib, strerror(errno));
        return 1;
    }
    for (size_t i = 0; i < pages * WORDS_PER_PAGE; i++)
        memory[i] = splitmix64(i);

    sigset_t ours, waiting;
    sigemptyset(&ours);
    sigaddset(&ours, SIGUSR1);
    sigaddset(&ours, SIGUSR2);
    sigaddset(&ours, SIGRTMIN);
    sigprocmask(SIG_BLOCK, &ours, &waiting);
    sigdelset(&waiting, SIGUSR1);
    sigdelset(&waiting, SIGUSR2);
    sigdelset(&waiting, SIGRTMIN);
    struct sigaction action = {.sa_handler = on_signal};
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGUSR1, &action, NULL) < 0 || sigaction(SIGUSR2, &action, NULL) < 0 ||
        sigaction(SIGRTMIN, &action, NULL) < 0)
        return 1;

    if (announce_ready("ready\n") < 0)
        return 1;

    unsigned long checks = 0, events = 0, answers = 0;
    for (;;) {
        while (!check_requested && !events_requested && !answer_requested)
            sigsuspend(&waiting);
        if (answer_requested) {
            answer_requested = 0;
            answer(memory, pages, ++answers);
        }
        if (events_requested) {
            events_requested = 0;
            exercise_events(memory, pages, ++events);
        }
        if (check_requested) {
            check_requested = 0;
            check(memory, pages, ++checks);
        }
    }
}
