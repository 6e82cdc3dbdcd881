/*
 * tiexec swap trampoline, x86_64 Linux.
 *
 * The one piece of code that changes what is mapped at a text address. The
 * Rust side (src/trampoline.rs) copies the bytes between
 * tiexec_trampoline_start and tiexec_trampoline_end into a fresh anonymous
 * mapping, makes that mapping r-x, calls it there, and unmaps it afterwards.
 * So while it runs, the code that swaps is never inside a range being swapped,
 * even when tiexec is linked into the program it optimises.
 *
 * Contract
 *   long tiexec_swap(struct tiexec_op *ops, unsigned long count)
 *     rdi = ops: array of `count` records, 40 bytes each:
 *        0  u64 staging   in:  address of the replacement (2 MiB aligned,
 *                              populated, holding the text bytes, PROT_READ|
 *                              PROT_WRITE, a single mapping)
 *        8  u64 text      in:  address of the text range to replace
 *       16  u64 len       in:  length of both, a multiple of 2 MiB
 *       24  i64 status    out: 0, or the -errno of the step that failed
 *       32  u64 outcome   out: what happened (OUTCOME_* below)
 *       40  u64 fail      in:  0 normally; a FAIL_* code makes one step fail
 *                              on purpose (tests of every failure path)
 *       48  u64 probe     in:  a page of the text range that was mapped
 *                              before (the range may also hold unmapped
 *                              holes, which a check of the whole range
 *                              would take for damage)
 *     rsi = count
 *   returns 0 when every record was processed, or the -errno of the first
 *   rt_sigprocmask, in which case no record was touched.
 *
 *   For each record, in order:
 *     1. mprotect(staging, len, PROT_READ|PROT_EXEC)       never W+X
 *     2. mremap(staging, len, len, MAYMOVE|FIXED, text)    the swap itself:
 *        the kernel replaces the old pages by the new ones in one call, so
 *        there is no moment without code at `text`.
 *     3. only if 2 failed: msync(probe, 4096, MS_ASYNC) tells whether the
 *        text is still mapped (ENOMEM if the kernel unmapped the target range
 *        before failing: it unmaps all of it at once, so one page that was
 *        mapped tells). Any other answer (0, or EINVAL for an address mremap
 *        refused outright) means nothing changed: OUTCOME_REMAP_FAILED.
 *     4. only if the old range has a hole: map anonymous memory read-write
 *        over it, copy the bytes back from the staging copy (still at its
 *        address, readable), make it r-x: OUTCOME_RESTORED_BY_COPY.
 *
 * Injected failures (FAIL_*), for tests only:
 *     FAIL_PROTECT      step 1 reports -EPERM without calling mprotect;
 *     FAIL_REMAP        step 2 reports -ENOMEM without calling mremap;
 *     FAIL_REMAP_HOLE   the worst case: the text is really unmapped (munmap)
 *                       and step 2 reports -ENOMEM, so steps 3 and 4 must
 *                       find the hole and put the bytes back.
 *
 * What it may not do (it runs while the text may be half-replaced)
 *   - call anything, or touch memory other than its own stack frame and the
 *     records: no libc, no PLT, no relocations, no data references;
 *   - run with signals deliverable: every signal is blocked first (SIGKILL
 *     and SIGSTOP cannot be) and the caller's mask is restored last;
 *   - leave any mapping writable and executable.
 *
 * Clobbers: rax, rcx, rdx, rsi, rdi, r8, r9, r10, r11, flags (all
 * caller-saved in the SysV ABI); rbx, r12, r13 are saved and restored.
 * Stack: 24 bytes of saved registers and 16 bytes of signal masks.
 */

#define SYS_mmap            9
#define SYS_mprotect        10
#define SYS_rt_sigprocmask  14
#define SYS_mremap          25
#define SYS_msync           26
#define SYS_munmap          11

