//! Transports: `unix:PATH` and `tcp:HOST:PORT`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Errors of transports.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("'{0}' is not a migration address: use unix:PATH or tcp:HOST:PORT")]
    BadUri(String),
    #[error("cannot connect to {uri}")]
    Connect {
        uri: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {uri}")]
    Listen {
        uri: String,
        #[source]
        source: std::io::Error,
    },
    #[error("accepting a connection on {uri} failed")]
    Accept {
        uri: String,
        #[source]
        source: std::io::Error,
    },
    #[error("socket setup failed")]
    Setup(#[source] std::io::Error),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("TLS applies to tcp: addresses only ({0} is a UNIX socket on this host)")]
    TlsOnUnix(String),
    #[error("{0} exists and is not a socket: it is left alone (give a path that is free, or a stale socket)")]
    NotASocket(String),
    #[error("a peer uid restriction applies to unix: addresses only ({0} is TCP: restrict its peers with TLS)")]
    UidOnTcp(String),
}

/// Who a listener lets in: over TCP, with `tls`, a source that completes a mutually
/// authenticated handshake (its names checked against the allow-list the identity was loaded
/// with); over a UNIX socket, with `peer_uid`, a process of that user only (the kernel's
/// SO_PEERCRED, taken at connect).
#[derive(Clone, Default)]
pub struct Admission {
    pub tls: Option<std::sync::Arc<crate::tls::Tls>>,
    pub peer_uid: Option<u32>,
}

/// The uid and pid of the process at the other end of a UNIX stream (as of its connect).
pub fn unix_peer(s: &UnixStream) -> std::io::Result<(u32, i32)> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred we own, of the length given; the result is checked.
    let r = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((cred.uid, cred.pid))
}

/// How long a TLS handshake may take on an accepted connection.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a migration goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uri {
    Unix(PathBuf),
    Tcp(String),
}

impl Uri {
    pub fn parse(s: &str) -> Result<Uri, TransportError> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(TransportError::BadUri(s.into()));
            }
            return Ok(Uri::Unix(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            match a.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => return Ok(Uri::Tcp(a.into())),
                _ => return Err(TransportError::BadUri(s.into())),
            }
        }
        Err(TransportError::BadUri(s.into()))
    }
}

impl std::fmt::Display for Uri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Uri::Unix(p) => write!(f, "unix:{}", p.display()),
            Uri::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// A connected byte stream.
#[derive(Debug)]
pub enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
    /// TCP with mutual TLS (crate::tls); clones share the session.
    Tls(crate::tls::TlsStream),
}

/// Socket buffer size asked for on both ends of a TCP connection (the kernel may cap it).
const SOCKET_BUFFER: libc::c_int = 4 << 20;
/// The same for a UNIX socket. Both ends share this host's caches: with less in flight the
/// bytes the sender wrote are still in cache when the receiver copies them out (768 MiB
/// migration into a prefaulted destination: 1.32-1.61 GB/s with 4 MiB, 1.56-1.98 GB/s with
/// 1 MiB, in alternating runs).
const UNIX_SOCKET_BUFFER: libc::c_int = 1 << 20;

fn set_buffers(fd: i32, size: libc::c_int) {
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: setsockopt on a valid socket fd with a pointer to a c_int of the right size.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// Tries each address `host:port` resolves to, each for at most `timeout`.
fn connect_tcp(addr: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    use std::net::ToSocketAddrs;
    let mut last = None;
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) => {
                last = Some(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{a} did not answer within {:.1} s", timeout.as_secs_f64()),
                ));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other(format!("'{addr}' resolves to no address"))))
}

