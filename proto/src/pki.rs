//! The cluster's PKI: its CA, leaf certificates that carry a Berth
//! identity, certificate signing requests, fingerprints, secrets and the
//! files they live in.
//!
//! A leaf certificate names who holds it in one URI subject alternative
//! name, `berth://member/3`, `berth://node/gpu-1` or `berth://user/admin`:
//! peers authorize by that identity, never by an address, so a member or
//! agent can move address or sit behind NAT and still be verified.
//! Every leaf may act as TLS server and client (members and agents are both).

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::SecureRandom;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};

/// How long a cluster CA made at bootstrap is valid.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a leaf certificate is valid unless configured otherwise.
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// The shortest leaf lifetime accepted (tests of rotation use under a minute).
pub const MIN_LEAF_LIFETIME: Duration = Duration::from_secs(30);
/// Clock skew tolerated between the issuer and the holder: a new leaf is
/// valid from this long before it was issued (a tenth of a short lifetime).
const BACKDATE: Duration = Duration::from_secs(5 * 60);

fn backdate(lifetime: Duration) -> Duration {
    BACKDATE.min(lifetime / 10)
}
const URI_PREFIX: &str = "berth://";

/// Errors of the PKI: each names the file or field it is about.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A certificate could not be made or signed.
    #[error("{what}: {source}")]
    Rcgen {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: rcgen::Error,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A file or field holds something other than what it should.
    #[error("{0}")]
    Invalid(String),
}

impl PkiError {
    fn rcgen(what: &str) -> impl FnOnce(rcgen::Error) -> PkiError + '_ {
        move |source| PkiError::Rcgen {
            what: what.to_string(),
            source,
        }
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
        move |source| PkiError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// Who holds a leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identity {
    /// A control-plane member, by id.
    Member(u64),
    /// A node's agent, by node name.
    Node(String),
    /// A person or tool holding an admin client certificate.
    User(String),
}

impl Identity {
    /// The URI subject alternative name that carries this identity.
    pub fn uri(&self) -> String {
        match self {
            Identity::Member(id) => format!("{URI_PREFIX}member/{id}"),
            Identity::Node(name) => format!("{URI_PREFIX}node/{name}"),
            Identity::User(name) => format!("{URI_PREFIX}user/{name}"),
        }
    }

    /// Parses [`Identity::uri`]'s form; `None` for anything else.
    pub fn from_uri(uri: &str) -> Option<Self> {
        let (kind, name) = uri.strip_prefix(URI_PREFIX)?.split_once('/')?;
        if name.is_empty() || name.contains('/') {
            return None;
        }
        match kind {
            "member" => name.parse().ok().map(Identity::Member),
            "node" => Some(Identity::Node(name.to_string())),
            "user" => Some(Identity::User(name.to_string())),
            _ => None,
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Member(id) => write!(f, "member {id}"),
            Identity::Node(name) => write!(f, "node {name}"),
            Identity::User(name) => write!(f, "user {name}"),
        }
    }
}

/// A secret (a private key in PEM, a token): its `Debug` and `Display` print
/// `[redacted]`, so no log line can carry it by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself, for the one place that must use it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The SHA-256 fingerprint of a DER certificate, in lowercase hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex(&sha256(der))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// `n` random bytes from the operating system's generator, in hex.
pub fn random_hex(n: usize) -> Result<String, PkiError> {
    let mut buf = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| PkiError::Invalid("the system's random generator failed".into()))?;
    Ok(hex(&buf))
}

