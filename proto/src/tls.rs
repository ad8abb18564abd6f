//! TLS for every Berth connection, built in this one place: rustls with the
//! `ring` provider (the only one compiled in), a server that asks for (but
//! does not require) a client certificate and takes its own certificate
//! from a swappable slot, and clients that verify the server by the Berth
//! identity in its certificate rather than by address.
//!
//! Rotation: [`Credentials::replace`] swaps the leaf in place. The server's
//! resolver and the client's certificate resolver read the slot at every
//! handshake, so new connections use the new certificate while open ones
//! (streams) carry on.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::auth::PeerInfo;
use crate::pki::{self, Identity, LeafInfo, PkiError, Secret};

/// The words of a pin mismatch, which callers look for to stop retrying.
pub const PIN_MISMATCH: &str = "does not match the pinned fingerprint";

/// How long a peer has to finish the TLS handshake before it is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The process's crypto provider: `ring`. Installed explicitly first thing in
/// every binary and test; calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = ring_provider().install_default();
}

// rustls 0.23.48 deprecates its ring provider because ring has no
// post-quantum key exchange; aws-lc-rs has, but needs cmake and a C build
// that doubles a 2-core build. Berth's connections stay inside one
// operator's cluster (ARCHITECTURE.md, "One crypto provider: ring").
#[allow(deprecated)]
fn ring_provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(ring_provider()))
}

/// The files of a process's TLS identity, under its data dir's `tls/`.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The directory.
    pub dir: PathBuf,
}

impl TlsFiles {
    /// The files under `data_dir/tls`.
    pub fn under(data_dir: &Path) -> Self {
        TlsFiles {
            dir: data_dir.join("tls"),
        }
    }
    /// The trusted CA bundle.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// The CA's key (members only).
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    /// This process's certificate chain.
    pub fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }
    /// This process's key.
    pub fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
    /// Whether an identity was stored here.
    pub fn exist(&self) -> bool {
        self.cert().is_file() && self.key().is_file() && self.ca().is_file()
    }

    fn next(path: PathBuf) -> PathBuf {
        let mut s = path.into_os_string();
        s.push(".next");
        PathBuf::from(s)
    }

    /// Replaces the leaf and its key, so that a crash at any point leaves
    /// a matching pair: both are staged as `*.next` first, then renamed key
    /// first; [`TlsFiles::recover`] finishes or drops a half-done swap.
    pub fn replace_leaf(&self, cert_pem: &str, key_pem: &Secret) -> Result<(), PkiError> {
        let (cert_next, key_next) = (Self::next(self.cert()), Self::next(self.key()));
        pki::write_private(&key_next, key_pem)?;
        pki::write_public(&cert_next, cert_pem)?;
        self.finish_swap()
    }

    fn finish_swap(&self) -> Result<(), PkiError> {
        let io = |path: PathBuf| {
            move |source| PkiError::Io {
                path: path.display().to_string(),
                source,
            }
        };
        let (cert_next, key_next) = (Self::next(self.cert()), Self::next(self.key()));
        if key_next.exists() {
            std::fs::rename(&key_next, self.key()).map_err(io(key_next.clone()))?;
        }
        if cert_next.exists() {
            std::fs::rename(&cert_next, self.cert()).map_err(io(cert_next.clone()))?;
        }
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(self.dir.clone()))
    }

    /// After a crash during [`TlsFiles::replace_leaf`]: a staged pair, or a
    /// staged certificate whose key was already moved, is completed; a
    /// staged key without its certificate is dropped.
    pub fn recover(&self) -> Result<(), PkiError> {
        let (cert_next, key_next) = (Self::next(self.cert()), Self::next(self.key()));
        if cert_next.exists() {
            return self.finish_swap();
        }
        if key_next.exists() {
            let _ = std::fs::remove_file(&key_next);
        }
        Ok(())
    }

    /// Stores a bundle, a certificate chain and its key (key 0600, all atomic).
    pub fn store(&self, ca_pem: &str, cert_pem: &str, key_pem: &Secret) -> Result<(), PkiError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| PkiError::Io {
            path: self.dir.display().to_string(),
            source,
        })?;
        pki::write_private(&self.key(), key_pem)?;
        pki::write_public(&self.cert(), cert_pem)?;
        pki::write_public(&self.ca(), ca_pem)
    }
}

