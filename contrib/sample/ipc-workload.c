/*
 * ipc-workload: a tiny process whose IPC and UTS namespaces hold known content, for CRIU
 * checkpoints that tests can compare against (see contrib/sample/make-checkpoint and
 * tests/criu_support.py, which hold the same expected values).
 *
 *   ipc-workload [--empty-ipc] [HOSTNAME [DOMAINNAME]]
 *
 * It unshares its own IPC and UTS namespaces first, so it never changes the caller's (running it
 * by hand on a host is harmless); the launcher adds a pid namespace so the dump restores anywhere.
 * Then, unless --empty-ipc:
 *   - IPC sysctls set to non-default values (kernel.msgmax, msgmnb, msgmni, sem, shmmni,
 *     fs.mqueue.queues_max);
 *   - shm id 7,  key 0x43455201, 4 KiB,  mode 0600, owner 0:0,       bytes (i*7+3) & 0xff;
 *   - shm id 8,  key 0x43455202, 2 MiB,  mode 0640, owner 1000:1000, bytes from an xorshift32
 *     stream seeded 0x12345678 (2 MiB so that CRIU stores it through pagemap-shmem-<id>.img);
 *   - sem id 3,  key 0x43455203, 4 semaphores = {1, 7, 42, 32000}, mode 0660, owner 0:0;
 *   - msg id 5,  key 0x43455204, mode 0620, owner 1001:1002, messages in queue order:
 *       (1, "hello"), (2, "world\0\x01\x02\xff"), (7, 300 bytes of 'x'), (1, "again type 1").
 * Ids are fixed through kernel.{shm,sem,msg}_next_id so restores can be checked id for id.
 * With --empty-ipc it only sets the host and domain names (defaults "cer-sample-empty" and
 * "cer.example"): an IPC namespace with default content, like a fresh pool namespace.
 *
 * Then it prints "ready\n", points stdin/stdout/stderr at /dev/null and closes every other fd (so
 * the dumped tree holds no pipe or file of whoever launched it), and sleeps forever. Its working
 * directory is "/" so that a restore does not depend on the launcher's directory; the launcher
 * deletes the binary before the dump so that CRIU stores it in the images as a ghost file and the
 * checkpoint restores on machines that never built it.
 *
 * Build: gcc -static -O2 -Wall -o ipc-workload ipc-workload.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <unistd.h>

#define SHM_SMALL_KEY 0x43455201
#define SHM_SMALL_ID 7
#define SHM_SMALL_SIZE 4096
#define SHM_BIG_KEY 0x43455202
#define SHM_BIG_ID 8
#define SHM_BIG_SIZE (2 * 1024 * 1024)
#define SEM_KEY 0x43455203
#define SEM_ID 3
#define MSG_KEY 0x43455204
#define MSG_ID 5

union semun { /* callers must define it (semctl(2)) */
    int val;
    struct semid_ds *buf;
    unsigned short *array;
};

