//! Reaching workers over gRPC: the connector every client uses (the
//! coordinator, a stage's relay to the next, the ring back to the first),
//! TLS, the cluster token and its interceptors, the HTTP/2 settings, and
//! the metadata keys a refusal's kind travels in.
use std::time::Duration;

use tonic::{Request, Status};

use crate::error::{Error, Result};
use crate::proto::worker_client::WorkerClient;

/// The metadata key that carries the cluster token.
pub const TOKEN_KEY: &str = "x-mlx-dist-token";

/// The metadata key of a refusal that names its kind: the kind travels as
/// data, not as words, and each `Error` kind a worker answers with comes
/// back as itself (`status_of`, `error_of`).
pub const ERROR_KIND_KEY: &str = "x-mlx-dist-error";
/// A step refused because the prefix it starts from is not kept here
/// (`Error::PrefixMissing`).
pub const PREFIX_MISSING: &str = "prefix-missing";
/// A sequence that needs more KV cache than a stage's whole budget
/// (`Error::KvBudgetExceeded`), with the bytes in these keys.
pub const KV_BUDGET_EXCEEDED: &str = "kv-budget-exceeded";
pub const NEED_KEY: &str = "x-mlx-dist-need-bytes";
pub const BUDGET_KEY: &str = "x-mlx-dist-budget-bytes";
/// A stage with no room for one more sequence now (`Error::KvBudgetFull`).
pub const KV_BUDGET_FULL: &str = "kv-budget-full";
/// A stage that holds no shard or not the sequence (`Error::NotReady`).
pub const NOT_READY: &str = "not-ready";
/// A stage of the chain that failed (`Error::StageFailed`); which one, in
/// `STAGE_KEY` (its name, when known) and `ADDRESS_KEY`.
pub const STAGE_FAILED: &str = "stage-failed";
/// A connection that failed over TLS (`Error::Tls`), to `ADDRESS_KEY`.
pub const TLS: &str = "tls";
/// A step lost on the way (`Error::Stalled`).
pub const STALLED: &str = "stalled";
/// The stage a refusal comes from, where it is not the one called: a stage
/// relaying another's refusal, or its own about the next stage, says whose
/// it is in these (binary: names and addresses need not be ASCII).
pub const STAGE_KEY: &str = "x-mlx-dist-stage-bin";
pub const ADDRESS_KEY: &str = "x-mlx-dist-address-bin";

/// `e` as the gRPC status a worker answers with: its code, its message, and
/// its kind (and figures) in the metadata, so that `error_of` gives back the
/// same kind without reading the message.
pub fn status_of(e: Error) -> Status {
    use tonic::metadata::{BinaryMetadataValue, MetadataValue};
    fn with_kind(mut s: Status, kind: &'static str) -> Status {
        s.metadata_mut()
            .insert(ERROR_KIND_KEY, MetadataValue::from_static(kind));
        s
    }
    fn with_bin(mut s: Status, key: &'static str, value: &str) -> Status {
        if !value.is_empty() {
            s.metadata_mut()
                .insert_bin(key, BinaryMetadataValue::from_bytes(value.as_bytes()));
        }
        s
    }
    match e {
        Error::NotFound(m) => Status::not_found(m),
        Error::InvalidArgument(_)
        | Error::InvalidModel { .. }
        | Error::UnsupportedArchitecture { .. } => Status::invalid_argument(e.to_string()),
        Error::ResourceExhausted(m) => Status::resource_exhausted(m),
        Error::KvBudgetFull(m) => with_kind(Status::resource_exhausted(m), KV_BUDGET_FULL),
        Error::KvBudgetExceeded {
            need,
            budget,
            detail,
        } => {
            let mut s = with_kind(Status::resource_exhausted(detail), KV_BUDGET_EXCEEDED);
            let m = s.metadata_mut();
            m.insert(NEED_KEY, need.into());
            m.insert(BUDGET_KEY, budget.into());
            s
        }
        Error::NotReady(m) => with_kind(Status::failed_precondition(m), NOT_READY),
        Error::PrefixMissing(m) => with_kind(Status::failed_precondition(m), PREFIX_MISSING),
        Error::Stalled(m) => with_kind(Status::aborted(m), STALLED),
        Error::StageFailed {
            stage,
            address,
            cause,
        } => {
            let s = with_kind(Status::unavailable(cause), STAGE_FAILED);
            let s = with_bin(s, ADDRESS_KEY, &address);
            if stage == address {
                s
            } else {
                with_bin(s, STAGE_KEY, &stage)
            }
        }
        Error::Tls { address, detail } => with_bin(
            with_kind(Status::unavailable(detail), TLS),
            ADDRESS_KEY,
            &address,
        ),
        other => Status::internal(other.to_string()),
    }
}

