/*
 * ipc-live-workload: a process whose SysV IPC is live when it is checkpointed, and that checks all of it
 * itself after a restore. For tests/contrib/test_ipc_restore.py and benchmarks/bench_restore.py.
 *
 *   ipc-live-workload ATTACHED_MIB UNATTACHED_MIB SEMAPHORES MESSAGES [RESULT_DIR]
 *
 * In its (the container's) IPC namespace it sets kernel.msgmnb to 65536 and kernel.msgmax to 16384, then
 * makes:
 *   - segment A (key 0x4c495601), ATTACHED_MIB MiB (0: none), filled with a pattern and left attached:
 *     the process reads it through its own mapping, the one a restore must give back (CRIU creates it);
 *   - segment U (key 0x4c495602), UNATTACHED_MIB MiB (0: none), and segment S (key 0x4c495603), 10000
 *     bytes (not a whole page), filled and detached again;
 *   - SEMAPHORES semaphores in sets of at most 100 (keys 0x4c495610 on), semaphore i of set s valued
 *     (s * 100 + i) * 7919 % 32768;
 *   - one queue (key 0x4c495605) holding MESSAGES messages, message m of type m % 5 + 1 with a text of
 *     16 + m * 13 % 200 bytes that names m.
 * Each word of a segment is splitmix64 of its index and the segment's seed, so every page differs from
 * every other and from a zero page. Once made it prints "ready\n" with the ids it got, points stdio at
 * /dev/null (a checkpoint must hold no pipe of whoever started it) and waits for signals.
 *
 * On each SIGUSR1 it checks everything: the sysctls; that each key still names the id it got; A through
 * its mapping; U and S attached afresh, every byte, then detached; every semaphore's value (GETALL); the
 * queue's message count and each message's type and text in order, read with MSG_COPY (which leaves
 * them queued, so the check can run again). Then it writes, atomically, RESULT_DIR/ipc-result
 * (RESULT_DIR defaults to /dev/shm; the tests bind-mount a host directory there):
 *
 *   OK <round> attached=<bytes> unattached=<bytes> semaphores=<n> messages=<n> seconds=<check time>
 *   FAIL <round> <what was wrong>
 *
 * <round> counts the checks. Nothing it checks is written after "ready".
 *
 * Build: gcc -static -O2 -Wall -I . -o ipc-live-workload ipc-live-workload.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <time.h>
#include <unistd.h>

#include "workload.h"

#ifndef MSG_COPY
#define MSG_COPY 040000
#endif

#define KEY_ATTACHED 0x4c495601
#define KEY_UNATTACHED 0x4c495602
#define KEY_SMALL 0x4c495603
#define KEY_QUEUE 0x4c495605
#define KEY_SEM_FIRST 0x4c495610
#define SMALL_BYTES 10000
#define SEMS_PER_SET 100
#define MAX_TEXT 256
#define MSGMNB 65536
#define MSGMAX 16384

union semun {
    int val;
    struct semid_ds *buf;
    unsigned short *array;
};

struct message {
    long mtype;
    char text[MAX_TEXT];
};

static char result_file[4096], result_tmp[4096];
static volatile sig_atomic_t check_requested;

static void on_usr1(int signum)
{
    (void)signum;
    check_requested = 1;
}

static void die(const char *what)
{
    fprintf(stderr, "ipc-live-workload: %s: %s\n", what, strerror(errno));
    exit(1);
}

static unsigned char pattern_byte(uint64_t seed, size_t offset)
{
    return (unsigned char)(splitmix64((seed << 40) + offset / 8) >> (8 * (offset % 8)));
}

static void fill(unsigned char *bytes, size_t size, uint64_t seed)
{
    size_t words = size / 8;
    for (size_t w = 0; w < words; w++)
        ((uint64_t *)bytes)[w] = splitmix64((seed << 40) + w);
    for (size_t i = words * 8; i < size; i++)
        bytes[i] = pattern_byte(seed, i);
}

/* The offset of the first byte that differs from the pattern, or -1. */
static long long first_wrong(const unsigned char *bytes, size_t size, uint64_t seed)
{
    size_t words = size / 8;
    for (size_t w = 0; w < words; w++)
        if (((const uint64_t *)bytes)[w] != splitmix64((seed << 40) + w))
            return (long long)(w * 8);
    for (size_t i = words * 8; i < size; i++)
        if (bytes[i] != pattern_byte(seed, i))
            return (long long)i;
    return -1;
}

static unsigned short semaphore_value(int set, int index)
{
    return (unsigned short)(((set * SEMS_PER_SET + index) * 7919L) % 32768);
}

static size_t message_length(int m)
{
    return 16 + (size_t)(m * 13 % 200);
}

