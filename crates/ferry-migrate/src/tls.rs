//! TLS 1.3 with mutual authentication for TCP migration and replication (docs/security.md).
//!
//! Both sides give a certificate, its key and the CA that signs their peers
//! (`--tls-cert`, `--tls-key`, `--tls-ca`). The connection is authenticated both ways before a
//! byte of the stream moves: the destination requires a client certificate signed by its CA
//! (and, with `--tls-allow-peer NAME`, valid for one of the names given); the source checks the
//! destination's certificate against its CA and the host it dialled. A failure names the
//! reason (no certificate, unknown CA, expired, name not allowed) and nothing of the stream is
//! read.
//!
//! rustls (ring provider) does the protocol; this module adapts a session to Ferry's blocking
//! sockets with timeouts: the session sits behind a mutex shared by the connection's clones
//! (the protocols use one direction at a time), and a write reports the bytes the session took
//! even when the socket is full, so a retried write never sends a byte twice.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Errors of setting TLS up or of a handshake.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}")]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no {what}")]
    Empty { what: &'static str, path: PathBuf },
    #[error("the TLS configuration is not usable")]
    Config(#[source] rustls::Error),
    #[error("the TLS client verifier is not usable")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("'{0}' is not a host name or address TLS can check")]
    ServerName(String),
    #[error("TLS handshake with {peer} failed: {reason}")]
    Handshake { peer: String, reason: String },
    #[error("the peer {peer} is authenticated but not allowed: its certificate is valid for none of {allowed:?}")]
    NotAllowed { peer: String, allowed: Vec<String> },
}

/// What `--tls-cert`, `--tls-key`, `--tls-ca` and `--tls-allow-peer` name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// Names a peer's certificate must be valid for (one of them); empty: any the CA signed.
    pub allow: Vec<String>,
}

/// A loaded TLS identity and trust: configurations for both roles.
pub struct Tls {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    allow: Vec<String>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("allow", &self.allow).finish_non_exhaustive()
    }
}

/// rustls with the *ring* provider: it builds with a C compiler alone (aws-lc-rs, the
/// default, needs cmake). Its key exchange has no post-quantum group yet, which rustls flags
/// by deprecating the function.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// Reads the PEM files and builds both roles' configurations (TLS 1.3 only).
    pub fn load(files: &TlsFiles) -> Result<Tls, TlsError> {
        let certs = read_certs(&files.cert, "certificate")?;
        let ca = read_certs(&files.ca, "CA certificate")?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| TlsError::File {
            what: "private key",
            path: files.key.clone(),
            source,
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for c in ca {
            roots.add(c).map_err(TlsError::Config)?;
        }
        let roots = Arc::new(roots);
        let versions = &[&rustls::version::TLS13];
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .map_err(TlsError::Config)?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(certs.clone(), key.clone_key())
            .map_err(TlsError::Config)?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(TlsError::Verifier)?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(TlsError::Config)?;
        Ok(Tls { client: Arc::new(client), server: Arc::new(server), allow: files.allow.clone() })
    }

    /// The client side of a handshake on `sock` (connected to `host`), within `timeout`.
    pub fn connect(&self, sock: TcpStream, host: &str, timeout: Duration) -> Result<TlsStream, TlsError> {
        let name = ServerName::try_from(host.to_string()).map_err(|_| TlsError::ServerName(host.into()))?;
        let conn = rustls::ClientConnection::new(self.client.clone(), name).map_err(TlsError::Config)?;
        let peer = sock.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| host.into());
        let s = TlsStream::handshake(sock, rustls::Connection::Client(conn), &peer, timeout)?;
        self.check_allowed(&s, &peer)?;
        Ok(s)
    }

    /// The server side of a handshake on an accepted `sock`, within `timeout`.
    pub fn accept(&self, sock: TcpStream, timeout: Duration) -> Result<TlsStream, TlsError> {
        let conn = rustls::ServerConnection::new(self.server.clone()).map_err(TlsError::Config)?;
        let peer = sock.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "the peer".into());
        let s = TlsStream::handshake(sock, rustls::Connection::Server(conn), &peer, timeout)?;
        self.check_allowed(&s, &peer)?;
        Ok(s)
    }

    /// With an allow-list, the peer's certificate must be valid for one of its names.
    fn check_allowed(&self, s: &TlsStream, peer: &str) -> Result<(), TlsError> {
        if self.allow.is_empty() {
            return Ok(());
        }
        let session = s.inner.session.lock().unwrap_or_else(|p| p.into_inner());
        let cert = session.peer_certificates().and_then(|c| c.first()).cloned();
        drop(session);
        let ok = cert.is_some_and(|c| {
            webpki::EndEntityCert::try_from(&c).is_ok_and(|ee| {
                self.allow.iter().any(|n| {
                    ServerName::try_from(n.as_str()).is_ok_and(|sn| ee.verify_is_valid_for_subject_name(&sn).is_ok())
                })
            })
        });
        if ok {
            Ok(())
        } else {
            Err(TlsError::NotAllowed { peer: peer.into(), allowed: self.allow.clone() })
        }
    }
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::File { what, path: path.to_path_buf(), source })?;
    if certs.is_empty() {
        return Err(TlsError::Empty { what, path: path.to_path_buf() });
    }
    Ok(certs)
}