/// A process's TLS identity: the CAs it trusts and its current leaf.
pub struct Credentials {
    roots: Arc<RootCertStore>,
    bundle: Vec<CertificateDer<'static>>,
    current: RwLock<(Arc<CertifiedKey>, Arc<LeafInfo>)>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("leaf", &self.leaf())
            .finish_non_exhaustive()
    }
}

fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    what: &str,
) -> Result<(Arc<CertifiedKey>, Arc<LeafInfo>), PkiError> {
    let leaf = chain
        .first()
        .ok_or_else(|| PkiError::Invalid(format!("{what}: holds no certificate")))?;
    let info = pki::leaf_info(leaf).map_err(|e| PkiError::Invalid(format!("{what}: {e}")))?;
    let signer = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| PkiError::Invalid(format!("{what}: the key cannot sign ({e})")))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match().map_err(|e| {
        PkiError::Invalid(format!(
            "{what}: the key does not belong to the certificate ({e})"
        ))
    })?;
    Ok((Arc::new(ck), Arc::new(info)))
}

impl Credentials {
    /// Credentials from a CA bundle, a leaf chain and its key (PEM).
    pub fn from_pem(
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &Secret,
        what: &str,
    ) -> Result<Arc<Self>, PkiError> {
        let bundle = pki::parse_certs(ca_pem.as_bytes(), &format!("{what} CA bundle"))?;
        let chain = pki::parse_certs(cert_pem.as_bytes(), &format!("{what} certificate"))?;
        let key = pki::parse_key(key_pem, &format!("{what} key"))?;
        let mut roots = RootCertStore::empty();
        for c in &bundle {
            roots
                .add(c.clone())
                .map_err(|e| PkiError::Invalid(format!("{what} CA bundle: {e}")))?;
        }
        let current = certified(chain, key, what)?;
        Ok(Arc::new(Credentials {
            roots: Arc::new(roots),
            bundle,
            current: RwLock::new(current),
        }))
    }

    /// Loads the credentials stored in `files`; errors name the file.
    pub fn load(files: &TlsFiles) -> Result<Arc<Self>, PkiError> {
        files.recover()?;
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| PkiError::Io {
                path: p.display().to_string(),
                source,
            })
        };
        let ca = read(&files.ca())?;
        let cert = read(&files.cert())?;
        let key = pki::read_private(&files.key())?;
        // Parse each file on its own first, so an error names the file.
        pki::parse_certs(ca.as_bytes(), &files.ca().display().to_string())?;
        pki::parse_certs(cert.as_bytes(), &files.cert().display().to_string())?;
        pki::parse_key(&key, &files.key().display().to_string())?;
        Self::from_pem(&ca, &cert, &key, &files.dir.display().to_string())
    }

    /// Swaps in a renewed leaf; new connections use it at once.
    pub fn replace(&self, cert_pem: &str, key_pem: &Secret) -> Result<(), PkiError> {
        let chain = pki::parse_certs(cert_pem.as_bytes(), "renewed certificate")?;
        let key = pki::parse_key(key_pem, "renewed key")?;
        let next = certified(chain, key, "renewed certificate")?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }

    /// What the current leaf says: identity, serial, expiry.
    pub fn leaf(&self) -> Arc<LeafInfo> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    fn key(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// The trusted CAs, DER.
    pub fn bundle(&self) -> &[CertificateDer<'static>] {
        &self.bundle
    }

    /// The trusted CAs, as a trust anchor for clients.
    pub fn trust(&self) -> Trust {
        Trust::Roots(self.roots.clone())
    }

    /// The server side: presents the current leaf (with the CA after it, so a
    /// joiner can check its pin), verifies any client certificate against
    /// the bundle, and lets callers without one through to the token check.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, PkiError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| PkiError::Invalid(format!("client verifier: {e}")))?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| PkiError::Invalid(format!("tls versions: {e}")))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(ServerResolver(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

#[derive(Debug)]
struct ServerResolver(Arc<Credentials>);

impl ResolvesServerCert for ServerResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.key())
    }
}

