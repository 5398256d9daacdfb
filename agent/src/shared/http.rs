//! The small HTTP/1.x server behind twilld's own endpoints (flannel's `/healthz` on
//! `--healthz-port`, `/metrics` and `/healthz` on `--metrics-addr`, kube-proxy's `/healthz` and
//! `/livez` on `--healthz-bind-address`).
//!
//! Why not a framework: the endpoints answer a handful of GETs from probes and scrapers; a
//! request line, a bounded read of the headers and one response with `Connection: close` is all
//! they need. Every client is bounded: its whole request head must arrive within
//! [`READ_TIMEOUT`] and [`MAX_HEAD_BYTES`] (a client trickling header lines, or sending one
//! endless line, is dropped there), and a streamed body's client must take [`MIN_PROGRESS`]
//! bytes within each [`WRITE_TIMEOUT`] (a send timeout alone does not do it: a client whose
//! window opens a few bytes at a time keeps each send making progress); a stuck client costs a task, never the agent. The rest of the request
//! head is read before answering, so closing does not reset a client that is still writing its
//! headers.
//!
//! A large body (a `/metrics` scrape with 10k frontends is megabytes) can be streamed: a
//! [`Reply::Streamed`] body is written as it is made, on a blocking thread (its writer may
//! read kernel maps), in chunks (`Transfer-Encoding: chunked` to HTTP/1.1 clients; to HTTP/1.0
//! ones the closing connection ends it), so the agent never holds it whole.
//!
//! Why not hyper 1.12 (with hyper-util 0.1, already in the agent under the Kubernetes client):
//! the same server on hyper's HTTP/1 connection (every behaviour above kept, the streamed body
//! fed through a channel) was measured against this one, release builds, `bench control-plane`:
//! twilld 255 KB bigger stripped (21.58 → 21.84 MB), resident memory 0.7 MiB higher both at 100
//! services (VmRSS 17.7 → 18.4-18.6 MiB, VmHWM 34.1-34.3 → 34.9-35.0 MiB) and at 10k services (VmHWM 42.8
//! → 43.4 MiB, before and after 100 scrapes), and scrape latency no better (p50 of 100 scrapes
//! of the 3.3 MB `/metrics` at 10k services: 192-221 ms here, 104-182 ms on hyper, within the
//! noise of a shared machine; 1.6 ms either way at 100). It also answers differently (an
//! HTTP/1.0 client gets `HTTP/1.0` status lines, a `Date` header is added), for no gain a probe
//! or a scraper sees.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{
    AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, BufReader,
};
use tokio::net::TcpListener;

/// How long a client may take for its whole request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Header lines read at most.
const MAX_HEADERS: usize = 64;
/// Bytes of a request head read at most; a longer head drops the connection.
const MAX_HEAD_BYTES: u64 = 16 * 1024;
/// How long a streamed body's client may take to accept [`MIN_PROGRESS`] more bytes.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes a streamed body's client must take within each [`WRITE_TIMEOUT`].
const MIN_PROGRESS: usize = 64 * 1024;
/// Longest a single send blocks (`SO_SNDTIMEO`), so the progress is checked at this pace.
const SEND_TICK: Duration = Duration::from_secs(1);
/// First pause after a failed accept; doubled up to [`ACCEPT_PAUSE_MAX`].
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(10);
/// Longest pause after a failed accept.
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// Writes a streamed body into the connection; runs on a blocking thread.
pub type BodyWriter = Box<dyn FnOnce(&mut dyn std::io::Write) -> std::io::Result<()> + Send>;

/// One answer: whole, or streamed as it is written.
pub enum Reply {
    /// A body held whole, sent with its length.
    Whole(Response),
    /// A body written as it is made (see the module notes).
    Streamed {
        /// Status code.
        code: u16,
        /// `Content-Type`.
        content_type: &'static str,
        /// Writes the body.
        write: BodyWriter,
    },
}

impl From<Response> for Reply {
    fn from(r: Response) -> Self {
        Self::Whole(r)
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Whole(r) => f.debug_tuple("Whole").field(r).finish(),
            Self::Streamed {
                code, content_type, ..
            } => f
                .debug_struct("Streamed")
                .field("code", code)
                .field("content_type", content_type)
                .finish_non_exhaustive(),
        }
    }
}

/// One answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub code: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Body.
    pub body: String,
}

impl Response {
    /// A response.
    pub fn new(code: u16, content_type: &'static str, body: impl Into<String>) -> Self {
        Self {
            code,
            content_type,
            body: body.into(),
        }
    }

    /// 404 with Go's text, as the Kubernetes components answer.
    pub fn not_found() -> Self {
        Self::new(404, "text/plain; charset=utf-8", "404 page not found\n")
    }

