//! The operator's Prometheus metrics and the small HTTP server for `/metrics` and `/healthz`.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::net::TcpListener;
use tracing::{debug, warn};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// Everything the operator counts.
pub struct Metrics {
    registry: Registry,
    /// Writes to the API server by kind of object (ProxyNode, ProxyConfigStatus, DaemonSet, Event...):
    /// the number that shows whether status writes are really batched.
    api_writes: Family<KindLabels, Counter>,
    reconciles: Family<ResultLabels, Counter>,
    reconcile_duration: Histogram,
    is_leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("fleetproxy_operator");
        let api_writes = Family::<KindLabels, Counter>::default();
        registry.register("api_writes", "Writes to the API server, by kind of object", api_writes.clone());
        let reconciles = Family::<ResultLabels, Counter>::default();
        registry.register("reconciles", "ProxyConfig reconciliations, by result", reconciles.clone());
        let reconcile_duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        registry.register(
            "reconcile_duration_seconds",
            "How long one ProxyConfig reconciliation took",
            reconcile_duration.clone(),
        );
        let is_leader = Gauge::default();
        registry.register("is_leader", "1 while this replica holds the leader Lease", is_leader.clone());
        Self { registry, api_writes, reconciles, reconcile_duration, is_leader }
    }
}

impl Metrics {
    pub fn api_write(&self, kind: &str) {
        self.api_writes.get_or_create(&KindLabels { kind: kind.to_owned() }).inc();
    }

    pub fn reconciled(&self, result: &str, took: Duration) {
        self.reconciles.get_or_create(&ResultLabels { result: result.to_owned() }).inc();
        self.reconcile_duration.observe(took.as_secs_f64());
    }

    pub fn set_leader(&self, leading: bool) {
        self.is_leader.set(i64::from(leading));
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        if let Err(error) = encode(&mut text, &self.registry) {
            warn!(%error, "encoding metrics");
        }
        text
    }
}

fn respond(metrics: &Metrics, request: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match request.uri().path() {
        "/metrics" => {
            (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics.render())
        }
        "/healthz" | "/livez" | "/readyz" => (StatusCode::OK, "text/plain", "ok".to_owned()),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// Binds `address` now (so a bad flag fails at start-up) and serves in the background.
pub async fn serve(address: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = TcpListener::bind(address).await?;
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "accepting a metrics connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let response = respond(&metrics, &request);
                    async move { Ok::<_, Infallible>(response) }
                });
                if let Err(error) =
                    http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
                {
                    debug!(%error, %peer, "metrics connection ended");
                }
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_counted_by_kind() {
        let metrics = Metrics::default();
        metrics.api_write("ProxyNode");
        metrics.api_write("ProxyNode");
        metrics.api_write("ProxyConfigStatus");
        metrics.reconciled("ok", Duration::from_millis(3));
        metrics.set_leader(true);
        let text = metrics.render();
        assert!(text.contains(r#"fleetproxy_operator_api_writes_total{kind="ProxyNode"} 2"#), "{text}");
        assert!(text.contains(r#"fleetproxy_operator_api_writes_total{kind="ProxyConfigStatus"} 1"#));
        assert!(text.contains(r#"fleetproxy_operator_reconciles_total{result="ok"} 1"#));
        assert!(text.contains("fleetproxy_operator_is_leader 1"));
    }
}
