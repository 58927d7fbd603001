//! Placing a model's layers on devices: what each part of the model weighs
//! (`Footprint`), how to split it (`Strategy`), and the resulting `Plan`, a
//! chain of stages each holding a contiguous range of layers.
//!
//! Every stage is weighed by its real bytes (layers differ in size in mixed
//! quantized models; the embedding and the head can be a fifth of a small
//! model) plus a KV cache reserve, against the device's available memory less
//! a margin. A plan that cannot fit is rejected here, with the numbers,
//! before any worker loads anything.
use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::device::Capabilities;
use crate::error::{Error, Result};
use crate::models::Shard;

mod footprint;
pub use footprint::Footprint;

/// Memory kept free on each device for activations and the runtime, beyond
/// a tenth of what is available.
const MARGIN_BYTES: u64 = 256 << 20;

/// Per-token overhead of one hop between stages (network and dispatch),
/// weighed against the bytes a stage reads per token.
const HOP_SECONDS: f64 = 0.3e-3;

/// What a device can give to weights and KV cache: its available memory
/// less 10% and 256 MiB for activations.
pub fn usable_memory(available: u64) -> u64 {
    available
        .saturating_sub(available / 10)
        .saturating_sub(MARGIN_BYTES)
}

/// How to split the layers over devices.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Strategy {
    /// Equal layer counts; the remainder goes to the first stages.
    Uniform,
    /// Layers in proportion to each device's available memory.
    MemoryProportional,
    /// Layers in proportion to each device's per-token speed: memory
    /// bandwidth (decode is bandwidth bound), else matmul throughput, else
    /// memory.
    ComputeProportional,
    /// The fastest single-sequence decode: as many layers as fit on the
    /// fastest devices, devices reordered by speed, idle ones left out.
    #[default]
    Balanced,
    /// Layers in the given proportions, one per device, any scale.
    Custom(Vec<f64>),
}

const STRATEGY_NAMES: &str =
    "uniform, memory_proportional (memory), compute_proportional (compute), balanced, \
     custom:P1,P2,... (one proportion per device)";

impl FromStr for Strategy {
    type Err = Error;

    fn from_str(s: &str) -> Result<Strategy> {
        let norm = s.trim().to_ascii_lowercase().replace('-', "_");
        if let Some(list) = norm.strip_prefix("custom:") {
            let props = list
                .split(',')
                .map(|p| {
                    p.trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|v| v.is_finite() && *v > 0.0)
                        .ok_or_else(|| {
                            Error::InvalidArgument(format!(
                                "custom strategy {s:?}: {p:?} is not a positive number"
                            ))
                        })
                })
                .collect::<Result<Vec<f64>>>()?;
            return Ok(Strategy::Custom(props));
        }
        match norm.as_str() {
            "uniform" => Ok(Strategy::Uniform),
            "memory_proportional" | "memory" => Ok(Strategy::MemoryProportional),
            "compute_proportional" | "compute" => Ok(Strategy::ComputeProportional),
            "balanced" => Ok(Strategy::Balanced),
            _ => Err(Error::InvalidArgument(format!(
                "unknown sharding strategy {s:?}; use one of: {STRATEGY_NAMES}"
            ))),
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Strategy::Uniform => f.write_str("uniform"),
            Strategy::MemoryProportional => f.write_str("memory_proportional"),
            Strategy::ComputeProportional => f.write_str("compute_proportional"),
            Strategy::Balanced => f.write_str("balanced"),
            Strategy::Custom(p) => {
                let p: Vec<String> = p.iter().map(|v| v.to_string()).collect();
                write!(f, "custom:{}", p.join(","))
            }
        }
    }
}

impl Serialize for Strategy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Strategy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// One stage of a plan: a device and what it holds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StagePlan {
    /// Index of the device in the list given to `plan`.
    pub device: usize,
    /// The device's name.
    pub name: String,
    pub layers: Range<usize>,
    /// Holds the embedding (the first stage).
    pub embed: bool,
    /// Holds the final norm and the head (the last stage).
    pub head: bool,
    /// Weights held, in bytes.
    pub weight_bytes: u64,
    /// KV cache reserved for the planned number of tokens, in bytes.
    pub kv_bytes: u64,
    /// The device's available memory, in bytes.
    pub memory_available: u64,
    /// Why the stage got these layers.
    pub reason: String,
}

impl StagePlan {
    /// The part of the model this stage loads.
    pub fn shard(&self) -> Shard {
        Shard {
            layers: self.layers.clone(),
            embed: self.embed,
            head: self.head,
        }
    }
}

/// A placement of the model: stages in pipeline order (activations flow from
/// `stages[i]` to `stages[i + 1]`). Under `balanced` the order follows speed,
/// not the order the devices were given in, and idle devices are left out.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    pub strategy: Strategy,
    pub stages: Vec<StagePlan>,
}

impl Plan {
    /// Estimated seconds per decoded token of one sequence: the sum over
    /// stages of the bytes each reads per token over its speed, plus one hop
    /// per stage boundary. Speeds are as `plan` weighs them (bandwidth where
    /// every device has one measured).
    pub fn decode_seconds(&self, fp: &Footprint, devices: &[Capabilities]) -> f64 {
        let basis = SpeedBasis::of(devices);
        let reads: f64 = self
            .stages
            .iter()
            .map(|s| {
                fp.read_bytes(s.layers.clone(), s.head) as f64
                    / basis.bytes_per_second(&devices[s.device])
            })
            .sum();
        reads + HOP_SECONDS * self.stages.len().saturating_sub(1) as f64
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let layers: usize = self.stages.iter().map(|s| s.layers.len()).sum();
        writeln!(
            f,
            "plan ({}): {layers} layers over {} stage{}",
            self.strategy,
            self.stages.len(),
            if self.stages.len() == 1 { "" } else { "s" }
        )?;
        let header = [
            "stage",
            "device",
            "layers",
            "weights",
            "KV reserve",
            "available",
            "why",
        ];
        let rows: Vec<[String; 7]> = self
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut held = format!("{}..{}", s.layers.start, s.layers.end);
                if s.embed {
                    held.push_str(" +embed");
                }
                if s.head {
                    held.push_str(" +head");
                }
                [
                    i.to_string(),
                    s.name.clone(),
                    held,
                    human(s.weight_bytes),
                    human(s.kv_bytes),
                    human(s.memory_available),
                    s.reason.clone(),
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |f: &mut fmt::Formatter<'_>, cells: &[&str]| {
            let mut out = String::new();
            for (i, c) in cells.iter().enumerate() {
                if i + 1 == cells.len() {
                    out.push_str(c);
                } else {
                    out.push_str(&format!("{c:<w$}  ", w = widths[i]));
                }
            }
            writeln!(f, "  {}", out.trim_end())
        };
        line(f, &header)?;
        for r in &rows {
            line(f, &r.each_ref().map(String::as_str))?;
        }
        Ok(())
    }
}

/// Bytes for people: GB above a gigabyte, MB below.
fn human(bytes: u64) -> String {
    if bytes >= 1_000_000_000 {
        format!("{:.2} GB", bytes as f64 / 1e9)
    } else {
        format!("{:.1} MB", bytes as f64 / 1e6)
    }
}

