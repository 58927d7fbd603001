//! Settings from the environment: the one place in the crate that reads
//! `MLX_DIST_*` variables (`tests/test_layout.py` fails on any other).
//!
//! Everything else takes its settings as values: `TransportConfig` (how to
//! reach workers), `WorkerConfig` (a worker) and `ClusterOptions` (the
//! coordinator). Their `from_env` are made here; the Python bindings call
//! them and override what their arguments give, so every variable is the
//! default of an argument (and of a command-line flag) of the same name.
//!
//! Each reader takes a `Lookup` (a variable's value by its name): the
//! process's environment, or in tests a map of their own, so that tests
//! neither race on the environment nor depend on the one they run in.
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use crate::coordinator::ClusterOptions;
use crate::error::{Error, Result};
use crate::transport::TransportConfig;
use crate::worker::WorkerConfig;

/// The cluster token sent and, by a worker, required.
pub const TOKEN: &str = "MLX_DIST_TOKEN";
/// A PEM file: the CA certificate connections to workers trust.
pub const TLS_CA: &str = "MLX_DIST_TLS_CA";
/// Seconds a peer may be silent before it is declared failed.
pub const FAILURE_TIMEOUT: &str = "MLX_DIST_FAILURE_TIMEOUT";
/// The HTTP/2 window of each stream, in MiB.
pub const H2_WINDOW_MB: &str = "MLX_DIST_H2_WINDOW_MB";
/// Seconds the coordinator waits for a step's reply before asking the
/// stages whether they still answer.
pub const STEP_TIMEOUT: &str = "MLX_DIST_STEP_TIMEOUT";
/// Microseconds a worker polls for a step's result before it sleeps.
pub const STEP_SPIN_US: &str = "MLX_DIST_STEP_SPIN_US";
/// `1` or `0`: a worker launches decode steps ahead of their input.
pub const LAUNCH_AHEAD: &str = "MLX_DIST_LAUNCH_AHEAD";
/// `1` or `0`: a worker compiles its stage's GPU kernels as it loads.
pub const WARM_UP: &str = "MLX_DIST_WARM_UP";
/// MiB of KV cache kept from ended sequences for later prompts.
pub const PREFIX_CACHE_MB: &str = "MLX_DIST_PREFIX_CACHE_MB";
/// The folder a worker keeps pushed models in (under `models/`).
pub const CACHE: &str = "MLX_DIST_CACHE";
/// The log filter (`tracing_subscriber`'s directives).
pub const LOG: &str = "MLX_DIST_LOG";

/// Every variable read here.
pub const VARIABLES: [&str; 11] = [
    TOKEN,
    TLS_CA,
    FAILURE_TIMEOUT,
    H2_WINDOW_MB,
    STEP_TIMEOUT,
    STEP_SPIN_US,
    LAUNCH_AHEAD,
    WARM_UP,
    PREFIX_CACHE_MB,
    CACHE,
    LOG,
];

/// A variable's value by its name.
pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<OsString>;

/// The process's environment.
pub fn process_env(name: &str) -> Option<OsString> {
    std::env::var_os(name)
}

/// A variable's text; `None` when unset or not UTF-8.
fn text(get: Lookup, name: &str) -> Option<String> {
    get(name).and_then(|v| v.into_string().ok())
}

/// A positive number of seconds, else `default`.
fn seconds(get: Lookup, name: &str, default: Duration) -> Duration {
    text(get, name)
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .and_then(|v| Duration::try_from_secs_f64(v).ok())
        .unwrap_or(default)
}

/// `1` or `0`, else `default` (with a warning when it is something else).
fn switch(get: Lookup, name: &str, default: bool) -> bool {
    match text(get, name).as_deref().map(str::trim) {
        None => default,
        Some("1") => true,
        Some("0") => false,
        Some(other) => {
            tracing::warn!("{name}={other:?} is neither 0 nor 1; using the default ({default})");
            default
        }
    }
}

impl TransportConfig {
    /// `MLX_DIST_TOKEN`, `MLX_DIST_TLS_CA` (a PEM file, read and checked
    /// now), `MLX_DIST_FAILURE_TIMEOUT` (seconds) and
    /// `MLX_DIST_H2_WINDOW_MB`, defaults for what is unset.
    pub fn from_env() -> Result<TransportConfig> {
        TransportConfig::from_lookup(&process_env, None)
    }

    /// `from_env`, trusting `ca` instead of what `MLX_DIST_TLS_CA` names
    /// when it is given (`Some(None)`: plain connections), so that a given
    /// certificate never depends on that file.
    pub fn from_env_with_ca(ca: Option<Option<String>>) -> Result<TransportConfig> {
        TransportConfig::from_lookup(&process_env, ca)
    }

