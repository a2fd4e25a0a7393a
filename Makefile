# ibsvm: the two commands that matter are `make run` and `make test` (see README.md).

CARGO      ?= cargo
IBSVM      := target/release/ibsvm
OUT        := guest-images/out
TESTKERNEL := $(OUT)/testkernel.elf
LINUX_DIR  := $(OUT)/linux

# Kernel parameters for the stock Linux guest. ibsvm itself appends what a host whose KVM
# emulates guest CPL0 needs (noxsave, clearcpuid=...); these are the guest's console and
# platform settings (no ACPI/PCI in this VM).
LINUX_CMDLINE ?= console=ttyS0 panic=-1 reboot=k nokaslr pci=off acpi=off io_delay=none 8250.nr_uarts=1 \
	tsc=reliable no_timer_check mitigations=off

.PHONY: all build images testkernel linux-image run run-linux test lint unit-test integration-test bench clean

all: build images

build:
	$(CARGO) build --release --locked -p ibsvm

testkernel:
	$(MAKE) -C guest-images/testkernel

linux-image:
	python3 guest-images/linux/build.py

images: testkernel linux-image

## make run: boot the default guest (the small test kernel) and show what it reports.
run: build testkernel
	$(IBSVM) run --kernel $(TESTKERNEL) --cmdline "test=smoke" --stats

## make run-linux: boot Debian's stock kernel with the guest checks in its initramfs.
run-linux: build linux-image
	$(IBSVM) run --kernel $(LINUX_DIR)/vmlinux --initrd $(LINUX_DIR)/initramfs.cpio \
		--cmdline "$(LINUX_CMDLINE)" --stats

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --locked --workspace --all-targets -- -D warnings

## make test: everything — lint, unit tests, and guests booted under real KVM.
test: build images lint
	$(CARGO) test --release --locked --workspace

bench: build testkernel
	$(CARGO) bench --locked -p vpmu

clean:
	$(CARGO) clean
	$(MAKE) -C guest-images/testkernel clean
	rm -rf $(OUT)
