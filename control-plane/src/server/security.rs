//! A member's TLS identity: made at `--bootstrap` (the cluster CA, this
//! member's certificate), bought with a join token on the first `--join`,
//! or loaded from `<data-dir>/tls/` on every later start. Also the
//! bootstrap's credentials for people: `admin.conf` and `agent.token`.
//!
//! `tls/ca.key` (the CA's key) and `tls/key.pem` are written 0600 and read
//! only if they are still 0600.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use berth_common::security::Role;
use berth_proto::auth::{Gate, Token};
use berth_proto::grpc::{Dialer, ServerSecurity};
use berth_proto::pki::{self, Ca, Identity, Secret};
use berth_proto::tls::{ClientFile, Credentials, TlsFiles};
use berth_proto::v1::PkiJoinRequest;

use super::Identity as MemberIdentity;
use crate::api::pki::{ClusterAuth, Signer};
use crate::config::Config;
use crate::member::{Member, now_ms};
use crate::raft::state_machine::StateView;
use crate::state::{Command, Outcome};

/// The CLI credentials bootstrap writes into the data dir.
pub const ADMIN_CONF: &str = "admin.conf";
/// The agent join token bootstrap writes into the data dir (0600).
pub const AGENT_TOKEN: &str = "agent.token";
/// How long the agent join token made at bootstrap works.
pub const BOOTSTRAP_AGENT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// How a member guards its port and dials its peers.
pub struct Security {
    /// The server side.
    pub server: ServerSecurity,
    /// The client side.
    pub dialer: Dialer,
    /// The CA (None with `--insecure`).
    pub signer: Option<Arc<Signer>>,
    /// This member's certificate (None with `--insecure`).
    pub credentials: Option<Arc<Credentials>>,
    /// Where the authorization layer finds the member once it runs (to
    /// catch up before it refuses a token).
    pub member: Arc<OnceLock<Member>>,
}

/// What bootstrap made for people.
#[derive(Debug, Clone)]
pub struct Bootstrapped {
    /// The CLI credentials file (admin token inside).
    pub admin_conf: PathBuf,
    /// The file holding the agent join token.
    pub agent_token: PathBuf,
    /// The CA's SHA-256 fingerprint.
    pub ca_fingerprint: String,
}

/// Names for the member's certificate: its advertised host and loopback,
/// for clients that verify by address.
fn names(identity: &MemberIdentity) -> Vec<String> {
    let host = berth_proto::tls::host_of(&identity.advertise);
    let mut names = vec![host, "localhost".to_string(), "127.0.0.1".to_string()];
    names.dedup();
    names
}

/// Loads, makes or buys this member's TLS identity (see the module doc).
pub async fn prepare(
    config: &Config,
    identity: &MemberIdentity,
    state: StateView,
) -> anyhow::Result<Security> {
    if config.insecure {
        tracing::warn!(
            "--insecure: plaintext gRPC and no authentication; anyone who reaches {} controls this cluster. For development only",
            config.listen
        );
        return Ok(Security {
            server: ServerSecurity::Insecure,
            dialer: Dialer::Insecure,
            signer: None,
            credentials: None,
            member: Arc::default(),
        });
    }
    let files = TlsFiles::under(&config.data_dir);
    if !files.exist() {
        if config.bootstrap {
            make_ca(config, identity, &files)?;
        } else if let Some(token) = &config.token {
            buy_certificate(config, identity, token, &files).await?;
        } else if !config.join.is_empty() {
            bail!(
                "--join needs --token on a member's first start: on the cluster run `berth token create --role member`, then pass --token TOKEN"
            );
        } else {
            bail!(
                "data dir {} has no TLS identity (tls/cert.pem): it was made with --insecure, or tls/ was removed; start a new member with --bootstrap or --join ADDR --token TOKEN",
                config.data_dir.display()
            );
        }
    }
    let credentials = Credentials::load(&files)?;
    let leaf = credentials.leaf();
    if leaf.identity != Some(Identity::Member(identity.id)) {
        bail!(
            "{} names {} but this is member {}: the data dir's tls/ belongs to another member",
            files.cert().display(),
            leaf.identity
                .as_ref()
                .map_or_else(|| "no Berth identity".to_string(), |i| i.to_string()),
            identity.id
        );
    }
    let ca_pem = std::fs::read_to_string(files.ca())
        .with_context(|| format!("read {}", files.ca().display()))?;
    let ca_key = pki::read_private(&files.ca_key())?;
    let ca = Ca::from_pem(&ca_pem, &ca_key, &files.ca_key().display().to_string())?;
    let signer = Arc::new(Signer {
        ca,
        lifetime: config.cert_lifetime,
    });
    heal_if_expired(&credentials, &files, &signer, identity, SystemTime::now())?;
    let leaf = credentials.leaf();
    let member = Arc::new(OnceLock::new());
    let gate = Gate::new(Arc::new(ClusterAuth::new(
        state,
        signer.ca.fingerprint(),
        member.clone(),
    )));
    let dialer = Dialer::with_credentials(credentials.clone())?;
    tracing::info!(
        member = identity.id,
        ca = %signer.ca.fingerprint(),
        serial = %leaf.serial,
        "serving mTLS"
    );
    Ok(Security {
        server: ServerSecurity::Tls {
            credentials: credentials.clone(),
            gate,
            connections: Default::default(),
        },
        dialer,
        signer: Some(signer),
        credentials: Some(credentials),
        member,
    })
}