    pub fn from_lookup(get: Lookup, ca: Option<Option<String>>) -> Result<TransportConfig> {
        let d = TransportConfig::default();
        let ca = match ca {
            Some(ca) => ca,
            None => match get(TLS_CA).filter(|p| !p.is_empty()) {
                None => None,
                Some(path) => {
                    let path = PathBuf::from(path);
                    let pem = std::fs::read_to_string(&path).map_err(|e| {
                        Error::InvalidArgument(format!("{TLS_CA} {}: {e}", path.display()))
                    })?;
                    crate::transport::check_ca(&pem)?;
                    Some(pem)
                }
            },
        };
        let h2_window = match text(get, H2_WINDOW_MB).and_then(|v| v.trim().parse::<u32>().ok()) {
            Some(mb) => TransportConfig::window_of_mb(mb),
            None => d.h2_window,
        };
        TransportConfig {
            failure_timeout: seconds(get, FAILURE_TIMEOUT, d.failure_timeout),
            h2_window,
            ..d
        }
        .with_token(text(get, TOKEN))
        .with_tls_ca(ca)
    }
}

/// The bound of the prefix cache of a model held in this process (a worker
/// or a model on one device), in bytes: `MLX_DIST_PREFIX_CACHE_MB`
/// megabytes, else `prefix::DEFAULT_BUDGET_MB` (0 turns it off).
pub fn prefix_cache_bytes(get: Lookup) -> u64 {
    use crate::prefix::DEFAULT_BUDGET_MB;
    let mb = match text(get, PREFIX_CACHE_MB) {
        None => DEFAULT_BUDGET_MB,
        Some(v) => v.trim().parse::<u64>().unwrap_or_else(|_| {
            tracing::warn!(
                "{PREFIX_CACHE_MB}={v:?} is not a number of megabytes: {DEFAULT_BUDGET_MB} is used"
            );
            DEFAULT_BUDGET_MB
        }),
    };
    mb.saturating_mul(1 << 20)
}

/// `prefix_cache_bytes` of the process's environment.
pub fn prefix_cache_bytes_from_env() -> u64 {
    prefix_cache_bytes(&process_env)
}

/// The log filter `MLX_DIST_LOG` gives, if any.
pub fn log_filter_from_env() -> Option<String> {
    text(&process_env, LOG)
}

impl WorkerConfig {
    /// The worker `name` as the environment configures it: `from_lookup`
    /// of the process's environment.
    pub fn from_env(name: &str) -> Result<WorkerConfig> {
        let transport = TransportConfig::from_env()?;
        Ok(WorkerConfig::from_env_with(name, transport))
    }

    /// `from_env`, reaching other workers (and requiring the token) as
    /// `transport` says.
    pub fn from_env_with(name: &str, transport: TransportConfig) -> WorkerConfig {
        WorkerConfig::from_lookup(name, &process_env, transport)
    }

    /// `WorkerConfig::new(name)` with what the variables set:
    /// `MLX_DIST_CACHE` (pushed models go in its `models/`),
    /// `MLX_DIST_PREFIX_CACHE_MB`, `MLX_DIST_WARM_UP`,
    /// `MLX_DIST_STEP_SPIN_US` (at most a second) and
    /// `MLX_DIST_LAUNCH_AHEAD`.
    pub fn from_lookup(name: &str, get: Lookup, transport: TransportConfig) -> WorkerConfig {
        let d = WorkerConfig::new(name);
        let spin = text(get, STEP_SPIN_US)
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(d.spin, crate::worker::spin_of_micros);
        WorkerConfig {
            cache_dir: get(CACHE)
                .map(|c| crate::worker::pushed_models_dir(&PathBuf::from(c)))
                .unwrap_or_else(|| d.cache_dir.clone()),
            prefix_cache_bytes: prefix_cache_bytes(get),
            warm_up: switch(get, WARM_UP, d.warm_up),
            spin,
            launch_ahead: switch(get, LAUNCH_AHEAD, d.launch_ahead),
            transport,
            ..d
        }
    }
}

impl ClusterOptions {
    /// The coordinator's options as the environment configures them:
    /// `from_lookup` of the process's environment.
    pub fn from_env() -> Result<ClusterOptions> {
        let transport = TransportConfig::from_env()?;
        Ok(ClusterOptions::from_env_with(transport))
    }

    /// `from_env`, reaching the workers as `transport` says.
    pub fn from_env_with(transport: TransportConfig) -> ClusterOptions {
        ClusterOptions::from_lookup(&process_env, transport)
    }

    /// The defaults with what the variables set: `MLX_DIST_STEP_TIMEOUT`
    /// (seconds).
    pub fn from_lookup(get: Lookup, transport: TransportConfig) -> ClusterOptions {
        let d = ClusterOptions::default();
        ClusterOptions {
            step_timeout: seconds(get, STEP_TIMEOUT, d.step_timeout),
            transport,
            ..d
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let vars: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |name| vars.get(name).cloned()
    }

    #[test]
    fn from_env_reads_each_variable() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = crate::transport::make_certificate(&["localhost".into()]).unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, &cert).unwrap();
        let vars = [
            (TOKEN, "s3cret"),
            (TLS_CA, ca.to_str().unwrap()),
            (FAILURE_TIMEOUT, "1.5"),
            (H2_WINDOW_MB, "2"),
            (STEP_TIMEOUT, "0.25"),
            (STEP_SPIN_US, "70"),
            (LAUNCH_AHEAD, "1"),
            (WARM_UP, "1"),
            (PREFIX_CACHE_MB, "3"),
            (CACHE, "/tmp/elsewhere"),
            (LOG, "debug"),
        ];
        // The test names every variable there is.
        let mut named: Vec<&str> = vars.iter().map(|(k, _)| *k).collect();
        let mut all = VARIABLES.to_vec();
        named.sort();
        all.sort();
        assert_eq!(named, all);
        let get = lookup(&vars);