/// What a refusal from a worker means, by its code and kind (never its
/// message). `who` names a stage, as (name, address shown), from the
/// address a refusal names (a later stage of the chain), or `None`: the
/// worker called, whose refusals are its own unless they name another.
pub fn error_of(s: Status, who: impl Fn(Option<&str>) -> (String, String)) -> Error {
    let md = s.metadata();
    let kind = md.get(ERROR_KIND_KEY).and_then(|v| v.to_str().ok());
    let text = |key: &str| {
        md.get_bin(key)
            .and_then(|v| v.to_bytes().ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .filter(|t| !t.is_empty())
    };
    let bytes = |key: &str| {
        md.get(key)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let from = text(ADDRESS_KEY);
    let (mut stage, shown) = who(from.as_deref());
    if let Some(named) = text(STAGE_KEY) {
        // A name only the refusal knows (the stage is none of the plan's).
        if from.as_deref() == Some(stage.as_str()) {
            stage = named;
        }
    }
    let named = crate::error::who(&stage, &shown);
    let msg = s.message().to_string();
    use tonic::Code;
    match (s.code(), kind) {
        (Code::ResourceExhausted, Some(KV_BUDGET_EXCEEDED)) => Error::KvBudgetExceeded {
            need: bytes(NEED_KEY),
            budget: bytes(BUDGET_KEY),
            detail: msg,
        },
        (Code::ResourceExhausted, Some(KV_BUDGET_FULL)) => Error::KvBudgetFull(msg),
        (Code::ResourceExhausted, _) => Error::ResourceExhausted(msg),
        // An evicted prefix: a cache miss (`Cluster::start`).
        (Code::FailedPrecondition, Some(PREFIX_MISSING)) => {
            Error::PrefixMissing(format!("worker {named}: {msg}"))
        }
        // A restarted worker or a dropped sequence: a re-plan mends it.
        (Code::FailedPrecondition, _) => Error::NotReady(format!("worker {named}: {msg}")),
        (Code::InvalidArgument, _) => Error::InvalidArgument(format!("worker {named}: {msg}")),
        (Code::NotFound, _) => Error::NotFound(format!("worker {named}: {msg}")),
        (_, Some(STALLED)) => Error::Stalled(msg),
        (_, Some(TLS)) => Error::Tls {
            address: from.unwrap_or(if shown.is_empty() { stage } else { shown }),
            detail: msg,
        },
        // Anything else (a stage gone, a broken stream, an internal error,
        // a refused token) is the failure of the stage it comes from.
        _ => Error::StageFailed {
            stage,
            address: shown,
            cause: msg,
        },
    }
}

/// A refusal a stage got from the next stage (at `address`), as it passes
/// it up the chain: one that names no stage is the next stage's own, and
/// says so from here on.
pub(crate) fn from_next_stage(mut s: Status, address: &str) -> Status {
    if !s.metadata().contains_key(ADDRESS_KEY) && !address.is_empty() {
        s.metadata_mut().insert_bin(
            ADDRESS_KEY,
            tonic::metadata::BinaryMetadataValue::from_bytes(address.as_bytes()),
        );
    }
    s
}

/// How this process reaches workers and, as a worker, is reached: the
/// cluster token, the CA certificate to trust, how long a silent peer has,
/// the HTTP/2 window. The coordinator holds one (`ClusterOptions`), a worker
/// another (`WorkerConfig`); `from_env` (in `config`) makes one from the
/// environment, and the Python bindings override it with their arguments.
#[derive(Clone)]
pub struct TransportConfig {
    /// The token sent with every call and, by a worker, required of every
    /// call; `None`: calls carry none and a worker takes any.
    pub token: Option<String>,
    /// The CA certificate (PEM) connections to workers trust, turning TLS
    /// on; `None`: plain connections (an `https://` address then fails).
    pub tls_ca: Option<String>,
    /// How long a peer may be silent before it is declared failed: one
    /// half between keepalive pings, one half waiting for the answer.
    pub failure_timeout: Duration,
    /// HTTP/2 flow-control window of each stream, in bytes: a prompt
    /// chunk's activations (megabytes) cross in one window instead of many
    /// 64 KiB round trips; `None`: HTTP/2's default of 64 KiB.
    pub h2_window: Option<u32>,
}

/// `TransportConfig::failure_timeout` unless configured.
pub const DEFAULT_FAILURE_TIMEOUT: Duration = Duration::from_secs(4);
/// `TransportConfig::h2_window` unless configured, in MiB.
pub const DEFAULT_H2_WINDOW_MB: u32 = 16;

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            token: None,
            tls_ca: None,
            failure_timeout: DEFAULT_FAILURE_TIMEOUT,
            h2_window: TransportConfig::window_of_mb(DEFAULT_H2_WINDOW_MB),
        }
    }
}

