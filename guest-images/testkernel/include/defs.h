/*
 * defs.h - constants shared by every .S file of the test kernel.
 *
 * Only #defines: this header is included by assembly (gcc -c x.S runs cpp).
 * Every number says where it comes from.  "APM" = AMD64 Architecture
 * Programmer's Manual vol. 2 (System Programming); "SDM" = Intel SDM vol. 3;
 * "contract" = the ibsvm boot contract written at the top of entry.S.
 */
#ifndef TESTKERNEL_DEFS_H
#define TESTKERNEL_DEFS_H

/* ------------------------------------------------------------------ */
/* Image layout                                                        */
/* ------------------------------------------------------------------ */
#define KERNEL_LOAD_ADDR    0x100000    /* contract: loaded at 1 MiB, phys == virt */
#define PAGE_SIZE           4096
#define BZ_ENTRY64_OFFSET   0x200       /* boot.rst: 64-bit entry = protected-mode code + 0x200 */

/* ------------------------------------------------------------------ */
/* Linux boot protocol (Documentation/arch/x86/zero-page.rst, boot.rst) */
/* ------------------------------------------------------------------ */
#define BP_HDR_CMD_LINE_PTR 0x228       /* boot_params.hdr.cmd_line_ptr, u32 */
#define CMDLINE_MAX         1024        /* our copy, NUL included; longer is cut */

/* ------------------------------------------------------------------ */
/* I/O ports                                                           */
/* ------------------------------------------------------------------ */
#define COM1_BASE           0x3F8       /* PC/AT COM1 */
#define UART_THR            0           /* 8250/16550: transmit holding (DLAB=0) */
#define UART_RBR            0           /* receive buffer (DLAB=0, read) */
#define UART_DLL            0           /* divisor latch low (DLAB=1) */
#define UART_IER            1           /* interrupt enable (DLAB=0) */
#define UART_DLM            1           /* divisor latch high (DLAB=1) */
#define UART_FCR            2           /* FIFO control */
#define UART_LCR            3           /* line control; bit 7 = DLAB */
#define UART_MCR            4           /* modem control */
#define UART_LSR            5           /* line status */
#define UART_LSR_DR         0x01        /* LSR bit 0: data ready (receive FIFO not empty) */
#define UART_LSR_THRE       0x20        /* LSR bit 5: THR empty */
#define UART_LCR_8N1        0x03
#define UART_LCR_DLAB       0x80
#define UART_MCR_DTR_RTS    0x03
#define UART_THRE_SPINS     10000       /* bound on LSR polls per character */

#define PORT_TEST_EXIT      0xF4        /* contract: out byte v -> VM ends, ibsvm exits v */
/* ibsvm's IBS test port (vmm/src/ibs/test_port.rs): reads IBS_TEST_PORT_ID;
 * write 1 = a fetch sample now, NMI at once; 2 = an op sample now, its NMI
 * after the next IBS_OP_CTL write. */
#define PORT_IBS_TEST       0xF5
#define IBS_TEST_PORT_ID    0x1B
#define IBS_TEST_FETCH_NMI  1
#define IBS_TEST_OP_LATE    2

#define PORT_I8042_STATUS   0x64        /* i8042 status (read) / command (write) */
#define I8042_STATUS_IBF    0x02        /* status bit 1: input buffer full */
#define I8042_CMD_RESET     0xFE        /* pulse output port bit 0 = CPU reset */
#define I8042_IBF_SPINS     10000

#define PORT_PIC1_DATA      0x21        /* 8259A master IMR */
#define PORT_PIC2_DATA      0xA1        /* 8259A slave IMR */

/* ------------------------------------------------------------------ */
/* Exit statuses (brief)                                               */
/* ------------------------------------------------------------------ */
#define EXIT_PASS           0
#define EXIT_FAIL           1
#define EXIT_UNKNOWN_TEST   2
#define EXIT_EXCEPTION      3
#define EXIT_BROKEN         4           /* test=race: could not run as designed */

