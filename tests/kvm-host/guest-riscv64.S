/*
 * The riscv64 test guest: the same job as guest-arm64.S. Runs in VS-mode
 * with address translation off (satp 0), from the PC the host sets; a0
 * holds the address of the mailbox (same layout as the x86 guest):
 *   +0 iteration, +4 stores per round, +8 LCG state (kept by the guest),
 *   +12 page mask, +16 region base, +20 page shift.
 * Each round stores the iteration number to the first word of `stores`
 * pseudo-random pages, then exits with an MMIO write to an unmapped address
 * (0x10000000); the host checks and resumes it for the next round.
 * Linked into the test program; the host copies guest_start .. guest_end
 * into guest memory.
 */
    .section .rodata
    .balign 4
    .option norvc
    .global guest_start, guest_end
guest_start:
round:
    lw    t1, 0(a0)
    lw    t2, 4(a0)
    lw    t3, 8(a0)
    lw    t4, 12(a0)
    lwu   t5, 16(a0)
    lw    t6, 20(a0)
    li    s0, 1103515245
    li    s1, 12345
1:  beqz  t2, 2f
    mulw  t3, t3, s0
    addw  t3, t3, s1
    srliw a1, t3, 8
    and   a1, a1, t4
    sll   a1, a1, t6
    add   a1, a1, t5
    sw    t1, 0(a1)
    addiw t2, t2, -1
    j     1b
2:  sw    t3, 8(a0)
    li    a2, 0x10000000        /* no memslot there */
    sw    t1, 0(a2)
    j     round
guest_end:
