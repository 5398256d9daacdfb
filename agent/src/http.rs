//! The small HTTP/1.x server behind twilld's own endpoints (`/healthz` and `/metrics` on
//! `--metrics-addr`, kube-proxy's `/healthz` and `/livez` on `--healthz-bind-address`).
//!
//! Why not a framework: the endpoints answer a handful of GETs from probes and scrapers; a
//! request line, a bounded read of the headers and one response with `Connection: close` is all
//! they need, with every read under a timeout so a stuck client costs a task, never the agent.
//! The rest of the request head is read before answering, so closing does not reset a client
//! that is still writing its headers.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;

/// How long a client may take for each line of its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Header lines read at most.
const MAX_HEADERS: usize = 64;

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
        let reason = match self.code {
            200 => "OK",
            404 => "Not Found",
            500 => "Internal Server Error",
            503 => "Service Unavailable",
            _ => "",
        };
        format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.code,
            self.content_type,
            self.body.len(),
        )
    }
}

/// The path of a request line (`GET /metrics?x=1 HTTP/1.1` → `/metrics`).
fn path_of(request_line: &str) -> &str {
    let target = request_line.split_whitespace().nth(1).unwrap_or("/");
    target.split('?').next().unwrap_or(target)
}

/// Serves `addr` until the task is dropped, answering every request with `handler(path)`.
pub async fn serve<F, Fut>(addr: SocketAddr, what: &str, handler: F) -> std::io::Result<()>
where
    F: Fn(String) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send,
{
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving {what}");
    loop {
        let (sock, _) = listener.accept().await?;
        let handler = handler.clone();
        tokio::spawn(async move {
            // Head and body are two writes: no Nagle wait between them.
            let _ = sock.set_nodelay(true);
            let (rd, mut wr) = sock.into_split();
            let mut reader = BufReader::new(rd);
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
            let response = handler(path_of(&line).to_string()).await;
            if wr.write_all(response.head().as_bytes()).await.is_ok() {
                let _ = wr.write_all(response.body.as_bytes()).await;
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
