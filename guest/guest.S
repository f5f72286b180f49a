/*
 * The test guest: 32-bit protected mode, flat segments set up by the host
 * through KVM_SET_SREGS (no GDT, no paging). ESI holds the address of the
 * vCPU's mailbox, set by the host:
 *   +0  iteration number (written by the host before each round)
 *   +4  stores per round
 *   +8  LCG state (kept by the guest across rounds)
 *   +12 page mask (pages in the test region - 1, a power of two minus 1)
 *   +16 guest physical base of the test region
 *   +20 page shift (12 on x86)
 * Each round stores the iteration number to the first word of `stores`
 * pseudo-random pages of the region, then exits with `out` to port 0x10;
 * the host checks, then resumes it for the next round.
 * Built with: as --32 guest.S -o guest.o && objcopy -O binary guest.o guest.bin
 * (guest.bin is checked in: the Rust and C tests load that one file; the test
 * guest_bin_matches_source rebuilds it when binutils are present)
 */
    .code32
    .text
round:
    mov  (%esi), %eax       /* iteration */
    mov  4(%esi), %ecx      /* stores */
    mov  8(%esi), %edx      /* LCG state */
    mov  12(%esi), %ebx     /* page mask */
    mov  16(%esi), %edi     /* region base */
1:  test %ecx, %ecx
    jz   2f
    imul $1103515245, %edx, %edx
    add  $12345, %edx
    mov  %edx, %ebp
    shr  $8, %ebp
    and  %ebx, %ebp
    push %ecx
    mov  20(%esi), %ecx
    shl  %cl, %ebp
    pop  %ecx
    mov  %eax, (%edi,%ebp)
    dec  %ecx
    jmp  1b
2:  mov  %edx, 8(%esi)
    out  %al, $0x10
    jmp  round
