//! Logging set-up shared by every binary: `tracing` to stderr, text or JSON,
//! filtered by `RUST_LOG` (default `info`).

use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "log format {other:?} is invalid: must be text or json"
            )),
        }
    }
}

/// Installs the global subscriber; a second call is a no-op (tests start many servers).
/// Text has colours only on a terminal: files and journald get plain lines.
pub fn init(format: LogFormat, default_filter: &str) {
    use std::io::IsTerminal;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// The Prometheus text format (0.0.4) of an OpenMetrics page as
/// `prometheus-client` encodes it, which is what `promtool check metrics`
/// and older scrapers read: a counter's HELP and TYPE name its `_total`
/// series, and the `# UNIT` and `# EOF` lines go.
pub fn prometheus_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" counter"))
        {
            counters.insert(name.to_string());
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The content type of [`prometheus_text`]'s output.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_counters_become_prometheus_text() {
        let om = "# HELP x_requests Requests.\n# TYPE x_requests counter\nx_requests_total{code=\"200\"} 3\n# HELP x_memory_used_bytes Memory.\n# TYPE x_memory_used_bytes gauge\n# UNIT x_memory_used_bytes bytes\nx_memory_used_bytes 1024\n# EOF\n";
        assert_eq!(
            prometheus_text(om),
            "# HELP x_requests_total Requests.\n# TYPE x_requests_total counter\nx_requests_total{code=\"200\"} 3\n# HELP x_memory_used_bytes Memory.\n# TYPE x_memory_used_bytes gauge\nx_memory_used_bytes 1024\n"
        );
    }
}
