//! kube-proxy's HTTP endpoints: on the metrics address `/proxyMode` (the mode, plain text) and
//! `/metrics`; on the healthz address `/healthz` and `/livez` with kube-proxy's JSON bodies.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use fleetproxy_api::ProxyMode;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use k8s_openapi::jiff::Timestamp;
use tokio::net::TcpListener;
use tracing::debug;

use crate::{error::AgentError, health::Health, metrics::Metrics};

/// The mode /proxyMode reports: the active one, or the wanted one before the first sync.
#[derive(Debug)]
pub struct ModeCell(Mutex<ProxyMode>);

impl ModeCell {
    pub fn new(mode: ProxyMode) -> Self {
        Self(Mutex::new(mode))
    }

    pub fn get(&self) -> ProxyMode {
        *self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn set(&self, mode: ProxyMode) {
        *self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = mode;
    }
}

/// What the endpoints read.
#[derive(Clone, Debug)]
pub struct ServeState {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub mode: Arc<ModeCell>,
}

fn response(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn not_found() -> Response<Full<Bytes>> {
    response(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "404 page not found\n")
}

/// Answers a request to the metrics address.
pub fn metrics_endpoint(method: &Method, path: &str, state: &ServeState) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return response(StatusCode::METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", "");
    }
    match path {
        "/proxyMode" => response(StatusCode::OK, "text/plain; charset=utf-8", state.mode.get().as_str()),
        "/metrics" => response(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics.encode(),
        ),
        _ => not_found(),
    }
}

/// Answers a request to the healthz address.
pub fn health_endpoint(path: &str, state: &ServeState, now: Timestamp) -> Response<Full<Bytes>> {
    let answer = match path {
        "/healthz" => state.health.healthz(now),
        "/livez" => state.health.livez(now),
        _ => return not_found(),
    };
    let status = if answer.healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let mut response = response(status, "application/json", answer.body);
    response.headers_mut().insert("X-Content-Type-Options", HeaderValue::from_static("nosniff"));
    response
}

/// Which endpoints a server answers.
#[derive(Clone, Copy, Debug)]
pub enum Endpoints {
    Metrics,
    Health,
}

/// Binds `address` now (so that a taken port stops the agent at start-up) and serves in the
/// background until the runtime shuts down.
pub async fn spawn(
    address: SocketAddr,
    endpoints: Endpoints,
    state: ServeState,
) -> Result<SocketAddr, AgentError> {
    let listener = TcpListener::bind(address).await.map_err(|source| AgentError::Bind { address, source })?;
    let bound = listener.local_addr().map_err(|source| AgentError::Bind { address, source })?;
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of file descriptors and the like: keep serving once it passes.
                    debug!(%err, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let state = state.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let answer = match endpoints {
                        Endpoints::Metrics => {
                            metrics_endpoint(request.method(), request.uri().path(), &state)
                        }
                        Endpoints::Health => health_endpoint(request.uri().path(), &state, Timestamp::now()),
                    };
                    async move { Ok::<_, Infallible>(answer) }
                });
                if let Err(err) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
                {
                    debug!(%err, "HTTP connection ended with an error");
                }
            });
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn state() -> ServeState {
        ServeState {
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(Health::new(Duration::from_secs(60), Timestamp::UNIX_EPOCH)),
            mode: Arc::new(ModeCell::new(ProxyMode::Nftables)),
        }
    }

    async fn body(response: Response<Full<Bytes>>) -> String {
        let bytes = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[tokio::test]
    async fn endpoints_answer_as_kube_proxys() {
        let state = state();
        let mode = metrics_endpoint(&Method::GET, "/proxyMode", &state);
        assert_eq!(mode.status(), StatusCode::OK);
        assert_eq!(body(mode).await, "nftables");
        let metrics = metrics_endpoint(&Method::GET, "/metrics", &state);
        assert!(body(metrics).await.contains("kubeproxy_sync_proxy_rules_duration_seconds"));
        assert_eq!(metrics_endpoint(&Method::GET, "/nope", &state).status(), StatusCode::NOT_FOUND);

        let now = Timestamp::UNIX_EPOCH;
        let healthz = health_endpoint("/healthz", &state, now);
        assert_eq!(healthz.status(), StatusCode::OK);
        assert_eq!(healthz.headers()[CONTENT_TYPE], "application/json");
        assert!(body(healthz).await.contains("nodeEligible"));
        state.health.queued(now);
        let late = now.checked_add(Duration::from_secs(61)).expect("time");
        assert_eq!(health_endpoint("/livez", &state, late).status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        let address =
            spawn("127.0.0.1:0".parse().expect("addr"), Endpoints::Metrics, state()).await.expect("bind");
        let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
        stream
            .write_all(b"GET /proxyMode HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("read");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("nftables"), "{answer}");
    }
}
