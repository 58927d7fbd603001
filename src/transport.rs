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

/// The metadata key of a refusal that names its kind, and the kind of a
/// step refused because the prefix it starts from is not kept here
/// (`Error::PrefixMissing`): the kind travels as data, not as words.
pub const ERROR_KIND_KEY: &str = "x-mlx-dist-error";
pub const PREFIX_MISSING: &str = "prefix-missing";
/// The kind of a sequence that needs more KV cache than a stage's whole
/// budget (`Error::KvBudgetExceeded`), with the bytes in these keys.
pub const KV_BUDGET_EXCEEDED: &str = "kv-budget-exceeded";
pub const NEED_KEY: &str = "x-mlx-dist-need-bytes";
pub const BUDGET_KEY: &str = "x-mlx-dist-budget-bytes";

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

/// Words of `connect`'s errors that retrying does not mend.
const TLS_REFUSED: &str = "TLS refused";
const NOT_TLS: &str = "does not serve TLS";
const NOT_PLAIN: &str = "does not answer plain gRPC";

/// Whether `e`, from `connect`, says that TLS does not match (the worker's
/// certificate was refused, or one side speaks TLS and the other not):
/// connecting again will not help, unlike a worker that is not up yet.
pub fn is_tls_mismatch(e: &Error) -> bool {
    matches!(e, Error::Worker(m) if [TLS_REFUSED, NOT_TLS, NOT_PLAIN].iter().any(|w| m.contains(w)))
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
            Error::Worker(format!(
                "worker {addr}: no connection within {:.1} s",
                timeout.as_secs_f64()
            ))
        })?
        .map_err(|e| {
            let why = error_chain(&e);
            if tls.is_none() {
                Error::Worker(format!("worker {addr} is unreachable: {why}"))
            } else if why.contains("certificate") || why.contains("CertificateUnknown") {
                Error::Worker(format!(
                    "worker {addr}: {TLS_REFUSED}: {why} (the worker's certificate must be signed by the CA given with tls_ca/--tls-ca and name {host})"
                ))
            } else if why.contains("corrupt message") || why.contains("HTTP/2 was not negotiated")
            {
                Error::Worker(format!(
                    "worker {addr} {NOT_TLS}: {why} (plain workers need no tls_ca)"
                ))
            } else {
                Error::Worker(format!("worker {addr} is unreachable over TLS: {why}"))
            }
        })?;
    if probe && tls.is_none() {
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let check = health.check(tonic_health::pb::HealthCheckRequest::default());
        let refused = match tokio::time::timeout(timeout, check).await {
            Err(_) => {
                return Err(Error::Worker(format!(
                    "worker {addr}: no answer within {:.1} s",
                    timeout.as_secs_f64()
                )))
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
            return Err(Error::Worker(format!(
                "worker {addr} {NOT_PLAIN}: {why} (if it serves TLS, trust its certificate with tls_ca= or --tls-ca)"
            )));
        }
    }
    Ok(WorkerClient::with_interceptor(channel, token)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}
