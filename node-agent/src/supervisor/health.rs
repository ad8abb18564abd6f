//! Readiness probes: an HTTP GET on the replica's port that must answer
//! 2xx, or a TCP connect; and the engine's load, read from its Prometheus
//! metrics. Both go to 127.0.0.1: the agent runs on the replica's machine.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use berth_common::HealthProbe;
use berth_common::model::EngineMetrics;
use http_body_util::{BodyExt, Empty, Limited};
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
    let HealthProbe::Http { path } = probe else {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect to port {port}: {e}"))?;
        return Ok(());
    };
    let (status, _) = get(port, path, 0).await?;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("GET {path} answered {status}"))
    }
}

/// `GET path` on 127.0.0.1:`port`: the status, and up to `max_body` bytes
/// of the body (none when 0).
async fn get(port: u16, path: &str, max_body: usize) -> Result<(hyper::StatusCode, Bytes), String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect to port {port}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake on port {port}: {e}"))?;
    // Aborted however this function ends (a probe timeout drops it midway).
    let _connection = AbortOnDrop(tokio::spawn(conn));
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, format!("127.0.0.1:{port}"))
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("build request for {path}: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    let status = response.status();
    if max_body == 0 {
        return Ok((status, Bytes::new()));
    }
    let body = Limited::new(response.into_body(), max_body)
        .collect()
        .await
        .map_err(|e| format!("GET {path}: the body: {e}"))?
        .to_bytes();
    Ok((status, body))
}

/// The engine's load, from its metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineLoad {
    /// Requests waiting for a slot.
    pub waiting: u32,
    /// Requests being generated.
    pub running: u32,
    /// The KV cache's use in thousandths, when the engine reports it.
    pub kv_cache_milli: Option<u32>,
}

/// The largest metrics page read (vLLM's, with its histograms, is tens of KiB).
const MAX_METRICS_BYTES: usize = 4 * 1024 * 1024;

/// Reads the engine's load from its metrics on `port`.
pub async fn scrape(metrics: &EngineMetrics, port: u16) -> Result<EngineLoad, String> {
    let read = tokio::time::timeout(PROBE_TIMEOUT, get(port, metrics.path, MAX_METRICS_BYTES));
    let (status, body) = read
        .await
        .map_err(|_| format!("no answer within {PROBE_TIMEOUT:?}"))??;
    if !status.is_success() {
        return Err(format!("GET {} answered {status}", metrics.path));
    }
    Ok(parse_load(&String::from_utf8_lossy(&body), metrics))
}

/// Sums the waiting and running gauges of a Prometheus text page (every
/// label set; a missing gauge counts 0).
pub fn parse_load(text: &str, metrics: &EngineMetrics) -> EngineLoad {
    let (mut waiting, mut running) = (0.0f64, 0.0f64);
    let mut kv: Option<f64> = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let Some(value) = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
        else {
            continue;
        };
        if metrics.waiting.contains(&name) {
            waiting += value;
        } else if metrics.running.contains(&name) {
            running += value;
        } else if metrics.kv_cache.contains(&name) {
            kv = Some(kv.map_or(value, |k| k.max(value)));
        }
    }
    EngineLoad {
        waiting: waiting.round().min(f64::from(u32::MAX)) as u32,
        running: running.round().min(f64::from(u32::MAX)) as u32,
        kv_cache_milli: kv.map(|k| (k.min(1.0) * 1000.0).round() as u32),
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

    #[test]
    fn load_sums_the_named_gauges_over_label_sets() {
        let vllm = berth_common::Runtime::Vllm
            .engine_metrics()
            .expect("vllm has metrics");
        let page = "# HELP vllm:num_requests_waiting Number of requests waiting.\n\
            # TYPE vllm:num_requests_waiting gauge\n\
            vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 3.0\n\
            vllm:num_requests_waiting{engine=\"1\",model_name=\"m\"} 2.0\n\
            vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 7.0\n\
            vllm:num_requests_waiting_by_reason{reason=\"x\"} 100\n\
            vllm:num_requests_running_total 50\n\
            vllm:kv_cache_usage_perc{engine=\"0\"} 0.25\n\
            vllm:kv_cache_usage_perc{engine=\"1\"} 0.9374\n";
        assert_eq!(
            parse_load(page, &vllm),
            EngineLoad {
                waiting: 5,
                running: 7,
                kv_cache_milli: Some(937),
            }
        );
        // Engines that do not report the KV cache leave it unknown.
        assert_eq!(
            parse_load("vllm:num_requests_running 1\n", &vllm).kv_cache_milli,
            None
        );
        assert_eq!(parse_load("garbage\n{}", &vllm), EngineLoad::default());
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
