/*
 * How late a thread wakes from a 2 ms sleep beside busy threads, with the
 * kernel's time slice or one it asks for (EEVDF, Linux 6.12 on:
 * sched_attr::sched_runtime of a SCHED_OTHER thread). Prints the
 * lateness percentiles of 1000 wakeups. doc/heavy.md, "Overflows at 8
 * vCPUs", used it to decide on the reaper thread's slice.
 *
 *   cc -O2 -pthread -o wake-latency tools/wake-latency.c
 *   ./wake-latency 8 0        # 8 busy threads, the kernel's slice
 *   ./wake-latency 8 100000   # 8 busy threads, a 0.1 ms slice
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

struct sched_attr_v0 {
    uint32_t size, policy;
    uint64_t flags;
    int32_t nice;
    uint32_t prio;
    uint64_t runtime, deadline, period;
};

static volatile int stop;

static void *busy(void *arg)
{
    (void)arg;
    while (!stop) {
        for (volatile int i = 0; i < 1000; i++) {
        }
    }
    return NULL;
}

static uint64_t now_ns(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000ull + t.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    enum { N = 1000, SLEEP_NS = 2000000 };
    static uint64_t late[N];
    pthread_t t[64];
    int nbusy;
    uint64_t slice;

    if (argc != 3) {
        fprintf(stderr, "usage: %s BUSY_THREADS SLICE_NS (0: the kernel's)\n", argv[0]);
        return 2;
    }
    nbusy = atoi(argv[1]);
    slice = strtoull(argv[2], NULL, 0);
    if (nbusy < 0 || nbusy > 64) {
        fprintf(stderr, "BUSY_THREADS: 0 to 64\n");
        return 2;
    }
    for (int i = 0; i < nbusy; i++) {
        pthread_create(&t[i], NULL, busy, NULL);
    }
    if (slice) {
        struct sched_attr_v0 a = { .size = sizeof(a), .runtime = slice };

        if (syscall(SYS_sched_setattr, 0, &a, 0)) {
            perror("sched_setattr");
            return 1;
        }
    }
    for (int i = 0; i < N; i++) {
        struct timespec d = { 0, SLEEP_NS };
        uint64_t t0 = now_ns();

        nanosleep(&d, NULL);
        late[i] = now_ns() - t0 - SLEEP_NS;
    }
    stop = 1;
    for (int i = 0; i < nbusy; i++) {
        pthread_join(t[i], NULL);
    }
    qsort(late, N, sizeof(late[0]), cmp);
    printf("%d busy threads, slice %llu ns (0: the kernel's), %ld CPUs: wake lateness "
           "p50 %.0f us, p90 %.0f us, p99 %.0f us, max %.0f us\n",
           nbusy, (unsigned long long)slice, sysconf(_SC_NPROCESSORS_ONLN),
           late[N / 2] / 1e3, late[N * 9 / 10] / 1e3, late[N * 99 / 100] / 1e3,
           late[N - 1] / 1e3);
    return 0;
}