/// Connects to the UNIX socket at `path`, waiting at most `timeout` while its listener's accept
/// queue is full (a destination that stopped accepting: hung, or stopped). `UnixStream::connect`
/// would wait there forever. Linux bounds that wait by the socket's send timeout
/// (`unix_stream_connect` waits `sk_sndtimeo`, then fails with `EAGAIN`), so the socket is
/// made by hand to set it before the connect; it is cleared again afterwards (the migration
/// sets its own write timeouts).
fn connect_unix(path: &std::path::Path, timeout: Duration) -> std::io::Result<UnixStream> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("a UNIX socket path must be 1 to {} bytes without NUL", addr.sun_path.len() - 1),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    // SAFETY: socket() takes plain flags and returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let set_send_timeout = |t: Duration| -> std::io::Result<()> {
        let tv = libc::timeval {
            tv_sec: t.as_secs().min(i32::MAX as u64) as libc::time_t,
            tv_usec: t.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: SO_SNDTIMEO on our socket with a timeval that outlives the call.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    let len = (std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1) as libc::socklen_t;
    let timed_out = || {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the listener accepted no connection within {:.1} s (its queue is full)", timeout.as_secs_f64()),
        )
    };
    let deadline = std::time::Instant::now() + timeout;
    loop {
        // Each try waits at most the time left (a zero timeval would mean no bound: 1 µs at least).
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        set_send_timeout(left.max(Duration::from_micros(1)))?;
        // SAFETY: connect() on our socket with a sockaddr_un of `len` valid bytes.
        let r = unsafe { libc::connect(sock.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len) };
        if r == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            // A signal ended the wait (with a send timeout set, even a SIGSTOP/SIGCONT does;
            // signal(7)). The socket is still unconnected: try again for the time left.
            Some(libc::EINTR) => {}
            Some(libc::EAGAIN) => return Err(timed_out()),
            _ => return Err(e),
        }
    }
    set_send_timeout(Duration::ZERO)?;
    Ok(UnixStream::from(sock))
}

impl Conn {
    /// Connects to `uri`. A TCP peer that does not answer (a host that drops the SYNs, a full
    /// accept queue) fails after `timeout` per address instead of the kernel's SYN retries
    /// (about two minutes); a UNIX listener whose accept queue stays full fails after
    /// `timeout` too.
    pub fn connect(uri: &Uri, timeout: Duration) -> Result<Conn, TransportError> {
        Self::connect_with(uri, timeout, None)
    }

    /// As [`Conn::connect`], then (with `tls`) the client side of a mutually authenticated TLS
    /// handshake within `timeout`: nothing is sent before the destination is authenticated.
    pub fn connect_with(uri: &Uri, timeout: Duration, tls: Option<&crate::tls::Tls>) -> Result<Conn, TransportError> {
        let err = |source| TransportError::Connect { uri: uri.to_string(), source };
        let c = match (uri, tls) {
            (Uri::Unix(_), Some(_)) => return Err(TransportError::TlsOnUnix(uri.to_string())),
            (Uri::Unix(p), None) => Conn::Unix(connect_unix(p, timeout).map_err(err)?),
            (Uri::Tcp(a), tls) => {
                let s = connect_tcp(a, timeout).map_err(err)?;
                s.set_nodelay(true).map_err(TransportError::Setup)?;
                set_buffers(std::os::fd::AsRawFd::as_raw_fd(&s), SOCKET_BUFFER);
                match tls {
                    None => Conn::Tcp(s),
                    Some(t) => {
                        let host = a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h);
                        let host = host.trim_start_matches('[').trim_end_matches(']');
                        Conn::Tls(t.connect(s, host, timeout)?)
                    }
                }
            }
        };
        c.set_buffers();
        Ok(c)
    }

    fn set_buffers(&self) {
        let size = match self {
            Conn::Unix(_) => UNIX_SOCKET_BUFFER,
            Conn::Tcp(_) | Conn::Tls(_) => SOCKET_BUFFER,
        };
        set_buffers(self.raw_fd(), size);
    }

    fn raw_fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        match self {
            Conn::Unix(s) => s.as_raw_fd(),
            Conn::Tcp(s) => s.as_raw_fd(),
            Conn::Tls(t) => t.sock().as_raw_fd(),
        }
    }

    /// Whether the connection is authenticated and encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }

    /// Whether the peer runs on this host: a UNIX socket, or TCP between loopback addresses or
    /// from this host's own address.
    pub fn is_local(&self) -> bool {
        let tcp_local = |s: &TcpStream| match (s.peer_addr(), s.local_addr()) {
            (Ok(p), Ok(l)) => p.ip().is_loopback() || p.ip() == l.ip(),
            _ => false,
        };
        match self {
            Conn::Unix(_) => true,
            Conn::Tcp(s) => tcp_local(s),
            Conn::Tls(t) => tcp_local(t.sock()),
        }
    }

    /// Bytes written but not yet read by the peer (UNIX) or not yet acknowledged (TCP).
    pub fn unread_bytes(&self) -> std::io::Result<u64> {
        let mut n: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (TIOCOUTQ) on a valid socket writes one c_int.
        let r = unsafe { libc::ioctl(self.raw_fd(), libc::TIOCOUTQ, &mut n) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n.max(0) as u64)
    }

    /// A TCP connection's delivery rate (bytes/s) and lowest round-trip time seen (µs), from
    /// `TCP_INFO` (Linux 4.6 and later); None for a UNIX socket or an older kernel.
    pub fn tcp_link(&self) -> Option<(u64, u32)> {
        if matches!(self, Conn::Unix(_)) {
            return None;
        }
        // The kernel's struct tcp_info: tcpi_min_rtt (u32) at byte 148, tcpi_delivery_rate
        // (u64) at byte 160 (include/uapi/linux/tcp.h); libc's struct ends before them.
        let mut buf = [0u8; 256];
        let mut len = buf.len() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `buf` and the length back.
        let r = unsafe {
            libc::getsockopt(self.raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, buf.as_mut_ptr().cast(), &mut len)
        };
        if r < 0 || (len as usize) < 168 {
            return None;
        }
        let min_rtt = u32::from_ne_bytes(buf[148..152].try_into().ok()?);
        let rate = u64::from_ne_bytes(buf[160..168].try_into().ok()?);
        Some((rate, min_rtt))
    }

    pub fn try_clone(&self) -> std::io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Tls(t) => Conn::Tls(t.clone()),
        })
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(t),
            Conn::Tcp(s) => s.set_read_timeout(t),
            Conn::Tls(s) => s.sock().set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_write_timeout(t),
            Conn::Tcp(s) => s.set_write_timeout(t),
            Conn::Tls(s) => s.sock().set_write_timeout(t),
        }
    }

    /// Shuts the receiving direction down: a read blocked on it returns, and the peer's sends
    /// fail, while answers can still go out (a NACK).
    pub fn shutdown_read(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Read),
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Read),
            Conn::Tls(t) => t.sock().shutdown(std::net::Shutdown::Read),
        };
    }

    /// Shuts both directions down (wakes a peer blocked on us).
    pub fn shutdown(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Conn::Tls(t) => {
                t.close();
                t.sock().shutdown(std::net::Shutdown::Both)
            }
        };
    }
}

