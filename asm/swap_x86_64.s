# tiexec swap routine, x86_64 Linux (AT&T syntax).
#
# Assembled by `global_asm!` in src/trampoline.rs, which supplies every
# named number (in braces below the header): syscall numbers, flags and errno values from the
# libc crate, record offsets from `offset_of!(SwapOp, ..)`, outcome and
# failure codes from the Rust enums. Nothing here is copied by hand.
#
# The one piece of code that changes what is mapped at a text address. It is
# position-independent (immediates and register-relative addressing only),
# so the Rust side may run it where it lies in tiexec's own text (when that
# text is not being swapped), or copy its bytes, from tiexec_trampoline_start
# to tiexec_trampoline_end, into a page of their own and run it there.
# Either way, the code doing the swap is never inside a range being swapped.
#
# Contract
#   long tiexec_swap(struct SwapOp *ops, unsigned long count)
#     rdi = ops: `count` records (`SwapOp`, 72 bytes):
#       staging  in:  address of the replacement: 2 MiB aligned, populated,
#                     holding the text's bytes, a single mapping. Anonymous
#                     (fd < 0): r-w, made r-x here. File-backed (fd >= 0):
#                     already r-x, and never writable.
#       text     in:  address of the text range to replace
#       len      in:  length of both, a multiple of 2 MiB
#       fd       in:  -1, or a read-only descriptor of the file the staging
#                     maps, for the restore in step 4
#       fd_offset in: where in that file the staging mapping starts
#       probe    in:  a page of the text range that was mapped before (the
#                     range may also hold unmapped holes, which a check of the
#                     whole range would take for damage)
#       fail     in:  0; a FAIL_* code makes one step fail on purpose (tests)
#       status   out: 0, or the -errno of the step that failed
#       outcome  out: what happened (OUTCOME_*)
#     rsi = count
#   returns 0 when every record was processed, or the -errno of the first
#   rt_sigprocmask, in which case no record was touched.
#
#   For each record, in order:
#     1. anonymous staging only: mprotect(staging, len, PROT_READ|PROT_EXEC).
#        It was never executable while writable.
#     2. mremap(staging, len, len, MAYMOVE|FIXED, text): the swap itself. The
#        kernel replaces the old pages by the new ones in one call, so there
#        is no moment without code at `text`.
#     3. only if 2 failed: msync(probe, page, MS_ASYNC) tells whether the text
#        is still mapped (ENOMEM if the kernel unmapped the target range
#        before failing: it unmaps all of it at once, so one page that was
#        mapped tells). Any other answer (0, or EINVAL for an address mremap
#        refused outright) means nothing changed: OUTCOME_REMAP_FAILED.
#     4. only if the text is gone, put the same bytes back at the same
#        address: file-backed staging maps its file there again, r-x
#        (OUTCOME_RESTORED_BY_MAP; no write+exec transition, so this works
#        under memory-deny-write-execute too); otherwise, or if that fails,
#        anonymous memory r-w, a copy from the staging (still mapped and
#        readable), then r-x (OUTCOME_RESTORED_BY_COPY).
#
# Injected failures (FAIL_*), for tests only:
#     FAIL_PROTECT      step 1 reports -EPERM without calling mprotect;
#     FAIL_REMAP        step 2 reports -ENOMEM without calling mremap;
#     FAIL_REMAP_HOLE   the worst case: the text is really unmapped (munmap)
#                       and step 2 reports -ENOMEM, so steps 3 and 4 must
#                       find the hole and put the bytes back.
#
# What it may not do (it runs while the text may be half-replaced)
#   - call anything, or touch memory other than its own stack frame and the
#     records: no libc, no PLT, no relocations, no data references;
#   - run with signals deliverable: every signal is blocked first (SIGKILL and
#     SIGSTOP cannot be) and the caller's mask is restored last;
#   - leave any mapping writable and executable.
#
# Clobbers: rax, rcx, rdx, rsi, rdi, r8, r9, r10, r11, flags (all
# caller-saved in the SysV ABI); r12 and r13 are saved and restored.
# Stack: 16 bytes of saved registers and 16 bytes of signal masks.

    .pushsection .text.tiexec_swap,"ax",@progbits
    .p2align 4
    .globl  tiexec_trampoline_start
    .hidden tiexec_trampoline_start
    .globl  tiexec_trampoline_end
    .hidden tiexec_trampoline_end
    .type   tiexec_trampoline_start, @function

