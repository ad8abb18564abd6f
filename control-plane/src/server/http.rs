//! The HTTP endpoint of a member: `GET /health` (JSON: id, role, leader,
//! term) and `GET /metrics` (Prometheus text).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use berth_proto::tls::Credentials;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use berth_common::ReplicaIntent;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::member::{Member, Role};
use crate::reconciler::nodes::NodeTracker;

/// Binds `addr` and serves health and metrics until `shutdown`.
pub(super) async fn serve(
    addr: SocketAddr,
    member: Member,
    nodes: NodeTracker,
    credentials: Option<Arc<Credentials>>,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind HTTP address {addr}"))?;
    let bound = listener.local_addr().context("read bound HTTP address")?;
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(Http {
            member,
            nodes,
            credentials,
        });
    tasks.spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "HTTP server stopped");
        }
    });
    tracing::info!(addr = %bound, "serving /health and /metrics");
    Ok(bound)
}

/// What the HTTP handlers read.
#[derive(Clone)]
struct Http {
    member: Member,
    nodes: NodeTracker,
    credentials: Option<Arc<Credentials>>,
}

async fn health(State(Http { member, .. }): State<Http>) -> impl IntoResponse {
    let v = member.view();
    let role = v
        .members
        .iter()
        .find(|m| m.0 == member.id)
        .map(|m| m.2.as_str())
        .unwrap_or("none");
    let body = serde_json::json!({
        "status": "ok",
        "id": member.id,
        "role": role,
        "leader_id": v.leader.as_ref().map(|l| l.0),
        "term": v.term,
        "applied_index": v.applied_index,
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}

async fn metrics(
    State(Http {
        member,
        nodes,
        credentials,
    }): State<Http>,
) -> impl IntoResponse {
    let v = member.view();
    let models = member.state.read().state.models.len() as i64;
    let mut registry = Registry::with_prefix("berth");
    let gauge = |registry: &mut Registry, name: &str, help: &str, value: i64| {
        let g: Gauge = Gauge::default();
        g.set(value);
        registry.register(name, help, g);
    };
    let is_leader = v
        .members
        .iter()
        .any(|m| m.0 == member.id && m.2 == Role::Leader);
    gauge(
        &mut registry,
        "raft_term",
        "Current Raft term",
        v.term as i64,
    );
    gauge(
        &mut registry,
        "raft_is_leader",
        "1 when this member leads",
        i64::from(is_leader),
    );
    gauge(
        &mut registry,
        "raft_last_log_index",
        "Last index in this member's log",
        v.last_log_index as i64,
    );
    gauge(
        &mut registry,
        "raft_applied_index",
        "Last index applied to the state machine",
        v.applied_index as i64,
    );
    gauge(
        &mut registry,
        "raft_members",
        "Members in the cluster",
        v.members.len() as i64,
    );
    gauge(&mut registry, "models", "Registered models", models);
    if is_leader {
        deployment_gauges(&mut registry, &member, &nodes);
    }
    if let Some(c) = &credentials {
        gauge(
            &mut registry,
            "tls_certificate_expiry_seconds",
            "Seconds before this member's TLS certificate expires (renewed at two thirds of its lifetime)",
            c.leaf().left(std::time::SystemTime::now()).as_secs() as i64,
        );
    }
    if let Some(busy) = super::load::busy_ratio() {
        let g: Gauge<f64, AtomicU64> = Gauge::default();
        g.set(busy);
        registry.register(
            "runtime_busy_ratio",
            "Share of the last 10 s the worker threads spent running tasks (see --worker-threads)",
            g,
        );
    }
    crate::metrics::register(&mut registry);
    berth_proto::call_metrics::register(&mut registry);
    let mut text = String::new();
    if let Err(e) = encode(&mut text, &registry) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encode metrics: {e}"),
        )
            .into_response();
    }
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            berth_common::telemetry::PROMETHEUS_TEXT,
        )],
        berth_common::telemetry::prometheus_text(&text),
    )
        .into_response()
}

/// A deployment's name, as a label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeploymentLabel {
    deployment: String,
}

/// Each deployment's replicas: desired, placed, pending, running (a
/// heartbeat says so, at the placed generation or later) and at the current
/// revision; the counts `berth deploy list` shows. Only the leader has the
/// heartbeats, so only it shows them. Heartbeats and the state are read one
/// after the other, never both locked at once.
fn deployment_gauges(registry: &mut Registry, member: &Member, nodes: &NodeTracker) {
    let running: HashMap<String, u64> = nodes.with_observations(|observed| {
        observed
            .values()
            .flat_map(|o| o.report.replicas.iter())
            .filter(|r| r.phase == "running")
            .map(|r| (r.id.clone(), r.generation))
            .collect()
    });
    let families: [(&str, &str, Family<DeploymentLabel, Gauge>); 5] = [
        (
            "deployment_replicas_desired",
            "Replicas a deployment asks for",
            Family::default(),
        ),
        (
            "deployment_replicas_placed",
            "A deployment's replicas placed on a node",
            Family::default(),
        ),
        (
            "deployment_replicas_pending",
            "A deployment's replicas waiting for a place",
            Family::default(),
        ),
        (
            "deployment_replicas_running",
            "A deployment's replicas whose agent reports them running",
            Family::default(),
        ),
        (
            "deployment_replicas_updated",
            "A deployment's replicas at its current revision",
            Family::default(),
        ),
    ];
    {
        let applied = member.state.read();
        let state = &applied.state;
        for d in state.deployments.values() {
            let label = DeploymentLabel {
                deployment: d.name.clone(),
            };
            families[0]
                .2
                .get_or_create(&label)
                .set(i64::from(d.spec.replicas));
            // Zero, not absent, for a deployment with nothing placed yet.
            for f in &families[1..] {
                f.2.get_or_create(&label).set(0);
            }
        }
        for r in state
            .replicas
            .values()
            .filter(|r| r.intent == ReplicaIntent::Run)
        {
            let Some(d) = state.deployments.get(&r.deployment) else {
                continue;
            };
            let label = DeploymentLabel {
                deployment: r.deployment.clone(),
            };
            let placed = r.node.is_some();
            families[if placed { 1 } else { 2 }]
                .2
                .get_or_create(&label)
                .inc();
            if placed && running.get(&r.id).is_some_and(|g| *g >= r.generation) {
                families[3].2.get_or_create(&label).inc();
            }
            if r.revision == d.revision {
                families[4].2.get_or_create(&label).inc();
            }
        }
    }
    for (name, help, family) in families {
        registry.register(name, help, family);
    }
}
