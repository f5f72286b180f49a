/*
 * /init of the arm64 guest that tests/arm64-qemu/run live-migrates: static,
 * no libc beyond glibc's static archive, no busybox.
 *
 * - One writer thread per online CPU (pinned), each storing
 *   (store count << 8 | cpu) into pseudo-random pages of its own part of a
 *   region of guest RAM, without ever pausing.
 * - An echo thread on the virtio-serial port (/dev/vport0p1): every line the
 *   host sends comes back prefixed with "pong ". The guest only sees a line
 *   when the port's receive interrupt arrives, which is an MSI-X message;
 *   with an in-kernel ITS it goes through the ITS, so a lost ITS table on
 *   the destination shows as a ping that is never answered.
 * - A heartbeat on the console every 500 ms: "hb <n> <stores per writer>
 *   echo=<lines echoed>".
 * - Before that, the ITS lines of the kernel log (the table addresses) and
 *   the port's interrupt line from /proc/interrupts, prefixed "guest: ".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/klog.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_CPUS 8

static volatile uint64_t stores[MAX_CPUS];
static volatile uint64_t echoed;
static uint8_t *region;
static size_t region_bytes;
static int ncpus;

static void *writer(void *arg)
{
    int cpu = (int)(intptr_t)arg;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof(set), &set);
    size_t part = region_bytes / ncpus;
    size_t pages = part / 4096;
    uint8_t *base = region + part * cpu;
    uint64_t x = 0x9e3779b97f4a7c15ull * (cpu + 1);
    for (uint64_t n = 1;; n++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        uint64_t *w = (uint64_t *)(base + ((x >> 33) % pages) * 4096 + ((x >> 20) & 0x1f8));
        *w = n << 8 | (uint64_t)cpu;
        stores[cpu] = n;
    }
    return NULL;
}

static void *echo(void *arg)
{
    (void)arg;
    char line[256];
    size_t len = 0;
    int fd = -1;
    for (;;) {
        if (fd < 0) {
            fd = open("/dev/vport0p1", O_RDWR);
            if (fd < 0) {
                usleep(100 * 1000);
                continue;
            }
        }
        char c;
        ssize_t r = read(fd, &c, 1);
        if (r <= 0) {
            /* EOF: the host side is not connected. Keep the port open
             * (closing it drops data) and try again. */
            usleep(20 * 1000);
            continue;
        }
        if (c != '\n' && len < sizeof(line) - 1) {
            line[len++] = c;
            continue;
        }
        line[len] = 0;
        char out[300];
        int n = snprintf(out, sizeof(out), "pong %s\n", line);
        if (write(fd, out, n) == n) {
            echoed++;
        }
        len = 0;
    }
    return NULL;
}

static void print_matching(const char *path, const char *needle)
{
    char buf[512];
    FILE *f = fopen(path, "r");
    if (!f) {
        return;
    }
    while (fgets(buf, sizeof(buf), f)) {
        if (strstr(buf, needle)) {
            printf("guest: %s", buf);
        }
    }
    fclose(f);
}

int main(void)
{
    mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
    int con = open("/dev/console", O_RDWR);
    if (con >= 0) {
        dup2(con, 0);
        dup2(con, 1);
        dup2(con, 2);
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    /* The initramfs holds only /init: make the mount points first. */
    mkdir("/proc", 0755);
    mkdir("/sys", 0755);
    if (mount("proc", "/proc", "proc", 0, NULL) != 0 ||
        mount("sysfs", "/sys", "sysfs", 0, NULL) != 0) {
        printf("guest: mount /proc or /sys: %s\n", strerror(errno));
    }

    ncpus = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (ncpus < 1 || ncpus > MAX_CPUS) {
        ncpus = 1;
    }
    const char *mib = getenv("kds_region_mib");
    region_bytes = (size_t)(mib ? atoi(mib) : 64) << 20;
    region = mmap(NULL, region_bytes, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (region == MAP_FAILED) {
        printf("guest: mmap %zu bytes: %s\n", region_bytes, strerror(errno));
        return 1;
    }

    /* The kernel log's ITS lines name the tables the ITS saves. */
    static char klog[1 << 17];
    int n = klogctl(3, klog, sizeof(klog) - 1);
    if (n > 0) {
        klog[n] = 0;
        for (char *l = strtok(klog, "\n"); l; l = strtok(NULL, "\n")) {
            if (strstr(l, "ITS")) {
                printf("guest: %s\n", l);
            }
        }
    }

    pthread_t t;
    pthread_create(&t, NULL, echo, NULL);
    for (int i = 0; i < ncpus; i++) {
        pthread_create(&t, NULL, writer, (void *)(intptr_t)i);
    }
    printf("guest: %d writers on %zu MiB\n", ncpus, region_bytes >> 20);
    for (uint64_t hb = 1;; hb++) {
        struct timespec ts = {0, 500 * 1000 * 1000};
        nanosleep(&ts, NULL);
        if (hb == 4) {
            print_matching("/proc/interrupts", "virtio");
        }
        printf("hb %llu", (unsigned long long)hb);
        for (int i = 0; i < ncpus; i++) {
            printf(" %llu", (unsigned long long)stores[i]);
        }
        printf(" echo=%llu\n", (unsigned long long)echoed);
    }
}