impl Conn {
    /// Whether the peer has closed or reset the connection (seen without reading).
    pub fn peer_closed(&self) -> bool {
        let mut p = libc::pollfd { fd: self.raw_fd(), events: libc::POLLRDHUP, revents: 0 };
        // SAFETY: poll on one valid descriptor we own, with a zero timeout.
        let r = unsafe { libc::poll(&mut p, 1, 0) };
        r > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }

    /// Whether the peer is known to be gone: a UNIX peer whose process no longer exists (or is
    /// a zombie). A TCP peer may be anywhere: never known gone.
    pub fn peer_gone(&self) -> bool {
        let Conn::Unix(s) = self else { return false };
        let Ok((_, pid)) = unix_peer(s) else { return false };
        // 0: a peer in another pid namespace, whose pid this side cannot see.
        if pid <= 0 {
            return false;
        }
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The state follows the command name's closing parenthesis.
            Ok(st) => st.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        }
    }

    /// An injected fault due on this connection's next read or write (`fault-injection` builds
    /// only; see ferry_stream::fault).
    fn injected(&self, write: bool) -> std::io::Result<()> {
        if ferry_stream::fault::take_drop() {
            self.shutdown();
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "connection dropped by fault injection",
            ));
        }
        match ferry_stream::fault::take_io(write) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.injected(false)?;
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.injected(true)?;
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }
    /// Plain sockets hold nothing back; a TLS session pushes what it holds (`WouldBlock` while
    /// the socket is full: call again).
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Tls(s) => s.flush(),
            _ => Ok(()),
        }
    }
}

