//! The agent's TLS identity: bought with a join token on first start (the
//! control plane is checked against the CA the token pins before the token
//! is sent), then loaded from `<data-dir>/tls/`. The Agent service accepts
//! only control-plane members' certificates (the access table says so);
//! the agent dials members with its node certificate.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use berth_proto::auth::{AuthError, Authenticate, Gate, Principal, Token, Via, certificate_role};
use berth_proto::grpc::{Dialer, ServerSecurity};
use berth_proto::pki::{self, Identity, LeafInfo};
use berth_proto::tls::{Credentials, TlsFiles};
use berth_proto::v1::PkiJoinRequest;
use berth_proto::v1::pki_client::PkiClient;

use crate::config::Config;

/// How long the first start keeps trying to buy a certificate.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

/// How the agent guards its port and dials the control plane.
pub struct AgentSecurity {
    /// The server side.
    pub server: ServerSecurity,
    /// The client side.
    pub dialer: Dialer,
    /// The node certificate (None with `--insecure`).
    pub credentials: Option<Arc<Credentials>>,
}

/// Certificates only: an agent knows no tokens, and its access table lets
/// only members in.
struct CertificatesOnly;

impl Authenticate for CertificatesOnly {
    fn token(&self, _token: &Token) -> Result<Principal, AuthError> {
        Err(AuthError::Unauthenticated(
            "an agent accepts no tokens: only the control plane's member certificates".into(),
        ))
    }

    fn certificate(&self, leaf: &LeafInfo) -> Result<Principal, AuthError> {
        let identity = leaf.identity.clone().ok_or_else(|| {
            AuthError::Unauthenticated("the client certificate carries no Berth identity".into())
        })?;
        Ok(Principal {
            role: certificate_role(&identity),
            via: Via::Certificate(identity),
        })
    }
}

/// Loads or buys the agent's identity; `advertised` goes into the
/// certificate for clients that verify by address.
pub async fn prepare(config: &Config, advertised: &str) -> anyhow::Result<AgentSecurity> {
    if config.insecure {
        tracing::warn!(
            "--insecure: plaintext gRPC and no authentication; anyone who reaches {} can start any command on this machine. For development only",
            config.listen
        );
        return Ok(AgentSecurity {
            server: ServerSecurity::Insecure,
            dialer: Dialer::Insecure,
            credentials: None,
        });
    }
    let files = TlsFiles::under(&config.data_dir);
    if !files.exist() {
        let Some(token) = &config.token else {
            bail!(
                "this agent has no certificate yet ({} is missing): start it once with --control ADDR --token TOKEN (bootstrap wrote one to agent.token; or run `berth token create --role agent`), or put a certificate for node {} signed by the cluster CA in {} (ca.pem, cert.pem, key.pem), or run with --insecure for development",
                files.cert().display(),
                config.node_name,
                files.dir.display()
            );
        };
        buy_certificate(config, advertised, token, &files).await?;
    }
    let credentials = Credentials::load(&files)?;
    let leaf = credentials.leaf();
    if leaf.identity != Some(Identity::Node(config.node_name.clone())) {
        bail!(
            "{} names {} but this agent runs node {:?}: the data dir belongs to another node (use its --node-name, or another --data-dir)",
            files.cert().display(),
            leaf.identity
                .as_ref()
                .map_or_else(|| "no Berth identity".to_string(), |i| i.to_string()),
            config.node_name
        );
    }
    tracing::info!(node = %config.node_name, serial = %leaf.serial, "serving mTLS");
    Ok(AgentSecurity {
        server: ServerSecurity::Tls {
            credentials: credentials.clone(),
            gate: Gate::new(Arc::new(CertificatesOnly)),
            connections: Default::default(),
        },
        dialer: Dialer::with_credentials(credentials.clone())?,
        credentials: Some(credentials),
    })
}

async fn buy_certificate(
    config: &Config,
    advertised: &str,
    token: &Token,
    files: &TlsFiles,
) -> anyhow::Result<()> {
    let request = pki::new_key_and_csr()?;
    let join = PkiJoinRequest {
        csr_der: request.csr_der.clone(),
        node_name: config.node_name.clone(),
        member_id: 0,
        names: vec![berth_proto::tls::host_of(advertised)],
    };
    let r = berth_proto::grpc::join_with_token(&config.control, token, join, JOIN_TIMEOUT)
        .await
        .map_err(anyhow::Error::msg)?;
    files
        .store(&r.ca_pem, &r.cert_pem, &request.key_pem)
        .context("store the node certificate")?;
    tracing::info!(node = %config.node_name, "received this node's certificate");
    Ok(())
}

/// Renews the node certificate at two thirds of its lifetime through
/// `Pki.Renew` on any member, paid for with the current certificate.
pub fn keep_renewed(
    security: &AgentSecurity,
    config: &Config,
    advertised: &str,
    tasks: &tokio_util::task::TaskTracker,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let Some(credentials) = &security.credentials else {
        return;
    };
    let dialer = security.dialer.clone();
    let control = config.control.clone();
    let names = vec![berth_proto::tls::host_of(advertised)];
    tasks.spawn(berth_proto::tls::keep_renewed(
        credentials.clone(),
        TlsFiles::under(&config.data_dir),
        shutdown,
        move |csr| {
            let (dialer, control, names) = (dialer.clone(), control.clone(), names.clone());
            async move {
                let mut last = String::from("no control-plane address");
                for addr in &control {
                    let channel = dialer.channel(addr).map_err(|e| e.to_string())?;
                    let mut req = tonic::Request::new(berth_proto::v1::PkiRenewRequest {
                        csr_der: csr.clone(),
                        names: names.clone(),
                    });
                    req.set_timeout(Duration::from_secs(30));
                    match PkiClient::new(channel).renew(req).await {
                        Ok(r) => return Ok(r.into_inner().cert_pem),
                        Err(s) => last = format!("{addr}: {}", berth_proto::grpc::describe(&s)),
                    }
                }
                Err(last)
            }
        },
    ));
}