impl std::fmt::Debug for TransportConfig {
    // The token stays out of logs and debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportConfig")
            .field("token", &self.token.as_ref().map(|_| "<secret>"))
            .field(
                "tls_ca",
                &self.tls_ca.as_ref().map(|p| format!("{} bytes", p.len())),
            )
            .field("failure_timeout", &self.failure_timeout)
            .field("h2_window", &self.h2_window)
            .finish()
    }
}

impl TransportConfig {
    /// With this cluster token (empty: none).
    pub fn with_token(mut self, token: Option<String>) -> TransportConfig {
        self.token = token.filter(|t| !t.is_empty());
        self
    }

    /// Trusting this CA certificate (PEM; empty or `None`: plain
    /// connections), which is checked here.
    pub fn with_tls_ca(mut self, pem: Option<String>) -> Result<TransportConfig> {
        let pem = pem.filter(|p| !p.trim().is_empty());
        if let Some(p) = &pem {
            check_ca(p)?;
        }
        self.tls_ca = pem;
        Ok(self)
    }

    /// The window of `mb` MiB (at most 512; 0: HTTP/2's default).
    pub fn window_of_mb(mb: u32) -> Option<u32> {
        (mb > 0).then(|| mb.min(512) << 20)
    }

    /// Between keepalive pings, and how long the answer to one may take.
    pub fn keepalive_interval(&self) -> Duration {
        (self.failure_timeout / 2).max(Duration::from_millis(200))
    }

    /// What a worker's interceptor requires of every call.
    pub fn check_token(&self) -> CheckToken {
        CheckToken(self.token.clone().map(String::into_bytes))
    }

    /// What a client's interceptor adds to every call.
    fn add_token(&self) -> Result<AddToken> {
        let Some(t) = &self.token else {
            return Ok(AddToken(None));
        };
        let mut v: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
            t.parse().map_err(|_| {
                Error::InvalidArgument("the cluster token must be printable ASCII".into())
            })?;
        // Kept out of debug output and HPACK tables.
        v.set_sensitive(true);
        Ok(AddToken(Some(v)))
    }
}

/// A cluster token no one else knows (16 random bytes, hex): what a worker
/// inside this process requires when it is given none, so that no other
/// local user can drive it.
pub fn random_token() -> Result<String> {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(hex::encode(bytes))
}