/// Which figure stands for a device's per-token speed: the first that every
/// device has (mixing units across devices would be meaningless).
#[derive(Clone, Copy, Debug, PartialEq)]
enum SpeedBasis {
    Bandwidth,
    Matmul,
    Memory,
}

impl SpeedBasis {
    fn of(devices: &[Capabilities]) -> SpeedBasis {
        if devices.iter().all(|d| d.bandwidth_gbs > 0.0) {
            SpeedBasis::Bandwidth
        } else if devices.iter().all(|d| d.matmul_gflops > 0.0) {
            SpeedBasis::Matmul
        } else {
            SpeedBasis::Memory
        }
    }

    fn speed(self, d: &Capabilities) -> f64 {
        let v = match self {
            SpeedBasis::Bandwidth => d.bandwidth_gbs,
            SpeedBasis::Matmul => d.matmul_gflops,
            SpeedBasis::Memory => d.memory_available as f64,
        };
        if v.is_finite() {
            v.max(0.0)
        } else {
            0.0
        }
    }

    /// The divisor turning bytes read into seconds. Only bandwidth is in the
    /// right unit; the fallbacks give relative times, in which the hop
    /// overhead dominates (so fewer stages win).
    fn bytes_per_second(self, d: &Capabilities) -> f64 {
        (self.speed(d) * 1e9).max(1e-9)
    }

    fn describe(self, d: &Capabilities) -> String {
        match self {
            SpeedBasis::Bandwidth => format!("{:.0} GB/s", d.bandwidth_gbs),
            SpeedBasis::Matmul => format!("{:.0} GFLOP/s", d.matmul_gflops),
            SpeedBasis::Memory => format!("{} free, unmeasured", human(d.memory_available)),
        }
    }
}

/// The numbers a placement is checked against.
struct Weigher<'a> {
    fp: &'a Footprint,
    devices: &'a [Capabilities],
    kv_tokens: u64,
    /// Prefix sums of layer weights plus KV reserve.
    prefix: Vec<u64>,
}

impl<'a> Weigher<'a> {
    fn new(fp: &'a Footprint, devices: &'a [Capabilities], kv_tokens: u64) -> Self {
        let mut prefix = vec![0];
        for i in 0..fp.n_layers() {
            let last = prefix[i];
            prefix.push(last + fp.layer_bytes[i] + fp.kv_bytes_per_token[i] * kv_tokens);
        }
        Weigher {
            fp,
            devices,
            kv_tokens,
            prefix,
        }
    }

    fn n(&self) -> usize {
        self.fp.n_layers()
    }

    fn budget(&self, device: usize) -> u64 {
        usable_memory(self.devices[device].memory_available)
    }

    fn cluster_usable(&self) -> u64 {
        (0..self.devices.len()).map(|d| self.budget(d)).sum()
    }

    /// What a stage holds beyond its layers.
    fn extras(&self, first: bool, last: bool) -> u64 {
        self.fp.weight_bytes(0..0, first, last)
    }

    /// Weights and KV reserve of a stage.
    fn need(&self, layers: Range<usize>, first: bool, last: bool) -> u64 {
        self.prefix[layers.end] - self.prefix[layers.start] + self.extras(first, last)
    }

    /// The whole model in one place, with its KV reserve.
    fn total_need(&self) -> u64 {
        self.need(0..self.n(), true, true)
    }

    fn ranges(counts: &[usize]) -> Vec<Range<usize>> {
        let mut start = 0;
        counts
            .iter()
            .map(|&c| {
                start += c;
                start - c..start
            })
            .collect()
    }

    /// Bytes to spare on stage `j` (negative when it overflows).
    fn slack(&self, order: &[usize], ranges: &[Range<usize>], j: usize) -> i128 {
        let need = self.need(ranges[j].clone(), j == 0, j + 1 == order.len());
        self.budget(order[j]) as i128 - need as i128
    }

    /// Moves layers off stages that overflow onto neighbours with room,
    /// shifting the stages in between by one layer where needed; every stage
    /// keeps at least `min_layers`. Fails with the stage that cannot be
    /// relieved.
    fn repair(
        &self,
        order: &[usize],
        counts: &mut [usize],
        min_layers: usize,
    ) -> std::result::Result<(), usize> {
        let k = order.len();
        // Each move takes a layer off an overflowing stage and keeps every
        // other stage within its budget, so this ends within n moves.
        for _ in 0..=self.n() {
            let ranges = Self::ranges(counts);
            let Some(j) = (0..k).find(|&j| self.slack(order, &ranges, j) < 0) else {
                return Ok(());
            };
            if counts[j] <= min_layers {
                return Err(j);
            }
            let mut best: Option<(i128, Vec<usize>)> = None;
            for d in 1..k {
                for m in [j.checked_add(d), j.checked_sub(d)].into_iter().flatten() {
                    if m >= k {
                        continue;
                    }
                    let mut c = counts.to_vec();
                    c[j] -= 1;
                    c[m] += 1;
                    let r = Self::ranges(&c);
                    let touched = j.min(m)..=j.max(m);
                    let worst = touched
                        .filter(|&s| s != j)
                        .map(|s| self.slack(order, &r, s))
                        .min()
                        .unwrap_or(0);
                    if worst >= 0 && best.as_ref().is_none_or(|(w, _)| worst > *w) {
                        best = Some((worst, c));
                    }
                }
                if best.is_some() {
                    break;
                }
            }
            match best {
                Some((_, c)) => counts.copy_from_slice(&c),
                None => return Err(j),
            }
        }
        Err(0)
    }

    fn stages(&self, order: &[usize], counts: &[usize], reasons: Vec<String>) -> Vec<StagePlan> {
        let k = order.len();
        Self::ranges(counts)
            .into_iter()
            .zip(reasons)
            .enumerate()
            .map(|(j, (layers, reason))| {
                let (embed, head) = (j == 0, j + 1 == k);
                let d = &self.devices[order[j]];
                StagePlan {
                    device: order[j],
                    name: d.name.clone(),
                    weight_bytes: self.fp.weight_bytes(layers.clone(), embed, head),
                    kv_bytes: self.fp.kv_bytes(layers.clone(), self.kv_tokens),
                    memory_available: d.memory_available,
                    layers,
                    embed,
                    head,
                    reason,
                }
            })
            .collect()
    }

    /// The cluster as a whole is too small.
    fn cluster_error(&self) -> Error {
        let avail: u64 = self.devices.iter().map(|d| d.memory_available).sum();
        let weights = self.fp.total_weight_bytes();
        Error::ResourceExhausted(format!(
            "the model does not fit in the cluster: it needs {} ({} of weights + {} of KV cache \
             for {} tokens) but the {} device{} have {} usable ({} available, less 10% and 256 MiB \
             each for activations)",
            human(self.total_need()),
            human(weights),
            human(self.total_need() - weights),
            self.kv_tokens,
            self.devices.len(),
            if self.devices.len() == 1 { "" } else { "s" },
            human(self.cluster_usable()),
            human(avail),
        ))
    }