static void message_text(int m, char *text)
{
    size_t length = message_length(m);
    int head = snprintf(text, MAX_TEXT, "message %d:", m);
    for (size_t i = (size_t)head; i < length; i++)
        text[i] = (char)('a' + (m + i) % 26);
}

static void report(const char *text)
{
    write_atomically(result_file, result_tmp, text);
}

static void write_sysctl(const char *name, long value)
{
    char path[128], text[32];
    snprintf(path, sizeof(path), "/proc/sys/kernel/%s", name);
    int fd = open(path, O_WRONLY);
    int length = snprintf(text, sizeof(text), "%ld", value);
    if (fd < 0 || write(fd, text, (size_t)length) != length)
        die(path);
    close(fd);
}

static long read_sysctl(const char *name)
{
    char path[128], text[32] = {0};
    snprintf(path, sizeof(path), "/proc/sys/kernel/%s", name);
    int fd = open(path, O_RDONLY);
    if (fd < 0 || read(fd, text, sizeof(text) - 1) <= 0)
        return -1;
    close(fd);
    return strtol(text, NULL, 10);
}

static int make_segment(key_t key, size_t size, uint64_t seed, int keep_attached, unsigned char **mapping)
{
    int id = shmget(key, size, IPC_CREAT | IPC_EXCL | 0600);
    if (id < 0)
        die("shmget");
    unsigned char *bytes = shmat(id, NULL, 0);
    if (bytes == (void *)-1)
        die("shmat");
    fill(bytes, size, seed);
    if (keep_attached)
        *mapping = bytes;
    else if (shmdt(bytes) < 0)
        die("shmdt");
    return id;
}

struct state {
    size_t attached_bytes, unattached_bytes;
    int semaphores, messages, sets;
    unsigned char *attached;
    int attached_id, unattached_id, small_id, queue_id;
    int sem_ids[1024];
};

/* Fills why[] and returns 0 at the first thing that is wrong; 1 when all is well. */
static int check(const struct state *s, char *why, size_t room)
{
    if (read_sysctl("msgmnb") != MSGMNB || read_sysctl("msgmax") != MSGMAX) {
        snprintf(why, room, "sysctls msgmnb=%ld msgmax=%ld", read_sysctl("msgmnb"), read_sysctl("msgmax"));
        return 0;
    }
    int ids[3] = {s->attached_id, s->unattached_id, s->small_id};
    key_t keys[3] = {KEY_ATTACHED, KEY_UNATTACHED, KEY_SMALL};
    size_t sizes[3] = {s->attached_bytes, s->unattached_bytes, SMALL_BYTES};
    for (int k = 0; k < 3; k++) {
        if (sizes[k] == 0)
            continue;
        int found = shmget(keys[k], 0, 0);
        struct shmid_ds ds;
        if (found != ids[k] || shmctl(found, IPC_STAT, &ds) < 0 || ds.shm_segsz != sizes[k]) {
            snprintf(why, room, "segment key %#x: id %d (had %d), errno %d", keys[k], found, ids[k], errno);
            return 0;
        }
        const unsigned char *bytes = k == 0 ? s->attached : shmat(found, NULL, SHM_RDONLY);
        if (bytes == (void *)-1) {
            snprintf(why, room, "shmat of segment %d: errno %d", found, errno);
            return 0;
        }
        long long wrong = first_wrong(bytes, sizes[k], (uint64_t)k + 1);
        if (k != 0)
            shmdt(bytes);
        if (wrong >= 0) {
            snprintf(why, room, "segment %d (%s): byte %lld differs", found, k == 0 ? "attached" : "unattached", wrong);
            return 0;
        }
    }
    unsigned short values[SEMS_PER_SET];
    for (int set = 0; set < s->sets; set++) {
        int count = s->semaphores - set * SEMS_PER_SET < SEMS_PER_SET ? s->semaphores - set * SEMS_PER_SET : SEMS_PER_SET;
        union semun arg = {.array = values};
        if (semget(KEY_SEM_FIRST + set, 0, 0) != s->sem_ids[set] || semctl(s->sem_ids[set], 0, GETALL, arg) < 0) {
            snprintf(why, room, "semaphore set %d (id %d): errno %d", set, s->sem_ids[set], errno);
            return 0;
        }
        for (int i = 0; i < count; i++)
            if (values[i] != semaphore_value(set, i)) {
                snprintf(why, room, "semaphore %d of set %d is %u, not %u", i, set, values[i], semaphore_value(set, i));
                return 0;
            }
    }
    struct msqid_ds qds;
    if (msgget(KEY_QUEUE, 0) != s->queue_id || msgctl(s->queue_id, IPC_STAT, &qds) < 0 ||
        qds.msg_qnum != (msgqnum_t)s->messages) {
        snprintf(why, room, "queue %d: %lu messages, not %d (errno %d)", s->queue_id, (unsigned long)qds.msg_qnum,
                 s->messages, errno);
        return 0;
    }
    struct message got;
    char expected[MAX_TEXT];
    for (int m = 0; m < s->messages; m++) {
        ssize_t length = msgrcv(s->queue_id, &got, MAX_TEXT, m, IPC_NOWAIT | MSG_COPY);
        message_text(m, expected);
        if (length != (ssize_t)message_length(m) || got.mtype != m % 5 + 1 || memcmp(got.text, expected, (size_t)length)) {
            snprintf(why, room, "message %d: length %zd type %ld (errno %d)", m, length, got.mtype, errno);
            return 0;
        }
    }
    return 1;
}

