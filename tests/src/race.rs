//! The race matrix: the test kernel's `test=race` (guest-images/testkernel/tests/race.S)
//! in each start-path order under each `--ibs-policy`, with what every cell must show.
//! Used by tests/race.rs and by the `race-matrix` binary (`make race-matrix`, `make stress`).

use std::fmt;
use std::time::Duration;

use ibsvm::stop::EXIT_IBS_RACE;

use crate::{ibsvm, image, require_kvm, Run};

/// The test kernel's exit status when it saw no accidental enable.
pub const GUEST_NO_RACE: i32 = 0;
/// ... when it saw accidental enables (or NMIs no unit claimed).
pub const GUEST_RACE: i32 = 1;
/// ... when it could not run as designed (tests/race.S, EXIT_BROKEN).
pub const GUEST_BROKEN: i32 = 4;

/// The race test kernel's start path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// STARTED, then enable: Linux before 1b044ff3c17e.
    Prefix,
    /// CTL = 0 first: Linux with 1b044ff3c17e.
    Fixed,
}

/// `--ibs-policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// The device owns Val (the default).
    Protect,
    /// A written Val is kept, as on hardware.
    Faithful,
}

/// `--ibs-race-check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RaceCheck {
    /// Count and log races.
    Warn,
    /// End the VM at the first race (status [`EXIT_IBS_RACE`]).
    Fail,
}

impl Order {
    /// Both orders.
    pub const ALL: [Order; 2] = [Order::Prefix, Order::Fixed];
    fn arg(self) -> &'static str {
        match self {
            Order::Prefix => "prefix",
            Order::Fixed => "fixed",
        }
    }
}

impl Policy {
    /// Both policies.
    pub const ALL: [Policy; 2] = [Policy::Protect, Policy::Faithful];
    fn arg(self) -> &'static str {
        match self {
            Policy::Protect => "protect",
            Policy::Faithful => "faithful",
        }
    }
}

impl RaceCheck {
    fn arg(self) -> &'static str {
        match self {
            RaceCheck::Warn => "warn",
            RaceCheck::Fail => "fail",
        }
    }
}

/// How a `test=race` run is driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Rounds of start / sample / stop.
    pub rounds: u64,
    /// Random NMI points instead of the window every round.
    pub stress: bool,
    /// The guest's random seed (stress).
    pub seed: u64,
}

impl Plan {
    /// The window every round, as the matrix runs it.
    pub const MATRIX: Plan = Plan {
        rounds: 20,
        stress: false,
        seed: 1,
    };
}

/// One cell of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cell {
    /// The kernel's start path.
    pub order: Order,
    /// The device's policy.
    pub policy: Policy,
}

impl Cell {
    /// The four cells, in table order.
    pub fn all() -> impl Iterator<Item = Cell> {
        Order::ALL.into_iter().flat_map(|order| {
            Policy::ALL
                .into_iter()
                .map(move |policy| Cell { order, policy })
        })
    }

    /// Only an unpatched start path on a faithful device reproduces the race.
    pub fn reproduces(self) -> bool {
        self.order == Order::Prefix && self.policy == Policy::Faithful
    }

    /// Boots the race test kernel for this cell.
    pub fn run(self, plan: Plan, check: RaceCheck) -> CellRun {
        require_kvm();
        let kernel = image("testkernel.elf");
        let cmdline = format!(
            "test=race order={} rounds={} stress={} seed={}",
            self.order.arg(),
            plan.rounds,
            u8::from(plan.stress),
            plan.seed
        );
        let args = [
            "run",
            "--kernel",
            kernel.to_str().expect("UTF-8 path"),
            "--cmdline",
            &cmdline,
            "--ibs",
            "synthetic",
            "--ibs-policy",
            self.policy.arg(),
            "--ibs-race-check",
            check.arg(),
            "--stats",
        ];
        // About 1.5 ms a round on the dev hosts; generous for a loaded machine.
        let deadline = Duration::from_secs(60) + Duration::from_millis(10 * plan.rounds);
        let run = ibsvm(&args, deadline);
        CellRun::new(self, check, run)
    }
}

