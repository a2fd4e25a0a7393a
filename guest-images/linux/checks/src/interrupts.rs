//! `/proc/interrupts`: per-CPU interrupt counts by row (fs/proc/interrupts.c writes
//! the `CPU0 CPU1 ...` header; arch/x86/kernel/irq.c `arch_show_interrupts` the x86
//! rows such as `NMI:` (every NMI, `__nmi_count`) and `PMI:` (NMIs a perf handler
//! claimed, `apic_perf_irqs`)).

/// One read of `/proc/interrupts`.
#[derive(Clone, Debug, PartialEq)]
pub struct Interrupts {
    /// The CPU number of each count column, from the header.
    cpus: Vec<u32>,
    /// Row label (`NMI`, `PMI`, `0`, ...) and its per-CPU counts.
    rows: Vec<(String, Vec<u64>)>,
}

impl Interrupts {
    /// Reads and parses `/proc/interrupts`.
    pub fn read() -> Result<Interrupts, String> {
        let text = std::fs::read_to_string("/proc/interrupts")
            .map_err(|e| format!("read /proc/interrupts: {e}"))?;
        Interrupts::parse(&text)
    }

    /// Parses the text of `/proc/interrupts`.
    pub fn parse(text: &str) -> Result<Interrupts, String> {
        let mut lines = text.lines();
        let header = lines
            .next()
            .ok_or_else(|| "/proc/interrupts is empty".to_string())?;
        let cpus: Vec<u32> = header
            .split_whitespace()
            .map(|w| {
                w.strip_prefix("CPU")
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| format!("/proc/interrupts header: {w:?} is not CPUn"))
            })
            .collect::<Result<_, _>>()?;
        if cpus.is_empty() {
            return Err(format!("/proc/interrupts header without CPUs: {header:?}"));
        }
        let rows = lines
            .filter_map(|l| {
                let (label, rest) = l.split_once(':')?;
                // Up to one count per CPU column; rows such as `ERR:` have a single one.
                let counts = rest
                    .split_whitespace()
                    .take(cpus.len())
                    .map_while(|w| w.parse().ok())
                    .collect();
                Some((label.trim().to_string(), counts))
            })
            .collect();
        Ok(Interrupts { cpus, rows })
    }

    /// The count of row `name` on CPU `cpu`, if both are there.
    pub fn count(&self, name: &str, cpu: u32) -> Option<u64> {
        let col = self.cpus.iter().position(|&c| c == cpu)?;
        let (_, counts) = self.rows.iter().find(|(l, _)| l == name)?;
        counts.get(col).copied()
    }

    /// The sum of row `name` over all CPUs, if the row is there.
    pub fn total(&self, name: &str) -> Option<u64> {
        let (_, counts) = self.rows.iter().find(|(l, _)| l == name)?;
        Some(counts.iter().sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape Linux 6.1 prints on x86 with two CPUs (abridged).
    const TWO_CPUS: &str = "           CPU0       CPU1       
  0:         40          0   IO-APIC   2-edge      timer
  4:        912          0   IO-APIC   4-edge      ttyS0
NMI:        123          7   Non-maskable interrupts
LOC:      25003      24100   Local timer interrupts
PMI:        120          0   Performance monitoring interrupts
ERR:          0
MIS:          0
";

    #[test]
    fn rows_by_cpu() {
        let i = Interrupts::parse(TWO_CPUS).unwrap();
        assert_eq!(i.count("NMI", 0), Some(123));
        assert_eq!(i.count("NMI", 1), Some(7));
        assert_eq!(i.count("PMI", 0), Some(120));
        assert_eq!(i.count("0", 0), Some(40));
        assert_eq!(i.total("NMI"), Some(130));
        assert_eq!(i.count("NMI", 2), None, "no such CPU");
        assert_eq!(i.count("XYZ", 0), None, "no such row");
        assert_eq!(i.count("ERR", 0), Some(0));
        assert_eq!(i.count("ERR", 1), None, "single-count rows");
    }

    /// Offline CPUs have no column: the header's numbers, not positions, name them.
    #[test]
    fn sparse_cpus() {
        let text = "       CPU0       CPU2\nNMI:   5   9   Non-maskable interrupts\n";
        let i = Interrupts::parse(text).unwrap();
        assert_eq!(i.count("NMI", 2), Some(9));
        assert_eq!(i.count("NMI", 1), None);
    }

    #[test]
    fn bad_input() {
        assert!(Interrupts::parse("").is_err());
        assert!(Interrupts::parse("   \nNMI: 1\n").is_err());
        assert!(Interrupts::parse("  CPU0  bogus\n").is_err());
    }

    #[test]
    fn this_host() {
        match Interrupts::read() {
            Ok(i) => assert!(!i.cpus.is_empty()),
            Err(e) => eprintln!("this_host skipped: {e}"),
        }
    }
}
