//! `berth events [--tail N] [-f]`: what happened in the cluster.

use berth_proto::v1 as pb;
use clap::Args;
use serde::Serialize;
use tokio_stream::StreamExt;

use crate::client::{CliError, Client};
use crate::output::{OutputFormat, print_json};

/// `events` options.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Events already recorded to print first.
    #[arg(long, default_value_t = 100)]
    tail: u32,
    /// Keep printing new events until Ctrl-C (with --output json: one JSON object a line).
    #[arg(long, short = 'f')]
    follow: bool,
}

/// An event, as printed.
#[derive(Debug, Serialize)]
pub struct EventView {
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// info or warning.
    pub severity: String,
    /// model, node, deployment or replica.
    pub kind: String,
    /// Its name.
    pub object: String,
    /// What happened.
    pub message: String,
}

fn time(ms: u64) -> String {
    let secs = ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03}Z", ms % 1000)
}

/// Runs `berth events`.
pub async fn run(a: EventsArgs, client: &Client, out: OutputFormat) -> Result<(), CliError> {
    let req = pb::EventsRequest {
        tail: Some(a.tail),
        follow: a.follow,
    };
    let mut stream = client
        .admin(|mut c| async move { c.events(req).await })
        .await?;
    let mut all = Vec::new();
    while let Some(e) = stream.next().await {
        let e = e.map_err(|status| CliError::Request {
            status,
            servers: client.servers().to_string(),
        })?;
        let view = EventView {
            at_ms: e.at_ms,
            severity: e.severity,
            kind: e.kind,
            object: e.object,
            message: e.message,
        };
        match (out, a.follow) {
            (OutputFormat::Json, false) => all.push(view),
            (OutputFormat::Json, true) => match serde_json::to_string(&view) {
                Ok(line) => out!("{line}"),
                Err(e) => eprintln!("error: encode an event: {e}"),
            },
            (OutputFormat::Table, _) => {
                let mark = if view.severity == "warning" { "!" } else { " " };
                out!(
                    "{} {mark} {:<10} {}",
                    time(view.at_ms),
                    view.kind,
                    view.message
                );
            }
        }
    }
    if out == OutputFormat::Json && !a.follow {
        print_json(&all);
    }
    Ok(())
}