/// The certificates of a PEM text, each a valid X.509 certificate.
pub(crate) fn pem_certificates(
    pem: &str,
    what: &str,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::InvalidArgument(format!("{what}: not a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{what}: no certificate in it (expected -----BEGIN CERTIFICATE-----)"
        )));
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in &certs {
        roots
            .add(c.clone())
            .map_err(|e| Error::InvalidArgument(format!("{what}: bad certificate: {e}")))?;
    }
    Ok(certs)
}

pub(crate) fn check_ca(pem: &str) -> Result<()> {
    pem_certificates(pem, "the TLS CA certificate").map(|_| ())
}

/// A worker's TLS certificate and private key, both PEM.
#[derive(Clone)]
pub struct TlsIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TlsIdentity {
    /// Checks that both parse and that the key is the certificate's.
    pub fn new(cert_pem: String, key_pem: String) -> Result<TlsIdentity> {
        use rustls::pki_types::pem::PemObject;
        let certs = pem_certificates(&cert_pem, "the TLS certificate")?;
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| {
                Error::InvalidArgument(format!("the TLS key: not a PEM private key: {e}"))
            })?;
        let provider = rustls::crypto::ring::default_provider();
        let signer = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| Error::InvalidArgument(format!("the TLS key: {e}")))?;
        rustls::sign::CertifiedKey::new(certs, signer)
            .keys_match()
            .map_err(|e| {
                Error::InvalidArgument(format!(
                    "the TLS key does not belong to the TLS certificate: {e}"
                ))
            })?;
        Ok(TlsIdentity { cert_pem, key_pem })
    }
}

impl std::fmt::Debug for TlsIdentity {
    // The key stays out of logs and debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("cert_pem", &format!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"<secret>")
            .finish()
    }
}

/// A self-signed certificate for `hosts` (DNS names or IP addresses, its
/// subject alternative names) and its private key, both PEM. Workers serve
/// it; clients trust the same certificate as their CA.
pub fn make_certificate(hosts: &[String]) -> Result<(String, String)> {
    let hosts: Vec<String> = hosts
        .iter()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .collect();
    if hosts.is_empty() {
        return Err(Error::InvalidArgument(
            "a certificate needs at least one host name or IP address".into(),
        ));
    }
    for h in &hosts {
        // What clients will check the certificate against.
        let h = h.trim_start_matches('[').trim_end_matches(']');
        if rustls::pki_types::ServerName::try_from(h).is_err() || h.len() > 253 {
            return Err(Error::InvalidArgument(format!(
                "{h:?} is neither a host name nor an IP address"
            )));
        }
    }
    let hosts: Vec<String> = hosts
        .iter()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
        .collect();
    let cert_err = |e: rcgen::Error| Error::InvalidArgument(format!("certificate: {e}"));
    let mut params = rcgen::CertificateParams::new(hosts).map_err(cert_err)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mlx-dist cluster");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().map_err(cert_err)?;
    let cert = params.self_signed(&key).map_err(cert_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// An error and its causes, as one line (tonic's transport errors say little
/// at the top).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    causes(e.to_string(), e.source())
}

/// `top`, then each cause from `src` on that does not repeat what was said.
pub(crate) fn causes(top: String, mut src: Option<&(dyn std::error::Error + 'static)>) -> String {
    let mut parts = vec![top];
    while let Some(s) = src {
        let s_text = s.to_string();
        if !parts.iter().any(|p| p.contains(&s_text)) {
            parts.push(s_text);
        }
        src = s.source();
    }
    parts.join(": ")
}

/// Adds the cluster token to every call a client makes.
#[derive(Clone)]
pub struct AddToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for AddToken {
    fn call(&mut self, mut req: Request<()>) -> std::result::Result<Request<()>, Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert(TOKEN_KEY, t.clone());
        }
        Ok(req)
    }
}

/// Refuses calls without the worker's cluster token.
#[derive(Clone)]
pub struct CheckToken(pub(crate) Option<Vec<u8>>);

