//! Peer identity and pinning, in the Syncthing device-ID model: every gateway has a
//! self-signed certificate; a peer is trusted because the SHA-256 fingerprint of its
//! certificate is pinned in our config, not because a CA signed it.
//!
//! Owns: key generation (`cert.pem`, `key.pem` in a directory), loading, the
//! [`Fingerprint`] type and the rustls client/server configurations of a link.
//!
//! Invariants: the private key file is created with mode 0600 (never written first and
//! narrowed later) and is never overwritten without `force`; key bytes never reach a
//! log (`Debug` prints `MASKED`); TLS 1.3 only, ring provider; both sides present a
//! certificate; pinning replaces chain validation, never the handshake signature
//! checks; session resumption is disabled so every connection verifies the pin anew
//! (a peer removed from the config cannot resume an old session).

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError, ServerConfig,
    SignatureScheme,
};

/// Subject alternative name of every gateway certificate, and the server name clients
/// use (it is not checked: the pin is).
pub const SERVER_NAME: &str = "m2m-gateway";

/// Certificate file name inside the identity directory.
pub const CERT_FILE: &str = "cert.pem";
/// Private key file name inside the identity directory.
pub const KEY_FILE: &str = "key.pem";

/// Errors of identity handling and TLS setup; each names the file or fingerprint.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A key already exists and `force` was not given.
    #[error("refusing to overwrite existing private key {0} (use --force to replace it)")]
    KeyExists(PathBuf),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A PEM file does not hold what it should.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The private key is not the one the certificate was made for.
    #[error("private key {key} does not match certificate {cert}")]
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
    },
    /// Certificate generation failed.
    #[error("cannot generate certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A fingerprint string does not parse.
    #[error("invalid fingerprint {input:?}: {reason}")]
    Fingerprint {
        /// What was given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A server configuration with nobody allowed to connect.
    #[error("no pinned peer fingerprints: the server would refuse every client")]
    NoPins,
    /// rustls refused the configuration (e.g. the key does not match the certificate).
    #[error("tls configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// SHA-256 of a certificate's DER bytes: the identity of a peer.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of(cert: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, cert);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        Self(out)
    }
}

impl fmt::Display for Fingerprint {
    /// Uppercase hex pairs separated by `:`, like `openssl x509 -fingerprint -sha256`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl FromStr for Fingerprint {
    type Err = TlsError;

    /// Accepts `AB:CD:…` (either case) or 64 plain hex digits. An optional
    /// `SHA256 Fingerprint=` prefix (openssl's output) is ignored.
    fn from_str(s: &str) -> Result<Self, TlsError> {
        let bad = |reason: String| TlsError::Fingerprint { input: s.to_string(), reason };
        let trimmed = s.trim();
        let body = trimmed
            .split_once('=')
            .filter(|(k, _)| k.to_ascii_lowercase().contains("fingerprint"))
            .map_or(trimmed, |(_, v)| v.trim());
        let hex: String = if body.contains(':') {
            let parts: Vec<&str> = body.split(':').collect();
            if parts.len() != 32 {
                return Err(bad(format!("expected 32 colon-separated hex pairs, found {}", parts.len())));
            }
            if let Some((i, p)) = parts.iter().enumerate().find(|(_, p)| p.len() != 2) {
                return Err(bad(format!("pair {} is {:?}, expected two hex digits", i + 1, p)));
            }
            parts.concat()
        } else {
            if body.len() != 64 {
                return Err(bad(format!(
                    "expected 64 hex digits (SHA-256), found {} characters",
                    body.len()
                )));
            }
            body.to_string()
        };
        if let Some((i, c)) = hex.char_indices().find(|(_, c)| !c.is_ascii_hexdigit()) {
            return Err(bad(format!("{c:?} at hex digit {} is not a hex digit", i + 1)));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(&hex, &mut out).map_err(|e| bad(e.to_string()))?;
        Ok(Self(out))
    }
}

impl serde::Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A private key whose `Debug` never shows the key.
pub struct PrivateKey(PrivateKeyDer<'static>);

impl PrivateKey {
    /// The key, for handing to rustls.
    pub fn der(&self) -> &PrivateKeyDer<'static> {
        &self.0
    }
}

impl Clone for PrivateKey {
    fn clone(&self) -> Self {
        Self(self.0.clone_key())
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MASKED")
    }
}

/// This gateway's certificate, private key and fingerprint.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Self-signed certificate (DER).
    pub cert: CertificateDer<'static>,
    /// Private key (masked in `Debug`).
    pub key: PrivateKey,
    /// SHA-256 of `cert`: what peers pin.
    pub fingerprint: Fingerprint,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + use<> {
    let path = path.to_path_buf();
    move |source| TlsError::Io { path, source }
}

/// Creates a new identity in `dir` (created with mode 0700 if missing): `cert.pem` and
/// `key.pem`, the key created with mode 0600. Refuses to replace an existing key unless
/// `force`; with `force` the new key is written to a fresh 0600 file and renamed over
/// the old one.
pub fn keygen(dir: &Path, force: bool) -> Result<Identity, TlsError> {
    let key_path = dir.join(KEY_FILE);
    let cert_path = dir.join(CERT_FILE);
    if !force && key_path.exists() {
        return Err(TlsError::KeyExists(key_path));
    }
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_err(dir))?;

    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])?;
    params.distinguished_name.push(rcgen::DnType::CommonName, SERVER_NAME);
    let cert = params.self_signed(&key_pair)?;

    if force {
        let tmp = dir.join(format!("{KEY_FILE}.new"));
        // A leftover from an interrupted run is ours; its permissions are unknown.
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&tmp)(e)),
            _ => {}
        }
        write_new(&tmp, key_pair.serialize_pem().as_bytes(), 0o600)?;
        fs::rename(&tmp, &key_path).map_err(io_err(&key_path))?;
    } else {
        write_new(&key_path, key_pair.serialize_pem().as_bytes(), 0o600)?;
    }
    // The certificate is public; replace it whatever its mode was.
    let tmp = dir.join(format!("{CERT_FILE}.new"));
    let _ = fs::remove_file(&tmp);
    write_new(&tmp, cert.pem().as_bytes(), 0o644)?;
    fs::rename(&tmp, &cert_path).map_err(io_err(&cert_path))?;

    let identity = load_identity(dir)?;
    tracing::info!(dir = %dir.display(), fingerprint = %identity.fingerprint, "generated new identity");
    Ok(identity)
}

