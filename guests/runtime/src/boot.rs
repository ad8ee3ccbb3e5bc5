//! PVH entry and the whole ring-0 machine state, built by the assembler.
//!
//! Ring-0 guest code is emulated on the development machines (about 0.6 million
//! instructions a second), so nothing here is computed at run time: the page tables, the
//! GDT (including the TSS descriptor), the IDT and the TSS are all `.quad`/`.short` data in
//! the image. The only thing that needs arithmetic on addresses, the split handler and TSS
//! addresses in IDT gates and the TSS descriptor, is made constant by placing the exception
//! stubs and the TSS at fixed addresses: the `.duplex_fixed` section starts the image at
//! [`FIXED_BASE`] (the linker script asserts it), stub `v` is at `FIXED_BASE + 16 * v`, and
//! the TSS at `FIXED_BASE + TSS_OFFSET`.
//!
//! The ring-0 path from the PVH entry to ring 3 is 30 instructions:
//!
//! * 32-bit protected mode (paging off, `EBX` = `hvm_start_info`): `lgdt`; `CR4.PAE`;
//!   `CR3` = the static PML4; `EFER.LME` by `rdmsr`/`wrmsr`; `CR0.PG`; far jump to 64-bit
//!   code (14 instructions).
//! * 64-bit: load data segments; mark the TSS descriptor available again (a warm reboot may
//!   leave it busy); `ltr`; `lidt`; set `RSP` to the ring-0 stack; push an `iretq` frame
//!   (user `SS`/`RSP`/`RFLAGS = 0x2`/user `CS`/`RIP`); `EDI` = `EBX`; `iretq` (16
//!   instructions).
//!
//! Ring 3 then starts in `duplex_ring3_entry`, which zeroes `.bss` (native speed) and calls
//! [`crate::start::duplex_ring3_start`].
//!
//! Paging: one PML4 entry, four PDPT entries and 2048 2-MiB PD entries identity-map
//! `0 – 4 GiB`, every level with `U/S` set so ring 3 reaches everything, including the MMIO
//! window. The last GiB (`0xC000_0000 –`, MMIO only) is mapped uncached (`PCD|PWT`).
//! Nothing above 4 GiB is mapped: an access there page-faults.
//!
//! Exceptions 0–31 go through interrupt gates (DPL 0; `#DF` on IST1) to a stub that pushes
//! the vector (and a zero error code where the CPU pushes none) and jumps to
//! `duplex_fault_common`, which calls [`crate::fault::duplex_fault`], except for the
//! `#UD` raised by the `ud2` at `duplex_ring0_trap_site`: that is the ring-0 hook and goes
//! to `duplex_ring0_call` instead (see [`crate::fault::ring0_call`]). The hook is not an
//! `int 0x80` gate because on the development machines `int n` from ring 3 raises `#UD`
//! at the `int` instruction instead of going through the IDT; real exceptions are
//! delivered normally.

use core::arch::global_asm;

/// Where the `.duplex_fixed` block (exception stubs, then the TSS) is linked.
pub const FIXED_BASE: u64 = 0x10_0000;
/// Offset of the TSS inside the fixed block (after 32 stubs of 16 bytes).
pub const TSS_OFFSET: u64 = 0x200;
/// Kernel 64-bit code selector.
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data selector.
pub const KERNEL_DS: u16 = 0x10;
/// User data selector, RPL 3.
pub const USER_SS: u16 = 0x18 | 3;
/// User 64-bit code selector, RPL 3.
pub const USER_CS: u16 = 0x20 | 3;
/// TSS selector.
pub const TSS_SEL: u16 = 0x28;
/// Ring-0 hook request: load a zero-limit IDT and raise an exception (triple fault).
pub const RING0_CALL_TRIPLE_FAULT: u64 = 1;
/// Exceptions for which the CPU pushes an error code (8, 10–14, 17, 21, 29, 30), as a mask.
const ERROR_CODE_MASK: u32 = 0x6022_7d00;
/// Size of the ring-3 stack.
pub const RING3_STACK_SIZE: usize = 256 * 1024;
/// Size of the ring-0 stack (TSS.RSP0): used by the fault handlers.
pub const RING0_STACK_SIZE: usize = 16 * 1024;
/// Size of the double-fault stack (TSS.IST1).
pub const IST1_STACK_SIZE: usize = 16 * 1024;

