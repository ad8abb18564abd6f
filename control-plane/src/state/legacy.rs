//! Earlier layouts of `ClusterState`, kept so that snapshots written by
//! older builds stay readable. postcard is not self-describing: a state
//! with a new field is a new snapshot format, and the old layout is
//! decoded here and converted.

use std::collections::BTreeMap;

use berth_common::Model;
use serde::{Deserialize, Serialize};

use super::ClusterState;

/// Snapshot format 1: the model registry only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStateV1 {
    /// Models by name.
    pub models: BTreeMap<String, Model>,
}

impl From<ClusterStateV1> for ClusterState {
    fn from(v1: ClusterStateV1) -> Self {
        ClusterState {
            models: v1.models,
            ..ClusterState::default()
        }
    }
}