/// Creates `path` (failing if it exists) with `mode` from the start, writes and syncs.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            TlsError::KeyExists(path.to_path_buf())
        } else {
            io_err(path)(e)
        }
    })?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Loads `cert.pem` and `key.pem` from `dir` and checks that the key is the
/// certificate's (the public key in the certificate is the one the private key gives).
/// Warns if the key is readable by group or others. `check` and `run` both use it.
pub fn load_identity(dir: &Path) -> Result<Identity, TlsError> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    let pem_err = |path: &Path, reason: String| TlsError::Pem { path: path.to_path_buf(), reason };

    let mode = fs::metadata(&key_path).map_err(io_err(&key_path))?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %key_path.display(),
            mode = format!("{:o}", mode & 0o777),
            "private key is readable by group or others; run chmod 600"
        );
    }
    let key_pem = fs::read(&key_path).map_err(io_err(&key_path))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| pem_err(&key_path, format!("no usable private key: {e}")))?;

    let cert_pem = fs::read(&cert_path).map_err(io_err(&cert_path))?;
    let cert = CertificateDer::from_pem_slice(&cert_pem)
        .map_err(|e| pem_err(&cert_path, format!("no usable certificate: {e}")))?;

    match rustls::sign::CertifiedKey::from_der(vec![cert.clone()], key.clone_key(), &provider()) {
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(TlsError::KeyMismatch { key: key_path, cert: cert_path });
        }
        Err(e) => return Err(pem_err(&key_path, format!("unusable private key or certificate: {e}"))),
        Ok(_) => {}
    }

    let fingerprint = Fingerprint::of(&cert);
    Ok(Identity { cert, key: PrivateKey(key), fingerprint })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server side of a link: TLS 1.3, our certificate, and a mandatory client certificate
/// whose fingerprint is in `pinned` (anything else fails the handshake).
pub fn server_config(id: &Identity, pinned: Vec<Fingerprint>) -> Result<Arc<ServerConfig>, TlsError> {
    if pinned.is_empty() {
        return Err(TlsError::NoPins);
    }
    let provider = provider();
    let verifier = PinnedClientVerifier { pinned, algs: provider.signature_verification_algorithms };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(vec![id.cert.clone()], id.key.0.clone_key())?;
    // No resumption: every connection runs the verifier (see the module header).
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Client side of a link: TLS 1.3, accepts only a server whose certificate has the
/// `pinned` fingerprint (the name is not checked), and presents our certificate.
pub fn client_config(id: &Identity, pinned: Fingerprint) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = PinnedServerVerifier { pinned, algs: provider.signature_verification_algorithms };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(vec![id.cert.clone()], id.key.0.clone_key())?;
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_sni = false;
    Ok(Arc::new(config))
}

