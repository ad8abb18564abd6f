//! Earlier layouts of `ClusterState`, kept so that snapshots written by
//! older builds stay readable. postcard is not self-describing: a state
//! with a new field is a new snapshot format, and the old layout is
//! decoded here and converted.

use std::collections::BTreeMap;

use berth_common::{Deployment, Model, Node, Replica};
use serde::{Deserialize, Serialize};

use super::{ClusterState, security::SecurityState};

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

/// Snapshot format 2: models, nodes, deployments, replicas, no security ledger.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStateV2 {
    /// Models by name.
    pub models: BTreeMap<String, Model>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, Node>,
    /// Deployments by name.
    pub deployments: BTreeMap<String, Deployment>,
    /// Replicas by id.
    pub replicas: BTreeMap<String, Replica>,
    /// The state version.
    pub version: u64,
}

impl From<ClusterStateV2> for ClusterState {
    fn from(v2: ClusterStateV2) -> Self {
        ClusterState {
            models: v2.models,
            nodes: v2.nodes,
            deployments: v2.deployments,
            replicas: v2.replicas,
            version: v2.version,
            ..ClusterState::default()
        }
    }
}

/// Snapshot format 3: format 2 and the security ledger, no aliases.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStateV3 {
    /// Models by name.
    pub models: BTreeMap<String, Model>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, Node>,
    /// Deployments by name.
    pub deployments: BTreeMap<String, Deployment>,
    /// Replicas by id.
    pub replicas: BTreeMap<String, Replica>,
    /// The state version.
    pub version: u64,
    /// Tokens, certificates, revocations.
    pub security: SecurityState,
}

impl From<ClusterStateV3> for ClusterState {
    fn from(v3: ClusterStateV3) -> Self {
        ClusterState {
            models: v3.models,
            nodes: v3.nodes,
            deployments: v3.deployments,
            replicas: v3.replicas,
            version: v3.version,
            security: v3.security,
            ..ClusterState::default()
        }
    }
}

/// Snapshot format 4: format 3 and aliases, no autoscaling or load times.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStateV4 {
    /// Models by name.
    pub models: BTreeMap<String, Model>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, Node>,
    /// Deployments by name.
    pub deployments: BTreeMap<String, Deployment>,
    /// Replicas by id.
    pub replicas: BTreeMap<String, Replica>,
    /// The state version.
    pub version: u64,
    /// Tokens, certificates, revocations.
    pub security: SecurityState,
    /// Alias → deployment.
    pub aliases: BTreeMap<String, String>,
}

impl From<ClusterStateV4> for ClusterState {
    fn from(v4: ClusterStateV4) -> Self {
        ClusterState {
            models: v4.models,
            nodes: v4.nodes,
            deployments: v4.deployments,
            replicas: v4.replicas,
            version: v4.version,
            security: v4.security,
            aliases: v4.aliases,
            ..ClusterState::default()
        }
    }
}

/// The state of snapshot format 5: no retired replica ordinals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStateV5 {
    /// Models by name.
    pub models: BTreeMap<String, Model>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, Node>,
    /// Deployments by name.
    pub deployments: BTreeMap<String, Deployment>,
    /// Replicas by id.
    pub replicas: BTreeMap<String, Replica>,
    /// The state version.
    pub version: u64,
    /// Tokens, certificates, revocations.
    pub security: SecurityState,
    /// Alias → deployment.
    pub aliases: BTreeMap<String, String>,
    /// Autoscaling policies by deployment.
    pub autoscale: BTreeMap<String, berth_common::AutoscalePolicy>,
    /// Measured load times.
    pub load_times: BTreeMap<String, BTreeMap<String, super::load_times::LoadTime>>,
}

impl From<ClusterStateV5> for ClusterState {
    fn from(v5: ClusterStateV5) -> Self {
        ClusterState {
            models: v5.models,
            nodes: v5.nodes,
            deployments: v5.deployments,
            replicas: v5.replicas,
            version: v5.version,
            security: v5.security,
            aliases: v5.aliases,
            autoscale: v5.autoscale,
            load_times: v5.load_times,
            // Deployments deleted before format 6 left no ordinals: their
            // names start at 1 again, as they did then.
            retired_ordinals: BTreeMap::new(),
            gpus: BTreeMap::new(),
        }
    }
}

/// The state of snapshot format 6: no GPU quarantines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStateV6 {
    /// Models by name.
    pub models: BTreeMap<String, Model>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, Node>,
    /// Deployments by name.
    pub deployments: BTreeMap<String, Deployment>,
    /// Replicas by id.
    pub replicas: BTreeMap<String, Replica>,
    /// The state version.
    pub version: u64,
    /// Tokens, certificates, revocations.
    pub security: SecurityState,
    /// Alias → deployment.
    pub aliases: BTreeMap<String, String>,
    /// Autoscaling policies by deployment.
    pub autoscale: BTreeMap<String, berth_common::AutoscalePolicy>,
    /// Measured load times.
    pub load_times: BTreeMap<String, BTreeMap<String, super::load_times::LoadTime>>,
    /// The next replica ordinal of each deleted deployment.
    pub retired_ordinals: BTreeMap<String, u64>,
}

impl From<ClusterStateV6> for ClusterState {
    fn from(v6: ClusterStateV6) -> Self {
        ClusterState {
            models: v6.models,
            nodes: v6.nodes,
            deployments: v6.deployments,
            replicas: v6.replicas,
            version: v6.version,
            security: v6.security,
            aliases: v6.aliases,
            autoscale: v6.autoscale,
            load_times: v6.load_times,
            retired_ordinals: v6.retired_ordinals,
            gpus: BTreeMap::new(),
        }
    }
}
