//! Config primitives shared by the binaries: a TOML file whose errors name
//! the file and line, a duration setting merged from a flag over a file key
//! over a default, comma-separated address lists, `HOST:PORT` checks.

use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::units::parse_duration;

/// Reads a TOML config file, or the defaults when there is none.
pub fn read_toml<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, String> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("read config file {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))
}

/// A duration from the flag, else the file, else the default.
pub fn duration(
    field: &str,
    flag: Option<String>,
    file: Option<String>,
    default: Duration,
) -> Result<Duration, String> {
    match flag.or(file) {
        Some(text) => parse_duration(field, &text).map_err(|e| e.to_string()),
        None => Ok(default),
    }
}

/// `a,b , c` → `[a, b, c]`; empty items are dropped.
pub fn address_list(text: Option<String>) -> Vec<String> {
    text.map(|t| {
        t.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    })
    .unwrap_or_default()
}

/// Checks a `HOST:PORT` address.
pub fn validate_host_port(field: &str, value: &str) -> Result<(), String> {
    match value.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!(
            "{field} {value:?} is invalid: it must be HOST:PORT, e.g. 10.0.0.5:7400"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        a: Option<u32>,
    }

    #[test]
    fn primitives() {
        assert_eq!(address_list(Some(" a:1, ,b:2 ".into())), ["a:1", "b:2"]);
        assert!(address_list(None).is_empty());
        assert!(validate_host_port("x", "h:1").is_ok());
        assert!(validate_host_port("x", ":1").is_err());
        assert!(validate_host_port("x", "h:99999").is_err());
        let d = Duration::from_secs(1);
        assert_eq!(
            duration("t", Some("2s".into()), Some("3s".into()), d),
            Ok(Duration::from_secs(2))
        );
        assert_eq!(
            duration("t", None, Some("3s".into()), d),
            Ok(Duration::from_secs(3))
        );
        assert_eq!(duration("t", None, None, d), Ok(d));
        assert!(
            duration("t", Some("soon".into()), None, d)
                .unwrap_err()
                .contains("t \"soon\"")
        );
        let dir = std::env::temp_dir().join(format!("berth-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.toml");
        std::fs::write(&p, "a = 1\nb = 2\n").unwrap();
        let e = read_toml::<File>(Some(&p)).unwrap_err();
        assert!(e.contains("line 2") && e.contains("c.toml"), "{e}");
        assert!(read_toml::<File>(None).unwrap().a.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