/// A member that was down past its certificate's expiry cannot renew
/// through the cluster (peers refuse an expired certificate), but it holds
/// the CA key: it signs itself a new leaf before it serves. The renewal
/// loop records the next one in the ledger as usual.
fn heal_if_expired(
    credentials: &Credentials,
    files: &TlsFiles,
    signer: &Signer,
    identity: &MemberIdentity,
    now: SystemTime,
) -> anyhow::Result<()> {
    let old = credentials.leaf();
    if old.left(now) >= Duration::from_secs(60) {
        return Ok(());
    }
    let request = pki::new_key_and_csr()?;
    let issued = signer.ca.sign_csr(
        &request.csr_der,
        &Identity::Member(identity.id),
        &names(identity),
        signer.lifetime,
        now,
    )?;
    let chain = format!("{}{}", issued.cert_pem, signer.ca.cert_pem());
    credentials.replace(&chain, &request.key_pem)?;
    files.replace_leaf(&chain, &request.key_pem)?;
    tracing::warn!(
        member = identity.id,
        expired_serial = %old.serial,
        serial = %issued.serial,
        "this member's certificate had expired (it was down past its lifetime): signed a new one with the cluster CA"
    );
    Ok(())
}

/// Bootstrap: the cluster's CA (or the operator's) and this member's leaf.
fn make_ca(config: &Config, identity: &MemberIdentity, files: &TlsFiles) -> anyhow::Result<()> {
    let now = SystemTime::now();
    let ca = match &config.ca {
        Some((cert, key)) => {
            let pem = std::fs::read_to_string(cert)
                .with_context(|| format!("read --ca-cert {}", cert.display()))?;
            pki::parse_certs(pem.as_bytes(), &cert.display().to_string())?;
            let key_pem = pki::read_private(key)?;
            Ca::from_pem(&pem, &key_pem, &key.display().to_string())?
        }
        None => {
            let cluster_id = pki::random_hex(8)?;
            Ca::generate(&cluster_id, now)?
        }
    };
    let request = pki::new_key_and_csr()?;
    let issued = ca.sign_csr(
        &request.csr_der,
        &Identity::Member(identity.id),
        &names(identity),
        config.cert_lifetime,
        now,
    )?;
    std::fs::create_dir_all(&files.dir)
        .with_context(|| format!("create {}", files.dir.display()))?;
    pki::write_private(&files.ca_key(), ca.key_pem())?;
    files.store(
        ca.cert_pem(),
        &format!("{}{}", issued.cert_pem, ca.cert_pem()),
        &request.key_pem,
    )?;
    tracing::info!(ca = %ca.fingerprint(), "made the cluster CA and this member's certificate");
    Ok(())
}

/// First `--join`: checks the server against the CA the token pins, and only
/// then sends the token with a CSR; stores the certificate, CA and CA key.
async fn buy_certificate(
    config: &Config,
    identity: &MemberIdentity,
    token: &Token,
    files: &TlsFiles,
) -> anyhow::Result<()> {
    let request = pki::new_key_and_csr()?;
    let join = PkiJoinRequest {
        csr_der: request.csr_der.clone(),
        node_name: String::new(),
        member_id: identity.id,
        names: names(identity),
    };
    let r = berth_proto::grpc::join_with_token(&config.join, token, join, config.join_timeout)
        .await
        .map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&files.dir)
        .with_context(|| format!("create {}", files.dir.display()))?;
    pki::write_private(&files.ca_key(), &Secret::new(r.ca_key_pem))?;
    files.store(&r.ca_pem, &r.cert_pem, &request.key_pem)?;
    tracing::info!(member = identity.id, "received this member's certificate");
    Ok(())
}

/// After bootstrap: records this member's certificate, makes the admin
/// token and a 24 h agent join token, and writes `admin.conf` and
/// `agent.token` into the data dir for the operator.
pub async fn after_bootstrap(
    member: &Member,
    security: &Security,
    data_dir: &Path,
    advertise: &str,
) -> anyhow::Result<Option<Bootstrapped>> {
    let (Some(signer), Some(credentials)) = (&security.signer, &security.credentials) else {
        return Ok(None);
    };
    let leaf = credentials.leaf();
    let own = berth_common::security::IssuedCert {
        serial: leaf.serial.clone(),
        identity: Identity::Member(member.id).to_string(),
        not_after_ms: leaf
            .not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        issued_ms: now_ms(),
        token: None,
    };
    member
        .write(Command::IssueCertificate {
            token: None,
            cert: own,
        })
        .await
        .map_err(|e| anyhow::anyhow!("record this member's certificate: {e}"))?;
    let fingerprint = signer.ca.fingerprint();
    let admin = new_token(member, &fingerprint, Role::Admin, None, "made at bootstrap").await?;
    let agent = new_token(
        member,
        &fingerprint,
        Role::Agent,
        Some(BOOTSTRAP_AGENT_TOKEN_TTL),
        "agent join token made at bootstrap",
    )
    .await?;
    let admin_conf = data_dir.join(ADMIN_CONF);
    ClientFile {
        servers: vec![advertise.to_string()],
        ca_fingerprint: fingerprint.clone(),
        ca_pem: signer.ca.cert_pem().to_string(),
        token: Some(admin.reveal().expose().to_string()),
    }
    .save(&admin_conf)?;
    let agent_token = data_dir.join(AGENT_TOKEN);
    pki::write_private(
        &agent_token,
        &Secret::new(format!("{}\n", agent.reveal().expose())),
    )?;
    Ok(Some(Bootstrapped {
        admin_conf,
        agent_token,
        ca_fingerprint: fingerprint,
    }))
}

