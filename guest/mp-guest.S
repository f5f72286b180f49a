/*
 * The migration guest: a multiboot (v1) ELF that QEMU loads with -kernel.
 * The bootstrap processor starts every other CPU with INIT/SIPI/SIPI
 * through the local APIC (no hypercall), then every CPU, the BSP included,
 * runs the same workload without ever pausing:
 *   - first it stores once to every page of the test region, so that all
 *     of it holds data (CPU n to pages n, n + N, n + 2N, ... if the host
 *     set KNOB_NCPUS to N: the region is filled N times sooner);
 *   - then an LCG picks a pseudo-random 4 KiB page of the test region
 *     (REGION_BASE, REGION_PAGES pages; KNOB_REGION_PAGES instead if the
 *     host set it, at most (4 GiB - REGION_BASE) / 4 KiB less the holes:
 *     no paging, so the region lies below 4 GiB);
 *   - it writes one 64-bit word there, at offset cpu * 8: the low half is
 *     the CPU's store count, the high half the CPU number (so a stale page
 *     on the destination tells whose store it missed, and how old it is);
 *   - after each store it spins KNOB_SPIN iterations (0 unless the host
 *     set it: the benchmark paces the guest's dirty rate so, with
 *     -device loader,addr=0x800000,data=<n>,data-len=4);
 *   - if the host set KNOB_WINDOW (a guest-physical address) and
 *     KNOB_WINDOW_MASK (its size in pages, less one), it stores the same
 *     word to the same page number, masked, in that window too: a PCI BAR
 *     backed by RAM that the host enables, disables and moves while the
 *     guest writes it (tests/qemu-flows.py, "churn"); while the window is
 *     not mapped, these stores go to unassigned memory;
 *   - every BEAT_MASK + 1 stores (KNOB_BEAT_MASK instead, if the host set
 *     it) it prints a heartbeat line on COM1 under a spin lock:
 *     "beat <cpu> <count>".
 * 32-bit protected mode at CPL0, flat segments, no paging, no interrupts.
 * (This host's KVM emulates CPL0 code; neither CR0.PG nor an iret to CPL3
 * got through it here, so the loop is kept short instead.)
 * Built with: as --32 mp-guest.S -o mp-guest.o &&
 *             ld -m elf_i386 -Ttext 0x100000 -o mp-guest.elf mp-guest.o
 * (tests/qemu-migration builds it; nothing built is checked in).
 */
    .set REGION_BASE,  0x01000000   /* 16 MiB */
    .set REGION_PAGES, 81920        /* 320 MiB */
    .set TRAMPOLINE,   0x8000       /* SIPI vector 0x08 */
    .set APIC,         0xfee00000
    .set COM1,         0x3f8
    .set STACK_SIZE,   4096
    .set MAX_CPUS,     16
    .set BEAT_MASK,    0xffff
    .set KNOB_SPIN,      0x00800000 /* 8 MiB: the host's knobs, 0 by default */
    .set KNOB_BEAT_MASK, 0x00800004
    .set KNOB_WINDOW,    0x00800008
    .set KNOB_WINDOW_MASK, 0x0080000c
    .set KNOB_REGION_PAGES, 0x00800010
    .set KNOB_NCPUS,     0x00800014

    .code32
    .text
    .globl _start
    .align 4
multiboot:
    .long 0x1badb002                /* magic */
    .long 0                         /* flags: an ELF needs none */
    .long -0x1badb002               /* checksum */

_start:
    cli
    lgdt gdt_desc
    ljmp $0x08, $1f
1:  mov  $0x10, %ax
    mov  %ax, %ds
    mov  %ax, %es
    mov  %ax, %ss
    mov  %ax, %fs
    mov  %ax, %gs
    mov  $stacks + STACK_SIZE, %esp
    /* The application processors start in real mode at TRAMPOLINE. */
    mov  $tramp_start, %esi
    mov  $TRAMPOLINE, %edi
    mov  $(tramp_end - tramp_start), %ecx
    cld
    rep movsb
    /* Software-enable the local APIC, then INIT, SIPI, SIPI to all but self. */
    movl $0x1ff, APIC + 0xf0
    movl $0x000c4500, APIC + 0x300
    call delay
    movl $0x000c4600 + (TRAMPOLINE >> 12), APIC + 0x300
    call delay
    movl $0x000c4600 + (TRAMPOLINE >> 12), APIC + 0x300
    xor  %ebp, %ebp                 /* the BSP is CPU 0 */
    jmp  work

delay:
    mov  $100000, %ecx
2:  dec  %ecx
    jnz  2b
    ret

/* An application processor, in protected mode (from the trampoline). */
ap32:
    mov  $0x10, %ax
    mov  %ax, %ds
    mov  %ax, %es
    mov  %ax, %ss
    mov  %ax, %fs
    mov  %ax, %gs
    mov  $1, %ebp
    lock xadd %ebp, next_cpu        /* %ebp = this CPU's number */
    cmp  $MAX_CPUS, %ebp
    jae  halt
    mov  %ebp, %esp
    inc  %esp
    shl  $12, %esp
    add  $stacks, %esp

