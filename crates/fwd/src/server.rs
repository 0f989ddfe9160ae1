//! The status socket and the metrics endpoint, on tokio.
//!
//! Why it is built this way:
//! - Both answer from the shared status document after asking the reconcile loop to refresh
//!   the kernel readings, with a deadline: while the loop is busy (a long apply, a slow
//!   fetch) a reader gets the last readings rather than waiting.
//! - The metrics endpoint is a minimal HTTP/1.1 responder (`GET /metrics`, anything else is
//!   404, one response per connection): a web framework would be most of the binary for one
//!   route. Request heads are bounded in size and time.
//! - The status socket's directory is created 0700 and the socket chmod-ed 0600 before it
//!   accepts: only root reads the document. A stale socket file from a killed run is
//!   replaced.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::mpsc::{Sender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, UnixListener};
use tracing::{debug, warn};

use crate::engine::{Msg, lock};
use crate::metrics::Metrics;
use crate::status::Status;

const REFRESH_DEADLINE: Duration = Duration::from_millis(1500);

/// Asks the loop to refresh the kernel readings; returns when it did or the deadline passed.
async fn refresh(tx: &Mutex<Sender<Msg>>) {
    let (done_tx, done_rx) = sync_channel(1);
    let sent = tx.lock().map(|t| t.send(Msg::Refresh(done_tx)).is_ok()).unwrap_or(false);
    if !sent {
        return;
    }
    let _ = tokio::task::spawn_blocking(move || done_rx.recv_timeout(REFRESH_DEADLINE)).await;
}

/// Binds the status socket at `path` (parent made 0700, socket 0600).
pub fn bind_status(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(listener)
}

pub async fn serve_status(
    listener: UnixListener,
    status: Arc<Mutex<Status>>,
    tx: Arc<Mutex<Sender<Msg>>>,
) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let (status, tx) = (status.clone(), tx.clone());
        tokio::spawn(async move {
            refresh(&tx).await;
            let doc = lock(&status).clone();
            let mut body = serde_json::to_vec(&doc).unwrap_or_default();
            body.push(b'\n');
            if let Err(e) = stream.write_all(&body).await {
                debug!("status reader went away: {e}");
            }
            let _ = stream.shutdown().await;
        });
    }
}

pub async fn bind_metrics(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("binding the metrics address {addr}"))
}

/// The request line of an HTTP request head, when the head is complete.
fn request_line(head: &[u8]) -> Option<&str> {
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&head[..end]).ok()?;
    head.lines().next()
}

fn response(line: &str, metrics: &Metrics) -> Vec<u8> {
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = if method == "GET"
        && (target == "/metrics" || target.starts_with("/metrics?"))
    {
        ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics.encode())
    } else if method == "GET" {
        ("404 Not Found", "text/plain", "not found: try /metrics\n".to_string())
    } else {
        ("405 Method Not Allowed", "text/plain", "only GET\n".to_string())
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    tx: Arc<Mutex<Sender<Msg>>>,
) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let (metrics, tx) = (metrics.clone(), tx.clone());
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(512);
            let mut buf = [0u8; 512];
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    let n = stream.read(&mut buf).await.ok()?;
                    if n == 0 {
                        return None;
                    }
                    head.extend_from_slice(&buf[..n]);
                    if let Some(line) = request_line(&head) {
                        return Some(line.to_string());
                    }
                    if head.len() > 16 * 1024 {
                        return None;
                    }
                }
            })
            .await;
            let Ok(Some(line)) = read else { return };
            if line.starts_with("GET /metrics") {
                refresh(&tx).await;
            }
            if let Err(e) = stream.write_all(&response(&line, &metrics)).await {
                warn!("metrics reader went away: {e}");
            }
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics_is_served() {
        let m = Metrics::new(Arc::new(Mutex::new(Status::default())));
        assert_eq!(
            request_line(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some("GET /metrics HTTP/1.1")
        );
        assert_eq!(request_line(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), None);
        let ok = String::from_utf8(response("GET /metrics HTTP/1.1", &m)).unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("fwd_drift_checks_total 0"), "{ok}");
        let nf = String::from_utf8(response("GET / HTTP/1.1", &m)).unwrap();
        assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
        let post = String::from_utf8(response("POST /metrics HTTP/1.1", &m)).unwrap();
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        assert!(String::from_utf8(response("", &m)).unwrap().starts_with("HTTP/1.1 405"));
    }

    #[tokio::test]
    async fn the_status_socket_is_private_and_serves_one_json_document() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("run/fwd/status.sock");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"stale").unwrap();
        let listener = bind_status(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        let status = Arc::new(Mutex::new(Status::default()));
        lock(&status).source.url = "file:///x".into();
        let (tx, _rx) = std::sync::mpsc::channel();
        tokio::spawn(serve_status(listener, status, Arc::new(Mutex::new(tx))));
        let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let doc: Status = serde_json::from_str(&out).unwrap();
        assert_eq!(doc.source.url, "file:///x");
    }
}