#define PROT_READ_EXEC      5      /* PROT_READ | PROT_EXEC */
#define PROT_READ_WRITE     3      /* PROT_READ | PROT_WRITE */
#define MREMAP_MAYMOVE_FIXED 3     /* MREMAP_MAYMOVE | MREMAP_FIXED */
#define MAP_PRIVATE_ANON_FIXED 0x32 /* MAP_PRIVATE | MAP_FIXED | MAP_ANONYMOUS */
#define MS_ASYNC            1
#define ENOMEM              12
#define SIG_SETMASK         2

#define OUTCOME_SWAPPED           0
#define OUTCOME_PROTECT_FAILED    1
#define OUTCOME_REMAP_FAILED      2
#define OUTCOME_RESTORED_BY_COPY  3
#define OUTCOME_TEXT_LOST         4
#define OUTCOME_RESTORE_PROTECT_FAILED 5

#define OP_STAGING  0
#define OP_TEXT     8
#define OP_LEN      16
#define OP_STATUS   24
#define OP_OUTCOME  32
#define OP_FAIL     40
#define OP_PROBE    48
#define OP_SIZE     56

#define FAIL_PROTECT     1
#define FAIL_REMAP       2
#define FAIL_REMAP_HOLE  3
#define EPERM            1

    .text
    .p2align 4
    .globl  tiexec_trampoline_start
    .hidden tiexec_trampoline_start
    .globl  tiexec_trampoline_end
    .hidden tiexec_trampoline_end
    .type   tiexec_trampoline_start, @function

tiexec_trampoline_start:
    endbr64                             /* valid indirect-branch target under CET */
    push    %rbx                        /* callee-saved: holds the mremap error */
    push    %r12                        /* callee-saved: current record */
    push    %r13                        /* callee-saved: records left */
    sub     $16, %rsp                   /* 0(%rsp): new mask, 8(%rsp): saved mask */
    mov     %rdi, %r12                  /* r12 = ops */
    mov     %rsi, %r13                  /* r13 = count */

    /* Block every signal; keep the caller's mask at 8(%rsp). */
    movq    $-1, (%rsp)                 /* all bits set: block all */
    mov     $SYS_rt_sigprocmask, %eax
    mov     $SIG_SETMASK, %edi          /* how */
    mov     %rsp, %rsi                  /* set = &all */
    lea     8(%rsp), %rdx               /* oldset = &saved */
    mov     $8, %r10d                   /* sizeof(kernel sigset_t) */
    syscall
    test    %rax, %rax
    jnz     .Lreturn                    /* mask not set: touch nothing, return -errno */

.Lnext_record:
    test    %r13, %r13                  /* any records left? */
    jz      .Lrestore_mask

    /* Step 1: staging becomes r-x (it was r-w while Rust filled it). */
    mov     $-EPERM, %rax               /* injected failure: report EPERM */
    cmpq    $FAIL_PROTECT, OP_FAIL(%r12)
    je      .Lprotect_failed
    mov     $SYS_mprotect, %eax
    mov     OP_STAGING(%r12), %rdi      /* addr */
    mov     OP_LEN(%r12), %rsi          /* len */
    mov     $PROT_READ_EXEC, %edx       /* prot */
    syscall
    test    %rax, %rax
    jnz     .Lprotect_failed

    /* Step 2: move the staging pages over the text, replacing it. */
    cmpq    $FAIL_REMAP, OP_FAIL(%r12)
    je      .Linject_remap_failure
    cmpq    $FAIL_REMAP_HOLE, OP_FAIL(%r12)
    je      .Linject_hole
    mov     $SYS_mremap, %eax
    mov     OP_STAGING(%r12), %rdi      /* old_address = staging */
    mov     OP_LEN(%r12), %rsi          /* old_size */
    mov     OP_LEN(%r12), %rdx          /* new_size */
    mov     $MREMAP_MAYMOVE_FIXED, %r10d /* flags */
    mov     OP_TEXT(%r12), %r8          /* new_address = text */
    syscall
    cmp     OP_TEXT(%r12), %rax         /* success returns the new address */
    jne     .Lremap_failed
    movq    $0, OP_STATUS(%r12)
    movq    $OUTCOME_SWAPPED, OP_OUTCOME(%r12)
    jmp     .Lrecord_done