tiexec_trampoline_start:
    endbr64                             # valid indirect-branch target under CET
    push    %r12                        # callee-saved: current record
    push    %r13                        # callee-saved: records left
    sub     $16, %rsp                   # 0(%rsp): new mask, 8(%rsp): saved mask
    mov     %rdi, %r12                  # r12 = ops
    mov     %rsi, %r13                  # r13 = count

    # Block every signal; keep the caller's mask at 8(%rsp).
    movq    $-1, (%rsp)                 # all bits set: block all
    mov     ${SYS_RT_SIGPROCMASK}, %eax
    mov     ${SIG_SETMASK}, %edi        # how
    mov     %rsp, %rsi                  # set = &all
    lea     8(%rsp), %rdx               # oldset = &saved
    mov     ${SIGSET_BYTES}, %r10d      # sizeof(kernel sigset_t)
    syscall
    test    %rax, %rax
    jnz     .Lreturn                    # mask not set: touch nothing, return -errno

.Lnext_record:
    test    %r13, %r13                  # any records left?
    jz      .Lrestore_mask

    # Step 1: anonymous staging becomes r-x (it was r-w while Rust filled it).
    cmpq    $0, {OP_FD}(%r12)
    jge     .Lremap                     # file-backed: mapped r-x already
    mov     $-{EPERM}, %rax             # injected failure: report EPERM
    cmpq    ${FAIL_PROTECT}, {OP_FAIL}(%r12)
    je      .Lprotect_failed
    mov     ${SYS_MPROTECT}, %eax
    mov     {OP_STAGING}(%r12), %rdi    # addr
    mov     {OP_LEN}(%r12), %rsi        # len
    mov     ${PROT_READ_EXEC}, %edx     # prot
    syscall
    test    %rax, %rax
    jnz     .Lprotect_failed

.Lremap:
    # Step 2: move the staging pages over the text, replacing it.
    cmpq    ${FAIL_REMAP}, {OP_FAIL}(%r12)
    je      .Linject_remap_failure
    cmpq    ${FAIL_REMAP_HOLE}, {OP_FAIL}(%r12)
    je      .Linject_hole
    mov     ${SYS_MREMAP}, %eax
    mov     {OP_STAGING}(%r12), %rdi    # old_address = staging
    mov     {OP_LEN}(%r12), %rsi        # old_size
    mov     {OP_LEN}(%r12), %rdx        # new_size
    mov     ${MREMAP_MAYMOVE_FIXED}, %r10d # flags
    mov     {OP_TEXT}(%r12), %r8        # new_address = text
    syscall
    cmp     {OP_TEXT}(%r12), %rax       # success returns the new address
    jne     .Lremap_failed
    movq    $0, {OP_STATUS}(%r12)
    movq    ${OUTCOME_SWAPPED}, {OP_OUTCOME}(%r12)
    jmp     .Lrecord_done

.Linject_hole:
    mov     ${SYS_MUNMAP}, %eax         # injected: the text really goes
    mov     {OP_TEXT}(%r12), %rdi       # addr
    mov     {OP_LEN}(%r12), %rsi        # len
    syscall
.Linject_remap_failure:
    mov     $-{ENOMEM}, %rax            # injected: mremap "failed"
    jmp     .Lremap_failed

.Lprotect_failed:
    mov     %rax, {OP_STATUS}(%r12)     # -errno; text untouched
    movq    ${OUTCOME_PROTECT_FAILED}, {OP_OUTCOME}(%r12)
    jmp     .Lrecord_done