#[derive(Debug)]
struct ClientResolver(Arc<Credentials>);

impl ResolvesClientCert for ClientResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// What a client trusts.
#[derive(Clone)]
pub enum Trust {
    /// These CAs.
    Roots(Arc<RootCertStore>),
    /// Whatever CA has this SHA-256 fingerprint, found in the chain the server
    /// sends (a joiner's first contact, or `--ca-fingerprint`). The CA found
    /// is kept in the slot, for the joiner to store.
    Pinned {
        /// Lowercase hex SHA-256 of the CA certificate.
        fingerprint: String,
        /// The CA certificate once seen.
        seen: Arc<Mutex<Option<CertificateDer<'static>>>>,
    },
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trust::Roots(r) => write!(f, "Roots({} CAs)", r.len()),
            Trust::Pinned { fingerprint, .. } => write!(f, "Pinned({fingerprint})"),
        }
    }
}

impl Trust {
    /// Trust in the CA with `fingerprint` (hex SHA-256).
    pub fn pinned(fingerprint: &str) -> Self {
        Trust::Pinned {
            fingerprint: fingerprint.to_ascii_lowercase(),
            seen: Arc::default(),
        }
    }

    /// Trust in the CAs of a PEM bundle; `what` names it in errors.
    pub fn from_pem(pem: &str, what: &str) -> Result<Self, PkiError> {
        let mut roots = RootCertStore::empty();
        for c in pki::parse_certs(pem.as_bytes(), what)? {
            roots
                .add(c)
                .map_err(|e| PkiError::Invalid(format!("{what}: {e}")))?;
        }
        Ok(Trust::Roots(Arc::new(roots)))
    }

    /// The pinned CA, once a handshake found it.
    pub fn seen(&self) -> Option<CertificateDer<'static>> {
        match self {
            Trust::Pinned { seen, .. } => seen.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            Trust::Roots(_) => None,
        }
    }
}

/// Whom a client expects at the other end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// A control-plane member (any id).
    Member,
    /// The agent of this node.
    Node(String),
}

impl Expect {
    fn accepts(&self, identity: Option<&Identity>) -> bool {
        match (self, identity) {
            (Expect::Member, Some(Identity::Member(_))) => true,
            (Expect::Node(want), Some(Identity::Node(got))) => want == got,
            _ => false,
        }
    }
}