/* ------------------------------------------------------------------ */
/* Control registers (APM 3.1, SDM 2.5)                                */
/* ------------------------------------------------------------------ */
#define CR0_PE              (1 << 0)
#define CR0_ET              (1 << 4)
#define CR0_PG              (1 << 31)
#define CR4_PAE             (1 << 5)
#define CR4_PCIDE           (1 << 17)
#define CR4_OSXSAVE         (1 << 18)   /* XSAVE and XCR0 enabled (SDM 2.5) */
#define CR4_SMEP            (1 << 20)
#define CR4_SMAP            (1 << 21)
#define CR4_PKE             (1 << 22)
#define RFLAGS_FIXED        0x2         /* bit 1 always set */
#define RFLAGS_IF           0x200       /* bit 9 */

/* ------------------------------------------------------------------ */
/* MSRs                                                                */
/* ------------------------------------------------------------------ */
#define MSR_APIC_BASE       0x1B        /* IA32_APIC_BASE (SDM 10.4.4, APM 16.3.1) */
#define APIC_BASE_BSP       (1 << 8)
#define APIC_BASE_EXTD      (1 << 10)   /* x2APIC mode (SDM 10.12.1) */
#define APIC_BASE_EN        (1 << 11)
#define MSR_EFER            0xC0000080  /* APM 3.1.7 */
#define EFER_SCE            (1 << 0)
#define EFER_LME            (1 << 8)
#define EFER_LMA            (1 << 10)
#define MSR_GS_BASE         0xC0000101  /* APM 4.5.3 */

/* x2APIC registers: MSR 0x800 + (xAPIC MMIO offset >> 4) (SDM 10.12.1.2) */
#define MSR_X2APIC_ID       0x802
#define MSR_X2APIC_EOI      0x80B
#define MSR_X2APIC_SVR      0x80F
#define MSR_X2APIC_ICR      0x830       /* 64-bit write; dest in 63:32 */
#define MSR_X2APIC_LVT_LINT0 0x835
#define MSR_X2APIC_LVT_LINT1 0x836
/* AMD extended APIC space in x2APIC mode (vpmu/DEVICE.md §5.2, docs/host-kvm.md) */
#define MSR_X2APIC_EFEAT    0x840
#define MSR_X2APIC_ECTRL    0x841
#define MSR_X2APIC_EILVT0   0x850       /* EILVT n = 0x850 + n, n = 0..3 */

#define SVR_APIC_ENABLE     (1 << 8)
#define SPURIOUS_VECTOR     0xFF
#define APIC_LVT_MASKED     (1 << 16)

/* ICR low word (SDM 10.6.1) */
#define ICR_DM_FIXED        (0 << 8)
#define ICR_DM_NMI          (4 << 8)
#define ICR_DM_INIT         (5 << 8)
#define ICR_DM_STARTUP      (6 << 8)
#define ICR_LEVEL_ASSERT    (1 << 14)
#define ICR_SH_SELF         (1 << 18)
#define ICR_SH_ALL_BUT_SELF (3 << 18)

/* AMD IBS (vpmu/DEVICE.md §1; Linux msr-index.h) - for IBS tests */
#define MSR_IBS_FETCH_CTL   0xC0011030
#define MSR_IBS_FETCH_LINADDR 0xC0011031
#define MSR_IBS_FETCH_PHYSADDR 0xC0011032
#define MSR_IBS_OP_CTL      0xC0011033
#define MSR_IBS_OP_RIP      0xC0011034
#define MSR_IBS_OP_DATA     0xC0011035
#define MSR_IBS_OP_DATA2    0xC0011036
#define MSR_IBS_OP_DATA3    0xC0011037
#define MSR_IBS_DC_LINADDR  0xC0011038
#define MSR_IBS_DC_PHYSADDR 0xC0011039
#define MSR_IBS_CTL         0xC001103A
#define MSR_IBS_BR_TARGET   0xC001103B  /* exists with caps BRNTRGT */
#define MSR_IBS_FETCH_CTL_EXT 0xC001103C /* exists with caps FETCHCTLEXTD */
#define MSR_IBS_OP_DATA4    0xC001103D  /* caps OPDATA4: never advertised by ibsvm */
#define MSR_IBS_OP_CTL2     0xC001103E  /* caps DIS: never advertised by ibsvm */
#define MSR_IBS_FETCH_CTL2  0xC001103F
#define MSR_IBS_FIRST       MSR_IBS_FETCH_CTL
#define MSR_IBS_LAST        MSR_IBS_FETCH_CTL2