    /// Stage `j` overflows and no neighbour can take its layers.
    fn stage_error(&self, order: &[usize], counts: &[usize], j: usize) -> Error {
        let ranges = Self::ranges(counts);
        let (first, last) = (j == 0, j + 1 == order.len());
        let r = ranges[j].clone();
        let d = &self.devices[order[j]];
        let weights = self.fp.weight_bytes(r.clone(), first, last);
        let kv = self.fp.kv_bytes(r.clone(), self.kv_tokens);
        let mut held = format!("layers {}..{}", r.start, r.end);
        if first {
            held.push_str(" with the embedding");
        }
        if last {
            held.push_str(if first {
                " and the head"
            } else {
                " with the head"
            });
        }
        Error::ResourceExhausted(format!(
            "device {} cannot hold its stage: {held} need {} ({} of weights + {} of KV cache for \
             {} tokens) but it has {} usable ({} available, less 10% and 256 MiB), and no other \
             device has room to take layers over; the whole model needs {} and the cluster has {} \
             usable",
            d.name,
            human(weights + kv),
            human(weights),
            human(kv),
            self.kv_tokens,
            human(self.budget(order[j])),
            human(d.memory_available),
            human(self.total_need()),
            human(self.cluster_usable()),
        ))
    }
}

/// Splits `n` into integer counts proportional to `weights` (largest
/// remainder; ties to the earlier device), then gives every device at least
/// one, taken from the most over-served.
fn proportional_counts(n: usize, weights: &[f64]) -> Vec<usize> {
    let total: f64 = weights.iter().sum();
    // Rounded so that equal shares compare equal despite float noise.
    let quotas: Vec<f64> = weights
        .iter()
        .map(|w| (w / total * n as f64 * 1e9).round() / 1e9)
        .collect();
    let mut counts: Vec<usize> = quotas.iter().map(|q| q.floor() as usize).collect();
    let left = n.saturating_sub(counts.iter().sum());
    let mut by_rest: Vec<usize> = (0..weights.len()).collect();
    by_rest.sort_by(|&a, &b| {
        (quotas[b] - quotas[b].floor()).total_cmp(&(quotas[a] - quotas[a].floor()))
    });
    for &i in by_rest.iter().take(left) {
        counts[i] += 1;
    }
    while let Some(z) = counts.iter().position(|&c| c == 0) {
        let Some(donor) = (0..counts.len())
            .filter(|&i| counts[i] > 1)
            .max_by(|&a, &b| {
                (counts[a] as f64 - quotas[a])
                    .total_cmp(&(counts[b] as f64 - quotas[b]))
                    .then(b.cmp(&a))
            })
        else {
            break;
        };
        counts[donor] -= 1;
        counts[z] += 1;
    }
    counts
}

/// Places the layers of the model weighed by `fp` on `devices`, reserving KV
/// cache for `kv_tokens` tokens on every stage.
///
/// Every strategy but `balanced` gives each device a contiguous range of at
/// least one layer, in the order given; a stage that overflows its device's
/// memory hands layers to the nearest stages with room (noted in its
/// reason). `balanced` minimises the estimated decode time of one sequence
/// (see `Plan::decode_seconds`): the whole model on the fastest device that
/// holds it, or, when none is fast and large enough, the fastest devices
/// filled up to their memory, with the embedding and the head on whichever
/// ends make it fastest; it reorders devices and leaves idle ones out.
pub fn plan(
    fp: &Footprint,
    devices: &[Capabilities],
    strategy: &Strategy,
    kv_tokens: u64,
) -> Result<Plan> {
    let n = fp.n_layers();
    let k = devices.len();
    if k == 0 {
        return Err(Error::InvalidArgument(
            "no devices to place the model on".into(),
        ));
    }
    if n == 0 {
        return Err(Error::InvalidArgument("the model has no layers".into()));
    }
    if fp.kv_bytes_per_token.len() != n {
        return Err(Error::InvalidArgument(format!(
            "footprint has KV sizes for {} layers but weights for {n}",
            fp.kv_bytes_per_token.len()
        )));
    }
    if let Strategy::Custom(p) = strategy {
        if p.len() != k {
            return Err(Error::InvalidArgument(format!(
                "custom strategy gives {} proportions for {k} devices; give one per device",
                p.len()
            )));
        }
        if let Some(bad) = p.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
            return Err(Error::InvalidArgument(format!(
                "custom strategy: proportion {bad} is not positive"
            )));
        }
    }
    if *strategy != Strategy::Balanced && k > n {
        return Err(Error::InvalidArgument(format!(
            "{k} devices but only {n} layers: under {strategy} every device needs at least one \
             layer; use fewer devices or the balanced strategy, which leaves some idle"
        )));
    }
    let w = Weigher::new(fp, devices, kv_tokens);
    if w.total_need() > w.cluster_usable() {
        return Err(w.cluster_error());
    }
    let stages = match strategy {
        Strategy::Balanced => balanced(&w)?,
        _ => proportional(&w, strategy)?,
    };
    Ok(Plan {
        strategy: strategy.clone(),
        stages,
    })
}

fn proportional(w: &Weigher, strategy: &Strategy) -> Result<Vec<StagePlan>> {
    let devices = w.devices;
    let basis = SpeedBasis::of(devices);
    let (weights, what): (Vec<f64>, &str) = match strategy {
        Strategy::Uniform => (vec![1.0; devices.len()], "an equal share"),
        Strategy::MemoryProportional => (
            devices.iter().map(|d| d.memory_available as f64).collect(),
            "available memory",
        ),
        Strategy::ComputeProportional => (
            devices.iter().map(|d| basis.speed(d)).collect(),
            match basis {
                SpeedBasis::Bandwidth => "memory bandwidth",
                SpeedBasis::Matmul => "matmul throughput",
                SpeedBasis::Memory => "available memory (no speeds measured)",
            },
        ),
        Strategy::Custom(p) => (p.clone(), "the custom proportions"),
        Strategy::Balanced => unreachable!("balanced is planned elsewhere"),
    };
    if let Some(i) = weights.iter().position(|v| !(v.is_finite() && *v > 0.0)) {
        return Err(Error::InvalidArgument(format!(
            "device {} has no {what} to weigh by, so {strategy} would give it no layers; \
             leave it out or use balanced",
            devices[i].name
        )));
    }
    let n = w.n();
    let order: Vec<usize> = (0..devices.len()).collect();
    // Per token a stage reads its layers, and the last one the head too:
    // under compute_proportional the speeds share out that work, the head
    // counted as the layers it weighs, not the layers alone.
    let head_layers = match strategy {
        Strategy::ComputeProportional if devices.len() > 1 => {
            let layers: u64 = w.fp.layer_bytes.iter().sum();
            let mean = layers as f64 / n as f64;
            if mean > 0.0 {
                w.fp.read_bytes(0..0, true) as f64 / mean
            } else {
                0.0
            }
        }
        _ => 0.0,
    };
    let planned = if head_layers > 0.0 {
        let total: f64 = weights.iter().sum();
        let mut quotas: Vec<f64> = weights
            .iter()
            .map(|v| (n as f64 + head_layers) * v / total)
            .collect();
        let last = quotas.len() - 1;
        quotas[last] = (quotas[last] - head_layers).max(1e-9);
        proportional_counts(n, &quotas)
    } else {
        proportional_counts(n, &weights)
    };
    let mut counts = planned.clone();
    w.repair(&order, &mut counts, 1)
        .map_err(|j| w.stage_error(&order, &counts, j))?;
    let total: f64 = weights.iter().sum();
    let reasons = (0..devices.len())
        .map(|i| {
            let mut r = match strategy {
                Strategy::Uniform => format!("an equal share ({} of {n} layers)", planned[i]),
                Strategy::ComputeProportional => format!(
                    "{:.0}% of the cluster's {what} ({})",
                    100.0 * weights[i] / total,
                    basis.describe(&devices[i])
                ),
                Strategy::MemoryProportional => {
                    format!("{:.0}% of the cluster's {what}", 100.0 * weights[i] / total)
                }
                _ => format!("{:.0}% of {what}", 100.0 * weights[i] / total),
            };
            if head_layers > 0.0 && i + 1 == devices.len() {
                r.push_str(&format!(", the head counted as {head_layers:.1} layers"));
            }
            let moved = counts[i] as i64 - planned[i] as i64;
            let plural = if moved.abs() == 1 { "layer" } else { "layers" };
            if moved > 0 {
                r.push_str(&format!("; {moved} more {plural} to fit memory"));
            } else if moved < 0 {
                r.push_str(&format!("; {} fewer {plural} to fit memory", -moved));
            }
            r
        })
        .collect();
    Ok(w.stages(&order, &counts, reasons))
}

