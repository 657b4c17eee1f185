/*
 * mount-workload: a container init that leaves known files in its tmpfs mounts, for checkpoints whose
 * mount tree tests compare with a pooled mount namespace (tests/mounts_support.py keeps the same list).
 *
 *   mount-workload
 *
 * It writes, then prints "ready\n", points stdin/stdout/stderr at /dev/null and sleeps forever:
 *   /run/cer/state.txt          "state of the workload\n", mode 0640
 *   /run/cer/sub/data.bin       65536 bytes (i * 31 + 7) & 0xff, mode 0600, owner 1000:1000
 *   /run/cer/link               symlink to "state.txt"
 *   /run/cer/hard               hard link of /run/cer/state.txt
 *   /run/cer/empty/             an empty directory, mode 0750
 *   /dev/shm/cer-shm            "shared\n" x 100, mode 0666
 *   /tmp/cer-tmp                "tmp file\n", mode 0644, mtime 2001-09-09 01:46:40 UTC
 *
 * Build: gcc -static -O2 -Wall -o mount-workload mount-workload.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

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

int main(void)
{
    static unsigned char data[65536];
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
    for (;;)
        pause();
}