/* IBS_FETCH_CTL bits (vpmu/DEVICE.md §1; perf_event.h IBS_FETCH_*) */
#define IBS_FETCH_MAX_CNT   0xFFFF      /* 15:0, period / 16 */
#define IBS_FETCH_CNT_SHIFT 16          /* 31:16 IbsFetchCnt */
#define IBS_FETCH_EN_BIT    48
#define IBS_FETCH_VAL_BIT   49
#define IBS_FETCH_PHYADDR_VALID_BIT 52  /* read-as-zero in ibsvm (vpmu README) */
#define IBS_FETCH_L3MISSONLY_BIT 59     /* needs caps ZEN4 */
#define IBS_FETCH_RSVD_BIT  63          /* 63:62 reserved */

/* IBS_OP_CTL bits (vpmu/DEVICE.md §1; perf_event.h IBS_OP_*) */
#define IBS_OP_MAX_CNT      0xFFFF      /* 15:0, period / 16 */
#define IBS_OP_L3MISSONLY   (1 << 16)   /* needs caps ZEN4 */
#define IBS_OP_EN           (1 << 17)
#define IBS_OP_VAL          (1 << 18)
#define IBS_OP_CNT_CTL      (1 << 19)   /* needs caps OPCNT */
#define IBS_OP_MAX_CNT_EXT  0x7F00000   /* 26:20, needs caps OPCNTEXT */
#define IBS_OP_RSVD_BIT     31          /* 31:27 reserved */
#define IBS_OP_CUR_CNT_SHIFT 32         /* 51:32 IbsOpCurCnt, needs caps RDWROPCNT */
#define IBS_OP_LDLAT_EN_BIT 63          /* caps OPLDLAT: not modelled, reserved in ibsvm */

/* IBS_CTL (0xC001103A) as ibsvm presents it: LvtOffsetVal (bit 8) | offset 0 */
#define IBS_CTL_VALUE       0x100

/* CPUID (vpmu/DEVICE.md §2; Linux cpufeatures.h, perf_event.h IBS_CAPS_*) */
#define CPUID_FEATURES      0x1
#define CPUID_1_ECX_XSAVE   (1 << 26)   /* SDM vol. 2A CPUID Table 3-10 */
#define CPUID_1_ECX_OSXSAVE (1 << 27)   /*   mirrors CR4.OSXSAVE */
#define CPUID_XSTATE        0xD         /* SDM vol. 1 13.2: sub-leaf 0 supported XCR0, i = component i */
#define CPUID_D_1_EAX_XGETBV1 (1 << 2) /* sub-leaf 1 EAX[2]: XGETBV of XCR 1 (SDM vol. 2A CPUID Table 3-8; APM vol. 3 Fn0000_000D_EAX_x1) */
#define XCR0_X87            (1 << 0)    /* XCR0 state components (SDM vol. 1 13.3) */
#define XCR0_SSE            (1 << 1)
#define XCR0_AVX            (1 << 2)
#define XSAVE_XMM0          160         /* XSAVE area: legacy region XMM0 (SDM vol. 1 Table 13-1) */
#define XSAVE_XSTATE_BV     512         /*   header: XSTATE_BV (SDM vol. 1 13.4.2) */
#define XSAVE_ALIGN         64          /*   XSAVE/XRSTOR need a 64-byte-aligned area */
#define CPUID_EXT_MAX       0x80000000
#define CPUID_EXT_FEATURES  0x80000001
#define CPUID_IBS_LEAF      0x8000001B
#define CPUID_EXT_ECX_EXTAPIC (1 << 3)  /* Fn8000_0001 ECX[3] ExtApicSpace */
#define CPUID_EXT_ECX_IBS   (1 << 10)   /* Fn8000_0001 ECX[10] IBS */
#define IBS_CAPS_AVAIL      (1 << 0)
#define IBS_CAPS_FETCHSAM   (1 << 1)
#define IBS_CAPS_OPSAM      (1 << 2)
#define IBS_CAPS_RDWROPCNT  (1 << 3)
#define IBS_CAPS_OPCNT      (1 << 4)
#define IBS_CAPS_BRNTRGT    (1 << 5)
#define IBS_CAPS_OPCNTEXT   (1 << 6)
#define IBS_CAPS_OPBRNFUSE  (1 << 8)
#define IBS_CAPS_FETCHCTLEXTD (1 << 9)
#define IBS_CAPS_ZEN4       (1 << 11)
#define IBS_CAPS_NEVER      0x80000000  /* table marker: an MSR that never exists */