/// A listening endpoint for `ferry run --incoming`.
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    pub fn bind(uri: &Uri) -> Result<Listener, TransportError> {
        let err = |source| TransportError::Listen { uri: uri.to_string(), source };
        Ok(match uri {
            Uri::Unix(p) => {
                // Only a stale socket is replaced (one no process listens on any more): never a
                // file of another kind, never a live listener.
                use std::os::unix::fs::FileTypeExt;
                if let Ok(m) = std::fs::symlink_metadata(p) {
                    if !m.file_type().is_socket() {
                        return Err(TransportError::NotASocket(p.display().to_string()));
                    }
                    if UnixStream::connect(p).is_err() {
                        let _ = std::fs::remove_file(p);
                    }
                }
                Listener::Unix(UnixListener::bind(p).map_err(err)?, p.clone())
            }
            Uri::Tcp(a) => Listener::Tcp(TcpListener::bind(a).map_err(err)?),
        })
    }

    /// Non-blocking accepts (`accept_with` then fails with `WouldBlock` instead of waiting, also
    /// after it refused a peer), or blocking ones again.
    pub fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        match self {
            Listener::Unix(l, _) => l.set_nonblocking(on),
            Listener::Tcp(l) => l.set_nonblocking(on),
        }
    }

    /// Waits up to `timeout` for a connection to accept; false if none came.
    pub fn wait_readable(&self, timeout: Duration) -> std::io::Result<bool> {
        use std::os::fd::AsRawFd;
        let fd = match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        };
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: poll on one valid pollfd that outlives the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        match r {
            r if r > 0 => Ok(true),
            0 => Ok(false),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Waits for the source.
    pub fn accept(&self, uri: &Uri) -> Result<Conn, TransportError> {
        self.accept_with(uri, &Admission::default())
    }

    /// Waits for a source that `admit` lets in: a connection it refuses (over TCP with TLS: no
    /// certificate, another CA, a name not allowed, no TLS at all; over UNIX with a peer uid:
    /// another user's process) is closed with the reason on stderr, before a byte of it is read
    /// as a stream, and the wait goes on.
    pub fn accept_with(&self, uri: &Uri, admit: &Admission) -> Result<Conn, TransportError> {
        let err = |source| TransportError::Accept { uri: uri.to_string(), source };
        let c = match self {
            Listener::Unix(..) if admit.tls.is_some() => return Err(TransportError::TlsOnUnix(uri.to_string())),
            Listener::Tcp(_) if admit.peer_uid.is_some() => return Err(TransportError::UidOnTcp(uri.to_string())),
            Listener::Unix(l, _) => loop {
                let s = l.accept().map_err(err)?.0;
                let Some(want) = admit.peer_uid else { break Conn::Unix(s) };
                match unix_peer(&s) {
                    Ok((uid, _)) if uid == want => break Conn::Unix(s),
                    Ok((uid, pid)) => tracing::warn!(
                        "refused a connection on {uri}: its process (pid {pid}) runs as uid {uid}, not the allowed uid {want}; still waiting"
                    ),
                    Err(e) => tracing::warn!("refused a connection on {uri}: its peer's credentials cannot be read: {e}; still waiting"),
                }
            },
            Listener::Tcp(l) => loop {
                let s = l.accept().map_err(err)?.0;
                s.set_nodelay(true).map_err(TransportError::Setup)?;
                set_buffers(std::os::fd::AsRawFd::as_raw_fd(&s), SOCKET_BUFFER);
                match &admit.tls {
                    None => break Conn::Tcp(s),
                    Some(t) => match t.accept(s, TLS_HANDSHAKE_TIMEOUT) {
                        Ok(s) => break Conn::Tls(s),
                        Err(e) => tracing::warn!("refused a connection on {uri}: {e}; still waiting"),
                    },
                }
            },
        };
        c.set_buffers();
        Ok(c)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// How often a blocked send wakes to check for a cancel and the stall timeout.
pub const SEND_POLL: Duration = Duration::from_millis(100);

/// A connection with its silences bounded, the one wrapper both directions use: a send the peer
/// does not take in, or a read it sends nothing for, is retried every [`SEND_POLL`] until it
/// moves, the migration is cancelled, or nothing moved for `stall` (then a `TimedOut` error
/// naming the peer and the wait). Without it a source whose destination stops reading would
/// block for good, cancel included (and in the final pass with the guest paused), and a
/// destination whose source hangs would wait forever with nothing started. The socket's
/// timeouts must be [`SEND_POLL`] (or shorter) in the directions watched.
pub struct StallWatch<'a, C> {
    pub conn: C,
    cancel: Option<&'a AtomicBool>,
    pub stall: Duration,
    /// Who is at the other end, for messages.
    peer: &'static str,
    /// What a read that gets nothing means ("sent no answer", "sent no data").
    read_what: &'static str,
    /// A wait already failed: every later call fails at once (a dropped BufWriter's last
    /// flush must not wait out another stall).
    failed: bool,
    /// Bytes moved on the migration's other connections (its page channels): while they grow,
    /// a silence here is not a stall.
    activity: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

/// The payload of the I/O error a cancel ends a blocked wait with (told apart from real
/// failures by [`cancelled_io`]).
#[derive(Debug)]
pub struct CancelledIo;

impl std::fmt::Display for CancelledIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("migration cancelled")
    }
}

impl std::error::Error for CancelledIo {}