static void die(const char *what)
{
    fprintf(stderr, "ipc-workload: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void write_file(const char *path, const char *value)
{
    int fd = open(path, O_WRONLY);
    if (fd < 0)
        die(path);
    ssize_t n = write(fd, value, strlen(value));
    if (n != (ssize_t)strlen(value))
        die(path);
    close(fd);
}

/* The next object created gets exactly this id (one-shot: the kernel resets it to -1). */
static void next_id(const char *kind, int id)
{
    char path[64], value[16];
    snprintf(path, sizeof(path), "/proc/sys/kernel/%s_next_id", kind);
    snprintf(value, sizeof(value), "%d", id);
    write_file(path, value);
}

static int make_shm(key_t key, int id, size_t size, int mode, uid_t uid, gid_t gid, int big)
{
    next_id("shm", id);
    int shmid = shmget(key, size, IPC_CREAT | IPC_EXCL | mode);
    if (shmid < 0)
        die("shmget");
    if (shmid != id) {
        fprintf(stderr, "ipc-workload: shm got id %d, wanted %d\n", shmid, id);
        exit(1);
    }
    unsigned char *p = shmat(shmid, NULL, 0);
    if (p == (void *)-1)
        die("shmat");
    uint32_t x = 0x12345678;
    for (size_t i = 0; i < size; i++) {
        if (big) { /* xorshift32: incompressible, so every page really is stored */
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            p[i] = x & 0xff;
        } else {
            p[i] = (i * 7 + 3) & 0xff;
        }
    }
    /* Detach: the segment lives in the namespace, not in this process's memory map. */
    if (shmdt(p) < 0)
        die("shmdt");
    if (uid || gid) {
        struct shmid_ds ds;
        if (shmctl(shmid, IPC_STAT, &ds) < 0)
            die("shmctl IPC_STAT");
        ds.shm_perm.uid = uid;
        ds.shm_perm.gid = gid;
        if (shmctl(shmid, IPC_SET, &ds) < 0)
            die("shmctl IPC_SET");
    }
    return shmid;
}

static void make_sem(void)
{
    next_id("sem", SEM_ID);
    int semid = semget(SEM_KEY, 4, IPC_CREAT | IPC_EXCL | 0660);
    if (semid != SEM_ID)
        die("semget");
    unsigned short values[4] = {1, 7, 42, 32000};
    union semun arg = {.array = values};
    if (semctl(semid, 0, SETALL, arg) < 0)
        die("semctl SETALL");
}

static void make_msg(void)
{
    static const struct {
        long mtype;
        const char *text;
        size_t len;
    } msgs[] = {
        {1, "hello", 5},
        {2, "world\0\x01\x02\xff", 9},
        {7, NULL, 300}, /* 300 x 'x' */
        {1, "again type 1", 12},
    };
    next_id("msg", MSG_ID);
    int msqid = msgget(MSG_KEY, IPC_CREAT | IPC_EXCL | 0620);
    if (msqid != MSG_ID)
        die("msgget");
    for (size_t i = 0; i < sizeof(msgs) / sizeof(msgs[0]); i++) {
        struct {
            long mtype;
            char mtext[512];
        } m;
        m.mtype = msgs[i].mtype;
        if (msgs[i].text)
            memcpy(m.mtext, msgs[i].text, msgs[i].len);
        else
            memset(m.mtext, 'x', msgs[i].len);
        if (msgsnd(msqid, &m, msgs[i].len, IPC_NOWAIT) < 0)
            die("msgsnd");
    }
    struct msqid_ds ds;
    if (msgctl(msqid, IPC_STAT, &ds) < 0)
        die("msgctl IPC_STAT");
    ds.msg_perm.uid = 1001;
    ds.msg_perm.gid = 1002;
    if (msgctl(msqid, IPC_SET, &ds) < 0)
        die("msgctl IPC_SET");
}

int main(int argc, char **argv)
{
    int empty_ipc = 0;
    int argi = 1;
    if (argi < argc && strcmp(argv[argi], "--empty-ipc") == 0) {
        empty_ipc = 1;
        argi++;
    }
    const char *hostname = argi < argc ? argv[argi++] : (empty_ipc ? "cer-sample-empty" : "cer-sample");
    const char *domainname = argi < argc ? argv[argi++] : "cer.example";
    if (argi < argc) {
        fprintf(stderr, "usage: %s [--empty-ipc] [HOSTNAME [DOMAINNAME]]\n", argv[0]);
        return 2;
    }

    /* CRIU refuses to dump a tree whose session leader is outside the tree's pid namespace:
     * lead a session of our own (fails harmlessly with EPERM if we already lead a group). */
    setsid();

    if (unshare(CLONE_NEWIPC | CLONE_NEWUTS) < 0)
        die("unshare(CLONE_NEWIPC|CLONE_NEWUTS)");
    if (sethostname(hostname, strlen(hostname)) < 0)
        die("sethostname");
    if (setdomainname(domainname, strlen(domainname)) < 0)
        die("setdomainname");

    if (!empty_ipc) {
        /* IPC sysctls are per IPC namespace: these writes reach only the new one. */
        write_file("/proc/sys/kernel/msgmax", "16384");          /* default 8192 */
        write_file("/proc/sys/kernel/msgmnb", "32768");          /* default 16384 */
        write_file("/proc/sys/kernel/msgmni", "1000");           /* default 32000 */
        write_file("/proc/sys/kernel/sem", "300 60000 64 512");  /* default 32000 1024000000 500 32000 */
        write_file("/proc/sys/kernel/shmmni", "2000");           /* default 4096 */
        write_file("/proc/sys/fs/mqueue/queues_max", "100");     /* default 256 */

        make_shm(SHM_SMALL_KEY, SHM_SMALL_ID, SHM_SMALL_SIZE, 0600, 0, 0, 0);
        make_shm(SHM_BIG_KEY, SHM_BIG_ID, SHM_BIG_SIZE, 0640, 1000, 1000, 1);
        make_sem();
        make_msg();
    }

    if (chdir("/") < 0)
        die("chdir /");
    if (printf("ready\n") < 0 || fflush(stdout) != 0)
        die("stdout");
    int devnull = open("/dev/null", O_RDWR);
    if (devnull < 0)
        die("/dev/null");
    for (int fd = 0; fd < 3; fd++)
        dup2(devnull, fd);
    close_range(3, ~0U, 0);

    for (;;)
        pause();
}