/* The workload. %ebp: CPU number; %esi: LCG state; %edi: store count. */
work:
    /* First one store to every page of the region (count 0), unpaced: the
     * whole region holds data before the paced random stores begin. With
     * KNOB_NCPUS = N, CPU n stores to pages n, n + N, ... only. */
    mov  KNOB_REGION_PAGES, %eax
    test %eax, %eax
    jnz  14f
    mov  $REGION_PAGES, %eax
14: mov  %eax, region_pages         /* every CPU writes the same value */
    mov  KNOB_NCPUS, %ecx
    mov  $1, %edx                   /* stride in pages; CPU 0 starts at 0 */
    xor  %ebx, %ebx
    test %ecx, %ecx
    jz   15f
    cmp  %ecx, %ebp
    jae  16f                        /* more CPUs than the host said: no fill */
    mov  %ecx, %edx
    mov  %ebp, %ebx                 /* first page: the CPU's number */
15: sub  %ebx, %eax                 /* pages from the first one on */
    jbe  16f
    add  %edx, %eax                 /* stores: ceil(pages / stride) */
    dec  %eax
    push %edx
    xor  %edx, %edx
    divl (%esp)
    pop  %edx
    mov  %eax, %ecx
    shl  $12, %ebx
    lea  REGION_BASE(%ebx,%ebp,8), %ebx
    shl  $12, %edx                  /* stride in bytes */
12: movl $0, (%ebx)
    mov  %ebp, 4(%ebx)
    add  %edx, %ebx
    dec  %ecx
    jnz  12b
16:
    lea  1(%ebp), %esi
    imul $0x9e3779b9, %esi, %esi
    xor  %edi, %edi
3:  imul $1664525, %esi, %esi       /* LCG (Numerical Recipes) */
    add  $1013904223, %esi
    mov  %esi, %eax                 /* page = state * region_pages >> 32 */
    mull region_pages
    shl  $12, %edx
    lea  REGION_BASE(%edx,%ebp,8), %ebx
    inc  %edi
    mov  %edi, (%ebx)
    mov  %ebp, 4(%ebx)
    mov  KNOB_WINDOW, %ebx          /* the window, if the host set one */
    test %ebx, %ebx
    jz   13f
    shr  $12, %edx                  /* page number, masked, in the window */
    and  KNOB_WINDOW_MASK, %edx
    shl  $12, %edx
    lea  (%ebx,%edx), %ebx
    mov  %edi, (%ebx,%ebp,8)
    mov  %ebp, 4(%ebx,%ebp,8)
13: mov  KNOB_SPIN, %ecx            /* pacing: a plain loop, no pause (PLE) */
    jecxz 9f
10: dec  %ecx
    jnz  10b
9:  mov  KNOB_BEAT_MASK, %eax
    test %eax, %eax
    jnz  11f
    mov  $BEAT_MASK, %eax
11: test %eax, %edi
    jnz  3b
    call beat
    jmp  3b

/* "beat <cpu> <count>\n" on COM1, one CPU at a time. */
beat:
4:  mov  $1, %eax
    xchg %eax, print_lock
    test %eax, %eax
    jz   5f
    pause
    jmp  4b
5:  mov  $beat_text, %ebx
    call puts
    mov  %ebp, %eax
    call putdec
    mov  $' ', %al
    call putc
    mov  %edi, %eax
    call putdec
    mov  $'\n', %al
    call putc
    movl $0, print_lock
    ret

puts:                               /* %ebx: NUL-terminated string */
    mov  (%ebx), %al
    test %al, %al
    jz   6f
    call putc
    inc  %ebx
    jmp  puts
6:  ret

putdec:                             /* %eax: unsigned number */
    mov  $10, %ecx
    xor  %ebx, %ebx                 /* digits pushed */
7:  xor  %edx, %edx
    div  %ecx
    push %edx
    inc  %ebx
    test %eax, %eax
    jnz  7b
8:  pop  %eax
    add  $'0', %al
    call putc
    dec  %ebx
    jnz  8b
    ret

putc:
    mov  $COM1, %dx
    out  %al, %dx
    ret

halt:
    hlt
    jmp  halt

/* Copied to TRAMPOLINE: real mode, straight to ap32. */
    .code16
tramp_start:
    cli
    xor  %ax, %ax
    mov  %ax, %ds
    lgdtl TRAMPOLINE + (tramp_gdt - tramp_start)
    mov  %cr0, %eax
    or   $1, %eax
    mov  %eax, %cr0
    ljmpl $0x08, $ap32
tramp_gdt:
    .word gdt_end - gdt - 1
    .long gdt
tramp_end:
    .code32

    .data
    .align 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff        /* 0x08: code, flat, 32-bit */
    .quad 0x00cf92000000ffff        /* 0x10: data, flat */
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt
next_cpu:
    .long 1
print_lock:
    .long 0
region_pages:
    .long REGION_PAGES
beat_text:
    .asciz "beat "

    .bss
    .align 4096
stacks:
    .skip STACK_SIZE * (MAX_CPUS + 1)
