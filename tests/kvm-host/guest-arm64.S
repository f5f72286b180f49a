/*
 * The arm64 test guest: the same job as guest/guest.S on x86. Runs at EL1
 * with the MMU off, straight from KVM_ARM_VCPU_INIT; X0 holds the address of
 * the mailbox (same layout as the x86 guest):
 *   +0 iteration, +4 stores per round, +8 LCG state (kept by the guest),
 *   +12 page mask, +16 region base, +20 page shift.
 * Each round stores the iteration number to the first word of `stores`
 * pseudo-random pages, then exits with an MMIO write to an unmapped address
 * (0x10000000); the host checks and resumes it for the next round.
 * Linked into the test program; the host copies guest_start ..
 * guest_end into guest memory.
 */
    .section .rodata
    .balign 4
    .global guest_start, guest_end
guest_start:
round:
    ldr  w1, [x0]
    ldr  w2, [x0, #4]
    ldr  w3, [x0, #8]
    ldr  w4, [x0, #12]
    ldr  w5, [x0, #16]
    ldr  w6, [x0, #20]
    movz w8, #0x4e6d
    movk w8, #0x41c6, lsl #16      /* 1103515245 */
    mov  w9, #12345
1:  cbz  w2, 2f
    madd w3, w3, w8, w9
    lsr  w7, w3, #8
    and  w7, w7, w4
    lsl  w7, w7, w6
    str  w1, [x5, x7]
    sub  w2, w2, #1
    b    1b
2:  str  w3, [x0, #8]
    movz x10, #0x1000, lsl #16     /* 0x10000000: no memslot there */
    str  w1, [x10]
    b    round
guest_end:
