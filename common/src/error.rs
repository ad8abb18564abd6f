//! The one validation error: which field, what value, which rule was broken.

use serde::{Deserialize, Serialize};

/// A value that breaks a rule. The message names the field, the value and the
/// rule, so the person who sent it knows what to change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{field} {value:?} is invalid: {rule}")]
pub struct ValidationError {
    /// The field, as the API and the CLI name it (`name`, `gpu_memory_mib`).
    pub field: String,
    /// The offending value, rendered as text.
    pub value: String,
    /// The rule it breaks and, where useful, what to do instead.
    pub rule: String,
}

impl ValidationError {
    /// Builds an error for `field` holding `value`, which breaks `rule`.
    pub fn new(field: impl Into<String>, value: impl ToString, rule: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            value: value.to_string(),
            rule: rule.into(),
        }
    }
}
