/*
 * The emulated arm64 host's helper for tests/arm64-qemu/host-init.sh
 * (static; busybox has no unix-socket client):
 *
 *   host-tool qmp SOCK CMD...       runs each QMP command (a JSON object) in
 *                                   turn and prints each reply on one line
 *   host-tool ping SOCK WORD SECS   sends "WORD\n" to a chardev socket and
 *                                   waits up to SECS s for "pong WORD";
 *                                   exit 0 when it came, 1 when not
 *   host-tool cmp A B BASE [MAX]    compares two RAM dumps page by page
 *                                   (4 KiB); prints "differ N" and up to
 *                                   MAX (16) guest-physical addresses (BASE
 *                                   is the dump's first address)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static int connect_unix(const char *path)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof(a.sun_path), "%s", path);
    for (int i = 0; i < 100; i++) {
        int fd = socket(AF_UNIX, SOCK_STREAM, 0);
        if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0) {
            return fd;
        }
        if (fd >= 0) {
            close(fd);
        }
        usleep(100 * 1000);
    }
    fprintf(stderr, "host-tool: connect %s: %s\n", path, strerror(errno));
    exit(2);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Reads one line (up to '\n') within `secs`; returns its length or -1. */
static int read_line(int fd, char *buf, size_t size, double secs)
{
    size_t len = 0;
    double end = now() + secs;
    while (len < size - 1) {
        int left = (int)((end - now()) * 1000);
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (left <= 0 || poll(&p, 1, left) <= 0) {
            return -1;
        }
        char c;
        if (read(fd, &c, 1) != 1) {
            return -1;
        }
        if (c == '\n') {
            break;
        }
        buf[len++] = c;
    }
    buf[len] = 0;
    return (int)len;
}

static char line[1 << 20];

static int qmp(int argc, char **argv)
{
    int fd = connect_unix(argv[0]);
    if (read_line(fd, line, sizeof(line), 30) < 0) {
        fprintf(stderr, "host-tool: no QMP greeting\n");
        return 2;
    }
    const char *caps = "{\"execute\":\"qmp_capabilities\"}\n";
    if (write(fd, caps, strlen(caps)) < 0) {
        return 2;
    }
    if (read_line(fd, line, sizeof(line), 30) < 0) {
        return 2;
    }
    for (int i = 1; i < argc; i++) {
        if (write(fd, argv[i], strlen(argv[i])) < 0 || write(fd, "\n", 1) < 0) {
            return 2;
        }
        /* Skip events; pmemsave of a large guest takes a while. */
        for (;;) {
            if (read_line(fd, line, sizeof(line), 300) < 0) {
                fprintf(stderr, "host-tool: no QMP reply to %s\n", argv[i]);
                return 2;
            }
            if (strstr(line, "\"return\"") || strstr(line, "\"error\"")) {
                printf("%s\n", line);
                break;
            }
        }
    }
    return 0;
}

static int ping(char **argv)
{
    int fd = connect_unix(argv[0]);
    char want[300];
    snprintf(want, sizeof(want), "pong %s", argv[1]);
    double end = now() + atof(argv[2]);
    /* Resend each second: the guest may not have the port open yet. */
    while (now() < end) {
        if (write(fd, argv[1], strlen(argv[1])) < 0 || write(fd, "\n", 1) < 0) {
            return 1;
        }
        double until = now() + 1;
        while (now() < until) {
            if (read_line(fd, line, sizeof(line), until - now()) >= 0 && strstr(line, want)) {
                return 0;
            }
        }
    }
    return 1;
}

static const unsigned char *map(const char *path, size_t *size)
{
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        fprintf(stderr, "host-tool: %s: %s\n", path, strerror(errno));
        exit(2);
    }
    *size = st.st_size;
    void *p = mmap(NULL, *size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
        fprintf(stderr, "host-tool: mmap %s: %s\n", path, strerror(errno));
        exit(2);
    }
    close(fd);
    return p;
}

static int cmp(int argc, char **argv)
{
    size_t na, nb;
    const unsigned char *a = map(argv[0], &na), *b = map(argv[1], &nb);
    unsigned long long base = strtoull(argv[2], NULL, 0);
    int max = argc > 3 ? atoi(argv[3]) : 16;
    if (na != nb || na == 0) {
        printf("differ sizes %zu %zu\n", na, nb);
        return 1;
    }
    size_t differ = 0;
    char list[4096] = "";
    for (size_t off = 0; off < na; off += 4096) {
        size_t len = na - off < 4096 ? na - off : 4096;
        if (memcmp(a + off, b + off, len)) {
            if ((int)differ < max) {
                size_t l = strlen(list);
                snprintf(list + l, sizeof(list) - l, " %#llx", base + off);
            }
            differ++;
        }
    }
    printf("differ %zu%s\n", differ, list);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 4 && !strcmp(argv[1], "qmp")) {
        return qmp(argc - 2, argv + 2);
    }
    if (argc == 5 && !strcmp(argv[1], "ping")) {
        return ping(argv + 2);
    }
    if (argc >= 5 && !strcmp(argv[1], "cmp")) {
        return cmp(argc - 2, argv + 2);
    }
    fprintf(stderr, "usage: host-tool qmp SOCK CMD... | ping SOCK WORD SECS | "
                    "cmp A B BASE [MAX]\n");
    return 2;
}