/// Verifies a server by its chain to the trusted CA and by the Berth
/// identity in its leaf, not by the address dialled.
#[derive(Debug)]
struct ClusterVerifier {
    trust: Trust,
    expect: Expect,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ClusterVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = match &self.trust {
            Trust::Roots(r) => r.clone(),
            Trust::Pinned { fingerprint, seen } => {
                let Some(ca) = intermediates
                    .iter()
                    .find(|c| pki::fingerprint(c) == *fingerprint)
                else {
                    return Err(rustls::Error::General(format!(
                        "the server's CA {PIN_MISMATCH} {fingerprint}: this is not the cluster the token or --ca-fingerprint names"
                    )));
                };
                let ca = ca.clone().into_owned();
                let mut roots = RootCertStore::empty();
                roots
                    .add(ca.clone())
                    .map_err(|e| rustls::Error::General(format!("pinned CA: {e}")))?;
                *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(ca);
                Arc::new(roots)
            }
        };
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let info = pki::leaf_info(end_entity)
            .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        if !self.expect.accepts(info.identity.as_ref()) {
            return Err(rustls::Error::General(format!(
                "the server is {}, not the expected {:?}",
                info.identity
                    .map_or_else(|| "without a Berth identity".to_string(), |i| i.to_string()),
                self.expect
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A client configuration: `trust` for the server, `expect` for its
/// identity, and `identity` as the client certificate (none: the caller
/// authenticates by token).
pub fn client_config(
    trust: Trust,
    expect: Expect,
    identity: Option<Arc<Credentials>>,
) -> Result<Arc<ClientConfig>, PkiError> {
    let provider = provider();
    let verifier = Arc::new(ClusterVerifier {
        trust,
        expect,
        algorithms: provider.signature_verification_algorithms,
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PkiError::Invalid(format!("tls versions: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some(c) => builder.with_client_cert_resolver(Arc::new(ClientResolver(c))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Connects to `host:port` and completes a TLS handshake within
/// [`HANDSHAKE_TIMEOUT`].
pub async fn connect(
    host: &str,
    port: u16,
    config: Arc<ClientConfig>,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = TcpStream::connect((bare, port)).await?;
    tcp.set_nodelay(true)?;
    let name = match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(host.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
    };
    tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}

/// Open server connections by the serial of their client certificate, so
/// that a revocation can close them (`Connections::cut`), not just refuse
/// their next call.
#[derive(Clone, Default)]
pub struct Connections {
    inner: Arc<Mutex<ConnTable>>,
}

#[derive(Default)]
struct ConnTable {
    next: u64,
    open: std::collections::HashMap<u64, (String, tokio_util::sync::CancellationToken)>,
}

impl fmt::Debug for Connections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Connections({})", self.len())
    }
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, ConnTable> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, serial: &str) -> (u64, tokio_util::sync::CancellationToken) {
        let mut t = self.lock();
        t.next += 1;
        let id = t.next;
        let token = tokio_util::sync::CancellationToken::new();
        t.open.insert(id, (serial.to_string(), token.clone()));
        (id, token)
    }

    fn forget(&self, id: u64) {
        self.lock().open.remove(&id);
    }

    /// Open connections that presented a client certificate.
    pub fn len(&self) -> usize {
        self.lock().open.len()
    }

    /// Whether no connection with a client certificate is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes every connection whose certificate serial `revoked` names;
    /// returns how many it closed.
    pub fn cut(&self, revoked: impl Fn(&str) -> bool) -> usize {
        let t = self.lock();
        let mut n = 0;
        for (serial, token) in t.open.values() {
            if revoked(serial) && !token.is_cancelled() {
                token.cancel();
                n += 1;
            }
        }
        n
    }
}

/// One accepted, handshaken server connection and what it proved.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: PeerInfo,
    /// Resolves when a revocation cuts this connection.
    cut: Option<(
        Connections,
        u64,
        Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    )>,
}

impl TlsConn {
    fn check_cut(&mut self, cx: &mut Context<'_>) -> Result<(), io::Error> {
        if let Some((_, _, cut)) = &mut self.cut
            && cut.as_mut().poll(cx).is_ready()
        {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the peer's certificate was revoked",
            ));
        }
        Ok(())
    }
}

impl Drop for TlsConn {
    fn drop(&mut self) {
        if let Some((connections, id, _)) = &self.cut {
            connections.forget(*id);
        }
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check_cut(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check_cut(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections on `listener` and hands out those that complete
/// the TLS handshake within [`HANDSHAKE_TIMEOUT`]; a slow or failed
/// handshake never holds up the others. Ends when the receiver is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    connections: Connections,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => return,
            };
            let (tcp, addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and the like: back off a little instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let connections = connections.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let leaf = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| pki::leaf_info(c).ok())
                            .map(Arc::new);
                        let cut = leaf.as_ref().map(|l| {
                            let (id, token) = connections.register(&l.serial);
                            (connections.clone(), id, Box::pin(token.cancelled_owned()))
                        });
                        let peer = PeerInfo { addr, leaf };
                        let _ = tx
                            .send(Ok(TlsConn {
                                inner: stream,
                                peer,
                                cut,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => tracing::debug!(peer = %addr, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(peer = %addr, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The host part of `host:port` (brackets of an IPv6 address removed).
pub fn host_of(addr: &str) -> String {
    addr.rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// Makes sure `addr` is loopback, for plaintext mode.
pub fn check_loopback(addr: SocketAddr, flag: &str) -> Result<(), String> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(format!(
            "--insecure serves plaintext without authentication, so it binds loopback addresses only, and {flag} {addr} is not one: listen on 127.0.0.1, drop --insecure, or add --insecure-bind-any if this network is private"
        ))
    }
}

/// The CLI's credentials file (`admin.conf`, `~/.config/berth/config`):
/// where the cluster is, which CA it has, and the token to call it with.
/// Written with mode 0600 because it holds a token.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    /// Member addresses.
    pub servers: Vec<String>,
    /// SHA-256 of the CA certificate, lowercase hex.
    pub ca_fingerprint: String,
    /// The cluster's CA certificates, PEM.
    pub ca_pem: String,
    /// The token (`berth1.…`), if the file carries one.
    #[serde(default)]
    pub token: Option<String>,
}

impl fmt::Debug for ClientFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientFile")
            .field("servers", &self.servers)
            .field("ca_fingerprint", &self.ca_fingerprint)
            .field("token", &self.token.as_ref().map(|_| "[redacted]"))
            .finish_non_exhaustive()
    }
}

impl ClientFile {
    /// Reads and checks a credentials file; errors name the file and field.
    pub fn load(path: &Path) -> Result<Self, PkiError> {
        let text = pki::read_private(path)?;
        let file: ClientFile = toml::from_str(text.expose())
            .map_err(|e| PkiError::Invalid(format!("{}: {}", path.display(), e.message())))?;
        let what = format!("{} ca_pem", path.display());
        let cas = pki::parse_certs(file.ca_pem.as_bytes(), &what)?;
        if !cas
            .iter()
            .any(|c| pki::fingerprint(c) == file.ca_fingerprint)
        {
            return Err(PkiError::Invalid(format!(
                "{}: ca_fingerprint {} matches no certificate in ca_pem: the file was edited or mixed from two clusters",
                path.display(),
                file.ca_fingerprint
            )));
        }
        if let Some(t) = &file.token {
            t.parse::<crate::auth::Token>()
                .map_err(|e| PkiError::Invalid(format!("{}: {e}", path.display())))?;
        }
        Ok(file)
    }

    /// Writes the file atomically with mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), PkiError> {
        let text = toml::to_string(self)
            .map_err(|e| PkiError::Invalid(format!("encode {}: {e}", path.display())))?;
        let header =
            "# Berth CLI credentials: cluster addresses, CA, token. Keep it private (mode 0600).\n";
        pki::write_private(path, &Secret::new(format!("{header}{text}")))
    }
}

/// Keeps `credentials` renewed until `shutdown`: at two thirds of each
/// leaf's lifetime a new key and CSR are made, `obtain` turns the CSR into
/// a certificate chain (PEM), the new leaf is swapped in (new handshakes use
/// it at once, open connections carry on) and stored in `files`. A failed
/// renewal is retried every tenth of the time left (between 1 s and 1 min).
pub async fn keep_renewed<F, Fut>(
    credentials: Arc<Credentials>,
    files: TlsFiles,
    shutdown: tokio_util::sync::CancellationToken,
    mut obtain: F,
) where
    F: FnMut(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = Result<String, String>>,
{
    let mut retry: Option<Duration> = None;
    loop {
        let leaf = credentials.leaf();
        let now = std::time::SystemTime::now();
        let wait = retry.unwrap_or_else(|| leaf.renew_at().duration_since(now).unwrap_or_default());
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let outcome = async {
            let request = pki::new_key_and_csr().map_err(|e| e.to_string())?;
            let chain = obtain(request.csr_der).await?;
            credentials
                .replace(&chain, &request.key_pem)
                .map_err(|e| e.to_string())?;
            files
                .replace_leaf(&chain, &request.key_pem)
                .map_err(|e| e.to_string())
        }
        .await;
        match outcome {
            Ok(()) => {
                let new = credentials.leaf();
                tracing::info!(
                    identity = ?new.identity,
                    serial = %new.serial,
                    valid_for_s = new.left(std::time::SystemTime::now()).as_secs(),
                    "renewed this process's certificate"
                );
                retry = None;
            }
            Err(e) => {
                let left = leaf.left(std::time::SystemTime::now());
                let next = (left / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
                tracing::warn!(
                    error = %e,
                    expires_in_s = left.as_secs(),
                    retry_in_s = next.as_secs(),
                    "could not renew this process's certificate"
                );
                retry = Some(next);
            }
        }
    }
}