/// A rustls error as an operator reads it.
fn explain(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match e {
        E::InvalidCertificate(C::UnknownIssuer) => {
            "the peer's certificate is not signed by the CA given with --tls-ca (unknown CA)".into()
        }
        E::InvalidCertificate(C::Expired) | E::InvalidCertificate(C::ExpiredContext { .. }) => {
            "the peer's certificate has expired".into()
        }
        E::InvalidCertificate(C::NotValidForName) | E::InvalidCertificate(C::NotValidForNameContext { .. }) => {
            "the peer's certificate is not valid for the address dialled".into()
        }
        E::NoCertificatesPresented => "the peer presented no certificate".into(),
        E::InvalidMessage(_) => "the peer does not speak TLS (a source without --tls-*?)".into(),
        E::AlertReceived(A::UnknownCA) | E::AlertReceived(A::BadCertificate) => {
            "the peer refused this Ferry's certificate (not signed by its CA)".into()
        }
        E::AlertReceived(A::CertificateExpired) => "the peer refused this Ferry's certificate (expired)".into(),
        E::AlertReceived(A::CertificateRequired) => {
            "the peer requires a client certificate and this Ferry sent none".into()
        }
        other => other.to_string(),
    }
}

struct Shared {
    sock: TcpStream,
    session: Mutex<rustls::Connection>,
}

/// A TLS session over a TCP socket; clones share it.
#[derive(Clone)]
pub struct TlsStream {
    inner: Arc<Shared>,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream").field("sock", &self.inner.sock).finish_non_exhaustive()
    }
}

fn would_block(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}

impl TlsStream {
    fn handshake(
        mut sock: TcpStream,
        mut conn: rustls::Connection,
        peer: &str,
        timeout: Duration,
    ) -> Result<TlsStream, TlsError> {
        let fail = |reason: String| TlsError::Handshake { peer: peer.into(), reason };
        let end = Instant::now() + timeout;
        // Page batches are written a MiB at a time: let the session take one whole (the default
        // 64 KiB limit cut each write into 16 round trips through the socket).
        conn.set_buffer_limit(Some(4 << 20));
        let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
        let _ = sock.set_write_timeout(Some(Duration::from_millis(100)));
        while conn.is_handshaking() {
            if Instant::now() > end {
                return Err(fail(format!("no answer within {:.1} s", timeout.as_secs_f64())));
            }
            match conn.complete_io(&mut sock) {
                Ok(_) => {}
                Err(e) if would_block(&e) => {}
                Err(e) => {
                    // A TLS error surfaces as InvalidData carrying the rustls error; the alert we
                    // owe the peer has been queued: send it so that it learns why.
                    let _ = conn.write_tls(&mut sock);
                    let reason = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                        Some(r) => explain(r),
                        None if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                            "the peer closed the connection during the handshake (it refused this Ferry, or \
                             does not speak TLS)"
                                .into()
                        }
                        None => e.to_string(),
                    };
                    return Err(fail(reason));
                }
            }
        }
        // The last handshake flight may still be buffered.
        while conn.wants_write() {
            match conn.write_tls(&mut sock) {
                Ok(_) => {}
                Err(e) if would_block(&e) && Instant::now() < end => {}
                Err(e) => return Err(fail(e.to_string())),
            }
        }
        Ok(TlsStream { inner: Arc::new(Shared { sock, session: Mutex::new(conn) }) })
    }

    pub fn sock(&self) -> &TcpStream {
        &self.inner.sock
    }

    /// Writes out what the session holds; `WouldBlock` when the socket is full (call again).
    fn push(&self, s: &mut rustls::Connection) -> std::io::Result<()> {
        let mut sock = &self.inner.sock;
        while s.wants_write() {
            s.write_tls(&mut sock)?;
        }
        Ok(())
    }

    /// Sends close_notify (best effort) before the socket is shut down.
    pub fn close(&self) {
        if let Ok(mut s) = self.inner.session.lock() {
            s.send_close_notify();
            let _ = self.push(&mut s);
        }
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut s = self.inner.session.lock().unwrap_or_else(|p| p.into_inner());
        let mut sock = &self.inner.sock;
        loop {
            match s.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if s.wants_write() {
                s.write_tls(&mut sock)?;
            }
            if s.read_tls(&mut sock)? == 0 {
                // The peer closed the socket without close_notify: a truncation, reported as EOF
                // (the stream's own framing says whether anything is missing).
                return Ok(0);
            }
            // An alert after the handshake (TLS 1.3: the destination judges the source's
            // certificate after the source finished its side) says why.
            s.process_new_packets().map_err(|e| std::io::Error::other(format!("TLS: {}", explain(&e))))?;
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut s = self.inner.session.lock().unwrap_or_else(|p| p.into_inner());
        // Earlier bytes first; if the socket is still full, nothing of `buf` is taken.
        self.push(&mut s)?;
        let n = s.writer().write(buf)?;
        // Taken: reported as written whatever the socket says now (the rest goes out on the
        // next write or flush).
        match self.push(&mut s) {
            Err(e) if !would_block(&e) => Err(e),
            _ => Ok(n),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let mut s = self.inner.session.lock().unwrap_or_else(|p| p.into_inner());
        self.push(&mut s)
    }
}