.Linject_hole:
    mov     $SYS_munmap, %eax           /* injected: the text really goes */
    mov     OP_TEXT(%r12), %rdi         /* addr */
    mov     OP_LEN(%r12), %rsi          /* len */
    syscall
.Linject_remap_failure:
    mov     $-ENOMEM, %rax              /* injected: mremap "failed" */
    jmp     .Lremap_failed

.Lprotect_failed:
    mov     %rax, OP_STATUS(%r12)       /* -errno; text untouched */
    movq    $OUTCOME_PROTECT_FAILED, OP_OUTCOME(%r12)
    jmp     .Lrecord_done

.Lremap_failed:
    mov     %rax, %rbx                  /* keep -errno of mremap */
    mov     %rax, OP_STATUS(%r12)

    /* Step 3: is the text still mapped? Ask about one page that was. */
    mov     $SYS_msync, %eax
    mov     OP_PROBE(%r12), %rdi        /* addr: a page mapped before */
    mov     $4096, %esi                 /* len: that page */
    mov     $MS_ASYNC, %edx             /* flags: a no-op that still checks the range */
    syscall
    cmp     $-ENOMEM, %rax              /* only ENOMEM means a hole where the */
    je      .Lrestore_by_copy           /* text was; 0 or another error: intact */
    movq    $OUTCOME_REMAP_FAILED, OP_OUTCOME(%r12)
    jmp     .Lrecord_done

.Lrestore_by_copy:
    /* Step 4: put the same bytes back at the same address. */
    mov     $SYS_mmap, %eax
    mov     OP_TEXT(%r12), %rdi         /* addr */
    mov     OP_LEN(%r12), %rsi          /* length */
    mov     $PROT_READ_WRITE, %edx      /* prot: writable, not executable */
    mov     $MAP_PRIVATE_ANON_FIXED, %r10d /* flags */
    mov     $-1, %r8                    /* fd */
    xor     %r9d, %r9d                  /* offset */
    syscall
    cmp     OP_TEXT(%r12), %rax
    jne     .Ltext_lost
    mov     OP_TEXT(%r12), %rdi         /* destination: the text address */
    mov     OP_STAGING(%r12), %rsi      /* source: the staging copy */
    mov     OP_LEN(%r12), %rcx          /* byte count */
    cld                                 /* copy forwards */
    rep movsb
    mov     $SYS_mprotect, %eax
    mov     OP_TEXT(%r12), %rdi         /* addr */
    mov     OP_LEN(%r12), %rsi          /* len */
    mov     $PROT_READ_EXEC, %edx       /* prot: r-x, no longer writable */
    syscall
    test    %rax, %rax
    jnz     .Lrestore_protect_failed
    movq    $OUTCOME_RESTORED_BY_COPY, OP_OUTCOME(%r12)
    jmp     .Lrecord_done

.Lrestore_protect_failed:
    movq    $OUTCOME_RESTORE_PROTECT_FAILED, OP_OUTCOME(%r12)
    jmp     .Lrecord_done

.Ltext_lost:
    movq    $OUTCOME_TEXT_LOST, OP_OUTCOME(%r12)

.Lrecord_done:
    add     $OP_SIZE, %r12              /* next record */
    dec     %r13
    jmp     .Lnext_record

.Lrestore_mask:
    mov     $SYS_rt_sigprocmask, %eax
    mov     $SIG_SETMASK, %edi          /* how */
    lea     8(%rsp), %rsi               /* set = saved mask */
    xor     %edx, %edx                  /* oldset = NULL */
    mov     $8, %r10d                   /* sizeof(kernel sigset_t) */
    syscall
    xor     %eax, %eax                  /* every record processed */

.Lreturn:
    add     $16, %rsp
    pop     %r13
    pop     %r12
    pop     %rbx
    ret
tiexec_trampoline_end:
    .size   tiexec_trampoline_start, tiexec_trampoline_end - tiexec_trampoline_start

    .section .note.GNU-stack,"",@progbits