fn offset(t: SystemTime) -> time::OffsetDateTime {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// The cluster's certificate authority: its certificate and signing key.
/// The key lives only in members' data dirs (`tls/ca.key`, mode 0600).
pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    key_pem: Secret,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Makes a new CA (ECDSA P-256, valid for [`CA_LIFETIME`]) for cluster `cluster_id`.
    pub fn generate(cluster_id: &str, now: SystemTime) -> Result<Ca, PkiError> {
        let key = KeyPair::generate().map_err(PkiError::rcgen("generate the CA key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("berth cluster {cluster_id}"));
        dn.push(DnType::OrganizationName, "berth");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = offset(now - BACKDATE);
        params.not_after = offset(now + CA_LIFETIME);
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
        let cert = params
            .self_signed(&key)
            .map_err(PkiError::rcgen("self-sign the CA"))?;
        let key_pem = Secret::new(key.serialize_pem());
        Ok(Ca {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            key_pem,
        })
    }

    /// Loads an existing CA (the cluster's, or an operator's) from PEM text;
    /// `what` names where it came from in errors.
    pub fn from_pem(cert_pem: &str, key_pem: &Secret, what: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(key_pem.expose()).map_err(|e| {
            PkiError::Invalid(format!(
                "{what}: the CA key is not a PEM private key rcgen can use ({e})"
            ))
        })?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| {
            PkiError::Invalid(format!("{what}: the CA certificate is not PEM ({e})"))
        })?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| {
            PkiError::Invalid(format!("{what}: the CA certificate cannot be used ({e})"))
        })?;
        Ok(Ca {
            cert_pem: cert_pem.to_string(),
            cert_der,
            issuer,
            key_pem: key_pem.clone(),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA's private key, PEM (only ever written to a member's data dir
    /// or sent to a joining member over the authenticated join).
    pub fn key_pem(&self) -> &Secret {
        &self.key_pem
    }

    /// The CA certificate's SHA-256 fingerprint (what join tokens pin).
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    /// Signs a CSR (DER) for `identity`. Only the CSR's public key is used:
    /// the identity, names and lifetime are the issuer's decision, never the
    /// requester's. `names` are extra DNS names or IP addresses for clients
    /// that verify by address (grpcurl).
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        identity: &Identity,
        names: &[String],
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Issued, PkiError> {
        let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(
            csr_der.to_vec(),
        ))
        .map_err(|e| {
            PkiError::Invalid(format!(
                "csr is not a valid signed certificate request ({e})"
            ))
        })?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.to_string());
        params.distinguished_name = dn;
        let uri = rcgen::string::Ia5String::try_from(identity.uri())
            .map_err(|e| PkiError::Invalid(format!("identity {identity} cannot be a URI ({e})")))?;
        params.subject_alt_names.push(SanType::URI(uri));
        for name in names {
            if let Ok(ip) = name.parse::<std::net::IpAddr>() {
                params.subject_alt_names.push(SanType::IpAddress(ip));
            } else if let Ok(dns) = rcgen::string::Ia5String::try_from(name.clone()) {
                params.subject_alt_names.push(SanType::DnsName(dns));
            }
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let serial = random_serial()?;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let not_after = now + lifetime;
        params.not_before = offset(now - backdate(lifetime));
        params.not_after = offset(not_after);
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(PkiError::rcgen("sign the certificate"))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            serial: hex(&serial),
            not_after,
        })
    }
}

/// 16 random bytes with the top bit clear (a positive DER integer).
fn random_serial() -> Result<[u8; 16], PkiError> {
    let mut serial = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| PkiError::Invalid("the system's random generator failed".into()))?;
    serial[0] &= 0x7f;
    serial[0] |= 0x01;
    Ok(serial)
}

/// A certificate the CA signed.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its serial number, lowercase hex.
    pub serial: String,
    /// When it expires.
    pub not_after: SystemTime,
}

/// A new private key and a CSR for it (the key never leaves its holder).
#[derive(Debug)]
pub struct KeyAndCsr {
    /// The private key, PEM.
    pub key_pem: Secret,
    /// The CSR, DER.
    pub csr_der: Vec<u8>,
}

/// Makes a new ECDSA P-256 key and a CSR for it.
pub fn new_key_and_csr() -> Result<KeyAndCsr, PkiError> {
    let key = KeyPair::generate().map_err(PkiError::rcgen("generate a key"))?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .map_err(PkiError::rcgen("make a certificate request"))?;
    Ok(KeyAndCsr {
        key_pem: Secret::new(key.serialize_pem()),
        csr_der: csr.der().to_vec(),
    })
}

/// What Berth reads from a leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafInfo {
    /// The Berth identity in its URI SAN, if it has one.
    pub identity: Option<Identity>,
    /// Its serial number, lowercase hex.
    pub serial: String,
    /// When it becomes valid.
    pub not_before: SystemTime,
    /// When it expires.
    pub not_after: SystemTime,
}

impl LeafInfo {
    /// When its holder renews it: at two thirds of its lifetime.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life * 2 / 3
    }

    /// Time left before it expires at `now` (zero once expired).
    pub fn left(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }
}

/// Reads the identity, serial and expiry of a DER certificate.
pub fn leaf_info(der: &[u8]) -> Result<LeafInfo, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::Invalid(format!("certificate does not parse ({e})")))?;
    let identity = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Identity::from_uri(u),
                _ => None,
            })
        });
    let at = |t: i64| UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    Ok(LeafInfo {
        identity,
        serial: hex(cert.raw_serial()),
        not_before: at(cert.validity().not_before.timestamp()),
        not_after: at(cert.validity().not_after.timestamp()),
    })
}

/// Reads every certificate of a PEM file; an error names the file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let text = std::fs::read(path).map_err(PkiError::io(path))?;
    parse_certs(&text, &path.display().to_string())
}