    /// The status line and headers; the body goes out after them as it is (a scrape body can
    /// be megabytes, not worth a copy).
    fn head(&self) -> String {
        head(
            self.code,
            self.content_type,
            &format!("Content-Length: {}\r\n", self.body.len()),
        )
    }
}

/// A status line and headers; `framing` is the header line that delimits the body, if any.
fn head(code: u16, content_type: &str, framing: &str) -> String {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    };
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nX-Content-Type-Options: nosniff\r\n{framing}Connection: close\r\n\r\n",
    )
}

/// A body in `Transfer-Encoding: chunked`: each write one chunk.
struct Chunked<W: std::io::Write>(W);

impl<W: std::io::Write> Chunked<W> {
    /// Writes the last chunk.
    fn finish(mut self) -> std::io::Result<()> {
        self.0.write_all(b"0\r\n\r\n")?;
        self.0.flush()
    }
}

impl<W: std::io::Write> std::io::Write for Chunked<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        write!(self.0, "{:x}\r\n", buf.len())?;
        self.0.write_all(buf)?;
        self.0.write_all(b"\r\n")?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// A blocking socket that fails a write once its client has taken less than [`MIN_PROGRESS`]
/// bytes in [`WRITE_TIMEOUT`]; its sends must time out (`SO_SNDTIMEO`) so the check runs.
struct Paced<W> {
    inner: W,
    /// Start of the current window.
    since: Instant,
    /// Bytes taken in the current window.
    taken: usize,
}

