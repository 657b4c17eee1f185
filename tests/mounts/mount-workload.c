/*
 * mount-workload: a container init that leaves known files in its tmpfs mounts, for checkpoints whose
 * mount tree tests compare with a pooled mount namespace (tests/mounts_support.py keeps the same list).
 *
 *   mount-workload          the workload
 *   mount-workload wait [DIR]   only sleeps, in DIR (a stand-in for a restored init, or a busy process)
 *
 * It writes, then keeps open, prints "ready\n", points stdin/stdout/stderr at /dev/null and sleeps forever:
 *   /run/cer/state.txt          "state of the workload\n", mode 0640
 *   /run/cer/sub/data.bin       65536 bytes (i * 31 + 7) & 0xff, mode 0600, owner 1000:1000
 *   /run/cer/link               symlink to "state.txt"
 *   /run/cer/hard               hard link of /run/cer/state.txt
 *   /run/cer/empty/             an empty directory, mode 0750
 *   /dev/shm/cer-shm            "shared\n" x 100, mode 0666
 *   /tmp/cer-tmp                "tmp file\n", mode 0644, mtime 2001-09-09 01:46:40 UTC
 * Open while it sleeps: fd 3 /run/cer/state.txt (read), fd 4 /dev/shm/cer-shm (read-write), cwd /run/cer/sub.
 * On SIGUSR1 it checks, through those fds and its own /proc, that they still show what it wrote and that it is
 * pid 1 of its PID namespace, and writes "ok\n" or what differs to /run/cer/check (so a restore can be checked
 * from inside: the files it had open are open, its /proc is its own).
 *
 * Build: gcc -static -O2 -Wall -o mount-workload mount-workload.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

static volatile sig_atomic_t check_requested;

static void on_usr1(int signo)
{
    (void)signo;
    check_requested = 1;
}

/* What the workload verifies after a restore; "ok\n" or the first difference, into /run/cer/check. */
static void check(void)
{
    char report[256] = "ok\n", buf[64] = {0};
    static char shared[700];
    ssize_t n = pread(3, buf, sizeof buf - 1, 0);
    if (n != 22 || memcmp(buf, "state of the workload\n", 22) != 0)
        snprintf(report, sizeof report, "fd 3 reads %zd bytes: %.30s\n", n, buf);
    else if (pread(4, shared, sizeof shared, 0) != 700 || memcmp(shared + 693, "shared\n", 7) != 0)
        snprintf(report, sizeof report, "fd 4 does not read /dev/shm/cer-shm\n");
    else if (access("data.bin", R_OK) != 0)
        snprintf(report, sizeof report, "cwd is not /run/cer/sub: %s\n", strerror(errno));
    else {
        char stat[64] = {0};
        int fd = open("/proc/self/stat", O_RDONLY);
        if (fd < 0 || read(fd, stat, sizeof stat - 1) <= 0 || strncmp(stat, "1 (", 3) != 0)
            snprintf(report, sizeof report, "/proc/self/stat says %.20s\n", stat);
        if (fd >= 0)
            close(fd);
    }
    int out = open("/run/cer/check.tmp", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (out >= 0) {
        if (write(out, report, strlen(report)) < 0)
            report[0] = 0;
        close(out);
        rename("/run/cer/check.tmp", "/run/cer/check");
    }
}

static void die(const char *what)
{
    fprintf(stderr, "mount-workload: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void put(const char *path, const void *data, size_t size, mode_t mode)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, mode);
    if (fd < 0)
        die(path);
    if (write(fd, data, size) != (ssize_t)size)
        die(path);
    if (fchmod(fd, mode) < 0)
        die(path);
    close(fd);
}

static void keep_open(const char *path, int flags, int want)
{
    int fd = open(path, flags);
    if (fd < 0 || (fd != want && (dup2(fd, want) != want || close(fd) < 0)))
        die(path);
}

int main(int argc, char **argv)
{
    static unsigned char data[65536];
    if (argc > 1 && strcmp(argv[1], "wait") == 0) {
        if (argc > 2 && chdir(argv[2]) < 0)
            die(argv[2]);
        for (;;)
            pause();
    }
    static char shared[700];
    for (size_t i = 0; i < sizeof data; i++)
        data[i] = (i * 31 + 7) & 0xff;
    for (int i = 0; i < 100; i++)
        memcpy(shared + 7 * i, "shared\n", 7);

    if (mkdir("/run/cer", 0755) < 0 || mkdir("/run/cer/sub", 0755) < 0 || mkdir("/run/cer/empty", 0750) < 0)
        die("mkdir /run/cer");
    chmod("/run/cer/empty", 0750);
    put("/run/cer/state.txt", "state of the workload\n", 22, 0640);
    put("/run/cer/sub/data.bin", data, sizeof data, 0600);
    if (chown("/run/cer/sub/data.bin", 1000, 1000) < 0)
        die("chown");
    if (symlink("state.txt", "/run/cer/link") < 0)
        die("symlink");
    if (link("/run/cer/state.txt", "/run/cer/hard") < 0)
        die("link");
    put("/dev/shm/cer-shm", shared, sizeof shared, 0666);
    put("/tmp/cer-tmp", "tmp file\n", 9, 0644);
    struct timeval times[2] = {{1000000000, 0}, {1000000000, 0}};
    if (utimes("/tmp/cer-tmp", times) < 0)
        die("utimes");

    keep_open("/run/cer/state.txt", O_RDONLY, 3);
    keep_open("/dev/shm/cer-shm", O_RDWR, 4);
    if (chdir("/run/cer/sub") < 0)
        die("chdir");
    signal(SIGUSR1, on_usr1);

    if (write(1, "ready\n", 6) != 6)
        die("write");
    int null = open("/dev/null", O_RDWR);
    if (null < 0)
        die("/dev/null");
    dup2(null, 0);
    dup2(null, 1);
    dup2(null, 2);
    if (null > 2)
        close(null);
    for (;;) {
        pause();
        if (check_requested) {
            check_requested = 0;
            check();
        }
    }
}
