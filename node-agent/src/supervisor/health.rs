//! Readiness probes: an HTTP GET on the replica's port that must answer
//! 2xx, or a TCP connect. Probes go to 127.0.0.1: the agent runs on the
//! replica's machine.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use berth_common::HealthProbe;
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long one probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Probes the replica on `port`. `Err` says what failed, for the phase reason.
pub async fn probe(probe: &HealthProbe, port: u16) -> Result<(), String> {
    match tokio::time::timeout(PROBE_TIMEOUT, run(probe, port)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
    }
}

async fn run(probe: &HealthProbe, port: u16) -> Result<(), String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect to port {port}: {e}"))?;
    let HealthProbe::Http { path } = probe else {
        return Ok(());
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake on port {port}: {e}"))?;
    // Aborted however this function ends (a probe timeout drops it midway).
    let _connection = AbortOnDrop(tokio::spawn(conn));
    let request = hyper::Request::get(path.as_str())
        .header(hyper::header::HOST, format!("127.0.0.1:{port}"))
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("build request for {path}: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("GET {path} answered {}", response.status()))
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn server(status: &'static str) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let body = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                let _ = s.write_all(body.as_bytes()).await;
            }
        });
        port
    }

    #[tokio::test]
    async fn http_and_tcp_probes() {
        let http = |p: &str| HealthProbe::Http { path: p.into() };
        let ok = server("200 OK").await;
        assert_eq!(probe(&http("/health"), ok).await, Ok(()));
        assert_eq!(probe(&HealthProbe::Tcp, ok).await, Ok(()));
        let bad = server("503 Service Unavailable").await;
        let e = probe(&http("/health"), bad).await.unwrap_err();
        assert!(e.contains("503"), "{e}");
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = probe(&HealthProbe::Tcp, closed).await.unwrap_err();
        assert!(e.contains("connect"), "{e}");
    }
}
