// tiexec swap routine, aarch64 Linux.
//
// Assembled by `global_asm!` in src/trampoline.rs, which supplies every
// named number (in braces below): syscall numbers, flags and errno values
// from the libc crate, record offsets from `offset_of!(SwapOp, ..)`, outcome
// and failure codes from the Rust enums. Nothing here is copied by hand.
//
// The same contract as asm/swap_x86_64.s, whose header is the full text;
// what differs on aarch64:
//
// Contract
//   long tiexec_swap(struct SwapOp *ops, unsigned long count)
//     x0 = ops, x1 = count; returns in x0: 0 when every record was processed,
//     or the -errno of the first rt_sigprocmask (no record touched).
//   For each record: 1. anonymous staging is made r-x (mprotect); 2. one
//   mremap(MREMAP_MAYMOVE|MREMAP_FIXED) moves it over the text; 3. only if
//   that failed, msync(probe, page, MS_ASYNC) tells whether the text is still
//   mapped (ENOMEM: a hole); 4. only then the same bytes are put back at the
//   same address: the staging's file mapped r-x (from the record's
//   fd_offset), else anonymous memory, a copy of the staging, then r-x.
//
// Instruction cache (aarch64 does not keep it coherent with data writes):
//   - staging the Rust side filled (anonymous copies) and the copy of this
//     routine are cleaned and invalidated there (`sys::sync_icache`) after
//     they are written and before they are made executable;
//   - the copy made here in step 4 (restore by copy) is cleaned to the point
//     of unification and invalidated here, line by line (line sizes from
//     CTR_EL0), before the mprotect that makes it executable.
//
// What it may not do: call anything, touch memory other than its own stack
// frame and the records, or run with signals deliverable (all blocked first,
// the caller's mask restored last); leave a mapping writable and executable.
//
// Clobbers: x0-x17 (caller-saved in AAPCS64), flags; x19-x22 are saved and
// restored. Stack: 48 bytes (four saved registers, two signal masks).

    .pushsection .text.tiexec_swap,"ax",%progbits
    .p2align 4
    .globl  tiexec_trampoline_start
    .hidden tiexec_trampoline_start
    .globl  tiexec_trampoline_end
    .hidden tiexec_trampoline_end
    .type   tiexec_trampoline_start, %function

