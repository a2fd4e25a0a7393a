//! The IBS test port: a guest test kernel asks its vCPU's virtual IBS device for a sample
//! at the exact instruction it chooses, to reproduce the Linux IBS race on purpose
//! (docs/ibs-race.md; guest-images/testkernel, `test=race`). Hardware has no
//! such thing; a kernel that never touches the port never notices it.
//!
//! I/O port 0xF5, next to the test-exit port 0xF4, one byte, present only on vCPUs with
//! virtual IBS (elsewhere the port floats: reads 0xFF, writes do nothing):
//!
//! | access | meaning |
//! |---|---|
//! | read | [`PORT_ID`] (0x1B): the port is there |
//! | write 1 | [`Command::FetchNmi`]: the fetch unit's period ends now; its NMI is injected before the guest's next instruction |
//! | write 2 | [`Command::OpSampleNmiLate`]: the op unit's period ends now; its NMI waits for the guest's next IBS_OP_CTL write |
//!
//! A command for a unit that is not counting, or any other byte, changes nothing; it is
//! counted (`ibs.test_port.refused`) and logged once.

use vpmu::{ForcedIrq, UnitKind};

/// The port.
pub const IBS_TEST_PORT: u16 = 0xf5;
/// What a read of the port returns.
pub const PORT_ID: u8 = 0x1b;

/// A request written to the port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Byte 1: a fetch sample now, its NMI at once — "an NMI from another source" landing
    /// where the guest wrote the byte (e.g. inside the op start path's window).
    FetchNmi,
    /// Byte 2: an op sample now, its NMI after the guest's next op CTL write — a sample
    /// that lands while the stop path reads CTL, so that stop writes Val = 1 back.
    OpSampleNmiLate,
}

impl Command {
    /// The command a written byte means, if any.
    pub fn from_byte(byte: u8) -> Option<Command> {
        match byte {
            1 => Some(Command::FetchNmi),
            2 => Some(Command::OpSampleNmiLate),
            _ => None,
        }
    }

    /// The unit whose period ends.
    pub fn unit(self) -> UnitKind {
        match self {
            Command::FetchNmi => UnitKind::Fetch,
            Command::OpSampleNmiLate => UnitKind::Op,
        }
    }

    /// When the sample's interrupt is raised.
    pub fn irq(self) -> ForcedIrq {
        match self {
            Command::FetchNmi => ForcedIrq::Now,
            Command::OpSampleNmiLate => ForcedIrq::AfterCtlWrite,
        }
    }

    /// Its `--stats` counter.
    pub fn counter(self) -> &'static str {
        match self {
            Command::FetchNmi => "ibs.test_port.fetch_nmi",
            Command::OpSampleNmiLate => "ibs.test_port.op_sample_nmi_late",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_to_commands() {
        assert_eq!(Command::from_byte(1), Some(Command::FetchNmi));
        assert_eq!(Command::from_byte(2), Some(Command::OpSampleNmiLate));
        for b in [0, 3, 0xff] {
            assert_eq!(Command::from_byte(b), None);
        }
        assert_eq!(
            (Command::FetchNmi.unit(), Command::FetchNmi.irq()),
            (UnitKind::Fetch, ForcedIrq::Now)
        );
        assert_eq!(
            (
                Command::OpSampleNmiLate.unit(),
                Command::OpSampleNmiLate.irq()
            ),
            (UnitKind::Op, ForcedIrq::AfterCtlWrite)
        );
    }
}