        let t = TransportConfig::from_lookup(&get, None).unwrap();
        assert_eq!(t.token.as_deref(), Some("s3cret"));
        assert_eq!(t.tls_ca.as_deref(), Some(cert.as_str()));
        assert_eq!(t.failure_timeout, Duration::from_millis(1500));
        assert_eq!(t.h2_window, Some(2 << 20));

        let w = WorkerConfig::from_lookup("w", &get, t.clone());
        assert_eq!(w.name, "w");
        assert_eq!(w.cache_dir, PathBuf::from("/tmp/elsewhere/models"));
        assert_eq!(w.prefix_cache_bytes, 3 << 20);
        assert!(w.warm_up && w.launch_ahead);
        assert_eq!(w.spin, Duration::from_micros(70));
        assert_eq!(w.transport.token.as_deref(), Some("s3cret"));

        let c = ClusterOptions::from_lookup(&get, t);
        assert_eq!(c.step_timeout, Duration::from_millis(250));
        assert_eq!(c.transport.h2_window, Some(2 << 20));

        // The other way round, where the defaults are on.
        let get = lookup(&[(LAUNCH_AHEAD, "0"), (WARM_UP, " 0\n"), (H2_WINDOW_MB, "0")]);
        let w = WorkerConfig::from_lookup("w", &get, TransportConfig::default());
        assert!(!w.warm_up && !w.launch_ahead);
        let t = TransportConfig::from_lookup(&get, None).unwrap();
        assert_eq!(t.h2_window, None);
    }

    #[test]
    fn unset_or_unusable_variables_leave_the_defaults() {
        let defaults = (
            TransportConfig::default(),
            WorkerConfig::new("w"),
            ClusterOptions::default(),
        );
        for vars in [
            vec![],
            vec![
                (TOKEN, ""),
                (TLS_CA, ""),
                (FAILURE_TIMEOUT, "-1"),
                (H2_WINDOW_MB, "lots"),
                (STEP_TIMEOUT, "inf"),
                (STEP_SPIN_US, "-5"),
                (LAUNCH_AHEAD, "yes"),
                (WARM_UP, ""),
                (PREFIX_CACHE_MB, "a gigabyte"),
            ],
        ] {
            let get = lookup(&vars);
            let t = TransportConfig::from_lookup(&get, None).unwrap();
            assert_eq!(format!("{t:?}"), format!("{:?}", defaults.0));
            let w = WorkerConfig::from_lookup("w", &get, t.clone());
            assert_eq!(format!("{w:?}"), format!("{:?}", defaults.1));
            let c = ClusterOptions::from_lookup(&get, t);
            assert_eq!(format!("{c:?}"), format!("{:?}", defaults.2));
        }
        assert_eq!(
            WorkerConfig::new("w").prefix_cache_bytes,
            crate::prefix::DEFAULT_BUDGET_MB << 20
        );
        assert_eq!(
            TransportConfig::default().failure_timeout,
            Duration::from_secs(4)
        );
        assert_eq!(TransportConfig::default().h2_window, Some(16 << 20));
        assert_eq!(
            ClusterOptions::default().step_timeout,
            Duration::from_secs(30)
        );
    }

    #[test]
    fn a_given_ca_is_used_instead_of_the_variables_file() {
        let get = lookup(&[(TLS_CA, "/no/such/ca.pem")]);
        let err = TransportConfig::from_lookup(&get, None).unwrap_err();
        assert!(err.to_string().contains("/no/such/ca.pem"), "{err}");
        let plain = TransportConfig::from_lookup(&get, Some(None)).unwrap();
        assert!(plain.tls_ca.is_none());
        let bad = TransportConfig::from_lookup(&get, Some(Some("not a certificate".into())));
        assert!(bad.is_err());
    }

    #[test]
    fn the_token_stays_out_of_debug_output() {
        let t = TransportConfig::default().with_token(Some("s3cret".into()));
        let opts = ClusterOptions {
            transport: t.clone(),
            ..Default::default()
        };
        let w = WorkerConfig {
            transport: t,
            ..WorkerConfig::new("w")
        };
        for shown in [format!("{opts:?}"), format!("{w:?}")] {
            assert!(
                !shown.contains("s3cret") && shown.contains("<secret>"),
                "{shown}"
            );
        }
    }
}
