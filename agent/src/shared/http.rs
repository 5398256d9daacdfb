//! The small HTTP/1.x server behind twilld's own endpoints (flannel's `/healthz` on
//! `--healthz-port`, `/metrics` and `/healthz` on `--metrics-addr`, kube-proxy's `/healthz` and
//! `/livez` on `--healthz-bind-address`).
//!
//! Why not a framework: the endpoints answer a handful of GETs from probes and scrapers; a
//! request line, a bounded read of the headers and one response with `Connection: close` is all
//! they need, with every read under a timeout so a stuck client costs a task, never the agent.
//! The rest of the request head is read before answering, so closing does not reset a client
//! that is still writing its headers.
//!
//! A large body (a `/metrics` scrape with 10k frontends is megabytes) can be streamed: a
//! [`Reply::Streamed`] body is written as it is made, on a blocking thread (its writer may
//! read kernel maps), in chunks (`Transfer-Encoding: chunked` to HTTP/1.1 clients; to HTTP/1.0
//! ones the closing connection ends it), so the agent never holds it whole.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;

/// How long a client may take for each line of its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Header lines read at most.
const MAX_HEADERS: usize = 64;
/// How long a streamed body's client may take to accept each write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
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
    sock.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut sock = sock;
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
            let mut reader = BufReader::new(&mut sock);
            let mut line = String::new();
            if tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line))
                .await
                .is_err()
            {
                return;
            }
            let mut header = String::new();
            for _ in 0..MAX_HEADERS {
                header.clear();
                match tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut header)).await {
                    Ok(Ok(n)) if n > 0 && !header.trim_end().is_empty() => {}
                    _ => break,
                }
            }
            drop(reader);
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
    use super::*;

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