/* EILVT values (APM vol. 2 16.4.5; Linux apic.c setup_APIC_eilvt) */
#define EILVT_RESET         0x00010000  /* masked, vector 0, fixed */
#define EILVT_MSG_NMI       0x400       /* message type 4 = NMI */
#define EILVT_MASKED_NMI    (APIC_LVT_MASKED | EILVT_MSG_NMI)
#define EFEAT_VALUE         0x00040000  /* 4 extended LVT entries, nothing else */
#define IBS_FIXED_VECTOR    0xE0        /* fixed vector the ibs-eilvt test routes through EILVT0 */

/* An MSR no one implements: ibsvm answers it with #GP (contract). */
#define MSR_UNIMPLEMENTED   0xC0DE0001

/* ------------------------------------------------------------------ */
/* GDT (entry.S builds it; layout chosen here)                         */
/* ------------------------------------------------------------------ */
#define KERNEL_CS           0x08        /* 64-bit code, DPL0 (same as the VMM's) */
#define KERNEL_DS           0x10        /* flat data, DPL0 (same as the VMM's) */
#define USER_DS             0x1B        /* 0x18 | RPL3: flat data, DPL3 */
#define USER_CS             0x23        /* 0x20 | RPL3: 64-bit code, DPL3 */
#define KERNEL_CS32         0x28        /* 32-bit code, DPL0: AP trampoline only */
#define TSS_SEL_BASE        0x30        /* TSS of cpu i: 0x30 + 16*i (16-byte descriptor) */
#define GDT_FIXED_BYTES     0x30        /* bytes before the TSS descriptors */
#define GDT_BYTES           (GDT_FIXED_BYTES + 16 * MAX_CPUS)

/* 64-bit TSS (APM 12.2.5, SDM 7.7) */
#define TSS_RSP0            4
#define TSS_IST1            36          /* IST n at 36 + 8*(n-1) */
#define TSS_IST2            44
#define TSS_IOPB            102         /* u16 I/O bitmap base */
#define TSS_SIZE            104
#define TSS_LIMIT           (TSS_SIZE - 1)
#define TSS_STRIDE          128         /* per-cpu spacing in our array */
#define TSS_TYPE_AVAIL64    0x89        /* P=1, DPL0, type 9 = available 64-bit TSS */

#define IST_NMI             1           /* IST index used by vector 2 */
#define IST_DF              2           /* IST index used by vector 8 */

/* IDT gate: P=1, DPL0, type 0xE (64-bit interrupt gate: clears IF) */
#define IDT_GATE_INTR       0x8E
#define IDT_ENTRIES         256
#define IDT_STUB_ALIGN      16          /* every stub is 16-byte aligned, stub i at base + 16*i */

/* ------------------------------------------------------------------ */
/* Paging: our own identity map of the first 1 GiB with 2 MiB pages    */
/* ------------------------------------------------------------------ */
#define PTE_P               0x001
#define PTE_RW              0x002
#define PTE_US              0x004       /* user-accessible: CPL3 test code lives in the kernel image */
#define PTE_PS              0x080       /* 2 MiB page in a PDE */
#define PDE_2M_FLAGS        (PTE_P | PTE_RW | PTE_US | PTE_PS)
#define PTE_TABLE_FLAGS     (PTE_P | PTE_RW | PTE_US)
#define HUGE_PAGE_SIZE      0x200000

/* ------------------------------------------------------------------ */
/* CPUs, stacks, per-cpu data                                          */
/* ------------------------------------------------------------------ */
#define MAX_CPUS            32          /* ibsvm --cpus allows 1..=32 */

