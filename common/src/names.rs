//! Names, versions, labels and environment keys: the input conventions of the
//! design (`^[a-z0-9][a-z0-9-]{0,62}$` names, `^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`
//! versions, Kubernetes-style label keys).

use std::collections::BTreeMap;

use crate::ValidationError;

/// Labels on a model version or a node: Kubernetes-style keys, short values.
pub type Labels = BTreeMap<String, String>;

/// The version used when none is given.
pub const DEFAULT_VERSION: &str = "v1";
/// The most labels one object may carry.
pub const MAX_LABELS: usize = 64;
/// The most environment variables one model version may set.
pub const MAX_ENV: usize = 128;

const NAME_RULE: &str =
    "must be 1-63 characters of lowercase letters, digits and '-', starting with a letter or digit";
const VERSION_RULE: &str =
    "must be 1-63 characters of letters, digits, '.', '_' and '-', starting with a letter or digit";

/// Checks an object name (model, deployment, node).
pub fn validate_name(field: &str, value: &str) -> Result<(), ValidationError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && value.as_bytes()[0] != b'-';
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(field, value, NAME_RULE))
    }
}

/// Checks a version string.
pub fn validate_version(field: &str, value: &str) -> Result<(), ValidationError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && value.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(field, value, VERSION_RULE))
    }
}

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, at most 63 characters; empty allowed when `allow_empty`.
fn is_label_segment(s: &str, allow_empty: bool) -> bool {
    if s.is_empty() {
        return allow_empty;
    }
    let b = s.as_bytes();
    s.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// A DNS subdomain: dot-separated lowercase labels, at most 253 characters.
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

/// Checks one label (`key=value` with a Kubernetes-style key).
pub fn validate_label(field: &str, key: &str, value: &str) -> Result<(), ValidationError> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let key_ok = is_label_segment(name, false) && prefix.is_none_or(is_dns_subdomain);
    if !key_ok {
        return Err(ValidationError::new(
            field,
            format!("{key}={value}"),
            "label key must be [prefix/]name: name 1-63 characters of letters, digits, '-', '_', '.', \
             starting and ending with a letter or digit; prefix a DNS subdomain",
        ));
    }
    if !is_label_segment(value, true) {
        return Err(ValidationError::new(
            field,
            format!("{key}={value}"),
            "label value must be at most 63 characters of letters, digits, '-', '_', '.', \
             starting and ending with a letter or digit (or empty)",
        ));
    }
    Ok(())
}

/// Checks a whole label set.
pub fn validate_labels(field: &str, labels: &Labels) -> Result<(), ValidationError> {
    if labels.len() > MAX_LABELS {
        return Err(ValidationError::new(
            field,
            labels.len(),
            format!("at most {MAX_LABELS} labels are allowed"),
        ));
    }
    labels
        .iter()
        .try_for_each(|(k, v)| validate_label(field, k, v))
}

/// Parses `k=v` as typed on a command line.
pub fn parse_label(field: &str, text: &str) -> Result<(String, String), ValidationError> {
    let Some((k, v)) = text.split_once('=') else {
        return Err(ValidationError::new(
            field,
            text,
            "must be key=value, e.g. gpu=a100",
        ));
    };
    validate_label(field, k, v)?;
    Ok((k.to_string(), v.to_string()))
}

/// Checks environment variables a replica will get.
pub fn validate_env(field: &str, env: &BTreeMap<String, String>) -> Result<(), ValidationError> {
    if env.len() > MAX_ENV {
        return Err(ValidationError::new(
            field,
            env.len(),
            format!("at most {MAX_ENV} variables are allowed"),
        ));
    }
    for (k, v) in env {
        let b = k.as_bytes();
        let key_ok = !b.is_empty()
            && k.len() <= 128
            && (b[0].is_ascii_alphabetic() || b[0] == b'_')
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_');
        if !key_ok {
            return Err(ValidationError::new(
                field,
                k,
                "variable name must match [A-Za-z_][A-Za-z0-9_]* (at most 128 characters)",
            ));
        }
        if v.len() > 4096 || v.contains('\0') {
            return Err(ValidationError::new(
                field,
                format!("{k}=…"),
                "value must be at most 4096 bytes without NUL characters",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "llama-3-8b", "0x", &"a".repeat(63)] {
            assert!(validate_name("name", ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "Llama", "a_b", "a.b", &"a".repeat(64), "é"] {
            let e = validate_name("name", bad).unwrap_err();
            assert_eq!(e.field, "name");
            assert_eq!(e.value, bad);
        }
    }

    #[test]
    fn versions() {
        for ok in ["v1", "2024.05.01", "V_2-rc.1", "1"] {
            assert!(validate_version("version", ok).is_ok(), "{ok}");
        }
        for bad in ["", ".v1", "-v", "v 1", "v/1", &"v".repeat(64)] {
            assert!(validate_version("version", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn labels() {
        for (k, v) in [
            ("gpu", "a100"),
            ("berth.dev/zone", "eu-1"),
            ("a", ""),
            ("x.y_z", "A.b-c"),
        ] {
            assert!(validate_label("label", k, v).is_ok(), "{k}={v}");
        }
        for (k, v) in [
            ("", "x"),
            ("-a", "x"),
            ("a", "-x"),
            ("Bad_Prefix/a", "x"),
            ("/a", "x"),
            ("a", "has space"),
        ] {
            assert!(validate_label("label", k, v).is_err(), "{k}={v}");
        }
        assert!(parse_label("label", "novalue").is_err());
        assert_eq!(
            parse_label("label", "gpu=h100").unwrap(),
            ("gpu".into(), "h100".into())
        );
    }

    #[test]
    fn env() {
        let mut env = BTreeMap::new();
        env.insert("HF_HOME".to_string(), "/data".to_string());
        assert!(validate_env("env", &env).is_ok());
        env.insert("1BAD".to_string(), "x".to_string());
        assert_eq!(validate_env("env", &env).unwrap_err().value, "1BAD");
    }
}
