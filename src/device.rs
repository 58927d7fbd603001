//! What a device can do: its chip and memory (from MLX and the operating
//! system) and its measured matmul and memory-bandwidth throughput. The
//! planner (`sharding`) weighs devices by these figures; workers report them
//! in `DeviceInfo`.
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::mlx::{self, Array, DeviceInfoValue, Dtype};

/// A device's description. Every field defaults, so a cluster config may
/// declare only some of them (e.g. the memory a worker may use).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Capabilities {
    /// The name the worker was started with, or the host name.
    pub name: String,
    /// "cpu" or "gpu": where MLX computes.
    pub device_type: String,
    /// Chip or GPU model name, e.g. "Apple M2 Max" or "NVIDIA H100 80GB HBM3".
    pub chip: String,
    /// GPU cores where the operating system tells (Apple Silicon), else 0.
    pub gpu_cores: u32,
    /// Memory usable by MLX, in bytes (unified, GPU or host memory).
    pub memory_total: u64,
    /// Of which free now, in bytes.
    pub memory_available: u64,
    /// Measured dense matmul throughput, GFLOP/s.
    pub matmul_gflops: f64,
    /// Measured memory bandwidth, GB/s.
    pub bandwidth_gbs: f64,
}

/// Describes the default MLX device without benchmarking it.
///
/// Memory: on CUDA, MLX's `total_memory` and `free_memory` (plus the buffers
/// MLX keeps cached for reuse). On Apple GPUs (unified memory) the total is
/// `memory_size`, and what is available is Metal's recommended working set
/// less what MLX holds now, capped by what the OS reports free
/// (`vm_stat`) plus MLX's cache. On the CPU, the host's memory:
/// `/proc/meminfo` (MemTotal, MemAvailable) on Linux, `sysctl hw.memsize`
/// and `vm_stat` on macOS.
pub fn probe(name: &str) -> Result<Capabilities> {
    let info = mlx::device_info()?;
    let text = |k: &str| match info.get(k) {
        Some(DeviceInfoValue::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
        _ => None,
    };
    let size = |k: &str| match info.get(k) {
        Some(DeviceInfoValue::Size(n)) => Some(*n),
        _ => None,
    };
    let gpu = mlx::default_device_is_gpu();
    let cached = mlx::cache_memory() as u64;
    let host = host_memory();
    let (memory_total, memory_available) = match size("total_memory").or(size("memory_size")) {
        Some(total) if gpu => {
            let available = match size("free_memory") {
                Some(free) => free + cached,
                None => {
                    let limit = size("max_recommended_working_set_size").unwrap_or(total);
                    let mut a = limit.saturating_sub(mlx::active_memory() as u64);
                    if let Some((_, free)) = host {
                        a = a.min(free + cached);
                    }
                    a
                }
            };
            (total, available.min(total))
        }
        _ => host.unwrap_or((0, 0)),
    };
    let chip = text("device_name")
        .or_else(|| text("architecture"))
        .unwrap_or_default();
    let apple = cfg!(target_os = "macos") && gpu;
    Ok(Capabilities {
        name: if name.is_empty() {
            host_name()
        } else {
            name.to_string()
        },
        device_type: if gpu { "gpu" } else { "cpu" }.to_string(),
        chip,
        gpu_cores: if apple {
            apple_gpu_cores().unwrap_or(0)
        } else {
            0
        },
        memory_total,
        memory_available,
        matmul_gflops: 0.0,
        bandwidth_gbs: 0.0,
    })
}

/// Seconds per timed run below which a benchmark grows its problem size, so
/// that timer and dispatch overheads stay small against the work.
const MIN_RUN_SECONDS: f64 = 0.004;

/// A short MLX micro-benchmark of the default device: (matmul GFLOP/s,
/// memory bandwidth GB/s).
///
/// Matmul: square float32 (CPU) or bfloat16 (GPU) products, grown from
/// 256x256 until one takes a few milliseconds (at most 1024 on the CPU, 8192
/// on a GPU), then the median of 5 timed runs after 2 warm-ups. Bandwidth: an
/// elementwise float32 add `c = a + b` over arrays grown from 32 MiB (CPU) or
/// 64 MiB (GPU) up to 128 MiB / 1 GiB, counting the bytes read and written.
/// Takes well under a second on a small CPU; buffers are returned to the
/// system afterwards.
pub fn benchmark() -> Result<(f64, f64)> {
    let gpu = mlx::default_device_is_gpu();
    let result = matmul_gflops(gpu).and_then(|g| Ok((g, bandwidth_gbs(gpu)?)));
    mlx::clear_cache();
    result
}

/// `probe` plus the benchmark figures. The benchmark runs once per process
/// (the first call); later calls reuse its figures and only probe memory
/// again.
pub fn capabilities(name: &str) -> Result<Capabilities> {
    with_throughput(probe(name)?, false)
}

/// As `capabilities`, but runs the benchmark again and keeps the new figures.
pub fn remeasure(name: &str) -> Result<Capabilities> {
    with_throughput(probe(name)?, true)
}

/// The process-wide benchmark figures. A mutex (not a `OnceLock`) so that
/// `remeasure` can replace them; holding it while measuring makes concurrent
/// first callers wait for one run instead of running several at once.
static MEASURED: Mutex<Option<(f64, f64)>> = Mutex::new(None);

fn with_throughput(mut caps: Capabilities, again: bool) -> Result<Capabilities> {
    let mut m = MEASURED.lock().unwrap_or_else(|e| e.into_inner());
    let (gflops, gbs) = match *m {
        Some(v) if !again => v,
        _ => {
            let v = benchmark()?;
            *m = Some(v);
            v
        }
    };
    caps.matmul_gflops = gflops;
    caps.bandwidth_gbs = gbs;
    Ok(caps)
}

/// Values in [0, 1) laid out contiguously (not a broadcast constant, which
/// MLX would read as a single element), evaluated.
fn filled(n: usize, shape: &[i32], dtype: Dtype) -> Result<Array> {
    let a = Array::arange(0.0, n as f64, 1.0, Dtype::Float32)?
        .mul_scalar(1.0 / n as f64)?
        .astype(dtype)?
        .reshape(shape)?;
    a.eval()?;
    Ok(a)
}

/// The median wall time of `runs` evaluations of `op`, after `warmup`.
fn median_seconds(op: impl Fn() -> Result<Array>, warmup: usize, runs: usize) -> Result<f64> {
    for _ in 0..warmup {
        op()?.eval()?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        op()?.eval()?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(median(&mut times))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn matmul_gflops(gpu: bool) -> Result<f64> {
    let (dtype, max_n) = if gpu {
        (Dtype::Bfloat16, 8192)
    } else {
        (Dtype::Float32, 1024)
    };
    let mut n: usize = 256;
    loop {
        let a = filled(n * n, &[n as i32, n as i32], dtype)?;
        let b = a.t()?.contiguous()?;
        b.eval()?;
        let op = || a.matmul(&b);
        if n >= max_n || median_seconds(op, 1, 1)? >= MIN_RUN_SECONDS {
            let t = median_seconds(op, 2, 5)?;
            return Ok(2.0 * (n as f64).powi(3) / t.max(1e-9) / 1e9);
        }
        n *= 2;
    }
}

fn bandwidth_gbs(gpu: bool) -> Result<f64> {
    let (mut bytes, max_bytes): (usize, usize) = if gpu {
        (64 << 20, 1 << 30)
    } else {
        (32 << 20, 128 << 20)
    };
    loop {
        let n = bytes / 4;
        let a = filled(n, &[n as i32], Dtype::Float32)?;
        let b = a.add_scalar(1.0)?;
        b.eval()?;
        let op = || a.add(&b);
        if bytes >= max_bytes || median_seconds(op, 1, 1)? >= MIN_RUN_SECONDS {
            let t = median_seconds(op, 2, 5)?;
            return Ok(3.0 * bytes as f64 / t.max(1e-9) / 1e9);
        }
        bytes *= 2;
    }
}

/// (total, available) bytes of host memory, where the OS tells.
fn host_memory() -> Option<(u64, u64)> {
    if cfg!(target_os = "macos") {
        let total = command_output("sysctl", &["-n", "hw.memsize"])?
            .trim()
            .parse::<u64>()
            .ok()?;
        let available = command_output("vm_stat", &[])
            .and_then(|s| parse_vm_stat(&s))
            .unwrap_or(0);
        Some((total, available.min(total)))
    } else {
        parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
    }
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// MemTotal and MemAvailable of `/proc/meminfo`, in bytes.
fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    let total = field("MemTotal")?;
    // Kernels before 3.14 have no MemAvailable; free + page cache is close.
    let available = field("MemAvailable")
        .or_else(|| Some(field("MemFree")? + field("Cached").unwrap_or(0)))
        .unwrap_or(0);
    Some((total, available.min(total)))
}

/// Bytes free or reclaimable without swapping (free + inactive +
/// speculative pages) from `vm_stat`'s output.
fn parse_vm_stat(text: &str) -> Option<u64> {
    let page_size = text
        .split("page size of ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse::<u64>()
        .ok()?;
    let pages = |name: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name)?.trim().strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches('.').parse::<u64>().ok())
            .unwrap_or(0)
    };
    let n = pages("Pages free") + pages("Pages inactive") + pages("Pages speculative");
    Some(n * page_size)
}

fn apple_gpu_cores() -> Option<u32> {
    command_output("ioreg", &["-rc", "AGXAccelerator"])
        .and_then(|s| parse_gpu_cores(&s))
        .or_else(|| {
            command_output("system_profiler", &["SPDisplaysDataType"])
                .and_then(|s| parse_gpu_cores(&s))
        })
}

/// The GPU core count in `ioreg -rc AGXAccelerator` (`"gpu-core-count" =
/// 38`) or `system_profiler SPDisplaysDataType` (`Total Number of Cores: 38`)
/// output.
fn parse_gpu_cores(text: &str) -> Option<u32> {
    text.lines().find_map(|l| {
        let l = l.trim();
        let value = l
            .strip_prefix("\"gpu-core-count\"")
            .and_then(|r| r.trim().strip_prefix('='))
            .or_else(|| {
                l.strip_prefix("Total Number of Cores")
                    .and_then(|r| r.trim().strip_prefix(':'))
            })?;
        value.trim().parse().ok()
    })
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| command_output("hostname", &[]))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_describes_this_machine() {
        let c = probe("w0").unwrap();
        assert_eq!(c.name, "w0");
        assert!(c.device_type == "cpu" || c.device_type == "gpu");
        assert!(!c.chip.is_empty(), "{c:?}");
        assert!(c.memory_total > 0, "{c:?}");
        assert!(
            c.memory_available > 0 && c.memory_available <= c.memory_total,
            "{c:?}"
        );
        // No benchmark in a probe.
        assert_eq!((c.matmul_gflops, c.bandwidth_gbs), (0.0, 0.0));
        assert!(!probe("").unwrap().name.is_empty());
    }

    #[test]
    fn device_info_has_a_name() {
        let info = mlx::device_info().unwrap();
        assert!(
            info.contains_key("device_name") || info.contains_key("architecture"),
            "{info:?}"
        );
    }

    #[test]
    fn benchmark_is_short_and_cached() {
        // The benchmark allocates hundreds of MiB: keep memory-measuring
        // tests elsewhere in the crate from seeing it.
        let _serial = mlx::MEMORY_TEST_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let start = Instant::now();
        let first = capabilities("bench").unwrap();
        let took = start.elapsed().as_secs_f64();
        assert!(
            first.matmul_gflops.is_finite() && first.matmul_gflops > 0.0,
            "{first:?}"
        );
        assert!(
            first.bandwidth_gbs.is_finite() && first.bandwidth_gbs > 0.0,
            "{first:?}"
        );
        // Generous: tests run side by side on small machines.
        assert!(took < 5.0, "benchmark took {took:.2} s");

        let start = Instant::now();
        let again = capabilities("bench").unwrap();
        assert!(start.elapsed().as_secs_f64() < 0.5);
        assert_eq!(
            (again.matmul_gflops, again.bandwidth_gbs),
            (first.matmul_gflops, first.bandwidth_gbs)
        );
        let re = remeasure("bench").unwrap();
        assert!(re.matmul_gflops > 0.0 && re.bandwidth_gbs > 0.0);
        let cached = capabilities("bench").unwrap();
        assert_eq!(
            (cached.matmul_gflops, cached.bandwidth_gbs),
            (re.matmul_gflops, re.bandwidth_gbs)
        );
    }

    #[test]
    fn declared_capabilities_may_name_only_some_fields() {
        let c: Capabilities =
            serde_json::from_str(r#"{"name": "mac", "memory_available": 1000}"#).unwrap();
        assert_eq!(c.name, "mac");
        assert_eq!(c.memory_available, 1000);
        assert_eq!(c.memory_total, 0);
        assert_eq!(c.bandwidth_gbs, 0.0);
        let full = Capabilities {
            name: "a".into(),
            device_type: "gpu".into(),
            chip: "Apple M2 Max".into(),
            gpu_cores: 38,
            memory_total: 64 << 30,
            memory_available: 48 << 30,
            matmul_gflops: 12000.0,
            bandwidth_gbs: 380.0,
        };
        let back: Capabilities =
            serde_json::from_str(&serde_json::to_string(&full).unwrap()).unwrap();
        assert_eq!(back, full);
    }

    #[test]
    fn meminfo_is_read_in_bytes() {
        let text = "MemTotal:       24684084 kB\nMemFree:          100 kB\n\
                    MemAvailable:   23838024 kB\nCached: 5 kB\n";
        assert_eq!(
            parse_meminfo(text),
            Some((24684084 * 1024, 23838024 * 1024))
        );
        // Old kernels: free + page cache.
        assert_eq!(
            parse_meminfo("MemTotal: 1000 kB\nMemFree: 100 kB\nCached: 200 kB\n"),
            Some((1000 * 1024, 300 * 1024))
        );
        assert_eq!(parse_meminfo("nothing here"), None);
    }

    #[test]
    fn vm_stat_counts_free_inactive_and_speculative_pages() {
        let text = "Mach Virtual Memory Statistics: (page size of 16384 bytes)\n\
                    Pages free:                               10.\n\
                    Pages active:                            500.\n\
                    Pages inactive:                           20.\n\
                    Pages speculative:                         3.\n\
                    Pages wired down:                        100.\n";
        assert_eq!(parse_vm_stat(text), Some(33 * 16384));
        assert_eq!(parse_vm_stat("Pages free: 10."), None);
    }

    #[test]
    fn gpu_cores_from_ioreg_or_system_profiler() {
        let ioreg = "+-o AGXAcceleratorG14X  <class AGXAcceleratorG14X>\n    {\n      \
                     \"model\" = \"Apple M2 Max\"\n      \"gpu-core-count\" = 38\n    }\n";
        assert_eq!(parse_gpu_cores(ioreg), Some(38));
        let sp = "Graphics/Displays:\n\n    Apple M1:\n\n      Chipset Model: Apple M1\n      \
                  Type: GPU\n      Total Number of Cores: 8\n";
        assert_eq!(parse_gpu_cores(sp), Some(8));
        assert_eq!(parse_gpu_cores("no gpu here"), None);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }
}
