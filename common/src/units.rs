//! Parsing and printing of the input units of the design: sizes (`512MiB`,
//! `20GiB`, `1TiB`, a plain number is MiB), CPU (`2` cores or `500m`) and
//! durations (`500ms`, `5s`, `2m`).

use std::time::Duration;

use crate::ValidationError;

/// Parses a size into MiB.
pub fn parse_size_mib(field: &str, text: &str) -> Result<u64, ValidationError> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let err = || {
        ValidationError::new(
            field,
            text,
            "must be a size like 512MiB, 20GiB or 1TiB (a plain number means MiB)",
        )
    };
    let n: u64 = digits.parse().map_err(|_| err())?;
    let mult: u64 = match unit.trim() {
        "" | "MiB" | "Mi" => 1,
        "GiB" | "Gi" => 1024,
        "TiB" | "Ti" => 1024 * 1024,
        _ => return Err(err()),
    };
    n.checked_mul(mult).ok_or_else(err)
}

/// Parses CPU as cores (`2`, `1.5`) or millicores (`500m`) into millicores.
pub fn parse_cpu_milli(field: &str, text: &str) -> Result<u32, ValidationError> {
    let t = text.trim();
    let err = || ValidationError::new(field, text, "must be cores (2, 1.5) or millicores (500m)");
    if let Some(m) = t.strip_suffix('m') {
        return m.parse::<u32>().map_err(|_| err());
    }
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    if whole.is_empty() || frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err());
    }
    let whole: u32 = whole.parse().map_err(|_| err())?;
    let frac_milli: u32 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<3}").parse().map_err(|_| err())?
    };
    whole
        .checked_mul(1000)
        .and_then(|w| w.checked_add(frac_milli))
        .ok_or_else(err)
}

/// Parses a duration such as `500ms`, `5s` or `2m`.
pub fn parse_duration(field: &str, text: &str) -> Result<Duration, ValidationError> {
    humantime::parse_duration(text.trim())
        .map_err(|_| ValidationError::new(field, text, "must be a duration like 500ms, 5s or 2m"))
}

/// Formats MiB the way a person reads it (`512MiB`, `20GiB`).
pub fn format_mib(mib: u64) -> String {
    if mib >= 1024 * 1024 && mib.is_multiple_of(1024 * 1024) {
        format!("{}TiB", mib / (1024 * 1024))
    } else if mib >= 1024 && mib.is_multiple_of(1024) {
        format!("{}GiB", mib / 1024)
    } else {
        format!("{mib}MiB")
    }
}

/// Formats MiB for reading at a glance: exact units when they fit
/// (`20GiB`), else one decimal (`23.5GiB`).
pub fn format_mib_approx(mib: u64) -> String {
    if mib < 1024 || mib.is_multiple_of(1024) {
        return format_mib(mib);
    }
    if mib >= 1024 * 1024 {
        format!("{:.1}TiB", mib as f64 / (1024.0 * 1024.0))
    } else {
        format!("{:.1}GiB", mib as f64 / 1024.0)
    }
}

/// Formats millicores (`2`, `500m`).
pub fn format_cpu_milli(milli: u32) -> String {
    if milli.is_multiple_of(1000) {
        format!("{}", milli / 1000)
    } else {
        format!("{milli}m")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size_mib("m", "512").unwrap(), 512);
        assert_eq!(parse_size_mib("m", "512MiB").unwrap(), 512);
        assert_eq!(parse_size_mib("m", "20GiB").unwrap(), 20 * 1024);
        assert_eq!(parse_size_mib("m", "1TiB").unwrap(), 1024 * 1024);
        for bad in [
            "",
            "GiB",
            "1.5GiB",
            "-1",
            "20GB",
            "12 parsecs",
            "99999999999999999999",
        ] {
            let e = parse_size_mib("memory", bad).unwrap_err();
            assert_eq!(e.field, "memory");
        }
        assert_eq!(format_mib(20 * 1024), "20GiB");
        assert_eq!(format_mib(1500), "1500MiB");
        assert_eq!(format_mib_approx(24105), "23.5GiB");
        assert_eq!(format_mib_approx(81920), "80GiB");
        assert_eq!(format_mib_approx(512), "512MiB");
    }

    #[test]
    fn cpu() {
        assert_eq!(parse_cpu_milli("cpu", "2").unwrap(), 2000);
        assert_eq!(parse_cpu_milli("cpu", "500m").unwrap(), 500);
        assert_eq!(parse_cpu_milli("cpu", "1.5").unwrap(), 1500);
        assert_eq!(parse_cpu_milli("cpu", "0.25").unwrap(), 250);
        for bad in ["", "m", "-1", "1.2345", "two", ".5"] {
            assert!(parse_cpu_milli("cpu", bad).is_err(), "{bad}");
        }
        assert_eq!(format_cpu_milli(2000), "2");
        assert_eq!(format_cpu_milli(1500), "1500m");
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("d", "500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(parse_duration("d", "2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("d", "soon").is_err());
    }
}