impl<W: std::io::Write> std::io::Write for Paced<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        loop {
            if self.since.elapsed() >= WRITE_TIMEOUT {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the client took {} bytes in {WRITE_TIMEOUT:?}, less than {MIN_PROGRESS}",
                        self.taken
                    ),
                ));
            }
            match self.inner.write(buf) {
                Ok(n) => {
                    self.taken += n;
                    if self.taken >= MIN_PROGRESS {
                        self.taken = 0;
                        self.since = Instant::now();
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Sends a streamed body on `sock` (blocking: run on a blocking thread).
fn send_streamed(
    sock: std::net::TcpStream,
    http10: bool,
    code: u16,
    content_type: &str,
    write: BodyWriter,
) -> std::io::Result<()> {
    use std::io::Write as _;
    sock.set_nonblocking(false)?;
    sock.set_write_timeout(Some(SEND_TICK))?;
    let mut sock = Paced {
        inner: sock,
        since: Instant::now(),
        taken: 0,
    };
    if http10 {
        sock.write_all(head(code, content_type, "").as_bytes())?;
        write(&mut sock)?;
        sock.flush()
    } else {
        sock.write_all(head(code, content_type, "Transfer-Encoding: chunked\r\n").as_bytes())?;
        let mut body = Chunked(sock);
        write(&mut body)?;
        body.finish()
    }
}

/// The path of a request line (`GET /metrics?x=1 HTTP/1.1` → `/metrics`).
fn path_of(request_line: &str) -> &str {
    let target = request_line.split_whitespace().nth(1).unwrap_or("/");
    target.split('?').next().unwrap_or(target)
}

/// Reads a request head from `r`, at most [`MAX_HEAD_BYTES`] of it: the request line, then
/// header lines up to the blank one (or [`MAX_HEADERS`] of them, or the end of the stream).
/// Returns the request line, or `None` when there is no whole one or the head is longer.
async fn read_head(r: impl AsyncRead + Unpin) -> Option<String> {
    let mut reader = BufReader::new(r.take(MAX_HEAD_BYTES));
    let mut line = String::new();
    reader.read_line(&mut line).await.ok()?;
    if !line.ends_with('\n') {
        return None;
    }
    let mut header = String::new();
    for _ in 0..MAX_HEADERS {
        header.clear();
        match reader.read_line(&mut header).await {
            Ok(n) if n > 0 && !header.trim_end().is_empty() => {}
            _ => break,
        }
    }
    // All the bytes allowed were read: the head did not end within them.
    (reader.get_ref().limit() > 0).then_some(line)
}

/// Binds `addr` for [`serve_replies_on`]. The agent binds its endpoints at start-up, before
/// anything else: an address that cannot be bound (taken, not on the node) stops it with the
/// reason, rather than leaving it running without the endpoint a probe or a scraper expects.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `addr` until the task is dropped, answering every request with `handler(path)`.
pub async fn serve<F, Fut>(addr: SocketAddr, what: &str, handler: F) -> std::io::Result<()>
where
    F: Fn(String) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send,
{
    serve_replies(addr, what, move |path| {
        let handler = handler.clone();
        async move { Reply::Whole(handler(path).await) }
    })
    .await
}

/// [`serve`] with answers that may be streamed ([`Reply`]).
pub async fn serve_replies<F, Fut>(addr: SocketAddr, what: &str, handler: F) -> std::io::Result<()>
where
    F: Fn(String) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send,
{
    let listener = bind(addr).await?;
    serve_replies_on(listener, what, handler).await;
    Ok(())
}

/// [`serve_replies`] on a listener already bound ([`bind`]), until the task is dropped. A failed
/// accept (out of file descriptors, say) is logged and retried after a pause that grows to a
/// second: the endpoint outlives a passing shortage instead of vanishing.
pub async fn serve_replies_on<F, Fut>(listener: TcpListener, what: &str, handler: F)
where
    F: Fn(String) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send,
{
    let addr = listener
        .local_addr()
        .map_or_else(|e| format!("<{e}>"), |a| a.to_string());
    tracing::info!(%addr, "serving {what}");
    let mut pause = ACCEPT_PAUSE_MIN;
    loop {
        let sock = match listener.accept().await {
            Ok((sock, _)) => {
                pause = ACCEPT_PAUSE_MIN;
                sock
            }
            Err(e) => {
                tracing::warn!(error = %e, %addr, "accept a connection for {what}; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(ACCEPT_PAUSE_MAX);
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            // Head and body are two writes: no Nagle wait between them.
            let _ = sock.set_nodelay(true);
            let mut sock = sock;
            let Ok(Some(line)) = tokio::time::timeout(READ_TIMEOUT, read_head(&mut sock)).await
            else {
                return;
            };
            match handler(path_of(&line).to_string()).await {
                Reply::Whole(response) => {
                    if sock.write_all(response.head().as_bytes()).await.is_ok() {
                        let _ = sock.write_all(response.body.as_bytes()).await;
                    }
                }
                Reply::Streamed {
                    code,
                    content_type,
                    write,
                } => {
                    let http10 = line.trim_end().ends_with("HTTP/1.0");
                    let Ok(sock) = sock.into_std() else { return };
                    let sent = tokio::task::spawn_blocking(move || {
                        send_streamed(sock, http10, code, content_type, write)
                    })
                    .await;
                    if let Ok(Err(e)) = sent {
                        tracing::debug!(error = %e, "stream a response");
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt as _;
    use tokio::sync::mpsc;

    use super::*;

    /// Serves on a loopback port: `/big` streams [`BIG`] bytes and reports how its writer
    /// ended; anything else is a whole 503 answer naming the path it was given.
    async fn server() -> (SocketAddr, mpsc::UnboundedReceiver<std::io::Result<()>>) {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        tokio::spawn(serve_replies_on(listener, "test", move |path: String| {
            let done = done_tx.clone();
            async move {
                if path == "/big" {
                    return Reply::Streamed {
                        code: 200,
                        content_type: "text/plain",
                        write: Box::new(move |w| {
                            let piece = vec![b'x'; 64 * 1024];
                            let mut r = Ok(());
                            for _ in 0..BIG / piece.len() {
                                r = w.write_all(&piece);
                                if r.is_err() {
                                    break;
                                }
                            }
                            let ended = match &r {
                                Ok(()) => Ok(()),
                                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                            };
                            let _ = done.send(ended);
                            r
                        }),
                    };
                }
                Response::new(503, "application/json", format!("{{\"path\":\"{path}\"}}")).into()
            }
        }));
        (addr, done_rx)
    }

    /// Bytes of the `/big` body: far more than loopback socket buffers hold.
    const BIG: usize = 256 * 1024 * 1024;

    /// Sends `request` and reads until the server closes (bounded by 30 s).
    async fn exchange(addr: SocketAddr, request: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut got))
            .await
            .expect("the server closes the connection")
            .unwrap();
        String::from_utf8(got).unwrap()
    }

    #[tokio::test]
    async fn whole_answers_carry_length_reason_and_close() {
        let (addr, _) = server().await;
        // The query is not part of the path the handler sees; a keep-alive request still gets
        // one answer and a closed connection.
        let r = exchange(
            addr,
            "GET /healthz?verbose=1 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
        )
        .await;
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{r}"
        );
        assert!(
            head.contains("\r\nContent-Type: application/json\r\n"),
            "{r}"
        );
        assert!(
            head.contains("\r\nX-Content-Type-Options: nosniff\r\n"),
            "{r}"
        );
        assert!(head.contains("\r\nContent-Length: 19\r\n"), "{r}");
        assert!(head.ends_with("\r\nConnection: close"), "{r}");
        assert_eq!(body, "{\"path\":\"/healthz\"}");
    }

    #[tokio::test]
    async fn an_endless_request_head_drops_the_connection() {
        let (addr, _) = server().await;
        // One header line that never ends: the server must stop reading it (and drop the
        // connection) long before the client has sent it all, rather than buffer it.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nX-Long: ").await.unwrap();
        let junk = vec![b'a'; 1024 * 1024];
        let sent = tokio::time::timeout(Duration::from_secs(30), async {
            for _ in 0..64 {
                s.write_all(&junk).await?;
            }
            Ok::<_, std::io::Error>(())
        })
        .await
        .expect("the client's writes end within 30 s");
        assert!(sent.is_err(), "the server took a 64 MiB header line");
    }

    /// Opens a connection, writes `lines` one every `every`, and returns how long the server
    /// kept the connection open.
    async fn held_for(addr: SocketAddr, lines: &[&str], every: Duration) -> Duration {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let t0 = Instant::now();
        let (mut rd, mut wr) = s.split();
        let writer = async {
            for l in lines {
                if wr.write_all(l.as_bytes()).await.is_err() {
                    break;
                }
                tokio::time::sleep(every).await;
            }
            std::future::pending::<()>().await;
        };
        let mut got = Vec::new();
        tokio::select! {
            () = writer => unreachable!(),
            r = tokio::time::timeout(READ_TIMEOUT * 6, rd.read_to_end(&mut got)) => {
                let _ = r.expect("the server drops a slow client");
            }
        }
        t0.elapsed()
    }

    #[tokio::test]
    async fn a_slow_request_head_is_dropped_after_the_read_timeout() {
        let (addr, _) = server().await;
        // A head that stops half way, and one trickled a line a second (each line in time, the
        // whole head not): both end at the timeout, not at the client's pace.
        let stalled = held_for(addr, &["GET / HTTP/1.1\r\nHost: x\r\n"], READ_TIMEOUT * 10);
        let lines: Vec<String> = (0..20).map(|i| format!("X-H{i}: v\r\n")).collect();
        let mut trickle = vec!["GET / HTTP/1.1\r\n"];
        trickle.extend(lines.iter().map(String::as_str));
        let trickled = held_for(addr, &trickle, Duration::from_secs(1));
        let (stalled, trickled) = tokio::join!(stalled, trickled);
        for held in [stalled, trickled] {
            assert!(held + Duration::from_millis(50) >= READ_TIMEOUT, "{held:?}");
            assert!(held < READ_TIMEOUT * 3, "{held:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_stops_reading_a_streamed_body_is_dropped() {
        let (addr, mut done) = server().await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // Read nothing: the writer must give up after the write timeout (once the socket
        // buffers are full), and the connection must be closed. A send timeout alone let it
        // hang on here (the kernel's window opening by a few bytes now and then).
        let t0 = Instant::now();
        let ended = tokio::time::timeout(WRITE_TIMEOUT * 3, done.recv())
            .await
            .expect("the writer gives up on a client that reads nothing")
            .unwrap();
        let e = ended.expect_err("the writer sent all of the body");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        assert!(t0.elapsed() + Duration::from_millis(50) >= WRITE_TIMEOUT);
        let mut sink = vec![0u8; 1 << 20];
        let closed = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match s.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the connection stays open");
    }

    #[test]
    fn paths_lose_their_query() {
        assert_eq!(path_of("GET /metrics HTTP/1.1\r\n"), "/metrics");
        assert_eq!(path_of("GET /healthz?verbose=1 HTTP/1.0"), "/healthz");
        assert_eq!(path_of(""), "/");
    }

    /// A streamed body on a loopback connection, as an HTTP/1.1 and an HTTP/1.0 client read it.
    fn streamed(http10: bool) -> String {
        use std::io::Read as _;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let write: BodyWriter = Box::new(|w| {
            w.write_all(b"twill_up 1\n")?;
            w.write_all(b"")?;
            w.write_all(b"twill_peers 999\n")
        });
        send_streamed(server, http10, 200, "text/plain", write).unwrap();
        let mut got = String::new();
        client.read_to_string(&mut got).unwrap();
        got
    }

    #[test]
    fn streamed_bodies_are_chunked_for_http11_and_close_delimited_for_http10() {
        let r = streamed(false);
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(head.contains("Transfer-Encoding: chunked"), "{r}");
        assert!(!head.contains("Content-Length"), "{r}");
        assert_eq!(
            body,
            "b\r\ntwill_up 1\n\r\n10\r\ntwill_peers 999\n\r\n0\r\n\r\n"
        );
        let r = streamed(true);
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(!head.contains("Transfer-Encoding") && !head.contains("Content-Length"));
        assert_eq!(body, "twill_up 1\ntwill_peers 999\n");
    }

    #[test]
    fn responses_carry_length_and_reason() {
        let r = Response::new(503, "application/json", "{}").head();
        assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{r}");
        assert!(
            r.contains("Content-Length: 2\r\n") && r.ends_with("\r\n\r\n"),
            "{r}"
        );
    }
}