/* Per-cpu stack block in .stack (not zeroed); offsets of each stack's TOP. */
#define KSTACK_SIZE         16384       /* main kernel stack of the cpu */
#define RSP0_STACK_SIZE     8192        /* TSS.RSP0: CPL3 -> CPL0 entries */
#define NMI_STACK_SIZE      8192        /* IST1 */
#define DF_STACK_SIZE       4096        /* IST2 */
#define USTACK_SIZE         16384       /* CPL3 stack for run_user */
#define STACK_BLOCK_SIZE    (KSTACK_SIZE + RSP0_STACK_SIZE + NMI_STACK_SIZE + DF_STACK_SIZE + USTACK_SIZE)
#define SB_KSTACK_TOP       (KSTACK_SIZE)
#define SB_RSP0_TOP         (SB_KSTACK_TOP + RSP0_STACK_SIZE)
#define SB_NMI_TOP          (SB_RSP0_TOP + NMI_STACK_SIZE)
#define SB_DF_TOP           (SB_NMI_TOP + DF_STACK_SIZE)
#define SB_USTACK_TOP       (SB_DF_TOP + USTACK_SIZE)

/*
 * struct percpu (one per cpu, GS base points at it; access as %gs:PC_xxx).
 * GS is never changed at CPL3 here, so no swapgs is needed.
 */
#define PC_SELF             0           /* linear address of this struct */
#define PC_CPU              8           /* cpu index: 0 = BSP, APs 1.. in start order */
#define PC_APIC_ID          16          /* x2APIC id (valid once x2APIC is on) */
#define PC_TSS              24          /* address of this cpu's TSS */
#define PC_STACKS           32          /* base of this cpu's stack block */
#define PC_USER_KRSP        40          /* run_user: kernel rsp to resume at */
#define PC_IN_USER          48          /* 1 while run_user is active */
#define PC_FAULT_VEC        56          /* last fault recovered through the extable */
#define PC_FAULT_ERR        64          /*   its error code */
#define PC_FAULT_RIP        72          /*   its RIP */
#define PC_FAULT_COUNT      80          /*   number of recovered faults */
#define PC_NMI_COUNT        88          /* NMIs taken by this cpu */
#define PC_WORK_FN          96          /* smp_call_on mailbox: function (0 = none) */
#define PC_WORK_ARG         104         /*   its argument */
#define PC_ONLINE           112         /* set to 1 when the cpu finished init */
#define PERCPU_SIZE         256

/* ------------------------------------------------------------------ */
/* Exception frame built by idt.S (offsets from the frame pointer)     */
/* ------------------------------------------------------------------ */
#define FR_R15              0
#define FR_R14              8
#define FR_R13              16
#define FR_R12              24
#define FR_R11              32
#define FR_R10              40
#define FR_R9               48
#define FR_R8               56
#define FR_RBP              64
#define FR_RDI              72
#define FR_RSI              80
#define FR_RDX              88
#define FR_RCX              96
#define FR_RBX              104
#define FR_RAX              112
#define FR_VEC              120
#define FR_ERR              128
#define FR_RIP              136         /* hardware frame from here */
#define FR_CS               144
#define FR_RFLAGS           152
#define FR_RSP              160
#define FR_SS               168
#define FR_SIZE             176

/* ------------------------------------------------------------------ */
/* Vectors                                                             */
/* ------------------------------------------------------------------ */
#define VEC_DE              0
#define VEC_NMI             2
#define VEC_UD              6
#define VEC_DF              8
#define VEC_GP              13
#define VEC_PF              14
#define PF_ERR_W            0x2         /* #PF error code: write access (SDM 4.7) */
#define VEC_IPI_WAKE        0xF0        /* fixed IPI that wakes an idle AP (smp.S) */

/* rdmsr_safe / wrmsr_safe: %rdx on a fault = FAULT_FLAG | vector */
#define FAULT_FLAG          0x100

/* ------------------------------------------------------------------ */
/* AP startup (smp.S)                                                  */
/* ------------------------------------------------------------------ */
/*
 * The real-mode trampoline is copied here; SIPI vector = address >> 12.
 * 0x8000 lies in conventional memory below the EBDA / MP table area
 * (0x9FC00) and is not one of the structures we still need after boot
 * (the zero page is read and the command line copied at entry, the MP
 * table lives at 0x9FC00 or 0xF0000+, our page tables are in .bss).
 */
#define TRAMPOLINE_ADDR     0x8000
#define SIPI_VECTOR         (TRAMPOLINE_ADDR >> 12)

