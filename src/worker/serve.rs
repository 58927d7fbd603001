//! Serving a worker: on a port, or inside this process (`start_local`).
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::service::WorkerService;
use super::WorkerConfig;
use crate::error::{Error, Result};
use crate::proto::worker_server::WorkerServer;
use crate::transport::{error_chain, TlsIdentity};
use crate::util::lock;

/// Serves a worker on `host:port` until Ctrl-C or SIGTERM; prints
/// `listening on HOST:PORT` (the real port when 0 was asked) once ready.
pub async fn serve(host: &str, port: u16, cfg: WorkerConfig) -> Result<()> {
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .map_err(|e| Error::InvalidArgument(format!("cannot listen on {host}:{port}: {e}")))?;
    let local = listener.local_addr()?;
    println!("listening on {host}:{}", local.port());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    serve_on(listener, cfg, shutdown_signal()).await
}

/// A worker inside this process, for as long as the process lives: a
/// server on one device runs its model there, so that the decode steps of
/// concurrent sequences run batched. It listens on no port: the coordinator
/// of this process hands it steps directly (`coordinator::Link`), so no
/// token guards it. Returns the name it is reached by.
pub fn start_local(cfg: WorkerConfig) -> Result<String> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let addr = format!("in-process:{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let svc = WorkerService::new(cfg);
    lock(&LOCAL).insert(addr.clone(), svc);
    Ok(addr)
}

/// Forgets the local worker `addr` (see `start_local`); its engine stops,
/// freeing its model, once the last sequence and cluster using it end.
pub fn stop_local(addr: &str) {
    lock(&LOCAL).remove(addr);
}

/// Whether `addr` names a worker `start_local` started in this process.
pub fn is_local(addr: &str) -> bool {
    lock(&LOCAL).contains_key(addr)
}

/// The local worker `addr` names, if any.
pub(crate) fn in_process(addr: &str) -> Option<WorkerService> {
    lock(&LOCAL).get(addr).cloned()
}

/// Local workers of this process, by name: the one table of process-wide
/// workers, as the kernel's is of ports. A worker is named by its address
/// everywhere (plans, re-plans, `/cluster/status`, Python's worker lists),
/// and an in-process one has no port, so its name is looked up here.
static LOCAL: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<String, WorkerService>>,
> = std::sync::LazyLock::new(Default::default);

/// Serves a worker on `listener` until `shutdown` completes.
async fn serve_on(
    listener: tokio::net::TcpListener,
    cfg: WorkerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let local = listener.local_addr()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<WorkerServer<WorkerService>>().await;
    let name = cfg.name.clone();
    let keepalive = cfg.transport.keepalive_interval();
    let builder = server_builder(&cfg)?;
    let tls = cfg.tls.is_some();
    let service = WorkerService::new(cfg);
    let stopping = service.stopping.clone();
    let service = service.into_server();
    tracing::info!(
        worker = %name,
        "serving on {local}{}",
        if tls { " with TLS" } else { " (plain, no TLS)" }
    );
    let incoming = incoming(listener);
    builder
        // A coordinator or previous stage that vanished is noticed within seconds.
        .http2_keepalive_interval(Some(keepalive))
        .http2_keepalive_timeout(Some(keepalive))
        .add_service(health_service)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            stopping.send_replace(true);
        })
        .await
        .map_err(|e| Error::Worker(format!("worker {name} stopped: {e}")))
}

/// The connections a worker serves, each with TCP_NODELAY: the builder's
/// own setting applies only to listeners it binds itself, and without it a
/// small reply can wait for the peer's delayed ACK. (Clients set it in
/// `open_client`, which every channel of this crate goes through.)
pub(super) fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// A gRPC server builder serving TLS when `cfg` says.
pub(super) fn server_builder(cfg: &WorkerConfig) -> Result<tonic::transport::Server> {
    let window = cfg.transport.h2_window;
    let builder = tonic::transport::Server::builder()
        .initial_stream_window_size(window)
        .initial_connection_window_size(window.map(|w| w.saturating_mul(2)));
    let Some(id) = &cfg.tls else {
        return Ok(builder);
    };
    let id = TlsIdentity::new(id.cert_pem.clone(), id.key_pem.clone())?;
    let config = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            id.cert_pem,
            id.key_pem,
        ))
        // A client that never finishes its handshake is dropped.
        .timeout(Duration::from_secs(10));
    builder.tls_config(config).map_err(|e| {
        Error::InvalidArgument(format!("worker {}: TLS: {}", cfg.name, error_chain(&e)))
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{make_certificate, TransportConfig};

    #[test]
    fn served_connections_set_tcp_nodelay() {
        crate::util::runtime().block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let mut accepted = incoming(listener);
            let _peer = tokio::net::TcpStream::connect(addr).await.unwrap();
            let conn = tokio_stream::StreamExt::next(&mut accepted).await.unwrap();
            assert!(conn.unwrap().nodelay().unwrap());
        });
    }

    #[test]
    fn certificates_are_checked_and_made_for_their_hosts() {
        assert!(make_certificate(&[]).is_err());
        assert!(make_certificate(&[" ".into()]).is_err());
        assert!(make_certificate(&["not a host!".into()]).is_err());
        let (cert, key) =
            make_certificate(&["127.0.0.1".into(), "localhost".into(), "[::1]".into()]).unwrap();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(key.contains("PRIVATE KEY"));
        assert!(TlsIdentity::new(cert.clone(), key.clone()).is_ok());
        let (_, other_key) = make_certificate(&["localhost".into()]).unwrap();
        let err = TlsIdentity::new(cert.clone(), other_key).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
        assert!(TlsIdentity::new(cert.clone(), "junk".into()).is_err());
        assert!(TlsIdentity::new("junk".into(), key.clone()).is_err());
        assert!(TransportConfig::default()
            .with_tls_ca(Some("not a certificate".into()))
            .is_err());
        let id = TlsIdentity::new(cert, key).unwrap();
        assert!(!format!("{id:?}").contains("PRIVATE"));
    }
}