global_asm!(
    // ---------------------------------------------------------------- PVH note
    // XEN_ELFNOTE_PHYS32_ENTRY: name "Xen\0", type 18, desc = 32-bit physical entry.
    ".pushsection .note.Xen, \"a\", @note",
    ".balign 4",
    ".long 4",
    ".long 4",
    ".long 18",
    ".asciz \"Xen\"",
    ".long duplex_pvh_entry32",
    ".popsection",
    //
    // ---------------------------------------------------------------- fixed block
    ".pushsection .duplex_fixed, \"ax\", @progbits",
    ".balign 16",
    ".globl duplex_fixed_block",
    "duplex_fixed_block:",
    ".set duplex_vec, 0",
    ".rept 32",
    "2:",
    ".if (({errmask} >> duplex_vec) & 1) == 0",
    "pushq $0",
    ".endif",
    "pushq $duplex_vec",
    "jmp duplex_fault_common",
    ".fill 2b + 16 - ., 1, 0xcc",
    ".set duplex_vec, duplex_vec + 1",
    ".endr",
    ".org {tss_offset}, 0xcc",
    // The 64-bit TSS: RSP0 and IST1, no I/O bitmap. The CPU never writes it in long mode.
    "duplex_tss:",
    ".long 0",
    ".quad duplex_ring0_stack_top",
    ".quad 0, 0, 0",
    ".quad duplex_ist1_stack_top",
    ".quad 0, 0, 0, 0, 0, 0, 0",
    ".short 0",
    ".short 104",
    ".popsection",
    //
    // ---------------------------------------------------------------- entry
    ".pushsection .text.duplex_boot, \"ax\", @progbits",
    ".code32",
    ".globl duplex_pvh_entry32",
    "duplex_pvh_entry32:",
    "lgdt duplex_gdtr",
    "mov %cr4, %eax",
    "or $0x20, %eax", // PAE
    "mov %eax, %cr4",
    "mov $duplex_pml4, %eax",
    "mov %eax, %cr3",
    "mov $0xc0000080, %ecx", // EFER
    "rdmsr",
    "or $0x100, %eax", // LME
    "wrmsr",
    "mov %cr0, %eax",
    "or $0x80000000, %eax", // PG (PE is already set)
    "mov %eax, %cr0",
    "ljmp ${kcs}, $duplex_start64",
    ".code64",
    "duplex_start64:",
    "mov ${kds}, %eax",
    "mov %eax, %ds",
    "mov %eax, %es",
    "mov %eax, %ss",
    "movb $0x89, duplex_gdt_tss + 5(%rip)", // available 64-bit TSS (not busy)
    "mov ${tss_sel}, %eax",
    "ltr %ax",
    "lidt duplex_idtr(%rip)",
    "lea duplex_ring0_stack_top(%rip), %rsp",
    "pushq ${user_ss}",
    "pushq $duplex_ring3_stack_top",
    "pushq $0x2",
    "pushq ${user_cs}",
    "pushq $duplex_ring3_entry",
    "mov %ebx, %edi", // hvm_start_info (zero-extended)
    "iretq",
    //
    // Ring 3 from here: zero .bss at native speed, then Rust.
    "duplex_ring3_entry:",
    "mov %rdi, %r12",
    "lea __duplex_bss_start(%rip), %rdi",
    "lea __duplex_bss_end(%rip), %rcx",
    "sub %rdi, %rcx",
    "xor %eax, %eax",
    "rep stosb",
    "mov %r12, %rdi",
    "call duplex_ring3_start",
    "ud2",
    //
    // Ring 3: the ring-0 hook, `extern "C" fn(request: u64) -> u64`. The #UD of this ud2 is
    // recognised by its address and served as a call; ring 0 resumes after it.
    ".globl duplex_ring0_trap",
    "duplex_ring0_trap:",
    "mov %rdi, %rax",
    "duplex_ring0_trap_site:",
    "ud2",
    "ret",
    //
    // Ring 0: every exception stub lands here with [vector, error, rip, cs, ...] on the stack.
    "duplex_fault_common:",
    "cmpq $duplex_ring0_trap_site, 16(%rsp)",
    "je duplex_ring0_call",
    "mov 0(%rsp), %rdi",
    "mov 8(%rsp), %rsi",
    "mov 16(%rsp), %rdx",
    "mov 24(%rsp), %rcx",
    "and $-16, %rsp",
    "call duplex_fault",
    "ud2",
    //
    // Ring 0: the hook, RAX = request. Unknown requests return RAX = -1. Only the #UD
    // stub gets here (the trap site is a ud2), so the frame is [6, 0, rip, cs, ...].
    "duplex_ring0_call:",
    "cmp ${req_triple}, %rax",
    "jne 3f",
    "lidt duplex_null_idtr(%rip)",
    "ud2", // #UD -> #GP -> #DF, none deliverable: triple fault
    "3:",
    "mov $-1, %rax",
    "addq $2, 16(%rsp)", // resume after the ud2
    "add $16, %rsp", // drop vector and error code
    "iretq",
    ".popsection",
    //
    // ---------------------------------------------------------------- page tables
    ".pushsection .data.duplex_paging, \"aw\", @progbits",
    ".balign 4096",
    "duplex_pml4:",
    ".quad duplex_pdpt + 0x7", // P | RW | US
    ".fill 511, 8, 0",
    "duplex_pdpt:",
    ".quad duplex_pd + 0x0000 + 0x7",
    ".quad duplex_pd + 0x1000 + 0x7",
    ".quad duplex_pd + 0x2000 + 0x7",
    ".quad duplex_pd + 0x3000 + 0x7",
    ".fill 508, 8, 0",
    "duplex_pd:",
    ".set duplex_page, 0",
    ".rept 1536", // 0 - 3 GiB: RAM, write-back
    ".quad duplex_page + 0x87", // P | RW | US | PS
    ".set duplex_page, duplex_page + 0x200000",
    ".endr",
    ".rept 512", // 3 - 4 GiB: MMIO, uncached
    ".quad duplex_page + 0x9f", // P | RW | US | PWT | PCD | PS
    ".set duplex_page, duplex_page + 0x200000",
    ".endr",
    ".popsection",
    //
    // ---------------------------------------------------------------- GDT and IDT
    ".pushsection .data.duplex_tables, \"aw\", @progbits",
    ".balign 16",
    "duplex_gdt:",
    ".quad 0",
    ".quad 0x00af9b000000ffff", // 0x08 kernel code64 (accessed)
    ".quad 0x00cf93000000ffff", // 0x10 kernel data (accessed)
    ".quad 0x00cff3000000ffff", // 0x18 user data, DPL 3 (accessed)
    ".quad 0x00affb000000ffff", // 0x20 user code64, DPL 3 (accessed)
    "duplex_gdt_tss:", // 0x28 64-bit TSS descriptor, limit 103
    ".short 103",
    ".short ({fixed} + {tss_offset}) & 0xffff",
    ".byte (({fixed} + {tss_offset}) >> 16) & 0xff",
    ".byte 0x89",
    ".byte 0",
    ".byte (({fixed} + {tss_offset}) >> 24) & 0xff",
    ".long ({fixed} + {tss_offset}) >> 32",
    ".long 0",
    "duplex_gdt_end:",
    ".balign 8",
    "duplex_gdtr:",
    ".short duplex_gdt_end - duplex_gdt - 1",
    ".quad duplex_gdt",
    ".balign 8",
    "duplex_idtr:",
    ".short duplex_idt_end - duplex_idt - 1",
    ".quad duplex_idt",
    ".balign 8",
    "duplex_null_idtr:",
    ".short 0",
    ".quad 0",
    ".macro duplex_gate addr, ist, attr",
    ".short (\\addr) & 0xffff",
    ".short {kcs}",
    ".byte \\ist",
    ".byte \\attr",
    ".short ((\\addr) >> 16) & 0xffff",
    ".long (\\addr) >> 32",
    ".long 0",
    ".endm",
    ".balign 16",
    "duplex_idt:",
    ".set duplex_vec, 0",
    ".rept 32",
    ".if duplex_vec == 8",
    "duplex_gate ({fixed}+duplex_vec*16), 1, 0x8e", // #DF on IST1
    ".else",
    "duplex_gate ({fixed}+duplex_vec*16), 0, 0x8e",
    ".endif",
    ".set duplex_vec, duplex_vec + 1",
    ".endr",
    "duplex_idt_end:",
    ".popsection",
    //
    // ---------------------------------------------------------------- stacks (never zeroed)
    ".pushsection .duplex_stacks, \"aw\", @nobits",
    ".balign 4096",
    ".skip {ring3_stack}",
    "duplex_ring3_stack_top:",
    ".skip {ring0_stack}",
    "duplex_ring0_stack_top:",
    ".skip {ist1_stack}",
    "duplex_ist1_stack_top:",
    ".popsection",
    errmask = const ERROR_CODE_MASK,
    tss_offset = const TSS_OFFSET,
    fixed = const FIXED_BASE,
    kcs = const KERNEL_CS,
    kds = const KERNEL_DS,
    user_ss = const USER_SS,
    user_cs = const USER_CS,
    tss_sel = const TSS_SEL,
    req_triple = const RING0_CALL_TRIPLE_FAULT,
    ring3_stack = const RING3_STACK_SIZE,
    ring0_stack = const RING0_STACK_SIZE,
    ist1_stack = const IST1_STACK_SIZE,
    options(att_syntax)
);