/* Bounded waits, counted in loop iterations.  CPL0 code is emulated on the
 * dev hosts (docs/host-kvm.md: ~1.8M instr/s; measured here on a 6-instruction
 * wait loop with pause: ~6 us per iteration), so 2M iterations is ~10 s
 * there and milliseconds on hardware.  APs come up in milliseconds. */
#define SMP_WAIT_LOOPS      2000000
#define SMP_CALL_LOOPS      2000000
#define IPI_DELAY_LOOPS     1000        /* between INIT and SIPIs (KVM needs none) */
#define NMI_WAIT_LOOPS      100000
#define RESET_WAIT_LOOPS    300000
#define CONSOLE_LOCK_SPINS  500000
/* test=echo: LSR polls waiting for console input, for the whole line.  Each
 * poll is an IN exit: ~12 us on a CPL0-emulating host (700k polls measured
 * 8.2 s), 60-400 us on a nested SVM host (guest-images/nested).  100k polls
 * take ~1.2 s on the first, ~15 s on the second: inside a test's deadline. */
#define ECHO_WAIT_POLLS     100000
#define ECHO_LINE_MAX       64          /* bytes of one input line, terminator excluded */

/* Default CPL3 loop length of the smoke test (native: ~2 ms). */
#define SMOKE_USER_LOOPS    10000000
#define USER_MAGIC          0x600d      /* returned by user_count_down */

/* IBS tests (tests/ibs*.S).  Op period = MaxCnt * 16; ibsvm's synthetic
 * sampler turns it into MaxCnt * 16 ns of guest run time (floor 10 us).
 * Guest run time includes KVM's cost of every exit and of emulating CPL0:
 * measured on the dev hosts, one NMI round (injection, the hook's 4-5 MSR
 * exits, iretq) takes ~200 us of it, ~60 us of that after the re-arm.  A
 * period of 0x1000 * 16 ns = 65 us would expire inside the NMI hook, so
 * the sampled CPL3 loop would never be hit; 0x8000 (524288 ops, ~524 us)
 * leaves a wide margin.  (Run time is the vCPU thread's CPU time, so host
 * preemption does not count.) */
#define IBS_OP_MAXCNT_TEST  0x8000
#define IBS_FETCH_MAXCNT_TEST 0x8000
#define IBS_MAX_SAMPLES     256         /* sample slots recorded by the NMI hook */
#define IBS_SAMPLE_COUNT    20          /* ibs-sample: op samples wanted */
#define IBS_FETCH_COUNT     3           /* ibs-sample: fetch samples wanted */
#define IBS_DEMO_SAMPLES    200         /* ibs-demo: op samples wanted */
/* CPL3 waits, counted in iterations of a 4-instruction loop (native at CPL3:
 * well under 1 ns each), so 4G iterations is a few seconds at most. */
#define IBS_USER_WAIT_LOOPS 4000000000
/* ibs-clock (make bench): ~0.1-0.2 s of spinning at CPL3 natively, sampled
 * at 0x1000 * 16 ns = 65 us, the period Linux's perf uses by default. */
#define IBS_CLOCK_LOOPS     200000000
#define IBS_CLOCK_MAXCNT    0x1000
#define IBS_MASKED_SPIN_LOOPS 40000000  /* ibs-eilvt: ~10 ms at CPL3, >> one period */
#define IBS_DEMO_B_LOOPS    1000000     /* hot_b inner loop per round (~0.2 ms) */
#define IBS_DEMO_A_LOOPS    3000000     /* hot_a: three times hot_b */
/* test=race: op period 0x2000 * 16 ns = 131 us of CPL3 time (ibsvm counts
 * emulated CPL0 time at 1/1000, vmm/src/ibs/vcpu.rs, so the NMI path no longer
 * eats the period; at 65 us, on a host that emulates CPL0 more slowly, a
 * sample of the unit's own period latched before the test port's late one in
 * every round); fetch at its longest period, so that its NMIs are the ones the
 * test asks for through the test port. */
#define RACE_OP_MAXCNT      0x2000
#define RACE_FETCH_MAXCNT   0xFFFF
#define RACE_ROUNDS         20          /* default rounds=N */

#endif /* TESTKERNEL_DEFS_H */