impl tonic::service::Interceptor for CheckToken {
    fn call(&mut self, req: Request<()>) -> std::result::Result<Request<()>, Status> {
        let Some(want) = &self.0 else { return Ok(req) };
        let got = req
            .metadata()
            .get(TOKEN_KEY)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        // Constant-time comparison: the time taken tells nothing about the token.
        let same = got.len() == want.len()
            && got.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        if same {
            Ok(req)
        } else {
            Err(Status::unauthenticated("missing or wrong cluster token"))
        }
    }
}

/// A client of a worker, sending this process's cluster token.
pub type Client = WorkerClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, AddToken>,
>;

/// Largest gRPC message a client of a worker sends or accepts (a worker
/// refuses what is over its own `max_message_bytes`).
pub const MAX_MESSAGE_BYTES: usize = 512 << 20;

/// The TLS error a connection failed with, if it failed in TLS (rustls'
/// own error, or inside the I/O error tokio-rustls wraps it in): a
/// certificate refused, or a peer that does not speak TLS.
fn tls_failure<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut at = Some(e);
    while let Some(err) = at {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(r) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(r);
        }
        at = err.source();
    }
    None
}

/// Whether a TLS error is about a certificate (the worker's refused here,
/// or the worker refusing the handshake with a certificate alert), rather
/// than a peer that does not speak TLS at all.
fn is_certificate_error(e: &rustls::Error) -> bool {
    use rustls::AlertDescription as A;
    match e {
        rustls::Error::InvalidCertificate(_)
        | rustls::Error::NoCertificatesPresented
        | rustls::Error::UnsupportedNameType => true,
        rustls::Error::AlertReceived(a) => matches!(
            a,
            A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
                | A::AccessDenied
                | A::HandshakeFailure
        ),
        _ => false,
    }
}

/// Opens a channel to another worker (the next stage, or from the
/// coordinator), carrying `transport`'s cluster token.
///
/// With a CA certificate (`TransportConfig::tls_ca`) the connection is TLS,
/// and the worker's certificate must come from that CA and name the
/// address's host; `http://` before the address forces a plain connection.
pub async fn connect(addr: &str, timeout: Duration, transport: &TransportConfig) -> Result<Client> {
    open_client(addr, timeout, true, transport).await
}

