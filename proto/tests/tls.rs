//! TLS and the authorization layer over real sockets: a real server built by
//! `grpc::serve` (health and reflection behind the layer), real clients
//! built by `Dialer`, certificates made by the real CA code.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use berth_common::security::Role;
use berth_proto::auth::{
    AuthError, Authenticate, Gate, Principal, TABLE, Token, Via, access, certificate_role,
};
use berth_proto::grpc::{self, Dialer, ServerSecurity};
use berth_proto::pki::{self, Ca, Identity, LeafInfo, Secret};
use berth_proto::tls::{Credentials, Trust};
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Records every token and certificate it is asked about; accepts a token
/// whose id is "viewer1" and any certificate with an identity.
#[derive(Default)]
struct Recorder {
    tokens: Mutex<Vec<String>>,
}

impl Authenticate for Recorder {
    fn token(&self, token: &Token) -> Result<Principal, AuthError> {
        self.tokens
            .lock()
            .expect("recorder lock")
            .push(token.id.clone());
        if token.id == "viewer1" {
            Ok(Principal {
                role: Role::Viewer,
                via: Via::Token(token.id.clone()),
            })
        } else {
            Err(AuthError::Unauthenticated("unknown".into()))
        }
    }

    fn certificate(&self, leaf: &LeafInfo) -> Result<Principal, AuthError> {
        let id = leaf
            .identity
            .clone()
            .ok_or_else(|| AuthError::Unauthenticated("no identity".into()))?;
        Ok(Principal {
            role: certificate_role(&id),
            via: Via::Certificate(id),
        })
    }
}

fn credentials(
    ca: &Ca,
    identity: Identity,
    now: SystemTime,
    lifetime: Duration,
) -> Arc<Credentials> {
    let req = pki::new_key_and_csr().expect("key and csr");
    let issued = ca
        .sign_csr(&req.csr_der, &identity, &[], lifetime, now)
        .expect("sign");
    Credentials::from_pem(
        ca.cert_pem(),
        &format!("{}{}", issued.cert_pem, ca.cert_pem()),
        &req.key_pem,
        "test",
    )
    .expect("credentials")
}

fn fresh(ca: &Ca, identity: Identity) -> Arc<Credentials> {
    credentials(ca, identity, SystemTime::now(), Duration::from_secs(3600))
}

