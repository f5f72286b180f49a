// SPDX-License-Identifier: GPL-2.0-only
/*
 * dirty_ring_signal_test: KVM_RESET_DIRTY_RINGS cut short by a signal
 * leaves pages write-enabled whose ring entries it has already reset, so
 * the guest's next writes to them are never logged.
 *
 * Written in the shape of a KVM selftest (tools/testing/selftests/kvm),
 * standalone: raw ioctls, no kvm_util, so that it builds with a cross
 * compiler alone. arm64 only (the guest is a few instructions of A64).
 *
 * One vCPU stores a round number to pseudo-random pages of a dirty-logged
 * memslot (4 KiB pages, no THP), round after round, exiting to userspace
 * with an MMIO write after each round. A reaper thread harvests the vCPU's
 * ring and calls KVM_RESET_DIRTY_RINGS every 2 ms while a third thread
 * sends it SIGUSR2 (an empty handler, no SA_RESTART) as fast as it can.
 * After each round the main thread harvests what is left and compares
 * memory with a shadow copy: every page whose first word changed must have
 * been reported by the ring. A page that changed without an entry is lost.
 *
 * Since "KVM: Bail from the dirty ring reset flow if a signal is pending"
 * (v6.17), kvm_dirty_ring_reset() returns when signal_pending() before it
 * has called kvm_reset_dirty_gfn() for the batch it was building: up to
 * 64 entries already marked invalid (reset), their pages still writable.
 * The ioctl returns the count so far, which userspace cannot tell from a
 * complete reset of fewer entries.
 *
 * Usage: dirty_ring_signal_test [-b] [-r rounds]
 *   -b  block signals around KVM_RESET_DIRTY_RINGS (what userspace can do
 *       today; the test then expects no loss)
 * Exit: KSFT_PASS (0) when no page was lost, KSFT_FAIL (1) when some were,
 * KSFT_SKIP (4) without an arm64 KVM with the dirty ring.
 *
 * As pid 1 (an initramfs's /init) it mounts devtmpfs, runs itself without
 * and then with -b, and powers off.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define KSFT_PASS 0
#define KSFT_FAIL 1
#define KSFT_SKIP 4

#define TEST_ASSERT(cond, fmt, ...)                                            \
	do {                                                                   \
		if (!(cond)) {                                                 \
			fprintf(stderr, "==== Test Assertion Failure ====\n"   \
				"  %s:%d: %s\n  errno=%d (%s)\n  " fmt "\n",   \
				__FILE__, __LINE__, #cond, errno,              \
				strerror(errno), ##__VA_ARGS__);               \
			finish(KSFT_FAIL);                                     \
		}                                                              \
	} while (0)

#ifndef KVM_CAP_DIRTY_LOG_RING_ACQ_REL
#define KVM_CAP_DIRTY_LOG_RING_ACQ_REL 223
#endif
#ifndef KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP
#define KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP 225
#endif
#ifndef KVM_EXIT_DIRTY_RING_FULL
#define KVM_EXIT_DIRTY_RING_FULL 31
#endif
/* arm64's value; Debian 12's 6.1 headers carry the generic 0. */
#define DIRTY_LOG_PAGE_OFFSET 64
#define GFN_DIRTY 1u
#define GFN_RESET 2u

#ifndef ROUNDS
#define ROUNDS 12
#endif
#define RAM_BASE 0x40000000ull
#define DATA_GPA (RAM_BASE + 0x100000ull)
#define DATA_PAGES 4096u
#define STORES 3000u
#define RING_ENTRIES 4096u
#define MMIO_EXIT 0x10000000ull

/*
 * The guest, at EL1 with the MMU off; x0 holds the mailbox:
 * +0 round, +4 stores, +8 LCG state, +12 page mask, +16 base, +20 shift.
 */