tiexec_trampoline_start:
    hint    #34                             // bti c: a valid indirect-call target under BTI
    sub     sp, sp, #48
    stp     x19, x20, [sp, #16]             // callee-saved: record, records left
    stp     x21, x22, [sp, #32]             // callee-saved: scratch for step 4
    mov     x19, x0                         // x19 = ops
    mov     x20, x1                         // x20 = count

    // Block every signal; the caller's mask goes to 8(sp).
    mov     x9, #-1
    str     x9, [sp]                        // all bits set: block all
    mov     x8, #{SYS_RT_SIGPROCMASK}
    mov     x0, #{SIG_SETMASK}              // how
    mov     x1, sp                          // set = &all
    add     x2, sp, #8                      // oldset = &saved
    mov     x3, #{SIGSET_BYTES}             // sizeof(kernel sigset_t)
    svc     #0
    cbnz    x0, .Lreturn                    // mask not set: touch nothing

.Lnext_record:
    cbz     x20, .Lrestore_mask

    // Step 1: anonymous staging becomes r-x (it was r-w while Rust filled it).
    ldr     x9, [x19, #{OP_FD}]
    tbz     x9, #63, .Lremap                // fd >= 0: mapped r-x already
    ldr     x9, [x19, #{OP_FAIL}]
    mov     x0, #-{EPERM}                   // injected failure: report EPERM
    cmp     x9, #{FAIL_PROTECT}
    b.eq    .Lprotect_failed
    mov     x8, #{SYS_MPROTECT}
    ldr     x0, [x19, #{OP_STAGING}]        // addr
    ldr     x1, [x19, #{OP_LEN}]            // len
    mov     x2, #{PROT_READ_EXEC}           // prot
    svc     #0
    cbnz    x0, .Lprotect_failed

.Lremap:
    // Step 2: move the staging pages over the text, replacing it.
    ldr     x9, [x19, #{OP_FAIL}]
    cmp     x9, #{FAIL_REMAP}
    b.eq    .Linject_remap_failure
    cmp     x9, #{FAIL_REMAP_HOLE}
    b.eq    .Linject_hole
    mov     x8, #{SYS_MREMAP}
    ldr     x0, [x19, #{OP_STAGING}]        // old_address = staging
    ldr     x1, [x19, #{OP_LEN}]            // old_size
    ldr     x2, [x19, #{OP_LEN}]            // new_size
    mov     x3, #{MREMAP_MAYMOVE_FIXED}     // flags
    ldr     x4, [x19, #{OP_TEXT}]           // new_address = text
    svc     #0
    ldr     x9, [x19, #{OP_TEXT}]
    cmp     x0, x9                          // success returns the new address
    b.ne    .Lremap_failed
    str     xzr, [x19, #{OP_STATUS}]
    mov     x9, #{OUTCOME_SWAPPED}
    str     x9, [x19, #{OP_OUTCOME}]
    b       .Lrecord_done

.Linject_hole:
    mov     x8, #{SYS_MUNMAP}               // injected: the text really goes
    ldr     x0, [x19, #{OP_TEXT}]           // addr
    ldr     x1, [x19, #{OP_LEN}]            // len
    svc     #0
.Linject_remap_failure:
    mov     x0, #-{ENOMEM}                  // injected: mremap "failed"
    b       .Lremap_failed

.Lprotect_failed:
    str     x0, [x19, #{OP_STATUS}]         // -errno; text untouched
    mov     x9, #{OUTCOME_PROTECT_FAILED}
    str     x9, [x19, #{OP_OUTCOME}]
    b       .Lrecord_done

.Lremap_failed:
    str     x0, [x19, #{OP_STATUS}]         // -errno of mremap

    // Step 3: is the text still mapped? Ask about one page that was.
    mov     x8, #{SYS_MSYNC}
    ldr     x0, [x19, #{OP_PROBE}]          // addr: a page mapped before
    mov     x1, #{PAGE}                     // len: that page
    mov     x2, #{MS_ASYNC}                 // flags: a no-op that still checks
    svc     #0
    cmn     x0, #{ENOMEM}                   // only -ENOMEM means a hole where
    b.eq    .Lrestore                       // the text was; else intact
    mov     x9, #{OUTCOME_REMAP_FAILED}
    str     x9, [x19, #{OP_OUTCOME}]
    b       .Lrecord_done

.Lrestore:
    // Step 4a: file-backed staging: map the same file at the text address.
    ldr     x9, [x19, #{OP_FD}]
    tbnz    x9, #63, .Lrestore_by_copy
    mov     x8, #{SYS_MMAP}
    ldr     x0, [x19, #{OP_TEXT}]           // addr
    ldr     x1, [x19, #{OP_LEN}]            // length
    mov     x2, #{PROT_READ_EXEC}           // prot: executable from the start
    mov     x3, #{MAP_SHARED_FIXED}         // flags
    ldr     x4, [x19, #{OP_FD}]             // fd
    ldr     x5, [x19, #{OP_FD_OFFSET}]      // offset: where the staging maps from
    svc     #0
    ldr     x9, [x19, #{OP_TEXT}]
    cmp     x0, x9
    b.ne    .Lrestore_by_copy               // not mapped: try the copy
    mov     x9, #{OUTCOME_RESTORED_BY_MAP}
    str     x9, [x19, #{OP_OUTCOME}]
    b       .Lrecord_done

.Lrestore_by_copy:
    // Step 4b: anonymous memory, a copy of the bytes, caches synced, r-x.
    mov     x8, #{SYS_MMAP}
    ldr     x0, [x19, #{OP_TEXT}]           // addr
    ldr     x1, [x19, #{OP_LEN}]            // length
    mov     x2, #{PROT_READ_WRITE}          // prot: writable, not executable
    mov     x3, #{MAP_PRIVATE_ANON_FIXED}   // flags
    mov     x4, #-1                         // fd
    mov     x5, #0                          // offset
    svc     #0
    ldr     x9, [x19, #{OP_TEXT}]
    cmp     x0, x9
    b.ne    .Ltext_lost
    ldr     x10, [x19, #{OP_STAGING}]       // source: the staging copy
    mov     x11, x9                         // destination: the text address
    ldr     x12, [x19, #{OP_LEN}]           // bytes: a multiple of 2 MiB
.Lcopy:
    ldp     x13, x14, [x10], #16
    stp     x13, x14, [x11], #16
    subs    x12, x12, #16
    b.ne    .Lcopy

    // Clean the data cache to the point of unification, then invalidate
    // the instruction cache, over the copy (what __clear_cache does).
    mrs     x21, ctr_el0
    ubfx    x13, x21, #16, #4               // DminLine: log2 of words
    mov     x14, #4
    lsl     x13, x14, x13                   // data line size in bytes
    and     x15, x21, #0xf                  // IminLine
    lsl     x15, x14, x15                   // instruction line size in bytes
    ldr     x10, [x19, #{OP_TEXT}]
    ldr     x12, [x19, #{OP_LEN}]
    add     x22, x10, x12                   // end
    mov     x11, x10
.Ldclean:
    dc      cvau, x11
    add     x11, x11, x13
    cmp     x11, x22
    b.lo    .Ldclean
    dsb     ish
    mov     x11, x10
.Licinval:
    ic      ivau, x11
    add     x11, x11, x15
    cmp     x11, x22
    b.lo    .Licinval
    dsb     ish
    isb

    mov     x8, #{SYS_MPROTECT}
    ldr     x0, [x19, #{OP_TEXT}]           // addr
    ldr     x1, [x19, #{OP_LEN}]            // len
    mov     x2, #{PROT_READ_EXEC}           // prot: r-x, no longer writable
    svc     #0
    cbnz    x0, .Lrestore_protect_failed
    mov     x9, #{OUTCOME_RESTORED_BY_COPY}
    str     x9, [x19, #{OP_OUTCOME}]
    b       .Lrecord_done

.Lrestore_protect_failed:
    mov     x9, #{OUTCOME_RESTORE_PROTECT_FAILED}
    str     x9, [x19, #{OP_OUTCOME}]
    b       .Lrecord_done

.Ltext_lost:
    mov     x9, #{OUTCOME_TEXT_LOST}
    str     x9, [x19, #{OP_OUTCOME}]

.Lrecord_done:
    add     x19, x19, #{OP_SIZE}            // next record
    sub     x20, x20, #1
    b       .Lnext_record

.Lrestore_mask:
    mov     x8, #{SYS_RT_SIGPROCMASK}
    mov     x0, #{SIG_SETMASK}              // how
    add     x1, sp, #8                      // set = saved mask
    mov     x2, #0                          // oldset = NULL
    mov     x3, #{SIGSET_BYTES}             // sizeof(kernel sigset_t)
    svc     #0
    mov     x0, #0                          // every record processed

.Lreturn:
    ldp     x21, x22, [sp, #32]
    ldp     x19, x20, [sp, #16]
    add     sp, sp, #48
    ret
tiexec_trampoline_end:
    .size   tiexec_trampoline_start, tiexec_trampoline_end - tiexec_trampoline_start
    .popsection
