//! Check options: `KEY=VALUE` arguments, else environment variables of the same name
//! (the kernel passes unknown `KEY=VALUE` boot parameters without a dot to init's
//! environment, and /init's children inherit it).

/// The options given to one check program.
pub struct Options {
    args: Vec<String>,
}

impl Options {
    /// This program's arguments; `Err` names the first one that is not `KEY=VALUE`
    /// with a KEY of `known`.
    pub fn from_args(known: &[&str]) -> Result<Options, String> {
        Options::new(std::env::args().skip(1).collect(), known)
    }

    fn new(args: Vec<String>, known: &[&str]) -> Result<Options, String> {
        for a in &args {
            let key_ok = a.split_once('=').is_some_and(|(k, _)| known.contains(&k));
            if !key_ok {
                return Err(format!(
                    "unknown argument {a:?} (want KEY=VALUE, KEY one of {})",
                    known.join(", ")
                ));
            }
        }
        Ok(Options { args })
    }

    /// The value of `key`: the last `key=` argument, else the environment variable.
    pub fn get(&self, key: &str) -> Option<String> {
        let prefix = format!("{key}=");
        self.args
            .iter()
            .rev()
            .find_map(|a| a.strip_prefix(&prefix).map(str::to_string))
            .or_else(|| std::env::var(key).ok())
    }

    /// `key` as seconds in `range`, or `default`.
    pub fn seconds(
        &self,
        key: &str,
        default: f64,
        range: std::ops::RangeInclusive<f64>,
    ) -> Result<f64, String> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => match v.trim().parse::<f64>() {
                Ok(s) if range.contains(&s) => Ok(s),
                _ => Err(format!(
                    "{key}={v:?}: want seconds in {}..={}",
                    range.start(),
                    range.end()
                )),
            },
        }
    }

    /// `key` as a number (hex or decimal) in `range`, or `default`.
    pub fn number(
        &self,
        key: &str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<u64, String> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => match parse_u64(&v) {
                Some(n) if range.contains(&n) => Ok(n),
                _ => Err(format!(
                    "{key}={v:?}: want {}..={}",
                    range.start(),
                    range.end()
                )),
            },
        }
    }

    /// `key` as an IBS sample period (a multiple of 16 in `min..=0x7ffffff0`), or
    /// `default`.
    pub fn period(&self, key: &str, default: u64, min: u64) -> Result<u64, String> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => {
                let p = parse_u64(&v).ok_or_else(|| format!("{key}={v:?}: not a number"))?;
                if p < min || !p.is_multiple_of(16) || p > 0x7fff_fff0 {
                    return Err(format!(
                        "{key}={v:?}: want a multiple of 16 in {min:#x}..=0x7ffffff0"
                    ));
                }
                Ok(p)
            }
        }
    }
}

/// Parses `0x...` hex or decimal.
pub fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: [&str; 3] = ["T_PERIOD", "T_SECONDS", "T_COUNT"];

    fn opts(args: &[&str]) -> Result<Options, String> {
        Options::new(args.iter().map(|s| s.to_string()).collect(), &KNOWN)
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_u64("0x10000"), Some(0x10000));
        assert_eq!(parse_u64(" 65536 "), Some(65536));
        assert_eq!(parse_u64("zz"), None);
    }

    #[test]
    fn arguments() {
        let e = opts(&["T_PERIOD=0x20", "bogus"]).err().unwrap();
        assert_eq!(
            e,
            "unknown argument \"bogus\" (want KEY=VALUE, KEY one of T_PERIOD, T_SECONDS, T_COUNT)"
        );
        assert!(opts(&["T_PERIODX=1"]).is_err(), "a key must match whole");
        let o = opts(&["T_PERIOD=0x20", "T_SECONDS=1.5", "T_PERIOD=0x30"]).unwrap();
        assert_eq!(
            o.get("T_PERIOD").as_deref(),
            Some("0x30"),
            "the last one wins"
        );
        assert_eq!(o.period("T_PERIOD", 0x10, 0x10), Ok(0x30));
        assert_eq!(o.seconds("T_SECONDS", 3.0, 0.1..=10.0), Ok(1.5));
        assert_eq!(o.number("T_COUNT", 7, 1..=10), Ok(7), "default");
    }

    #[test]
    fn ranges() {
        let o = opts(&["T_PERIOD=0x18", "T_SECONDS=20", "T_COUNT=0"]).unwrap();
        assert!(o
            .period("T_PERIOD", 0x10, 0x10)
            .unwrap_err()
            .contains("multiple of 16"));
        assert_eq!(
            o.seconds("T_SECONDS", 3.0, 0.1..=10.0).unwrap_err(),
            "T_SECONDS=\"20\": want seconds in 0.1..=10"
        );
        assert!(o.number("T_COUNT", 7, 1..=10).is_err());
        let o = opts(&["T_PERIOD=0x0"]).unwrap();
        assert!(o.period("T_PERIOD", 0x10, 0x10).is_err());
    }
}