asm(".pushsection .rodata\n"
    ".balign 4\n"
    ".global guest_start, guest_end\n"
    "guest_start:\n"
    "1:  ldr  w1, [x0]\n"
    "    ldr  w2, [x0, #4]\n"
    "    ldr  w3, [x0, #8]\n"
    "    ldr  w4, [x0, #12]\n"
    "    ldr  w5, [x0, #16]\n"
    "    ldr  w6, [x0, #20]\n"
    "    movz w8, #0x4e6d\n"
    "    movk w8, #0x41c6, lsl #16\n"
    "    mov  w9, #12345\n"
    "2:  cbz  w2, 3f\n"
    "    madd w3, w3, w8, w9\n"
    "    lsr  w7, w3, #8\n"
    "    and  w7, w7, w4\n"
    "    lsl  w7, w7, w6\n"
    "    str  w1, [x5, x7]\n"
    "    sub  w2, w2, #1\n"
    "    b    2b\n"
    "3:  str  w3, [x0, #8]\n"
    "    movz x10, #0x1000, lsl #16\n"
    "    str  w1, [x10]\n"
    "    b    1b\n"
    "guest_end:\n"
    ".popsection\n");
extern const uint8_t guest_start[], guest_end[];

static int vm_fd, vcpu_fd, block_signals;
static long page;
static struct kvm_dirty_gfn *ring;
static uint32_t fetch; /* next ring entry to harvest */
static uint32_t pending; /* harvested, not reset yet */
static uint8_t *data;
static atomic_uchar *reported; /* per data page, since the last check */
static pthread_mutex_t ring_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_int stop;
static atomic_int reaper_tid;
static atomic_ulong resets, short_resets, signals;

static void finish(int code)
{
	fflush(stdout);
	fflush(stderr);
	if (getpid() == 1) {
		sync();
		reboot(RB_POWER_OFF);
	}
	exit(code);
}

/* Harvest every dirty entry, then reset; with ring_lock held. */
static void harvest_and_reset(void)
{
	uint32_t n = 0;

	for (;;) {
		struct kvm_dirty_gfn *e = &ring[fetch % RING_ENTRIES];
		/* Pairs with the kernel's smp_store_release() of the flags. */
		uint32_t flags = __atomic_load_n(&e->flags, __ATOMIC_ACQUIRE);

		if (!(flags & GFN_DIRTY))
			break;
		if (e->slot == 1 && e->offset < DATA_PAGES)
			atomic_store(&reported[e->offset], 1);
		/* Pairs with the kernel's smp_load_acquire() in the reset. */
		__atomic_store_n(&e->flags, GFN_RESET, __ATOMIC_RELEASE);
		fetch++;
		n++;
	}
	pending += n;
	if (!pending)
		return;

	sigset_t all, old;

	sigfillset(&all);
	if (block_signals)
		pthread_sigmask(SIG_BLOCK, &all, &old);
	int r = ioctl(vm_fd, KVM_RESET_DIRTY_RINGS, 0);

	if (block_signals)
		pthread_sigmask(SIG_SETMASK, &old, NULL);
	TEST_ASSERT(r >= 0 && (uint32_t)r <= pending, "KVM_RESET_DIRTY_RINGS: %d of %u", r,
		    pending);
	atomic_fetch_add(&resets, 1);
	/*
	 * Fewer than harvested: the kernel stopped early. The rest are reset
	 * by the next call; the batch it stopped in stays write-enabled.
	 */
	if ((uint32_t)r < pending)
		atomic_fetch_add(&short_resets, 1);
	pending -= (uint32_t)r;
}

static void on_signal(int sig)
{
	(void)sig;
}

static void *reaper(void *arg)
{
	(void)arg;
	atomic_store(&reaper_tid, (int)syscall(SYS_gettid));
	while (!atomic_load(&stop)) {
		struct timespec t = { 0, 2000000 };

		while (nanosleep(&t, &t) && errno == EINTR && !atomic_load(&stop))
			;
		pthread_mutex_lock(&ring_lock);
		harvest_and_reset();
		pthread_mutex_unlock(&ring_lock);
	}
	return NULL;
}

static void *sender(void *arg)
{
	(void)arg;
	while (!atomic_load(&reaper_tid) && !atomic_load(&stop))
		sched_yield();
	while (!atomic_load(&stop)) {
		syscall(SYS_tgkill, getpid(), atomic_load(&reaper_tid), SIGUSR2);
		atomic_fetch_add(&signals, 1);
	}
	return NULL;
}