int main(int argc, char **argv)
{
    if (argc != 5 && argc != 6) {
        fprintf(stderr, "usage: %s ATTACHED_MIB UNATTACHED_MIB SEMAPHORES MESSAGES [RESULT_DIR]\n", argv[0]);
        return 2;
    }
    static struct state s;
    s.attached_bytes = strtoul(argv[1], NULL, 10) << 20;
    s.unattached_bytes = strtoul(argv[2], NULL, 10) << 20;
    s.semaphores = atoi(argv[3]);
    s.messages = atoi(argv[4]);
    s.sets = (s.semaphores + SEMS_PER_SET - 1) / SEMS_PER_SET;
    if (s.semaphores < 0 || s.sets > 1024 || s.messages < 0) {
        fprintf(stderr, "ipc-live-workload: bad sizes\n");
        return 2;
    }
    const char *dir = argc == 6 ? argv[5] : "/dev/shm";
    snprintf(result_file, sizeof(result_file), "%s/ipc-result", dir);
    snprintf(result_tmp, sizeof(result_tmp), "%s/.ipc-result.tmp", dir);

    write_sysctl("msgmnb", MSGMNB);
    write_sysctl("msgmax", MSGMAX);
    if (s.attached_bytes)
        s.attached_id = make_segment(KEY_ATTACHED, s.attached_bytes, 1, 1, &s.attached);
    if (s.unattached_bytes)
        s.unattached_id = make_segment(KEY_UNATTACHED, s.unattached_bytes, 2, 0, NULL);
    s.small_id = make_segment(KEY_SMALL, SMALL_BYTES, 3, 0, NULL);
    for (int set = 0; set < s.sets; set++) {
        int count = s.semaphores - set * SEMS_PER_SET < SEMS_PER_SET ? s.semaphores - set * SEMS_PER_SET : SEMS_PER_SET;
        unsigned short values[SEMS_PER_SET];
        for (int i = 0; i < count; i++)
            values[i] = semaphore_value(set, i);
        s.sem_ids[set] = semget(KEY_SEM_FIRST + set, count, IPC_CREAT | IPC_EXCL | 0600);
        union semun arg = {.array = values};
        if (s.sem_ids[set] < 0 || semctl(s.sem_ids[set], 0, SETALL, arg) < 0)
            die("semaphores");
    }
    s.queue_id = msgget(KEY_QUEUE, IPC_CREAT | IPC_EXCL | 0600);
    if (s.queue_id < 0)
        die("msgget");
    for (int m = 0; m < s.messages; m++) {
        struct message message = {.mtype = m % 5 + 1};
        message_text(m, message.text);
        if (msgsnd(s.queue_id, &message, message_length(m), IPC_NOWAIT) < 0)
            die("msgsnd");
    }

    sigset_t usr1, waiting;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    sigprocmask(SIG_BLOCK, &usr1, &waiting);
    sigdelset(&waiting, SIGUSR1);
    struct sigaction action = {.sa_handler = on_usr1};
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGUSR1, &action, NULL) < 0)
        return 1;

    char ready_line[160];
    snprintf(ready_line, sizeof(ready_line), "ids attached=%d unattached=%d small=%d queue=%d\nready\n", s.attached_id,
             s.unattached_id, s.small_id, s.queue_id);
    if (announce_ready(ready_line) < 0)
        return 1;

    for (unsigned long round = 1;; round++) {
        while (!check_requested)
            sigsuspend(&waiting);
        check_requested = 0;
        char why[256], text[400];
        double started = now();
        if (check(&s, why, sizeof(why)))
            snprintf(text, sizeof(text), "OK %lu attached=%zu unattached=%zu semaphores=%d messages=%d seconds=%.3f\n",
                     round, s.attached_bytes, s.unattached_bytes + SMALL_BYTES, s.semaphores, s.messages,
                     now() - started);
        else
            snprintf(text, sizeof(text), "FAIL %lu %s\n", round, why);
        report(text);
    }
}