/// A candidate placement for `balanced`: stages in pipeline order.
struct Candidate {
    order: Vec<usize>,
    counts: Vec<usize>,
    seconds: f64,
}

fn balanced(w: &Weigher) -> Result<Vec<StagePlan>> {
    let devices = w.devices;
    let k = devices.len();
    let n = w.n();
    let basis = SpeedBasis::of(devices);
    let seconds = |order: &[usize], counts: &[usize]| -> f64 {
        let ranges = Weigher::ranges(counts);
        let reads: f64 = order
            .iter()
            .zip(&ranges)
            .enumerate()
            .map(|(j, (&d, r))| {
                w.fp.read_bytes(r.clone(), j + 1 == order.len()) as f64
                    / basis.bytes_per_second(&devices[d])
            })
            .sum();
        reads + HOP_SECONDS * (order.len() - 1) as f64
    };
    // Fastest first; ties keep the given order.
    let mut by_speed: Vec<usize> = (0..k).collect();
    by_speed.sort_by(|&a, &b| {
        basis
            .speed(&devices[b])
            .total_cmp(&basis.speed(&devices[a]))
    });

    let mut best: Option<Candidate> = None;
    let mut consider = |c: Candidate| {
        let better = best.as_ref().is_none_or(|b| {
            c.seconds < b.seconds - 1e-12
                || (c.seconds <= b.seconds + 1e-12 && c.order.len() < b.order.len())
        });
        if better {
            best = Some(c);
        }
    };
    // The whole model on one device.
    for &d in &by_speed {
        if w.total_need() <= w.budget(d) {
            consider(Candidate {
                order: vec![d],
                counts: vec![n],
                seconds: seconds(&[d], &[n]),
            });
        }
    }
    // A chain: `first` holds the embedding, `last` the head; layers go to
    // the fastest devices first, up to what fits (estimated with the mean
    // layer, then checked and repaired with the real sizes).
    let mean = w.prefix[n] as f64 / n as f64;
    for &first in &by_speed {
        for &last in &by_speed {
            if first == last || n < 2 {
                continue;
            }
            let cap = |d: usize| -> usize {
                let extras = w.extras(d == first, d == last);
                let room = w.budget(d).saturating_sub(extras) as f64;
                if mean > 0.0 {
                    ((room / mean).floor() as usize).min(n)
                } else if room > 0.0 || extras == 0 {
                    n
                } else {
                    0
                }
            };
            if cap(first) < 1 || cap(last) < 1 {
                continue;
            }
            let mut count = vec![0usize; k];
            count[first] = 1;
            count[last] = 1;
            let mut left = n - 2;
            for &d in &by_speed {
                let take = cap(d).saturating_sub(count[d]).min(left);
                count[d] += take;
                left -= take;
            }
            if left > 0 {
                continue;
            }
            let mut order = vec![first];
            order.extend(
                by_speed
                    .iter()
                    .copied()
                    .filter(|&d| d != first && d != last && count[d] > 0),
            );
            order.push(last);
            let mut counts: Vec<usize> = order.iter().map(|&d| count[d]).collect();
            if w.repair(&order, &mut counts, 1).is_err() {
                continue;
            }
            let s = seconds(&order, &counts);
            consider(Candidate {
                order,
                counts,
                seconds: s,
            });
        }
    }
    let Some(best) = best else {
        let largest = (0..k).max_by_key(|&d| w.budget(d)).unwrap_or(0);
        return Err(Error::ResourceExhausted(format!(
            "no placement of the {n} layers fits: the model needs {} with its KV cache \
             reserve and the cluster has {} usable, but with the embedding on the first stage and \
             the head on the last, no split of the layers fits the devices (largest: {}, {} usable)",
            human(w.total_need()),
            human(w.cluster_usable()),
            devices[largest].name,
            human(w.budget(largest)),
        )));
    };
    let rank = |d: usize| by_speed.iter().position(|&x| x == d).unwrap_or(0) + 1;
    let ranges = Weigher::ranges(&best.counts);
    let reasons = best
        .order
        .iter()
        .enumerate()
        .map(|(j, &d)| {
            let speed = basis.describe(&devices[d]);
            if best.order.len() == 1 {
                return if rank(d) == 1 {
                    format!("{speed}: the fastest device, and the whole model fits on it")
                } else {
                    format!("{speed}: the fastest device that holds the whole model")
                };
            }
            let need = w.need(ranges[j].clone(), j == 0, j + 1 == best.order.len());
            let fill = if need as f64 + mean <= w.budget(d) as f64 {
                "the remaining layers"
            } else {
                "filled to its memory"
            };
            format!("{speed}, #{} of {k} by speed: {fill}", rank(d))
        })
        .collect();
    Ok(w.stages(&best.order, &best.counts, reasons))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mlx::Dtype;
    use crate::models::ModelArgs;

    const GB: u64 = 1_000_000_000;

    /// Available memory that leaves exactly `usable` bytes after the margin.
    fn available_for(usable: u64) -> u64 {
        let mut a = (usable + MARGIN_BYTES) / 9 * 10;
        while usable_memory(a) < usable {
            a += 1;
        }
        a
    }

    fn dev(name: &str, usable: u64, bandwidth: f64) -> Capabilities {
        Capabilities {
            name: name.into(),
            device_type: "gpu".into(),
            memory_total: available_for(usable) * 2,
            memory_available: available_for(usable),
            bandwidth_gbs: bandwidth,
            matmul_gflops: bandwidth * 10.0,
            ..Capabilities::default()
        }
    }

    /// `n` layers of `layer` bytes, no KV, small embedding and head.
    fn model(n: usize, layer: u64, embed: u64, tied: bool) -> Footprint {
        Footprint {
            layer_bytes: vec![layer; n],
            embed_bytes: embed,
            head_bytes: embed,
            norm_bytes: 0,
            tied,
            kv_bytes_per_token: vec![0; n],
        }
    }

    fn counts(p: &Plan) -> Vec<usize> {
        p.stages.iter().map(|s| s.layers.len()).collect()
    }

    /// Stages are contiguous, cover every layer once, the first holds the
    /// embedding, the last the head, and each fits its device.
    fn check(p: &Plan, fp: &Footprint, devices: &[Capabilities]) {
        let mut next = 0;
        for (i, s) in p.stages.iter().enumerate() {
            assert_eq!(s.layers.start, next, "{p}");
            assert!(!s.layers.is_empty(), "{p}");
            next = s.layers.end;
            assert_eq!(s.embed, i == 0);
            assert_eq!(s.head, i + 1 == p.stages.len());
            assert_eq!(s.name, devices[s.device].name);
            assert!(
                s.weight_bytes + s.kv_bytes <= usable_memory(devices[s.device].memory_available),
                "{p}"
            );
        }
        assert_eq!(next, fp.n_layers(), "{p}");
    }

    #[test]
    fn strategies_parse_and_print() {
        for (s, want) in [
            ("uniform", Strategy::Uniform),
            ("memory", Strategy::MemoryProportional),
            ("memory_proportional", Strategy::MemoryProportional),
            ("Compute-Proportional", Strategy::ComputeProportional),
            ("compute", Strategy::ComputeProportional),
            (" balanced ", Strategy::Balanced),
            ("custom:0.5,0.3,0.2", Strategy::Custom(vec![0.5, 0.3, 0.2])),
            ("custom:2, 1", Strategy::Custom(vec![2.0, 1.0])),
        ] {
            let got: Strategy = s.parse().unwrap();
            assert_eq!(got, want, "{s}");
            assert_eq!(got.to_string().parse::<Strategy>().unwrap(), got);
        }
        assert_eq!(Strategy::default(), Strategy::Balanced);
        assert_eq!(
            Strategy::Custom(vec![0.5, 0.3, 0.2]).to_string(),
            "custom:0.5,0.3,0.2"
        );
        assert_eq!(
            Strategy::MemoryProportional.to_string(),
            "memory_proportional"
        );
        let err = "fastest".parse::<Strategy>().unwrap_err().to_string();
        assert!(err.contains("fastest") && err.contains("balanced"), "{err}");
        for bad in [
            "custom:",
            "custom:1,x",
            "custom:1,-1",
            "custom:0",
            "custom:inf",
        ] {
            assert!(bad.parse::<Strategy>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&Strategy::Custom(vec![1.0, 3.0])).unwrap();
        assert_eq!(json, "\"custom:1,3\"");
        assert_eq!(
            serde_json::from_str::<Strategy>(&json).unwrap(),
            Strategy::Custom(vec![1.0, 3.0])
        );
    }

    #[test]
    fn largest_remainder_rounding() {
        assert_eq!(proportional_counts(30, &[1.0; 3]), vec![10, 10, 10]);
        assert_eq!(proportional_counts(7, &[1.0; 3]), vec![3, 2, 2]);
        assert_eq!(proportional_counts(30, &[16.0, 8.0, 8.0]), vec![15, 8, 7]);
        assert_eq!(proportional_counts(10, &[0.5, 0.3, 0.2]), vec![5, 3, 2]);
        assert_eq!(proportional_counts(10, &[5.0, 3.0, 2.0]), vec![5, 3, 2]);
        // A tiny share still gets one layer, from the most over-served.
        assert_eq!(proportional_counts(21, &[0.01, 1.0, 1.0]), vec![1, 10, 10]);
        for (n, w) in [
            (32, vec![3.3, 1.7, 0.2, 9.0]),
            (5, vec![1.0; 5]),
            (100, vec![1e-6, 1.0]),
        ] {
            let c = proportional_counts(n, &w);
            assert_eq!(c.iter().sum::<usize>(), n, "{w:?} -> {c:?}");
            assert!(c.iter().all(|&c| c >= 1), "{w:?} -> {c:?}");
        }
    }

    #[test]
    fn uniform_and_proportional_splits() {
        let fp = model(30, GB, GB / 10, false);
        let equal = [
            dev("a", 20 * GB, 100.0),
            dev("b", 20 * GB, 100.0),
            dev("c", 20 * GB, 100.0),
        ];
        let p = plan(&fp, &equal, &Strategy::Uniform, 0).unwrap();
        check(&p, &fp, &equal);
        assert_eq!(counts(&p), vec![10, 10, 10]);
        assert_eq!(
            p.stages.iter().map(|s| s.device).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        let p = plan(&model(7, GB, 0, false), &equal, &Strategy::Uniform, 0).unwrap();
        assert_eq!(counts(&p), vec![3, 2, 2]);

        let mem = [
            dev("a", 16 * GB, 100.0),
            dev("b", 8 * GB, 100.0),
            dev("c", 8 * GB, 100.0),
        ];
        let p = plan(&fp, &mem, &Strategy::MemoryProportional, 0).unwrap();
        check(&p, &fp, &mem);
        let c = counts(&p);
        assert_eq!(c.iter().sum::<usize>(), 30);
        assert!(
            (14..=16).contains(&c[0]) && (7..=8).contains(&c[1]),
            "{c:?}"
        );

        let speeds = [
            dev("a", 40 * GB, 400.0),
            dev("b", 40 * GB, 200.0),
            dev("c", 40 * GB, 200.0),
        ];
        let p = plan(&fp, &speeds, &Strategy::ComputeProportional, 0).unwrap();
        assert_eq!(counts(&p), vec![15, 8, 7]);
        assert!(p.stages[0].reason.contains("400 GB/s"), "{p}");
        // Without bandwidth figures, matmul throughput weighs.
        let mut no_bw = speeds.clone();
        no_bw[2].bandwidth_gbs = 0.0;
        no_bw[2].matmul_gflops = 6000.0;
        let p = plan(&fp, &no_bw, &Strategy::ComputeProportional, 0).unwrap();
        assert_eq!(counts(&p), vec![10, 5, 15]);

        let p = plan(&fp, &speeds, &"custom:1,1,4".parse().unwrap(), 0).unwrap();
        assert_eq!(counts(&p), vec![5, 5, 20]);
    }

    #[test]
    fn compute_proportional_counts_the_head_in_the_last_stages_work() {
        // A small model's head weighs as much as six of its layers: equal
        // devices read equal bytes per token with 18 and 12 + head.
        let fp = Footprint {
            head_bytes: 6 * GB,
            ..model(30, GB, GB, false)
        };
        let d = [dev("a", 80 * GB, 400.0), dev("b", 80 * GB, 400.0)];
        let p = plan(&fp, &d, &Strategy::ComputeProportional, 0).unwrap();
        assert_eq!(counts(&p), vec![18, 12], "{p}");
        assert!(
            p.stages[1].reason.contains("head counted as 6.0 layers"),
            "{p}"
        );
        let reads: Vec<u64> = p
            .stages
            .iter()
            .map(|s| fp.read_bytes(s.layers.clone(), s.head))
            .collect();
        assert_eq!(reads[0], reads[1]);
        // One device holds it all, head included.
        let p = plan(&fp, &d[..1], &Strategy::ComputeProportional, 0).unwrap();
        assert_eq!(counts(&p), vec![30]);
        // Uniform stays an equal share of layers.
        let p = plan(&fp, &d, &Strategy::Uniform, 0).unwrap();
        assert_eq!(counts(&p), vec![15, 15]);
    }

    #[test]
    fn a_one_layer_stage_through_custom_proportions() {
        let fp = model(21, GB, GB / 10, false);
        let d = [
            dev("a", 30 * GB, 100.0),
            dev("b", 30 * GB, 100.0),
            dev("c", 30 * GB, 100.0),
        ];
        let p = plan(&fp, &d, &Strategy::Custom(vec![0.01, 1.0, 1.0]), 0).unwrap();
        check(&p, &fp, &d);
        assert_eq!(counts(&p), vec![1, 10, 10]);
        assert_eq!(p.stages[0].layers, 0..1);
        assert_eq!(
            p.stages[0].weight_bytes,
            GB + GB / 10,
            "one layer and the embedding"
        );
    }

    #[test]
    fn argument_errors() {
        let fp = model(4, GB, GB / 10, false);
        let d = [dev("a", 30 * GB, 100.0), dev("b", 30 * GB, 100.0)];
        let err = plan(&fp, &[], &Strategy::Balanced, 0).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)) && err.to_string().contains("no devices"));
        let err = plan(&fp, &d, &Strategy::Custom(vec![1.0, 2.0, 3.0]), 0).unwrap_err();
        assert!(
            err.to_string().contains("3 proportions for 2 devices"),
            "{err}"
        );
        let err = plan(&fp, &d, &Strategy::Custom(vec![1.0, 0.0]), 0).unwrap_err();
        assert!(err.to_string().contains("not positive"), "{err}");
        let five: Vec<Capabilities> = (0..5)
            .map(|i| dev(&format!("d{i}"), 30 * GB, 1.0))
            .collect();
        for s in [
            Strategy::Uniform,
            Strategy::Custom(vec![1.0; 5]),
            Strategy::MemoryProportional,
        ] {
            let err = plan(&fp, &five, &s, 0).unwrap_err();
            assert!(
                err.to_string().contains("5 devices but only 4 layers"),
                "{err}"
            );
        }
        // Balanced leaves the extra devices idle.
        let p = plan(&fp, &five, &Strategy::Balanced, 0).unwrap();
        check(&p, &fp, &five);
        assert_eq!(p.stages.len(), 1);
        // A device with nothing to weigh by gets no share.
        let mut zero = d.clone();
        zero[1].memory_available = 0;
        let err = plan(&fp, &zero, &Strategy::MemoryProportional, 0).unwrap_err();
        assert!(err.to_string().contains("device b"), "{err}");
        let mut bad = fp.clone();
        bad.kv_bytes_per_token.pop();
        assert!(plan(&bad, &d, &Strategy::Uniform, 0).is_err());
    }

    #[test]
    fn a_device_too_small_is_named_with_its_numbers() {
        let fp = model(10, GB, GB / 10, false);
        let d = [dev("big", 100 * GB, 100.0), dev("tiny", GB / 2, 100.0)];
        for s in [
            Strategy::Uniform,
            Strategy::MemoryProportional,
            Strategy::Custom(vec![1.0, 1.0]),
        ] {
            let err = plan(&fp, &d, &s, 0).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, Error::ResourceExhausted(_)), "{msg}");
            assert!(
                msg.contains("device tiny")
                    && msg.contains(&human(usable_memory(d[1].memory_available)))
                    && msg.contains(&human(GB + GB / 10)),
                "{s}: {msg}"
            );
        }
        // Balanced simply leaves it out.
        let p = plan(&fp, &d, &Strategy::Balanced, 0).unwrap();
        assert_eq!(p.stages.len(), 1);
        assert_eq!(p.stages[0].name, "big");
    }

    #[test]
    fn a_model_too_large_for_the_cluster_names_both_totals() {
        let fp = Footprint {
            kv_bytes_per_token: vec![1_000_000; 40],
            ..model(40, GB, 2 * GB, false)
        };
        let d = [dev("a", 16 * GB, 100.0), dev("b", 16 * GB, 100.0)];
        for s in [
            Strategy::Balanced,
            Strategy::Uniform,
            Strategy::ComputeProportional,
        ] {
            let err = plan(&fp, &d, &s, 1000).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, Error::ResourceExhausted(_)), "{msg}");
            // 40 GB of layers + 4 GB embedding/head + 40 GB of KV.
            assert!(
                msg.contains("84.00 GB") && msg.contains("32.00 GB"),
                "{msg}"
            );
            assert!(msg.contains("1000 tokens"), "{msg}");
        }
    }

    #[test]
    fn kv_reserve_is_weighed() {
        let mut fp = model(20, GB, GB / 10, false);
        fp.kv_bytes_per_token = vec![100_000; 20];
        let d = [dev("a", 30 * GB, 100.0), dev("b", 30 * GB, 100.0)];
        let p = plan(&fp, &d, &Strategy::Uniform, 4096).unwrap();
        assert_eq!(p.stages[0].kv_bytes, 10 * 100_000 * 4096);
        // 20.2 GB of weights and 8.2 GB of cache fit one device.
        let p = plan(&fp, &d, &Strategy::Balanced, 4096).unwrap();
        assert_eq!(p.stages.len(), 1, "{p}");
        // Enough context and it no longer does.
        let p = plan(&fp, &d, &Strategy::Balanced, 8000).unwrap();
        assert_eq!(p.stages.len(), 2, "{p}");
        check(&p, &fp, &d);
    }

    #[test]
    fn heterogeneous_devices() {
        let fp = model(32, GB / 2, GB / 4, false);
        let d = [
            dev("mac-studio", 48 * GB, 800.0),
            dev("macbook", 12 * GB, 100.0),
            dev("linux", 6 * GB, 20.0),
        ];
        for s in [
            Strategy::Uniform,
            Strategy::MemoryProportional,
            Strategy::ComputeProportional,
            Strategy::Balanced,
        ] {
            let p = plan(&fp, &d, &s, 0).unwrap();
            check(&p, &fp, &d);
            if s != Strategy::Balanced {
                assert_eq!(p.stages.len(), 3, "{s}: {p}");
            }
        }
        let p = plan(&fp, &d, &Strategy::MemoryProportional, 0).unwrap();
        assert!(
            counts(&p)[0] > counts(&p)[1] && counts(&p)[1] > counts(&p)[2],
            "{p}"
        );
        let p = plan(&fp, &d, &Strategy::Balanced, 0).unwrap();
        assert_eq!(p.stages.len(), 1);
        assert_eq!(p.stages[0].name, "mac-studio");
        let text = p.to_string();
        assert!(
            text.contains("mac-studio") && text.contains("0..32 +embed +head"),
            "{text}"
        );
    }

    #[test]
    fn balanced_fills_the_fastest_device_and_puts_the_head_where_it_is_cheapest() {
        // 20 GB of layers, 1 GB embedding and head: the fast device holds 10.
        let fp = model(20, GB, GB, false);
        let d = [dev("slow", 100 * GB, 100.0), dev("fast", 10 * GB, 800.0)];
        let p = plan(&fp, &d, &Strategy::Balanced, 0).unwrap();
        check(&p, &fp, &d);
        assert_eq!(p.stages.len(), 2, "{p}");
        // The head is read every token, the embedding only one row: the fast
        // device is the last stage, the slow one keeps the embedding.
        assert_eq!(
            (p.stages[0].name.as_str(), p.stages[1].name.as_str()),
            ("slow", "fast")
        );
        assert_eq!(counts(&p), vec![11, 9]);
        assert!(p.stages[1].reason.contains("filled to its memory"), "{p}");
        // Better than the whole model on the slow device, and than any
        // other split.
        let alone = plan(&fp, &d[..1], &Strategy::Balanced, 0).unwrap();
        assert!(p.decode_seconds(&fp, &d) < alone.decode_seconds(&fp, &d[..1]));
        for s in [
            Strategy::Uniform,
            Strategy::MemoryProportional,
            Strategy::ComputeProportional,
        ] {
            if let Ok(other) = plan(&fp, &d, &s, 0) {
                assert!(
                    p.decode_seconds(&fp, &d) <= other.decode_seconds(&fp, &d),
                    "{s}"
                );
            }
        }
    }

    /// A deterministic pseudo-random sequence for property tests.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    #[test]
    fn balanced_is_never_slower_than_the_fastest_member_alone() {
        let mut rng = Lcg(7);
        for case in 0..300 {
            let n = 1 + (rng.next() * 60.0) as usize;
            let layer = (0.05 + rng.next()) * GB as f64;
            let mut fp = model(
                n,
                layer as u64,
                (rng.next() * 3.0 * GB as f64) as u64,
                rng.next() < 0.5,
            );
            fp.head_bytes = if fp.tied {
                fp.embed_bytes
            } else {
                fp.embed_bytes / 2
            };
            fp.kv_bytes_per_token = vec![(rng.next() * 200_000.0) as u64; n];
            let tokens = (rng.next() * 8192.0) as u64;
            let w = Weigher::new(&fp, &[], tokens);
            let need = w.total_need();
            let fastest = Capabilities {
                name: "fastest".into(),
                memory_available: available_for(need + (rng.next() * GB as f64) as u64),
                bandwidth_gbs: 100.0 + rng.next() * 900.0,
                ..Capabilities::default()
            };
            let alone = plan(
                &fp,
                std::slice::from_ref(&fastest),
                &Strategy::Balanced,
                tokens,
            )
            .unwrap();
            let t_alone = alone.decode_seconds(&fp, std::slice::from_ref(&fastest));
            let mut devices = vec![fastest.clone()];
            for i in 0..1 + (rng.next() * 4.0) as usize {
                let slower = Capabilities {
                    name: format!("slow{i}"),
                    memory_available: (rng.next() * 3.0 * need as f64) as u64,
                    bandwidth_gbs: fastest.bandwidth_gbs * (0.01 + 0.98 * rng.next()),
                    ..Capabilities::default()
                };
                // In front of the fastest or behind it.
                if rng.next() < 0.5 {
                    devices.insert(0, slower);
                } else {
                    devices.push(slower);
                }
                let p = plan(&fp, &devices, &Strategy::Balanced, tokens).unwrap();
                check(&p, &fp, &devices);
                let t = p.decode_seconds(&fp, &devices);
                assert!(
                    t <= t_alone * (1.0 + 1e-9),
                    "case {case}: {t} > {t_alone}\n{p}"
                );
                assert_eq!(p.stages.len(), 1, "case {case}\n{p}");
                assert_eq!(p.stages[0].name, "fastest");
            }
        }
    }

    #[test]
    fn adding_a_slower_device_never_slows_a_balanced_plan() {
        let mut rng = Lcg(11);
        for case in 0..200 {
            let n = 2 + (rng.next() * 40.0) as usize;
            let fp = model(
                n,
                GB / 2,
                (rng.next() * 2.0 * GB as f64) as u64,
                rng.next() < 0.5,
            );
            let mut devices: Vec<Capabilities> = Vec::new();
            let mut last: Option<f64> = None;
            let mut bandwidth = 1000.0;
            for i in 0..5 {
                bandwidth *= 0.2 + 0.79 * rng.next();
                devices.push(Capabilities {
                    name: format!("d{i}"),
                    memory_available: (rng.next() * 0.6 * (n as u64 * GB / 2) as f64) as u64 + GB,
                    bandwidth_gbs: bandwidth,
                    ..Capabilities::default()
                });
                let Ok(p) = plan(&fp, &devices, &Strategy::Balanced, 0) else {
                    assert!(
                        last.is_none(),
                        "case {case}: a device made a feasible plan fail"
                    );
                    continue;
                };
                check(&p, &fp, &devices);
                let t = p.decode_seconds(&fp, &devices);
                if let Some(prev) = last {
                    assert!(t <= prev * (1.0 + 1e-9), "case {case}: {t} > {prev}\n{p}");
                }
                last = Some(t);
            }
        }
    }

    #[test]
    fn a_large_vocabulary_shifts_layers_off_the_end_stages() {
        // Three 9 GB devices, 21 one-gigabyte layers: 7 each fit with a
        // small embedding, not with a 2.5 GB embedding and head.
        let d = [
            dev("a", 9 * GB, 100.0),
            dev("b", 9 * GB, 100.0),
            dev("c", 9 * GB, 100.0),
        ];
        let small = model(21, GB, GB / 10, false);
        let p = plan(&small, &d, &Strategy::MemoryProportional, 0).unwrap();
        assert_eq!(counts(&p), vec![7, 7, 7]);
        let large = model(21, GB, 5 * GB / 2, false);
        for s in [Strategy::MemoryProportional, Strategy::Uniform] {
            let p = plan(&large, &d, &s, 0).unwrap();
            check(&p, &large, &d);
            assert_eq!(counts(&p), vec![6, 9, 6], "{p}");
            assert!(
                p.stages[0].reason.contains("1 fewer layer to fit memory"),
                "{p}"
            );
            assert!(p.stages[1].reason.contains("2 more layers"), "{p}");
            assert_eq!(p.stages[0].weight_bytes, 6 * GB + 5 * GB / 2);
        }
        // 2 GB layers on 7.8 GB devices: 23 GB fit in 23.4 GB, but whole
        // layers do not (3 + 3 + 3 of 10).
        let coarse = model(10, 2 * GB, 3 * GB / 2, false);
        let d = [
            dev("a", 78 * GB / 10, 1.0),
            dev("b", 78 * GB / 10, 1.0),
            dev("c", 78 * GB / 10, 1.0),
        ];
        let err = plan(&coarse, &d, &Strategy::MemoryProportional, 0).unwrap_err();
        assert!(err.to_string().contains("cannot hold its stage"), "{err}");
        let err = plan(&coarse, &d, &Strategy::Balanced, 0).unwrap_err();
        assert!(err.to_string().contains("no placement"), "{err}");
    }

    #[test]
    fn repair_shifts_through_full_neighbours() {
        // The first stage overflows, its neighbour is full, the third has
        // room: the middle stage shifts by one layer.
        let fp = model(9, GB, 2 * GB, false);
        let d = [
            dev("a", 5 * GB, 1.0),
            dev("b", 3 * GB, 1.0),
            dev("c", 9 * GB, 1.0),
        ];
        let p = plan(&fp, &d, &Strategy::Uniform, 0).unwrap();
        check(&p, &fp, &d);
        assert_eq!(counts(&p), vec![3, 3, 3]);
        let d = [
            dev("a", 4 * GB, 1.0),
            dev("b", 3 * GB, 1.0),
            dev("c", 9 * GB, 1.0),
        ];
        let p = plan(&fp, &d, &Strategy::Uniform, 0).unwrap();
        check(&p, &fp, &d);
        assert_eq!(counts(&p), vec![2, 3, 4]);
    }

    #[test]
    fn tied_heads_are_counted_twice_across_stages_once_in_one() {
        let tied = model(10, GB, 3 * GB, true);
        let d = [dev("a", 100 * GB, 100.0), dev("b", 100 * GB, 100.0)];
        let p = plan(&tied, &d, &Strategy::Uniform, 0).unwrap();
        let total: u64 = p.stages.iter().map(|s| s.weight_bytes).sum();
        assert_eq!(total, 10 * GB + 2 * 3 * GB);
        assert_eq!(p.stages[1].weight_bytes, 5 * GB + 3 * GB);
        let p = plan(&tied, &d, &Strategy::Balanced, 0).unwrap();
        assert_eq!(p.stages.len(), 1);
        assert_eq!(p.stages[0].weight_bytes, 10 * GB + 3 * GB);
        assert_eq!(tied.total_weight_bytes(), 13 * GB);
        let untied = Footprint {
            tied: false,
            ..tied.clone()
        };
        assert_eq!(untied.total_weight_bytes(), 16 * GB);
        // A tied model that fits one device only without the second copy.
        let d = [dev("a", 14 * GB, 100.0), dev("b", 14 * GB, 100.0)];
        let p = plan(&tied, &d, &Strategy::Balanced, 0).unwrap();
        assert_eq!(p.stages.len(), 1, "{p}");
        let err = plan(&untied, &d[..1], &Strategy::Balanced, 0).unwrap_err();
        assert!(err.to_string().contains("16.00 GB"), "{err}");
    }

    #[test]
    fn plans_print_as_a_table_and_serialize() {
        let mut fp = model(12, GB, GB / 5, false);
        fp.kv_bytes_per_token = vec![50_000; 12];
        let d = [
            dev("alpha", 20 * GB, 200.0),
            dev("beta-long-name", 20 * GB, 100.0),
        ];
        let p = plan(&fp, &d, &Strategy::Uniform, 2048).unwrap();
        let text = p.to_string();
        assert!(
            text.starts_with("plan (uniform): 12 layers over 2 stages"),
            "{text}"
        );
        for want in [
            "device",
            "KV reserve",
            "available",
            "why",
            "alpha",
            "beta-long-name",
            "0..6 +embed",
            "6..12 +head",
            "6.20 GB",
            "614.4 MB",
        ] {
            assert!(text.contains(want), "{want} missing in\n{text}");
        }
        let json: serde_json::Value = serde_json::to_value(&p).unwrap();
        assert_eq!(json["strategy"], "uniform");
        assert_eq!(json["stages"][1]["layers"]["start"], 6);
        assert_eq!(json["stages"][1]["head"], true);
        assert_eq!(
            p.stages[1].shard(),
            Shard {
                layers: 6..12,
                embed: false,
                head: true
            }
        );
    }

    #[test]
    fn footprints_come_from_shapes_without_reading_weights() {
        use crate::mlx::{io::save_safetensors, Array};
        use crate::weights::{resolve, Weights};
        let tmp = tempfile::tempdir().unwrap();
        let (h, v, layers) = (64, 4096, 3);
        let mut tensors: Vec<(String, Array)> = Vec::new();
        let mut add = |name: &str, shape: &[i32], dtype: Dtype| {
            tensors.push((name.into(), Array::zeros(shape, dtype).unwrap()));
        };
        // 32 MiB, so that reading the weights would show.
        add("model.layers.0.big.weight", &[2048, 4096], Dtype::Float32);
        // A quantized embedding (float16 scales), a bfloat16 head.
        add("model.embed_tokens.weight", &[v, h / 8], Dtype::Uint32);
        add("model.embed_tokens.scales", &[v, h / 64], Dtype::Float16);
        add("model.embed_tokens.biases", &[v, h / 64], Dtype::Float16);
        add("lm_head.weight", &[v, h], Dtype::Bfloat16);
        add("model.norm.weight", &[h], Dtype::Bfloat16);
        for l in 0..layers {
            // Layer 1 is twice as wide.
            let w = if l == 1 { 2 * h } else { h };
            add(
                &format!("model.layers.{l}.mlp.up_proj.weight"),
                &[w, h],
                Dtype::Bfloat16,
            );
            add(
                &format!("model.layers.{l}.input_layernorm.weight"),
                &[h],
                Dtype::Bfloat16,
            );
        }
        let refs: Vec<(&str, &Array)> = tensors.iter().map(|(n, a)| (n.as_str(), a)).collect();
        save_safetensors(&tmp.path().join("model.safetensors"), &refs).unwrap();
        drop(refs);
        drop(tensors);
        let config = serde_json::json!({
            "model_type": "llama", "hidden_size": h, "num_hidden_layers": layers,
            "intermediate_size": 2 * h, "num_attention_heads": 8, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "vocab_size": v
        });
        std::fs::write(tmp.path().join("config.json"), config.to_string()).unwrap();
        let weights = Weights::open(&resolve(tmp.path().to_str().unwrap()).unwrap()).unwrap();
        let args: ModelArgs = serde_json::from_value(weights.config.clone()).unwrap();

        let _serial = crate::mlx::MEMORY_TEST_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let before = crate::mlx::active_memory();
        let fp = Footprint::from_weights(&weights, &args, false);
        assert!(
            crate::mlx::active_memory() < before + (16 << 20),
            "weights were read"
        );

        let layer = |w: u64| (w * 64 + 64) * 2;
        assert_eq!(
            fp.layer_bytes,
            vec![layer(64) + (32 << 20), layer(128), layer(64)]
        );
        let embed = (v as u64 * 8 * 4) + 2 * (v as u64 * 2);
        assert_eq!(fp.embed_bytes, embed);
        assert_eq!(fp.head_bytes, v as u64 * 64 * 2);
        assert_eq!(fp.norm_bytes, 128);
        assert!(!fp.tied);
        // 2 (K and V) * 2 kv heads * head dim 8 * float16.
        assert_eq!(fp.kv_bytes_per_token, vec![2 * 2 * 8 * 2; 3]);
        assert_eq!(
            fp.total_weight_bytes(),
            fp.layer_bytes.iter().sum::<u64>() + embed + fp.head_bytes + 128
        );
        let tied = Footprint::from_weights(&weights, &args, true);
        assert_eq!(tied.head_bytes, embed);
        assert_eq!(
            tied.total_weight_bytes(),
            fp.layer_bytes.iter().sum::<u64>() + embed + 128
        );
    }
}