static void set_reg(uint64_t off, uint64_t v)
{
	struct kvm_one_reg r = {
		.id = KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE |
		      (off / sizeof(uint32_t)),
		.addr = (uint64_t)(uintptr_t)&v,
	};

	TEST_ASSERT(ioctl(vcpu_fd, KVM_SET_ONE_REG, &r) == 0, "KVM_SET_ONE_REG");
}

int main(int argc, char **argv)
{
	int rounds = ROUNDS, opt;

	if (getpid() == 1) {
		/* /init: the run without blocking, then the one with it. */
		mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
		char *runs[][4] = { { argv[0], NULL }, { argv[0], "-b", NULL } };

		for (int i = 0; i < 2; i++) {
			pid_t pid = fork();

			if (pid == 0) {
				execv("/proc/self/exe", runs[i]);
				execv(argv[0], runs[i]);
				_exit(127);
			}
			int st;

			waitpid(pid, &st, 0);
		}
		finish(KSFT_PASS);
	}
	while ((opt = getopt(argc, argv, "br:")) != -1) {
		if (opt == 'b')
			block_signals = 1;
		else if (opt == 'r')
			rounds = atoi(optarg);
	}
	page = sysconf(_SC_PAGESIZE);

	struct utsname u;

	uname(&u);
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);

	if (kvm < 0) {
		printf("# no /dev/kvm: skip\n");
		finish(KSFT_SKIP);
	}
	vm_fd = ioctl(kvm, KVM_CREATE_VM, 0);
	TEST_ASSERT(vm_fd >= 0, "KVM_CREATE_VM");
	if (ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING_ACQ_REL) <= 0) {
		printf("# Linux %s: no KVM_CAP_DIRTY_LOG_RING_ACQ_REL: skip\n", u.release);
		finish(KSFT_SKIP);
	}
	struct kvm_enable_cap cap = {
		.cap = KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
		.args = { RING_ENTRIES * sizeof(struct kvm_dirty_gfn) },
	};

	TEST_ASSERT(ioctl(vm_fd, KVM_ENABLE_CAP, &cap) == 0, "enable the ring");
	/*
	 * The backup bitmap, as arm64 VMMs enable it (the vGIC ITS needs it):
	 * with it a logging slot has a dirty bitmap, which arm64 requires to
	 * map the slot page by page (memslot_is_logging()).
	 */
	struct kvm_enable_cap bitmap = { .cap = KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP };

	TEST_ASSERT(ioctl(vm_fd, KVM_ENABLE_CAP, &bitmap) == 0, "enable the backup bitmap");

	uint8_t *code = mmap(NULL, 4 * page, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	data = mmap(NULL, DATA_PAGES * page, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	TEST_ASSERT(code != MAP_FAILED && data != MAP_FAILED, "mmap");
	/* Page-sized stage-2 mappings: no huge page hides the logging. */
	madvise(data, DATA_PAGES * page, MADV_NOHUGEPAGE);
	memset(data, 0, DATA_PAGES * page);
	memcpy(code, guest_start, (uintptr_t)guest_end - (uintptr_t)guest_start);

	struct kvm_userspace_memory_region r0 = {
		0, 0, RAM_BASE, 4 * page, (uint64_t)(uintptr_t)code
	};
	struct kvm_userspace_memory_region r1 = {
		1, KVM_MEM_LOG_DIRTY_PAGES, DATA_GPA, DATA_PAGES * page,
		(uint64_t)(uintptr_t)data
	};

	TEST_ASSERT(ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &r0) == 0, "code slot");
	TEST_ASSERT(ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &r1) == 0, "data slot");

	struct kvm_vcpu_init init;

	vcpu_fd = ioctl(vm_fd, KVM_CREATE_VCPU, 0);
	TEST_ASSERT(vcpu_fd >= 0, "KVM_CREATE_VCPU");
	TEST_ASSERT(ioctl(vm_fd, KVM_ARM_PREFERRED_TARGET, &init) == 0, "target");
	TEST_ASSERT(ioctl(vcpu_fd, KVM_ARM_VCPU_INIT, &init) == 0, "KVM_ARM_VCPU_INIT");
	set_reg(offsetof(struct kvm_regs, regs.pc), RAM_BASE);
	set_reg(offsetof(struct kvm_regs, regs.regs[0]), RAM_BASE + page);

	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE,
				   MAP_SHARED, vcpu_fd, 0);

	ring = mmap(NULL, RING_ENTRIES * sizeof(*ring), PROT_READ | PROT_WRITE,
		    MAP_SHARED, vcpu_fd, DIRTY_LOG_PAGE_OFFSET * page);
	TEST_ASSERT(run != MAP_FAILED && ring != MAP_FAILED, "mmap kvm_run / ring");

	uint32_t *shadow = calloc(DATA_PAGES, sizeof(uint32_t));

	reported = calloc(DATA_PAGES, 1);
	TEST_ASSERT(shadow && reported, "calloc");

	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	TEST_ASSERT(sigaction(SIGUSR2, &sa, NULL) == 0, "sigaction");
	pthread_t rt, st;

	pthread_create(&rt, NULL, reaper, NULL);
	pthread_create(&st, NULL, sender, NULL);

	printf("# Linux %s, %s signals around KVM_RESET_DIRTY_RINGS, %d rounds of %u stores\n",
	       u.release, block_signals ? "blocking" : "not blocking", rounds, STORES);
	uint32_t *mb = (uint32_t *)(code + page);
	uint64_t changed = 0, lost = 0, full = 0;
	uint8_t *ever_lost = calloc(DATA_PAGES, 1);

	mb[2] = 1;
	for (int it = 1; it <= rounds; it++) {
		mb[0] = it;
		mb[1] = STORES;
		mb[3] = DATA_PAGES - 1;
		mb[4] = (uint32_t)DATA_GPA;
		mb[5] = __builtin_ctzl(page);
		for (;;) {
			int r = ioctl(vcpu_fd, KVM_RUN, 0);

			TEST_ASSERT(r == 0 || errno == EINTR, "KVM_RUN");
			if (r)
				continue;
			if (run->exit_reason == KVM_EXIT_MMIO)
				break;
			TEST_ASSERT(run->exit_reason == KVM_EXIT_DIRTY_RING_FULL,
				    "exit reason %u", run->exit_reason);
			full++;
			pthread_mutex_lock(&ring_lock);
			harvest_and_reset();
			pthread_mutex_unlock(&ring_lock);
		}
		/* The vCPU is out of the guest: harvest the rest, compare. */
		pthread_mutex_lock(&ring_lock);
		harvest_and_reset();
		uint64_t round_lost = 0;

		for (uint32_t p = 0; p < DATA_PAGES; p++) {
			uint32_t w = *(volatile uint32_t *)(data + (uint64_t)p * page);

			if (w != shadow[p]) {
				changed++;
				if (!atomic_load(&reported[p])) {
					round_lost++;
					ever_lost[p] = 1;
				}
				shadow[p] = w;
			}
			atomic_store(&reported[p], 0);
		}
		pthread_mutex_unlock(&ring_lock);
		lost += round_lost;
		printf("# round %d: %lu pages changed without a ring entry\n", it,
		       (unsigned long)round_lost);
		fflush(stdout);
	}
	atomic_store(&stop, 1);
	pthread_join(st, NULL);
	pthread_join(rt, NULL);

	uint64_t distinct = 0;

	for (uint32_t p = 0; p < DATA_PAGES; p++)
		distinct += ever_lost[p];
	printf("# %lu pages changed, %lu unreported (%lu distinct pages); %lu resets, %lu short, "
	       "%lu signals, %lu ring-full exits\n", (unsigned long)changed,
	       (unsigned long)lost, (unsigned long)distinct, atomic_load(&resets),
	       atomic_load(&short_resets), atomic_load(&signals), (unsigned long)full);
	printf("%s 1 dirty_ring_signal_test%s\n", lost ? "not ok" : "ok",
	       block_signals ? " (signals blocked)" : "");
	finish(lost ? KSFT_FAIL : KSFT_PASS);
	return 0;
}