/// Whether `e`'s chain holds the I/O error a cancel ended a wait with.
pub fn cancelled_io(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.get_ref().is_some_and(|inner| inner.is::<CancelledIo>()) {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

impl<'a, C> StallWatch<'a, C> {
    /// The source's connection to its destination: sends and answer waits, ended by `cancel`.
    pub fn to_destination(conn: C, cancel: &'a AtomicBool, stall: Duration) -> Self {
        StallWatch {
            conn,
            cancel: Some(cancel),
            stall,
            peer: "destination",
            read_what: "sent no answer",
            failed: false,
            activity: None,
        }
    }

    /// The destination's connection from its source: reads of the stream.
    pub fn from_source(conn: C, stall: Duration) -> Self {
        StallWatch {
            conn,
            cancel: None,
            stall,
            peer: "source",
            read_what: "sent no data",
            failed: false,
            activity: None,
        }
    }

    /// Counts bytes moved on `activity` (the migration's page channels) as signs of life too.
    pub fn with_activity(mut self, activity: std::sync::Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.activity = Some(activity);
        self
    }

    /// Runs `op` (one send or receive on a socket with a SEND_POLL timeout) until it completes
    /// or fails otherwise, the migration is cancelled, or `stall` passes; `what` names the wait.
    pub fn retry<T>(&mut self, what: &str, mut op: impl FnMut(&mut C) -> std::io::Result<T>) -> std::io::Result<T> {
        use std::io::ErrorKind;
        if self.failed {
            return Err(std::io::Error::new(ErrorKind::BrokenPipe, "an earlier send or wait failed"));
        }
        let mut start = Instant::now();
        let seen = |a: &Option<std::sync::Arc<std::sync::atomic::AtomicU64>>| {
            a.as_ref().map_or(0, |a| a.load(Ordering::Relaxed))
        };
        let mut last = seen(&self.activity);
        loop {
            match op(&mut self.conn) {
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    let now = seen(&self.activity);
                    if now != last {
                        (last, start) = (now, Instant::now());
                    }
                    if self.cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
                        self.failed = true;
                        return Err(std::io::Error::other(CancelledIo));
                    }
                    if start.elapsed() >= self.stall {
                        self.failed = true;
                        return Err(std::io::Error::new(
                            ErrorKind::TimedOut,
                            format!("the {} {what} for {:.1} s", self.peer, self.stall.as_secs_f64()),
                        ));
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

impl<C: std::io::Read> std::io::Read for StallWatch<'_, C> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.retry(self.read_what, |c| c.read(buf))
    }
}

impl<C: std::io::Write> std::io::Write for StallWatch<'_, C> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.retry("took no data", |c| c.write(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.retry("took no data", |c| c.flush())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that never answers the SYN (here: a listener whose accept queue is full, so the
    /// kernel drops further SYNs) fails the connect after the timeout, naming it, instead of
    /// after the kernel's SYN retries.
    #[test]
    fn a_tcp_peer_that_never_answers_fails_the_connect_after_the_timeout() {
        use std::os::fd::AsRawFd;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        // SAFETY: re-listens on a valid listening socket with a backlog of 0 (Linux allows
        // changing the backlog this way).
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
        let addr = l.local_addr().unwrap().to_string();
        let _queued = TcpStream::connect(&addr).unwrap();
        let uri = Uri::Tcp(addr.clone());

        let t = std::time::Instant::now();
        let e = Conn::connect(&uri, Duration::from_millis(300)).err().unwrap();
        let took = t.elapsed();

        let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
        assert!(chain.contains(&format!("cannot connect to tcp:{addr}")), "{chain}");
        assert!(chain.contains("did not answer within 0.3 s"), "{chain}");
        assert!(took < Duration::from_secs(3), "the connect took {took:?}");
    }

    /// A UNIX listener that stopped accepting (its queue full) fails the connect after the
    /// timeout, naming it, where `UnixStream::connect` would wait forever; a listener that
    /// accepts still connects, and the stream it gives works both ways.
    #[test]
    fn a_unix_listener_that_never_accepts_fails_the_connect_after_the_timeout() {
        // On a thread, so that a connect that never returns fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            unix_listener_that_never_accepts();
            let _ = tx.send(());
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("a UNIX connect was still blocked after 20 s"),
            // Done, or the thread panicked: join passes its panic on.
            _ => {
                if let Err(p) = t.join() {
                    std::panic::resume_unwind(p);
                }
            }
        }
    }

    /// A test directory removed when the test ends, failed or not.
    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn unix_listener_that_never_accepts() {
        use std::os::fd::AsRawFd;
        let tmp = TempDir(PathBuf::from(format!("/tmp/ferry-unix-connect-{}", std::process::id())));
        let dir = tmp.0.clone();
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("full.sock");
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        // SAFETY: re-listens on a valid listening socket with a backlog of 0.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
        let uri = Uri::Unix(path.clone());
        // Backlog 0 queues one connection; fill the queue (each connect is bounded itself).
        let mut queued = Vec::new();
        let e = loop {
            match Conn::connect(&uri, Duration::from_millis(300)) {
                Ok(c) => queued.push(c),
                Err(e) => break e,
            }
            assert!(queued.len() < 8, "the queue never filled");
        };
        let t = std::time::Instant::now();
        let e2 = Conn::connect(&uri, Duration::from_millis(300)).err().unwrap();
        let took = t.elapsed();
        for e in [&e, &e2] {
            let source = std::error::Error::source(e).unwrap();
            let chain = format!("{e}: {source}");
            assert!(chain.contains(&format!("cannot connect to unix:{}", path.display())), "{chain}");
            assert!(chain.contains("accepted no connection within 0.3 s"), "{chain}");
            let io = source.downcast_ref::<std::io::Error>().unwrap();
            assert_eq!(io.kind(), std::io::ErrorKind::TimedOut, "{chain}");
        }
        assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(3), "the connect took {took:?}");

        // Once the listener takes a connection off its queue, the next connect gets in, and the
        // stream it gives works both ways with no send timeout left on it.
        let _first = l.accept().unwrap();
        let mut c = Conn::connect(&uri, Duration::from_millis(300)).unwrap();
        match &c {
            Conn::Unix(s) => assert_eq!(s.write_timeout().unwrap(), None),
            Conn::Tcp(_) | Conn::Tls(_) => panic!("a UNIX URI gave a TCP connection"),
        }
        // The other queued connections first, then ours (the queue is FIFO).
        for _ in 1..queued.len() {
            l.accept().unwrap();
        }
        let (mut a, _) = l.accept().unwrap();
        c.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        a.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        a.write_all(b"pong").unwrap();
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");
    }

    #[test]
    fn a_unix_path_too_long_for_a_socket_is_refused_naming_the_limit() {
        let uri = Uri::Unix(PathBuf::from(format!("/tmp/{}", "x".repeat(200))));
        let e = Conn::connect(&uri, Duration::from_millis(300)).err().unwrap();
        let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
        assert!(chain.contains("must be 1 to 107 bytes"), "{chain}");
    }

    #[test]
    fn unix_and_tcp_uris_parse() {
        assert_eq!(Uri::parse("unix:/tmp/m.sock").unwrap(), Uri::Unix("/tmp/m.sock".into()));
        assert_eq!(Uri::parse("tcp:127.0.0.1:4444").unwrap(), Uri::Tcp("127.0.0.1:4444".into()));
    }

    #[test]
    fn malformed_uris_are_refused_with_the_accepted_forms() {
        for bad in ["", "unix:", "tcp:host", "tcp::80", "tcp:h:notaport", "udp:1.2.3.4:5", "/tmp/x"] {
            let e = Uri::parse(bad).unwrap_err().to_string();
            assert!(e.contains("unix:PATH or tcp:HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn unix_and_loopback_tcp_peers_are_local() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(Conn::Unix(a).is_local());
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(Conn::Tcp(c).is_local());
    }

    #[test]
    fn a_failed_stall_watch_fails_later_calls_at_once_and_a_cancel_is_recognised() {
        use std::io::Write;
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_write_timeout(Some(Duration::from_millis(20))).unwrap();
        let cancel = AtomicBool::new(true);
        let mut w = StallWatch::to_destination(Conn::Unix(a), &cancel, Duration::from_secs(60));
        // Fill the socket until a send would block: the cancel ends it.
        let chunk = [0u8; 65536];
        let e = loop {
            if let Err(e) = w.write(&chunk) {
                break e;
            }
        };
        assert!(cancelled_io(&e), "{e}");
        let t = Instant::now();
        let again = w.write(&chunk).unwrap_err();
        assert!(t.elapsed() < Duration::from_millis(10), "a second call waited");
        assert!(!cancelled_io(&again));
        // Wrapped the way the stream writer reports it.
        let wrapped = ferry_stream::StreamError::Write(e);
        assert!(cancelled_io(&wrapped));
        let other = ferry_stream::StreamError::Write(std::io::Error::other("broken"));
        assert!(!cancelled_io(&other));
    }
}