struct Server {
    addr: String,
    recorder: Arc<Recorder>,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve(credentials: Arc<Credentials>) -> Server {
    berth_proto::tls::install_crypto_provider();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("bound address").to_string();
    let recorder = Arc::new(Recorder::default());
    let security = ServerSecurity::Tls {
        credentials,
        gate: Gate::new(recorder.clone()),
        connections: Default::default(),
    };
    let stop = CancellationToken::new();
    let shutdown = stop.clone().cancelled_owned();
    tokio::spawn(async move {
        grpc::serve(
            listener,
            tonic::service::Routes::default(),
            &[],
            &security,
            shutdown,
        )
        .await
        .expect("serve");
    });
    Server {
        addr,
        recorder,
        stop,
    }
}

async fn check(dialer: &Dialer, addr: &str) -> Result<(), tonic::Status> {
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    req.set_timeout(Duration::from_secs(10));
    HealthClient::new(dialer.channel(addr).expect("channel"))
        .check(req)
        .await
        .map(drop)
}

/// A refusal by TLS itself, before any request reached the server's layer:
/// the client's verifier (Unavailable), or the server's alert read by the
/// client after a TLS 1.3 handshake (a transport error).
#[track_caller]
fn refused_by_tls(e: &tonic::Status, what: &str) {
    assert!(
        matches!(e.code(), tonic::Code::Unavailable | tonic::Code::Unknown)
            && (e.code() == tonic::Code::Unavailable || e.message().contains("transport error")),
        "{what}: {e:?}"
    );
}

fn token(fingerprint: &str, id: &str) -> Secret {
    Secret::new(format!("berth1.{fingerprint}.{id}.{}", "s".repeat(40)))
}

#[tokio::test]
async fn mutual_tls_works_and_another_ca_is_refused_in_both_directions() {
    let now = SystemTime::now();
    let a = Ca::generate("a", now).unwrap();
    let b = Ca::generate("b", now).unwrap();
    let server = serve(fresh(&a, Identity::Member(1))).await;

    // Same CA, member certificate: accepted.
    let ok = Dialer::with_credentials(fresh(&a, Identity::Member(2))).unwrap();
    check(&ok, &server.addr).await.unwrap();

    // A client that trusts only CA b refuses the server.
    let wrong_trust = Dialer::with_credentials(fresh(&b, Identity::Member(2))).unwrap();
    let e = check(&wrong_trust, &server.addr).await.unwrap_err();
    refused_by_tls(&e, "refused");

    // A client that trusts a but presents a certificate of b is refused by the server.
    let b_leaf = fresh(&b, Identity::Member(2));
    let a_trust = Trust::from_pem(a.cert_pem(), "a").unwrap();
    let mixed = Dialer::tls(a_trust, Some(b_leaf), None).unwrap();
    let e = check(&mixed, &server.addr).await.unwrap_err();
    refused_by_tls(&e, "refused");
    assert!(server.recorder.tokens.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_pin_mismatch_never_sends_the_token() {
    let now = SystemTime::now();
    let a = Ca::generate("a", now).unwrap();
    let other = Ca::generate("other", now).unwrap();
    let server = serve(fresh(&a, Identity::Member(1))).await;

    let pinned_wrong = Dialer::tls(
        Trust::pinned(&other.fingerprint()),
        None,
        Some(token(&other.fingerprint(), "viewer1")),
    )
    .unwrap();
    let e = check(&pinned_wrong, &server.addr).await.unwrap_err();
    refused_by_tls(&e, "refused");
    assert!(
        server.recorder.tokens.lock().unwrap().is_empty(),
        "the server received a token over a connection whose CA did not match the pin"
    );

    // The right pin: the token arrives, and the pinned CA is learnt.
    let trust = Trust::pinned(&a.fingerprint());
    let pinned = Dialer::tls(
        trust.clone(),
        None,
        Some(token(&a.fingerprint(), "viewer1")),
    )
    .unwrap();
    check(&pinned, &server.addr).await.unwrap();
    assert_eq!(*server.recorder.tokens.lock().unwrap(), ["viewer1"]);
    assert_eq!(
        trust.seen().map(|c| pki::fingerprint(&c)),
        Some(a.fingerprint())
    );
}

#[tokio::test]
async fn expired_and_not_yet_valid_certificates_are_refused() {
    let now = SystemTime::now();
    let ca = Ca::generate("a", now).unwrap();
    let day = Duration::from_secs(24 * 3600);
    let expired = || credentials(&ca, Identity::Member(9), now - 60 * day, 30 * day);
    let future = || credentials(&ca, Identity::Member(9), now + day, 30 * day);

    // As the client's certificate.
    let server = serve(fresh(&ca, Identity::Member(1))).await;
    for (what, creds) in [("expired", expired()), ("not yet valid", future())] {
        let dialer = Dialer::with_credentials(creds).unwrap();
        let e = check(&dialer, &server.addr).await.unwrap_err();
        refused_by_tls(&e, what);
    }
    // As the server's certificate.
    for (what, creds) in [("expired", expired()), ("not yet valid", future())] {
        let server = serve(creds).await;
        let dialer = Dialer::with_credentials(fresh(&ca, Identity::Member(2))).unwrap();
        let e = check(&dialer, &server.addr).await.unwrap_err();
        refused_by_tls(&e, what);
    }
}

#[tokio::test]
async fn a_plaintext_client_fails_before_any_handler_runs() {
    let ca = Ca::generate("a", SystemTime::now()).unwrap();
    let server = serve(fresh(&ca, Identity::Member(1))).await;
    let e = check(&Dialer::Insecure, &server.addr).await.unwrap_err();
    assert_ne!(e.code(), tonic::Code::Ok);
    assert!(server.recorder.tokens.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_client_expecting_a_node_refuses_another_node_or_a_member() {
    let ca = Ca::generate("a", SystemTime::now()).unwrap();
    let agent_b = serve(fresh(&ca, Identity::Node("b".into()))).await;
    let member = Dialer::with_credentials(fresh(&ca, Identity::Member(1))).unwrap();
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    req.set_timeout(Duration::from_secs(10));
    // Dialled as node a's agent: node b's certificate is refused.
    let e = HealthClient::new(member.agent_channel(&agent_b.addr, "a").unwrap())
        .check(req)
        .await
        .unwrap_err();
    refused_by_tls(&e, "refused");
    HealthClient::new(member.agent_channel(&agent_b.addr, "b").unwrap())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    // A node's server is not a member: dialled as a member, it is refused.
    let e = check(&member, &agent_b.addr).await.unwrap_err();
    refused_by_tls(&e, "refused");
}

#[tokio::test]
async fn reflection_answers_v1_and_v1alpha_behind_the_layer() {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    let ca = Ca::generate("a", SystemTime::now()).unwrap();
    let server = serve(fresh(&ca, Identity::Member(1))).await;
    let request = || ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    // Anonymous: refused by the table (reflection is for viewers and up).
    let anonymous = Dialer::tls(Trust::from_pem(ca.cert_pem(), "ca").unwrap(), None, None).unwrap();
    let e = ServerReflectionClient::new(anonymous.channel(&server.addr).unwrap())
        .server_reflection_info(tokio_stream::iter([request()]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    // A viewer token: answered.
    let viewer = Dialer::tls(
        Trust::from_pem(ca.cert_pem(), "ca").unwrap(),
        None,
        Some(token(&ca.fingerprint(), "viewer1")),
    )
    .unwrap();
    let mut stream = ServerReflectionClient::new(viewer.channel(&server.addr).unwrap())
        .server_reflection_info(tokio_stream::iter([request()]))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
}

/// Every method of every service Berth serves has an entry in the access
/// table, and every entry names a method that exists.
#[test]
fn the_access_table_covers_every_method_of_every_service() {
    let mut methods = Vec::new();
    for set in [
        berth_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ] {
        let fds = prost_types::FileDescriptorSet::decode(set).unwrap();
        for file in fds.file {
            let package = file.package().to_string();
            for service in &file.service {
                for method in &service.method {
                    methods.push(format!("/{package}.{}/{}", service.name(), method.name()));
                }
            }
        }
    }
    assert!(methods.len() > 40, "{methods:?}");
    let missing: Vec<&String> = methods.iter().filter(|m| access(m).is_none()).collect();
    assert!(
        missing.is_empty(),
        "methods without an access entry: {missing:?}"
    );
    let stale: Vec<&str> = TABLE
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !methods.iter().any(|m| m == p))
        .collect();
    assert!(stale.is_empty(), "table entries for no method: {stale:?}");
}

/// A call that could not connect (nothing listening, or a server the client's
/// TLS refuses) never left the client, so it may be retried elsewhere; a call
/// whose connection was cut after the server read it may have been served.
#[tokio::test]
async fn never_sent_tells_a_failed_connect_from_a_cut_call() {
    use tokio::io::AsyncReadExt;

    let now = SystemTime::now();
    let a = Ca::generate("a", now).unwrap();
    let b = Ca::generate("b", now).unwrap();
    let dialer = Dialer::with_credentials(fresh(&a, Identity::Member(2))).unwrap();

    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let e = check(&dialer, &closed).await.unwrap_err();
    assert!(grpc::never_sent(&e), "nothing listening: {e:?}");

    // A server that never accepts: the kernel completes the TCP handshake,
    // the TLS handshake waits until the connect timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e = check(&dialer, &silent.local_addr().unwrap().to_string())
        .await
        .unwrap_err();
    assert!(grpc::never_sent(&e), "connect timed out: {e:?}");

    let other_cluster = serve(fresh(&b, Identity::Member(1))).await;
    let e = check(&dialer, &other_cluster.addr).await.unwrap_err();
    assert!(grpc::never_sent(&e), "server refused by TLS: {e:?}");

    // A server that completes the handshake, reads the call, and hangs up.
    let server_config = fresh(&a, Identity::Member(1)).server_config().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let read = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = tokio_rustls::TlsAcceptor::from(server_config)
            .accept(tcp)
            .await
            .unwrap();
        let mut buf = vec![0u8; 16 * 1024];
        let mut got = 0;
        // The HTTP/2 preface (24 bytes), settings, then the call's frames.
        while got < 64 {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        got
    });
    let e = check(&dialer, &addr).await.unwrap_err();
    assert!(read.await.unwrap() >= 64, "the server read the call");
    assert!(!grpc::never_sent(&e), "cut after sending: {e:?}");
}