/// Parses every certificate of PEM text; `what` names its origin in errors.
pub fn parse_certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            PkiError::Invalid(format!(
                "{what}: not a PEM certificate file ({e}); it may be truncated: copy it again"
            ))
        })?;
    if certs.is_empty() {
        return Err(PkiError::Invalid(format!(
            "{what}: holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)"
        )));
    }
    for c in &certs {
        x509_parser::parse_x509_certificate(c).map_err(|e| {
            PkiError::Invalid(format!(
                "{what}: a certificate does not parse ({e}); it may be truncated"
            ))
        })?;
    }
    Ok(certs)
}

/// Parses a PEM private key; `what` names its origin in errors.
pub fn parse_key(pem: &Secret, what: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.expose().as_bytes()).map_err(|e| {
        PkiError::Invalid(format!(
            "{what}: not a PEM private key ({e}); it may be truncated"
        ))
    })
}

/// Reads a private file (a key, a token), refusing one that others can
/// read: the message names the file, its mode and the fix.
pub fn read_private(path: &Path) -> Result<Secret, PkiError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(PkiError::io(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PkiError::Invalid(format!(
            "{}: mode {mode:04o} lets others read a secret; it must be 0600: run `chmod 600 {}`",
            path.display(),
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(PkiError::io(path))?;
    Ok(Secret::new(text))
}

/// Writes a private file atomically with mode 0600.
pub fn write_private(path: &Path, secret: &Secret) -> Result<(), PkiError> {
    berth_common::fsutil::write_private(path, secret.expose().as_bytes())
        .map_err(PkiError::io(path))
}

/// Writes a public file (a certificate) atomically.
pub fn write_public(path: &Path, text: &str) -> Result<(), PkiError> {
    berth_common::fsutil::write_atomic(path, text.as_bytes()).map_err(PkiError::io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_their_uri() {
        for id in [
            Identity::Member(3),
            Identity::Node("gpu-1".into()),
            Identity::User("admin".into()),
        ] {
            assert_eq!(Identity::from_uri(&id.uri()), Some(id));
        }
        for bad in [
            "berth://member/x",
            "berth://node/",
            "berth://pod/a",
            "http://node/a",
            "berth://node/a/b",
        ] {
            assert_eq!(Identity::from_uri(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_signed_leaf_carries_the_issuers_identity_not_the_requesters() {
        let now = SystemTime::now();
        let ca = Ca::generate("c1", now).unwrap();
        let req = new_key_and_csr().unwrap();
        let issued = ca
            .sign_csr(
                &req.csr_der,
                &Identity::Node("gpu-1".into()),
                &["127.0.0.1".into()],
                Duration::from_secs(3600),
                now,
            )
            .unwrap();
        let der = parse_certs(issued.cert_pem.as_bytes(), "test").unwrap();
        let info = leaf_info(&der[0]).unwrap();
        assert_eq!(info.identity, Some(Identity::Node("gpu-1".into())));
        assert_eq!(info.serial, issued.serial);
        let left = info.not_after.duration_since(now).unwrap_or_default();
        assert!(left <= Duration::from_secs(3600) && left > Duration::from_secs(3500));
        // The CA reloads from its PEM and still signs.
        let again = Ca::from_pem(ca.cert_pem(), ca.key_pem(), "test").unwrap();
        assert_eq!(again.fingerprint(), ca.fingerprint());
    }

    #[test]
    fn a_garbled_csr_is_refused() {
        let ca = Ca::generate("c1", SystemTime::now()).unwrap();
        let mut req = new_key_and_csr().unwrap();
        let n = req.csr_der.len();
        req.csr_der[n - 3] ^= 0xff;
        let e = ca
            .sign_csr(
                &req.csr_der,
                &Identity::Member(1),
                &[],
                DEFAULT_LEAF_LIFETIME,
                SystemTime::now(),
            )
            .unwrap_err();
        assert!(e.to_string().contains("csr"), "{e}");
    }

    #[test]
    fn truncated_pem_and_open_key_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("c1", SystemTime::now()).unwrap();
        let path = dir.path().join("ca.pem");
        let pem = ca.cert_pem();
        std::fs::write(&path, &pem[..pem.len() / 2]).unwrap();
        let e = read_certs(&path).unwrap_err().to_string();
        assert!(e.contains("ca.pem") && e.contains("truncated"), "{e}");

        let key = dir.path().join("ca.key");
        write_private(&key, ca.key_pem()).unwrap();
        assert_eq!(read_private(&key).unwrap(), *ca.key_pem());
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_private(&key).unwrap_err().to_string();
        assert!(
            e.contains("ca.key") && e.contains("0644") && e.contains("chmod 600"),
            "{e}"
        );
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "[redacted] [redacted]");
    }
}