async fn new_token(
    member: &Member,
    fingerprint: &str,
    role: Role,
    ttl: Option<Duration>,
    description: &str,
) -> anyhow::Result<Token> {
    let token = Token::generate(fingerprint)?;
    let record = crate::api::pki::token_record(&token, role, ttl, None, description.to_string());
    match member.write(Command::CreateToken(record)).await {
        Ok(Outcome::Token(_)) => Ok(token),
        Ok(other) => bail!("make the {role} token: unexpected outcome {other:?}"),
        Err(e) => bail!("make the {role} token: {e}"),
    }
}

/// Renews this member's certificate at two thirds of its lifetime: it signs
/// its own CSR with the CA it holds and records the new certificate through
/// Raft like any other (so renewal needs a quorum, and retries without one).
pub fn keep_renewed(
    member: &Member,
    security: &Security,
    data_dir: &Path,
    identity: &MemberIdentity,
    tasks: &tokio_util::task::TaskTracker,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let (Some(signer), Some(credentials)) = (&security.signer, &security.credentials) else {
        return;
    };
    let (member, signer) = (member.clone(), signer.clone());
    let names = names(identity);
    let me = Identity::Member(identity.id);
    tasks.spawn(berth_proto::tls::keep_renewed(
        credentials.clone(),
        TlsFiles::under(data_dir),
        shutdown,
        move |csr| {
            let (member, signer, names, me) =
                (member.clone(), signer.clone(), names.clone(), me.clone());
            async move {
                let issued = signer
                    .issue(&member, &csr, &me, &names, None)
                    .await
                    .map_err(|s| s.message().to_string())?;
                Ok(format!("{}{}", issued.cert_pem, signer.ca.cert_pem()))
            }
        },
    ));
}

/// Closes open connections whose client certificate was revoked (`node
/// remove`, `cluster remove`): every call is checked against the ledger
/// anyway, and this also ends streams that make no new calls. Looks once a
/// second, and only when the revoked set changed.
pub fn cut_revoked(
    state: StateView,
    security: &Security,
    tasks: &tokio_util::task::TaskTracker,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let ServerSecurity::Tls { connections, .. } = &security.server else {
        return;
    };
    let connections = connections.clone();
    tasks.spawn(async move {
        let mut seen = std::collections::BTreeSet::new();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let revoked = {
                let applied = state.read();
                let revoked = &applied.state.security.revoked;
                if *revoked == seen {
                    continue;
                }
                seen = revoked.clone();
                seen.clone()
            };
            let cut = connections.cut(|serial| revoked.contains(serial));
            if cut > 0 {
                tracing::info!(
                    connections = cut,
                    "closed connections of revoked certificates"
                );
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_back_after_its_certificate_expired_signs_itself_a_new_one() {
        berth_proto::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles::under(dir.path());
        let day = Duration::from_secs(24 * 3600);
        let now = SystemTime::now();
        let ca = Ca::generate("c", now - 90 * day).unwrap();
        let identity = MemberIdentity {
            id: 2,
            advertise: "127.0.0.1:7410".into(),
            joined: true,
        };
        // A leaf issued 60 days ago for 30 days: expired a month ago.
        let request = pki::new_key_and_csr().unwrap();
        let old = ca
            .sign_csr(
                &request.csr_der,
                &Identity::Member(2),
                &[],
                30 * day,
                now - 60 * day,
            )
            .unwrap();
        files
            .store(
                ca.cert_pem(),
                &format!("{}{}", old.cert_pem, ca.cert_pem()),
                &request.key_pem,
            )
            .unwrap();
        let credentials = Credentials::load(&files).unwrap();
        let signer = Signer {
            ca,
            lifetime: 30 * day,
        };
        heal_if_expired(&credentials, &files, &signer, &identity, now).unwrap();
        let healed = credentials.leaf();
        assert_ne!(healed.serial, old.serial);
        assert_eq!(healed.identity, Some(Identity::Member(2)));
        assert!(healed.left(now) > 29 * day);
        // Stored too: a restart loads the new one.
        assert_eq!(
            Credentials::load(&files).unwrap().leaf().serial,
            healed.serial
        );
        // A valid leaf is left alone.
        heal_if_expired(&credentials, &files, &signer, &identity, now).unwrap();
        assert_eq!(credentials.leaf().serial, healed.serial);
    }
}