.Lremap_failed:
    mov     %rax, {OP_STATUS}(%r12)     # -errno of mremap

    # Step 3: is the text still mapped? Ask about one page that was.
    mov     ${SYS_MSYNC}, %eax
    mov     {OP_PROBE}(%r12), %rdi      # addr: a page mapped before
    mov     ${PAGE}, %esi               # len: that page
    mov     ${MS_ASYNC}, %edx           # flags: a no-op that still checks the range
    syscall
    cmp     $-{ENOMEM}, %rax            # only ENOMEM means a hole where the
    je      .Lrestore                   # text was; 0 or another error: intact
    movq    ${OUTCOME_REMAP_FAILED}, {OP_OUTCOME}(%r12)
    jmp     .Lrecord_done

.Lrestore:
    # Step 4a: file-backed staging: map the same file at the text address.
    cmpq    $0, {OP_FD}(%r12)
    jl      .Lrestore_by_copy
    mov     ${SYS_MMAP}, %eax
    mov     {OP_TEXT}(%r12), %rdi       # addr
    mov     {OP_LEN}(%r12), %rsi        # length
    mov     ${PROT_READ_EXEC}, %edx     # prot: executable from the start
    mov     ${MAP_SHARED_FIXED}, %r10d  # flags
    mov     {OP_FD}(%r12), %r8          # fd
    mov     {OP_FD_OFFSET}(%r12), %r9   # offset: where the staging maps from
    syscall
    cmp     {OP_TEXT}(%r12), %rax
    jne     .Lrestore_by_copy           # not mapped: try the copy
    movq    ${OUTCOME_RESTORED_BY_MAP}, {OP_OUTCOME}(%r12)
    jmp     .Lrecord_done

.Lrestore_by_copy:
    # Step 4b: anonymous memory, a copy of the bytes, then r-x.
    mov     ${SYS_MMAP}, %eax
    mov     {OP_TEXT}(%r12), %rdi       # addr
    mov     {OP_LEN}(%r12), %rsi        # length
    mov     ${PROT_READ_WRITE}, %edx    # prot: writable, not executable
    mov     ${MAP_PRIVATE_ANON_FIXED}, %r10d # flags
    mov     $-1, %r8                    # fd
    xor     %r9d, %r9d                  # offset
    syscall
    cmp     {OP_TEXT}(%r12), %rax
    jne     .Ltext_lost
    mov     {OP_TEXT}(%r12), %rdi       # destination: the text address
    mov     {OP_STAGING}(%r12), %rsi    # source: the staging copy
    mov     {OP_LEN}(%r12), %rcx        # byte count
    cld                                 # copy forwards
    rep movsb
    mov     ${SYS_MPROTECT}, %eax
    mov     {OP_TEXT}(%r12), %rdi       # addr
    mov     {OP_LEN}(%r12), %rsi        # len
    mov     ${PROT_READ_EXEC}, %edx     # prot: r-x, no longer writable
    syscall
    test    %rax, %rax
    jnz     .Lrestore_protect_failed
    movq    ${OUTCOME_RESTORED_BY_COPY}, {OP_OUTCOME}(%r12)
    jmp     .Lrecord_done

.Lrestore_protect_failed:
    movq    ${OUTCOME_RESTORE_PROTECT_FAILED}, {OP_OUTCOME}(%r12)
    jmp     .Lrecord_done

.Ltext_lost:
    movq    ${OUTCOME_TEXT_LOST}, {OP_OUTCOME}(%r12)

.Lrecord_done:
    add     ${OP_SIZE}, %r12            # next record
    dec     %r13
    jmp     .Lnext_record

.Lrestore_mask:
    mov     ${SYS_RT_SIGPROCMASK}, %eax
    mov     ${SIG_SETMASK}, %edi        # how
    lea     8(%rsp), %rsi               # set = saved mask
    xor     %edx, %edx                  # oldset = NULL
    mov     ${SIGSET_BYTES}, %r10d      # sizeof(kernel sigset_t)
    syscall
    xor     %eax, %eax                  # every record processed

.Lreturn:
    add     $16, %rsp
    pop     %r13
    pop     %r12
    ret
tiexec_trampoline_end:
    .size   tiexec_trampoline_start, tiexec_trampoline_end - tiexec_trampoline_start
    .popsection