impl fmt::Display for Cell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} + {}", self.order.arg(), self.policy.arg())
    }
}

/// What one boot of a cell showed.
#[derive(Debug)]
pub struct CellRun {
    /// The cell.
    pub cell: Cell,
    /// The race check it ran with.
    pub check: RaceCheck,
    /// The run itself.
    pub run: Run,
}

impl CellRun {
    fn new(cell: Cell, check: RaceCheck, run: Run) -> CellRun {
        CellRun { cell, check, run }
    }

    /// ibsvm's exit status.
    pub fn code(&self) -> i32 {
        self.run.code()
    }

    /// The guest's count of accidental enables (absent when ibsvm stopped the VM first).
    pub fn accidental(&self) -> Option<u64> {
        self.counts().map(|(_, a)| a)
    }

    /// The guest's `race: stale stops S, accidental enables A` line: stops that wrote
    /// Val = 1 back and were followed by a start, and accidental enables.
    pub fn counts(&self) -> Option<(u64, u64)> {
        let line = self
            .run
            .stdout
            .lines()
            .find(|l| l.starts_with("race: stale stops "))?;
        let mut numbers = line
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().ok());
        Some((numbers.next()??, numbers.next()??))
    }

    /// NMIs the guest's handler took, and those no unit claimed.
    pub fn nmis(&self) -> Option<(u64, u64)> {
        let line = self
            .run
            .stdout
            .lines()
            .find(|l| l.starts_with("race: rounds "))?;
        let field = |name: &str| -> Option<u64> {
            let rest = &line[line.find(name)? + name.len()..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        };
        Some((field(", nmis ")?, field(", unknown nmis ")?))
    }

    /// A `--stats` counter.
    pub fn stat(&self, name: &str) -> u64 {
        self.run.stat(name)
    }

    /// The exit status this cell must end with.
    pub fn expected_code(&self) -> i32 {
        match (self.cell.reproduces(), self.check) {
            (false, _) => GUEST_NO_RACE,
            (true, RaceCheck::Warn) => GUEST_RACE,
            (true, RaceCheck::Fail) => i32::from(EXIT_IBS_RACE),
        }
    }

    /// Everything wrong with this run, as the matrix sees it (empty: as expected).
    pub fn problems(&self, plan: Plan) -> Vec<String> {
        let mut p = Vec::new();
        let code = self.code();
        if code != self.expected_code() {
            p.push(format!(
                "exit status {code}, expected {}",
                self.expected_code()
            ));
        }
        if code == GUEST_BROKEN {
            p.push("the test kernel could not run as designed".into());
        }
        let races = self.stat("ibs.races_detected");
        let stale = self.stat("ibs.stale_val_reads");
        if self.cell.reproduces() {
            if races == 0 {
                p.push("no race detected".into());
            }
            if self.check == RaceCheck::Fail {
                if !self.run.stderr.contains("guest IBS race") {
                    p.push("no race report on stderr".into());
                }
                return p;
            }
            // The window every round: every start that follows a stale stop is caught (all
            // but the first start, unless the unit's own sample beat the test port's at a
            // stop, which the guest reports). Random points: some are.
            let ok = match self.counts() {
                Some((stale, n)) if !plan.stress => n == stale && n + 2 >= plan.rounds,
                Some((_, n)) => n >= 1,
                None => false,
            };
            if !ok || self.accidental() != Some(races) {
                p.push(format!(
                    "(stale stops, accidental enables) {:?}, races detected {races}: want \
                     accidental = stale stops (>= rounds - 2 without stress) = races",
                    self.counts()
                ));
            }
        } else {
            if races != 0 || stale != 0 {
                p.push(format!(
                    "races detected {races}, stale Val reads {stale}; want 0"
                ));
            }
            if self.accidental() != Some(0) {
                p.push(format!(
                    "accidental enables {:?}, want 0",
                    self.accidental()
                ));
            }
        }
        match self.nmis() {
            Some((_, 0)) => {}
            other => p.push(format!(
                "NMIs (taken, unclaimed) {other:?}: want none unclaimed"
            )),
        }
        p
    }
}