/// The server name to pass to `TlsConnector::connect` (not checked by the pin).
pub fn server_name() -> ServerName<'static> {
    ServerName::DnsName(
        rustls::pki_types::DnsName::try_from(SERVER_NAME)
            .expect("SERVER_NAME is a valid dns name")
            .to_owned(),
    )
}

/// Fingerprint of the certificate the peer presented, once the handshake is done.
/// On the server side this tells which of the pinned peers connected.
pub fn peer_fingerprint(conn: &rustls::CommonState) -> Option<Fingerprint> {
    conn.peer_certificates().and_then(|certs| certs.first()).map(|c| Fingerprint::of(c))
}

fn not_pinned(role: &str, fp: Fingerprint) -> rustls::Error {
    tracing::warn!(fingerprint = %fp, "refused {role}: certificate fingerprint is not pinned");
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(NotPinned(fp)))))
}

/// The error carried inside rustls' `InvalidCertificate` when a fingerprint is not
/// pinned.
#[derive(Debug, thiserror::Error)]
#[error("certificate fingerprint {0} is not pinned")]
pub struct NotPinned(pub Fingerprint);

#[derive(Debug)]
struct PinnedClientVerifier {
    pinned: Vec<Fingerprint>,
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for PinnedClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let fp = Fingerprint::of(end_entity);
        if self.pinned.contains(&fp) {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(not_pinned("client", fp))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[derive(Debug)]
struct PinnedServerVerifier {
    pinned: Fingerprint,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = Fingerprint::of(end_entity);
        if fp == self.pinned { Ok(ServerCertVerified::assertion()) } else { Err(not_pinned("server", fp)) }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    fn identity() -> (tempfile::TempDir, Identity) {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = keygen(&dir.path().join("id"), false).expect("keygen");
        (dir, id)
    }

    /// Runs one handshake over real TCP; returns what each side saw. On success the
    /// server echoes one byte so the client proves application data flows.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> (Result<Option<Fingerprint>, std::io::Error>, Result<Option<Fingerprint>, std::io::Error>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server_task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            let mut tls = TlsAcceptor::from(server).accept(tcp).await?;
            let fp = peer_fingerprint(tls.get_ref().1);
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await?;
            tls.write_all(&b).await?;
            tls.shutdown().await?;
            Ok::<_, std::io::Error>(fp)
        });
        let client_result = async {
            let tcp = TcpStream::connect(addr).await?;
            let mut tls = TlsConnector::from(client).connect(server_name(), tcp).await?;
            let fp = peer_fingerprint(tls.get_ref().1);
            tls.write_all(b"x").await?;
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await?;
            assert_eq!(&b, b"x");
            Ok::<_, std::io::Error>(fp)
        }
        .await;
        let server_result = tokio::time::timeout(std::time::Duration::from_secs(10), server_task)
            .await
            .expect("server finishes")
            .expect("server task");
        (server_result, client_result)
    }

    #[tokio::test]
    async fn pinned_peers_handshake_both_ways() {
        let (_da, a) = identity();
        let (_db, b) = identity();
        let (_dc, c) = identity();
        // a serves, b connects; the server pins several peers and learns which one came.
        let (s, cl) = handshake(
            server_config(&a, vec![c.fingerprint, b.fingerprint]).expect("server"),
            client_config(&b, a.fingerprint).expect("client"),
        )
        .await;
        assert_eq!(s.expect("server ok"), Some(b.fingerprint));
        assert_eq!(cl.expect("client ok"), Some(a.fingerprint));
        // And the other way round.
        let (s, cl) = handshake(
            server_config(&b, vec![a.fingerprint]).expect("server"),
            client_config(&a, b.fingerprint).expect("client"),
        )
        .await;
        assert_eq!(s.expect("server ok"), Some(a.fingerprint));
        assert_eq!(cl.expect("client ok"), Some(b.fingerprint));
    }

    #[tokio::test]
    async fn unpinned_client_is_refused() {
        let (_da, a) = identity();
        let (_db, b) = identity();
        let (_dc, intruder) = identity();
        let (s, cl) = handshake(
            server_config(&a, vec![b.fingerprint]).expect("server"),
            client_config(&intruder, a.fingerprint).expect("client"),
        )
        .await;
        let e = s.expect_err("server refuses");
        assert!(e.to_string().contains(&intruder.fingerprint.to_string()), "{e}");
        // In TLS 1.3 the client finishes first; it must still never get data back.
        assert!(cl.is_err());
    }

    #[tokio::test]
    async fn client_without_certificate_is_refused() {
        let (_da, a) = identity();
        let (_db, b) = identity();
        let provider = provider();
        let verifier =
            PinnedServerVerifier { pinned: a.fingerprint, algs: provider.signature_verification_algorithms };
        let anonymous = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        let (s, cl) =
            handshake(server_config(&a, vec![b.fingerprint]).expect("server"), Arc::new(anonymous)).await;
        assert!(s.is_err());
        assert!(cl.is_err());
    }

    #[tokio::test]
    async fn wrong_server_is_refused_by_client() {
        let (_da, a) = identity();
        let (_db, b) = identity();
        let (_dm, mitm) = identity();
        // b expects a, but mitm answers (and would even accept b).
        let (s, cl) = handshake(
            server_config(&mitm, vec![b.fingerprint]).expect("server"),
            client_config(&b, a.fingerprint).expect("client"),
        )
        .await;
        let e = cl.expect_err("client refuses");
        assert!(e.to_string().contains(&mitm.fingerprint.to_string()), "{e}");
        assert!(s.is_err());
    }

    #[test]
    fn key_is_0600_and_not_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id_dir = dir.path().join("id");
        let first = keygen(&id_dir, false).expect("keygen");
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&id_dir.join(KEY_FILE)), 0o600);
        assert_eq!(mode(&id_dir), 0o700);
        let e = keygen(&id_dir, false).expect_err("refuses");
        assert!(matches!(&e, TlsError::KeyExists(p) if p == &id_dir.join(KEY_FILE)));
        assert!(e.to_string().contains("key.pem"), "{e}");
        // Unchanged on disk.
        assert_eq!(load_identity(&id_dir).expect("load").fingerprint, first.fingerprint);
        // force replaces it, still 0600, even if the old key had been widened.
        fs::set_permissions(id_dir.join(KEY_FILE), fs::Permissions::from_mode(0o644)).expect("chmod");
        let second = keygen(&id_dir, true).expect("forced keygen");
        assert_ne!(second.fingerprint, first.fingerprint);
        assert_eq!(mode(&id_dir.join(KEY_FILE)), 0o600);
        let loaded = load_identity(&id_dir).expect("load");
        assert_eq!(loaded.fingerprint, second.fingerprint);
        assert_eq!(loaded.cert, second.cert);
    }

    #[test]
    fn key_is_masked_in_debug() {
        let (_d, id) = identity();
        let dbg = format!("{id:?}");
        assert!(dbg.contains("MASKED"), "{dbg}");
        assert!(!dbg.contains("PRIVATE"), "{dbg}");
    }

    #[test]
    fn missing_files_name_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = load_identity(dir.path()).expect_err("missing");
        assert!(e.to_string().contains("key.pem"), "{e}");
        fs::write(dir.path().join(KEY_FILE), "not pem").expect("write");
        let e = load_identity(dir.path()).expect_err("bad pem");
        assert!(e.to_string().contains("key.pem"), "{e}");
    }

    #[test]
    fn fingerprint_display_and_parse() {
        let fp = Fingerprint(core::array::from_fn(|i| (i * 9) as u8));
        let shown = fp.to_string();
        assert_eq!(shown.len(), 95);
        assert!(shown.starts_with("00:09:12:1B:"), "{shown}");
        assert_eq!(shown.parse::<Fingerprint>().expect("upper"), fp);
        assert_eq!(shown.to_lowercase().parse::<Fingerprint>().expect("lower"), fp);
        assert_eq!(shown.replace(':', "").parse::<Fingerprint>().expect("plain"), fp);
        assert_eq!(format!("SHA256 Fingerprint={shown}").parse::<Fingerprint>().expect("openssl"), fp);
        let err = |s: &str| s.parse::<Fingerprint>().expect_err(s).to_string();
        assert!(err("AB:CD").contains("expected 32 colon-separated hex pairs, found 2"));
        assert!(err(&"a".repeat(63)).contains("expected 64 hex digits"));
        assert!(err(&format!("{}zz", "a".repeat(62))).contains("'z' at hex digit 63"));
        assert!(err(&shown.replacen("00:", "0:", 1).replacen(":09", ":009", 1)).contains("pair 1"));
    }

    #[test]
    fn fingerprint_matches_cert_der_sha256() {
        let (_d, id) = identity();
        let digest = ring::digest::digest(&ring::digest::SHA256, &id.cert);
        assert_eq!(&id.fingerprint.0[..], digest.as_ref());
        assert_eq!(Fingerprint::of(&id.cert), id.fingerprint);
    }

    #[test]
    fn server_needs_a_pin() {
        let (_d, id) = identity();
        assert!(matches!(server_config(&id, vec![]), Err(TlsError::NoPins)));
    }
}
