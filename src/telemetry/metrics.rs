//! Prometheus metrics: the names ztgate records (docs/metrics.md describes
//! each) and the local HTTP listener that serves them.

use http_body_util::Full;
use hyper::body::Bytes;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::sync::OnceLock;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Connections that reached a verdict, by `outcome` (admitted, refused) and `code`.
pub const CONNECTIONS_TOTAL: &str = "ztgate_connections_total";
/// Handshakes by `outcome` (ok, failed, timeout).
pub const HANDSHAKES_TOTAL: &str = "ztgate_handshakes_total";
/// Live sessions.
pub const SESSIONS_ACTIVE: &str = "ztgate_sessions_active";
/// Streams (tunnels) opened, by `application`.
pub const STREAMS_TOTAL: &str = "ztgate_streams_total";
/// Bytes forwarded, by `application` and `direction` (to_upstream, to_client).
pub const BYTES_TOTAL: &str = "ztgate_bytes_total";
/// Policy decisions, by `engine` and `outcome`, cache hits included.
pub const POLICY_DECISIONS_TOTAL: &str = "ztgate_policy_decisions_total";
/// Latency of policy decisions, by `engine`.
pub const POLICY_DECISION_SECONDS: &str = "ztgate_policy_decision_duration_seconds";
/// Upstream TCP connects, by `application` and `outcome` (ok, error).
pub const UPSTREAM_CONNECTS_TOTAL: &str = "ztgate_upstream_connects_total";
/// Latency of successful upstream connects, by `application`.
pub const UPSTREAM_CONNECT_SECONDS: &str = "ztgate_upstream_connect_duration_seconds";
/// Sessions closed by the gateway, by `code`.
pub const SESSIONS_CLOSED_TOTAL: &str = "ztgate_sessions_closed_total";
/// Handshakes in progress, by `transport` (quic, tls).
pub const HANDSHAKES_PENDING: &str = "ztgate_handshakes_pending";
/// QUIC Retry packets sent, by `reason` (pending-handshakes, source-rate).
pub const QUIC_RETRIES_TOTAL: &str = "ztgate_quic_retries_total";
/// New connections rejected by the per-source handshake rate limit, by `transport`.
pub const HANDSHAKES_RATE_LIMITED_TOTAL: &str = "ztgate_handshakes_rate_limited_total";
/// Streams reset with stream-rate-limited.
pub const STREAMS_RATE_LIMITED_TOTAL: &str = "ztgate_streams_rate_limited_total";
/// Upstream dials that found the application's dial cap full, by
/// `application` and `outcome` (waited, rejected).
pub const UPSTREAM_DIALS_QUEUED_TOTAL: &str = "ztgate_upstream_dials_queued_total";

fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 0.5, 1.0, 2.5,
            ])
            .map(|b| b.build_recorder())
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        if let Err(e) = metrics::set_global_recorder(recorder) {
            tracing::warn!(error = %e, "another metrics recorder is installed; /metrics shows only what this one records");
        }
        handle
    })
}

/// Installs the recorder (once per process) and serves `GET /metrics` on
/// `addr`, which must be a loopback or otherwise private address the
/// operator chose. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<SocketAddr> {
    let handle = handle().clone();
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen for metrics on {addr}: {e}"),
        )
    })?;
    let bound = listener.local_addr()?;
    tracing::info!(%bound, "metrics listener started");
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.changed() => return,
            };
            let Ok((tcp, _)) = accepted else { continue };
            let handle = handle.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: hyper::Request<hyper::body::Incoming>| {
                        let handle = handle.clone();
                        async move {
                            let response = if request.uri().path() == "/metrics" {
                                hyper::Response::builder()
                                    .header("content-type", "text/plain; version=0.0.4")
                                    .body(Full::new(Bytes::from(handle.render())))
                            } else {
                                hyper::Response::builder().status(404).body(Full::new(
                                    Bytes::from_static(b"not found; use /metrics\n"),
                                ))
                            };
                            response
                        }
                    },
                );
                let io = hyper_util::rt::TokioIo::new(tcp);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    tracing::debug!(error = %e, "metrics connection failed");
                }
            });
        }
    });
    Ok(bound)
}

/// Counts a connection's verdict: `admitted`, or `refused` with its code.
pub fn connection(outcome: &'static str, code: &'static str) {
    metrics::counter!(CONNECTIONS_TOTAL, "outcome" => outcome, "code" => code).increment(1);
}

/// Counts a handshake's outcome: `ok`, `failed` or `timeout`.
pub fn handshake(outcome: &'static str) {
    metrics::counter!(HANDSHAKES_TOTAL, "outcome" => outcome).increment(1);
}

/// Moves the live-session gauge by `delta`.
pub fn sessions_active(delta: f64) {
    metrics::gauge!(SESSIONS_ACTIVE).increment(delta);
}

/// Counts a session closed by the gateway.
pub fn session_closed(code: &'static str) {
    metrics::counter!(SESSIONS_CLOSED_TOTAL, "code" => code).increment(1);
}

/// Counts one stream and, when it ends, its bytes each way.
pub fn stream_opened(application: &str) {
    metrics::counter!(STREAMS_TOTAL, "application" => application.to_string()).increment(1);
}

pub fn stream_bytes(application: &str, to_upstream: u64, to_client: u64) {
    metrics::counter!(BYTES_TOTAL, "application" => application.to_string(), "direction" => "to_upstream")
        .increment(to_upstream);
    metrics::counter!(BYTES_TOTAL, "application" => application.to_string(), "direction" => "to_client")
        .increment(to_client);
}

/// Counts an upstream connect and records its latency when it succeeded.
pub fn upstream_connect(application: &str, result: Result<std::time::Duration, ()>) {
    match result {
        Ok(latency) => {
            metrics::counter!(UPSTREAM_CONNECTS_TOTAL, "application" => application.to_string(), "outcome" => "ok")
                .increment(1);
            metrics::histogram!(UPSTREAM_CONNECT_SECONDS, "application" => application.to_string())
                .record(latency.as_secs_f64());
        }
        Err(()) => {
            metrics::counter!(UPSTREAM_CONNECTS_TOTAL, "application" => application.to_string(), "outcome" => "error")
                .increment(1);
        }
    }
}

/// Moves the pending-handshake gauge of `transport` by `delta`.
pub fn handshakes_pending(transport: &'static str, delta: f64) {
    metrics::gauge!(HANDSHAKES_PENDING, "transport" => transport).increment(delta);
}

/// Counts a Retry packet sent, with why the address needed validating.
pub fn quic_retry(reason: &'static str) {
    metrics::counter!(QUIC_RETRIES_TOTAL, "reason" => reason).increment(1);
}

/// Counts a new connection rejected by the per-source handshake rate limit.
pub fn handshake_rate_limited(transport: &'static str) {
    metrics::counter!(HANDSHAKES_RATE_LIMITED_TOTAL, "transport" => transport).increment(1);
}

/// Counts a stream reset by the per-connection stream rate limit.
pub fn stream_rate_limited() {
    metrics::counter!(STREAMS_RATE_LIMITED_TOTAL).increment(1);
}

/// Counts a dial that found the dial cap full: `waited` when it got a slot
/// later, `rejected` when it gave up.
pub fn upstream_dial_queued(application: &str, outcome: &'static str) {
    metrics::counter!(UPSTREAM_DIALS_QUEUED_TOTAL, "application" => application.to_string(), "outcome" => outcome)
        .increment(1);
}