/// `connect`; with `probe`, a plain connection is tried with one health
/// check first, so that a TLS worker reached without TLS says so now (a
/// plain HTTP/2 client learns it only at its first call).
pub(crate) async fn open_client(
    addr: &str,
    timeout: Duration,
    probe: bool,
    transport: &TransportConfig,
) -> Result<Client> {
    let ca = transport.tls_ca.clone();
    let token = transport.add_token()?;
    let (tls, rest) = if let Some(rest) = addr.strip_prefix("http://") {
        (None, rest)
    } else if let Some(rest) = addr.strip_prefix("https://") {
        let ca = ca.ok_or_else(|| {
            Error::InvalidArgument(format!(
                "worker {addr}: https:// needs the CA certificate to trust (tls_ca= or --tls-ca)"
            ))
        })?;
        (Some(ca), rest)
    } else {
        (ca, addr)
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{rest}"))
        .map_err(|e| Error::InvalidArgument(format!("bad worker address {addr:?}: {e}")))?;
    let host = endpoint
        .uri()
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if let Some(ca) = &tls {
        let config = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name(host.clone())
            .timeout(timeout);
        endpoint = endpoint.tls_config(config).map_err(|e| {
            Error::InvalidArgument(format!("worker {addr}: TLS: {}", error_chain(&e)))
        })?;
    }
    let endpoint = endpoint
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(transport.keepalive_interval())
        .keep_alive_timeout(transport.keepalive_interval())
        .keep_alive_while_idle(true)
        .initial_stream_window_size(transport.h2_window)
        .initial_connection_window_size(transport.h2_window.map(|w| w.saturating_mul(2)));
    let channel = tokio::time::timeout(timeout, endpoint.connect())
        .await
        .map_err(|_| {
            Error::stage_failed(
                addr,
                addr,
                format!("no connection within {:.1} s", timeout.as_secs_f64()),
            )
        })?
        .map_err(|e| {
            let why = error_chain(&e);
            match tls_failure(&e) {
                Some(t) if is_certificate_error(t) => Error::Tls {
                    address: addr.to_string(),
                    detail: format!(
                        "TLS refused: {why} (the worker's certificate must be signed by the CA given with tls_ca/--tls-ca and name {host})"
                    ),
                },
                Some(_) => Error::Tls {
                    address: addr.to_string(),
                    detail: format!("does not serve TLS: {why} (plain workers need no tls_ca)"),
                },
                None if tls.is_none() => {
                    Error::stage_failed(addr, addr, format!("unreachable: {why}"))
                }
                None => Error::stage_failed(addr, addr, format!("unreachable over TLS: {why}")),
            }
        })?;
    if probe && tls.is_none() {
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let check = health.check(tonic_health::pb::HealthCheckRequest::default());
        let refused = match tokio::time::timeout(timeout, check).await {
            Err(_) => {
                return Err(Error::stage_failed(
                    addr,
                    addr,
                    format!("no answer within {:.1} s", timeout.as_secs_f64()),
                ))
            }
            // A gRPC answer of any kind (even "no health service") will do.
            // Transport failures carry their cause; a server's answer does not.
            Ok(Err(s))
                if std::error::Error::source(&s).is_some()
                    || matches!(
                        s.code(),
                        tonic::Code::Unknown | tonic::Code::Unavailable | tonic::Code::Cancelled
                    ) =>
            {
                Some(causes(
                    s.message().to_string(),
                    std::error::Error::source(&s),
                ))
            }
            Ok(_) => None,
        };
        if let Some(why) = refused {
            // The connection was made, yet its first call broke: the worker
            // speaks TLS to this plain client.
            return Err(Error::Tls {
                address: addr.to_string(),
                detail: format!(
                    "does not answer plain gRPC: {why} (if it serves TLS, trust its certificate with tls_ca= or --tls-ca)"
                ),
            });
        }
    }
    Ok(WorkerClient::with_interceptor(channel, token)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stages a coordinator knows: a refusal naming one of these
    /// addresses is that stage's, the rest the called stage's ("w0").
    fn known(from: Option<&str>) -> (String, String) {
        match from {
            None => ("w0".into(), "10.0.0.1:7000".into()),
            Some("10.0.0.2:7000") => ("w1".into(), "10.0.0.2:7000".into()),
            Some(a) => (a.into(), a.into()),
        }
    }

    fn round_trip(e: Error) -> Error {
        error_of(status_of(e), known)
    }

    #[test]
    fn every_kind_a_worker_answers_with_comes_back_as_itself() {
        let full = round_trip(Error::KvBudgetFull("no room now".into()));
        assert!(
            matches!(&full, Error::KvBudgetFull(m) if m == "no room now"),
            "{full:?}"
        );
        let over = round_trip(Error::KvBudgetExceeded {
            need: 3 << 30,
            budget: 2 << 20,
            detail: "too long".into(),
        });
        assert!(
            matches!(&over, Error::KvBudgetExceeded { need, budget, detail }
                if *need == 3 << 30 && *budget == 2 << 20 && detail == "too long"),
            "{over:?}"
        );
        let oom = round_trip(Error::ResourceExhausted("over the limit".into()));
        assert!(matches!(oom, Error::ResourceExhausted(_)), "{oom:?}");
        let missing = round_trip(Error::PrefixMissing("not kept".into()));
        assert!(matches!(missing, Error::PrefixMissing(_)), "{missing:?}");
        let unready = round_trip(Error::NotReady("holds no model".into()));
        assert!(
            matches!(&unready, Error::NotReady(m) if m == "worker w0 (10.0.0.1:7000): holds no model"),
            "{unready:?}"
        );
        let stalled = round_trip(Error::Stalled("lost".into()));
        assert!(matches!(stalled, Error::Stalled(_)), "{stalled:?}");
        let bad = round_trip(Error::InvalidArgument("bad shape".into()));
        assert!(matches!(bad, Error::InvalidArgument(_)), "{bad:?}");
        let gone = round_trip(Error::NotFound("no such model".into()));
        assert!(matches!(gone, Error::NotFound(_)), "{gone:?}");
        let tls = round_trip(Error::Tls {
            address: "10.0.0.2:7000".into(),
            detail: "TLS refused".into(),
        });
        assert!(
            matches!(&tls, Error::Tls { address, detail }
                if address == "10.0.0.2:7000" && detail == "TLS refused"),
            "{tls:?}"
        );
    }

    #[test]
    fn a_failed_stage_is_named_by_its_address_and_the_plans_name_for_it() {
        // Found by the relay, which knows only the next stage's address.
        let e = round_trip(Error::stage_failed(
            "10.0.0.2:7000",
            "10.0.0.2:7000",
            "its stream ended",
        ));
        match &e {
            Error::StageFailed {
                stage,
                address,
                cause,
            } => {
                assert_eq!((stage.as_str(), address.as_str()), ("w1", "10.0.0.2:7000"));
                assert_eq!(cause, "its stream ended");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(e.to_string(), "worker w1 (10.0.0.2:7000): its stream ended");
        // A stage the plan does not know keeps the name the refusal gives.
        let e = round_trip(Error::stage_failed("w9", "10.0.0.9:7000", "gone"));
        assert!(
            matches!(&e, Error::StageFailed { stage, address, .. }
                if stage == "w9" && address == "10.0.0.9:7000"),
            "{e:?}"
        );
        // The worker inside this process is named without its address.
        let e = error_of(Status::unavailable("broken pipe"), |_| {
            ("local".into(), String::new())
        });
        assert_eq!(e.to_string(), "worker local: broken pipe");
    }

    #[test]
    fn a_refusal_without_a_kind_is_the_failure_of_the_stage_it_comes_from() {
        // The called stage's own: its transport broke, or it failed inside.
        for s in [
            Status::unavailable("connection reset"),
            Status::unknown("h2 protocol error"),
            Status::internal("MLX error"),
            Status::unauthenticated("missing or wrong cluster token"),
        ] {
            let code = s.code();
            let e = error_of(s, known);
            assert!(
                matches!(&e, Error::StageFailed { stage, .. } if stage == "w0"),
                "{code:?}: {e:?}"
            );
        }
        // Passed up the chain from the next stage: that stage's, kind kept.
        let below = from_next_stage(Status::internal("MLX error"), "10.0.0.2:7000");
        let e = error_of(below, known);
        assert!(
            matches!(&e, Error::StageFailed { stage, .. } if stage == "w1"),
            "{e:?}"
        );
        let full = from_next_stage(
            status_of(Error::KvBudgetFull("no room".into())),
            "10.0.0.2:7000",
        );
        assert!(matches!(error_of(full, known), Error::KvBudgetFull(_)));
        let unready = from_next_stage(Status::failed_precondition("unknown"), "10.0.0.2:7000");
        let e = error_of(unready, known);
        assert!(
            matches!(&e, Error::NotReady(m) if m.starts_with("worker w1 (10.0.0.2:7000)")),
            "{e:?}"
        );
        // A refusal that already names its stage keeps it on the way up.
        let deeper = status_of(Error::stage_failed(
            "10.0.0.3:7000",
            "10.0.0.3:7000",
            "gone",
        ));
        let e = error_of(from_next_stage(deeper, "10.0.0.2:7000"), known);
        assert!(
            matches!(&e, Error::StageFailed { address, .. } if address == "10.0.0.3:7000"),
            "{e:?}"
        );
    }

    #[test]
    fn names_that_are_not_ascii_travel_too() {
        let e = round_trip(Error::stage_failed("wörker-ü", "10.0.0.9:7000", "gone"));
        assert!(
            matches!(&e, Error::StageFailed { stage, .. } if stage == "wörker-ü"),
            "{e:?}"
        );
    }
}
