//! GGUF's block quantizations turned into MLX affine quantization (packed
//! codes, a scale and a bias per group: `w = scale * q + bias`).
//!
//! Where llama.cpp's format is affine over 32 weights (Q4_0, Q4_1, Q5_0,
//! Q5_1, Q8_0, Q4_K, Q5_K) the codes are kept as they are, so with float32
//! scales every weight equals llama.cpp's own dequantization bit for bit;
//! with float16 scales the K-quants' `d * sc` products are rounded. Formats
//! with 16-weight sub-blocks (Q2_K, Q3_K, Q6_K) or non-uniform levels
//! (IQ4_NL, IQ4_XS) cannot be one affine group of 32: they are requantized
//! at group 32 with two more bits than the source, and the error is
//! measured and reported.
use crate::mlx::Dtype;

/// How one GGML tensor type is stored and what it becomes.
#[derive(Clone, Copy, Debug)]
pub struct GgmlType {
    pub id: u32,
    pub name: &'static str,
    /// Weights per block, and the bytes of one block.
    pub block: usize,
    pub block_bytes: usize,
    pub kind: Kind,
}

#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// Stored as the MLX dtype, unchanged.
    Float(Dtype),
    /// Affine per 32 weights: codes of `bits` and a scale and bias per group.
    Affine { bits: u32, decode: DecodeAffine },
    /// Values only: requantized at `bits`.
    Values { bits: u32, decode: DecodeValues },
    /// No conversion to MLX exists here.
    Unsupported,
}

/// One block to its codes and, per group of 32, `(scale, bias)` in f32.
pub type DecodeAffine = fn(&[u8], &mut [u8], &mut [(f32, f32)]);
/// One block to its weights, as llama.cpp dequantizes them.
pub type DecodeValues = fn(&[u8], &mut [f32]);

/// Weights per MLX group for every converted type.
pub const GROUP: usize = 32;

const fn t(id: u32, name: &'static str, block: usize, block_bytes: usize, kind: Kind) -> GgmlType {
    GgmlType {
        id,
        name,
        block,
        block_bytes,
        kind,
    }
}

const fn affine(bits: u32, decode: DecodeAffine) -> Kind {
    Kind::Affine { bits, decode }
}

const fn values(bits: u32, decode: DecodeValues) -> Kind {
    Kind::Values { bits, decode }
}

/// GGML's type table (ids as in ggml.h).
const TYPES: &[GgmlType] = &[
    t(0, "F32", 1, 4, Kind::Float(Dtype::Float32)),
    t(1, "F16", 1, 2, Kind::Float(Dtype::Float16)),
    t(2, "Q4_0", 32, 18, affine(4, q4_0)),
    t(3, "Q4_1", 32, 20, affine(4, q4_1)),
    t(6, "Q5_0", 32, 22, affine(5, q5_0)),
    t(7, "Q5_1", 32, 24, affine(5, q5_1)),
    t(8, "Q8_0", 32, 34, affine(8, q8_0)),
    t(9, "Q8_1", 32, 36, Kind::Unsupported),
    t(10, "Q2_K", 256, 84, values(4, q2_k)),
    t(11, "Q3_K", 256, 110, values(5, q3_k)),
    t(12, "Q4_K", 256, 144, affine(4, q4_k)),
    t(13, "Q5_K", 256, 176, affine(5, q5_k)),
    t(14, "Q6_K", 256, 210, values(8, q6_k)),
    t(15, "Q8_K", 256, 292, Kind::Unsupported),
    t(16, "IQ2_XXS", 256, 66, Kind::Unsupported),
    t(17, "IQ2_XS", 256, 74, Kind::Unsupported),
    t(18, "IQ3_XXS", 256, 98, Kind::Unsupported),
    t(19, "IQ1_S", 256, 50, Kind::Unsupported),
    t(20, "IQ4_NL", 32, 18, values(6, iq4_nl)),
    t(21, "IQ3_S", 256, 110, Kind::Unsupported),
    t(22, "IQ2_S", 256, 82, Kind::Unsupported),
    t(23, "IQ4_XS", 256, 136, values(6, iq4_xs)),
    t(24, "I8", 1, 1, Kind::Unsupported),
    t(25, "I16", 1, 2, Kind::Unsupported),
    t(26, "I32", 1, 4, Kind::Unsupported),
    t(27, "I64", 1, 8, Kind::Unsupported),
    t(28, "F64", 1, 8, Kind::Unsupported),
    t(29, "IQ1_M", 256, 56, Kind::Unsupported),
    t(30, "BF16", 1, 2, Kind::Float(Dtype::Bfloat16)),
    t(34, "TQ1_0", 256, 54, Kind::Unsupported),
    t(35, "TQ2_0", 256, 66, Kind::Unsupported),
    t(39, "MXFP4", 32, 17, Kind::Unsupported),
];

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES.iter().find(|t| t.id == id).copied()
    }

    /// Bytes of `n` weights (a multiple of the block).
    pub fn bytes(&self, n: u64) -> u64 {
        n / self.block as u64 * self.block_bytes as u64
    }

    /// The MLX bit width it becomes, when quantized.
    pub fn bits(&self) -> Option<u32> {
        match self.kind {
            Kind::Affine { bits, .. } | Kind::Values { bits, .. } => Some(bits),
            _ => None,
        }
    }
}

pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: normalise the mantissa.
            let shift = m.leading_zeros() - 21;
            sign | ((113 - shift) << 23) | (((m << shift) & 0x3ff) << 13)
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// Round to nearest, ties to even, as MLX's `astype(float16)`.
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rest = m & ((1 << shift) - 1);
        let mut r = m >> shift;
        if rest > half || (rest == half && r & 1 == 1) {
            r += 1;
        }
        return sign | r as u16;
    }
    let mut r = ((e as u32) << 10) | (man >> 13);
    let rest = man & 0x1fff;
    if rest > 0x1000 || (rest == 0x1000 && r & 1 == 1) {
        r += 1; // a carry into the exponent is still right
    }
    sign | r as u16
}

fn half(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn q4_0(b: &[u8], q: &mut [u8], g: &mut [(f32, f32)]) {
    let d = half(b, 0);
    nibbles(&b[2..18], q);
    g[0] = (d, -8.0 * d);
}

fn q4_1(b: &[u8], q: &mut [u8], g: &mut [(f32, f32)]) {
    nibbles(&b[4..20], q);
    g[0] = (half(b, 0), half(b, 2));
}

/// Low nibbles are weights 0..16, high nibbles 16..32.
fn nibbles(qs: &[u8], q: &mut [u8]) {
    for j in 0..16 {
        q[j] = qs[j] & 0xf;
        q[j + 16] = qs[j] >> 4;
    }
}

/// Five-bit codes: nibbles plus a high bit from `qh` (bit j for weight j).
fn fives(qh: u32, qs: &[u8], q: &mut [u8]) {
    nibbles(qs, q);
    for (j, v) in q.iter_mut().enumerate().take(32) {
        *v |= (((qh >> j) & 1) << 4) as u8;
    }
}

fn q5_0(b: &[u8], q: &mut [u8], g: &mut [(f32, f32)]) {
    let d = half(b, 0);
    fives(u32::from_le_bytes([b[2], b[3], b[4], b[5]]), &b[6..22], q);
    g[0] = (d, -16.0 * d);
}

fn q5_1(b: &[u8], q: &mut [u8], g: &mut [(f32, f32)]) {
    fives(u32::from_le_bytes([b[4], b[5], b[6], b[7]]), &b[8..24], q);
    g[0] = (half(b, 0), half(b, 2));
}

fn q8_0(b: &[u8], q: &mut [u8], g: &mut [(f32, f32)]) {
    let d = half(b, 0);
    for j in 0..32 {
        q[j] = (b[2 + j] as i8 as i16 + 128) as u8;
    }
    g[0] = (d, -128.0 * d);
}

/// The 6-bit scale and minimum of sub-block `j` of a Q4_K/Q5_K block.
fn scale_min_k4(j: usize, s: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    };
    (sc as f32, m as f32)
}

fn q4_k(b: &[u8], q: &mut [u8], g: &mut [(f32, f32)]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for c in 0..4 {
        for h in 0..2 {
            let (sc, m) = scale_min_k4(2 * c + h, scales);
            g[2 * c + h] = (d * sc, -(dmin * m));
            for l in 0..32 {
                q[c * 64 + h * 32 + l] = (qs[c * 32 + l] >> (4 * h)) & 0xf;
            }
        }
    }
}

fn q5_k(b: &[u8], q: &mut [u8], g: &mut [(f32, f32)]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for c in 0..4 {
        for h in 0..2 {
            let (sc, m) = scale_min_k4(2 * c + h, scales);
            g[2 * c + h] = (d * sc, -(dmin * m));
            let high = 1u8 << (2 * c + h);
            for l in 0..32 {
                let lo = (qs[c * 32 + l] >> (4 * h)) & 0xf;
                q[c * 64 + h * 32 + l] = lo | if qh[l] & high != 0 { 16 } else { 0 };
            }
        }
    }
}

fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = half(b, 208);
    for n in 0..2 {
        let (ql, qh) = (&b[64 * n..], &b[128 + 32 * n..]);
        let sc = |i: usize| b[192 + 8 * n + i] as i8 as f32;
        let y = &mut y[128 * n..];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * sc(is) * q1 as f32;
            y[l + 32] = d * sc(is + 2) * q2 as f32;
            y[l + 64] = d * sc(is + 4) * q3 as f32;
            y[l + 96] = d * sc(is + 6) * q4 as f32;
        }
    }
}

fn q3_k(b: &[u8], y: &mut [f32]) {
    let (hmask, qs, raw) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = half(b, 108);
    // 16 six-bit scales: low nibbles from bytes 0..8, high pairs from 8..12.
    let mut scales = [0i32; 16];
    for (i, s) in scales.iter_mut().enumerate() {
        let low = (raw[i % 8] >> (4 * (i / 8))) & 0xf;
        let high = (raw[8 + i % 4] >> (2 * (i / 4))) & 3;
        *s = (low | (high << 4)) as i32 - 32;
    }
    let mut is = 0;
    let mut m = 1u8;
    for n in 0..2 {
        let q = &qs[32 * n..];
        for j in 0..4 {
            let shift = 2 * j;
            for half in 0..2 {
                let dl = d * scales[is] as f32;
                is += 1;
                for l in 0..16 {
                    let k = half * 16 + l;
                    let v = ((q[k] >> shift) & 3) as i32 - if hmask[k] & m != 0 { 0 } else { 4 };
                    y[128 * n + 32 * j + k] = dl * v as f32;
                }
            }
            m <<= 1;
        }
    }
}

fn q2_k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (half(b, 80), half(b, 82));
    let mut is = 0;
    for n in 0..2 {
        let q = &qs[32 * n..];
        for j in 0..4 {
            let shift = 2 * j;
            for half in 0..2 {
                let sc = scales[is];
                is += 1;
                let (dl, ml) = (d * (sc & 0xf) as f32, dmin * (sc >> 4) as f32);
                for l in 0..16 {
                    let k = half * 16 + l;
                    y[128 * n + 32 * j + k] = dl * ((q[k] >> shift) & 3) as f32 - ml;
                }
            }
        }
    }
}

/// IQ4's 16 non-uniform levels.
const IQ4_LEVELS: [f32; 16] = [
    -127.0, -104.0, -83.0, -65.0, -49.0, -35.0, -22.0, -10.0, 1.0, 13.0, 25.0, 38.0, 53.0, 69.0,
    89.0, 113.0,
];

fn iq4_nl(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    for j in 0..16 {
        y[j] = d * IQ4_LEVELS[(b[2 + j] & 0xf) as usize];
        y[j + 16] = d * IQ4_LEVELS[(b[2 + j] >> 4) as usize];
    }
}

fn iq4_xs(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    let scales_h = u16::from_le_bytes([b[2], b[3]]);
    for ib in 0..8 {
        let low = (b[4 + ib / 2] >> (4 * (ib % 2))) & 0xf;
        let ls = (low as u16 | (((scales_h >> (2 * ib)) & 3) << 4)) as i32;
        let dl = d * (ls - 32) as f32;
        let qs = &b[8 + 16 * ib..];
        for j in 0..16 {
            y[32 * ib + j] = dl * IQ4_LEVELS[(qs[j] & 0xf) as usize];
            y[32 * ib + j + 16] = dl * IQ4_LEVELS[(qs[j] >> 4) as usize];
        }
    }
}

/// A quantized matrix in MLX's layout, `[rows, cols * bits / 32]` words and
/// `[rows, cols / 32]` scales and biases.
pub struct Affine {
    pub words: Vec<u32>,
    /// Scales and biases as stored (float32 or float16 bits).
    pub scales: Vec<u8>,
    pub biases: Vec<u8>,
    pub bits: u32,
    pub dtype: Dtype,
    /// The largest difference between a weight as llama.cpp dequantizes it
    /// and as MLX will, and the largest weight's magnitude.
    pub max_error: f32,
    pub max_abs: f32,
}

/// Packs codes into MLX's bitstream: code i takes bits `[i*b, (i+1)*b)` of
/// the row, in little-endian 32-bit words.
struct Packer<'a> {
    out: &'a mut [u32],
    at: usize,
    acc: u64,
    n: u32,
}

impl Packer<'_> {
    fn push(&mut self, code: u8, bits: u32) {
        self.acc |= (code as u64) << self.n;
        self.n += bits;
        if self.n >= 32 {
            self.out[self.at] = self.acc as u32;
            self.at += 1;
            self.acc >>= 32;
            self.n -= 32;
        }
    }
}

/// The value a scale or bias takes once stored in `dtype`.
fn stored(x: f32, dtype: Dtype) -> f32 {
    match dtype {
        Dtype::Float16 => f16_to_f32(f32_to_f16(x)),
        _ => x,
    }
}

fn put(out: &mut [u8], i: usize, x: f32, dtype: Dtype) {
    match dtype {
        Dtype::Float16 => out[2 * i..2 * i + 2].copy_from_slice(&f32_to_f16(x).to_le_bytes()),
        _ => out[4 * i..4 * i + 4].copy_from_slice(&x.to_le_bytes()),
    }
}

/// Converts `rows` rows of `cols` weights of type `ty` from `data` (row `r`
/// of the result is source row `order[r]`, when given), with scales and
/// biases in `dtype` (float16 or float32). Rows are split over threads.
pub fn to_affine(
    ty: &GgmlType,
    data: &[u8],
    rows: usize,
    cols: usize,
    order: Option<&[usize]>,
    dtype: Dtype,
) -> Affine {
    let bits = ty.bits().expect("a quantized type");
    let (row_bytes, row_words, groups) = (
        ty.bytes(cols as u64) as usize,
        cols * bits as usize / 32,
        cols / GROUP,
    );
    let size = dtype.size();
    let mut words = vec![0u32; rows * row_words];
    let mut scales = vec![0u8; rows * groups * size];
    let mut biases = vec![0u8; rows * groups * size];
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(rows.max(1));
    let per = rows.div_ceil(threads.max(1)).max(1);
    let mut errors = Vec::new();
    std::thread::scope(|s| {
        let parts = words
            .chunks_mut(per * row_words.max(1))
            .zip(scales.chunks_mut(per * groups * size))
            .zip(biases.chunks_mut(per * groups * size))
            .enumerate();
        let handles: Vec<_> = parts
            .map(|(p, ((w, sc), bi))| {
                s.spawn(move || {
                    let mut err = (0f32, 0f32);
                    for (i, w) in w.chunks_mut(row_words.max(1)).enumerate() {
                        let r = p * per + i;
                        let src = order.map_or(r, |o| o[r]);
                        let row = &data[src * row_bytes..(src + 1) * row_bytes];
                        let g0 = i * groups;
                        let e = convert_row(ty, row, w, sc, bi, g0, dtype);
                        err = (err.0.max(e.0), err.1.max(e.1));
                    }
                    err
                })
            })
            .collect();
        errors = handles
            .into_iter()
            .map(|h| h.join().expect("conversion thread"))
            .collect();
    });
    let (max_error, max_abs) = errors
        .iter()
        .fold((0f32, 0f32), |a, e| (a.0.max(e.0), a.1.max(e.1)));
    Affine {
        words,
        scales,
        biases,
        bits,
        dtype,
        max_error,
        max_abs,
    }
}

/// One row; returns (largest error, largest magnitude).
fn convert_row(
    ty: &GgmlType,
    row: &[u8],
    words: &mut [u32],
    scales: &mut [u8],
    biases: &mut [u8],
    g0: usize,
    dtype: Dtype,
) -> (f32, f32) {
    let mut packer = Packer {
        out: words,
        at: 0,
        acc: 0,
        n: 0,
    };
    let (mut err, mut big) = (0f32, 0f32);
    let mut codes = vec![0u8; ty.block];
    let mut groups = vec![(0f32, 0f32); ty.block / GROUP];
    let mut vals = vec![0f32; ty.block];
    let mut g = g0;
    for block in row.chunks_exact(ty.block_bytes) {
        match ty.kind {
            Kind::Affine { bits, decode } => {
                decode(block, &mut codes, &mut groups);
                for (k, &(s, b)) in groups.iter().enumerate() {
                    let (ss, sb) = (stored(s, dtype), stored(b, dtype));
                    for &q in &codes[k * GROUP..(k + 1) * GROUP] {
                        let want = s * q as f32 + b;
                        err = err.max((ss * q as f32 + sb - want).abs());
                        big = big.max(want.abs());
                        packer.push(q, bits);
                    }
                    put(scales, g, s, dtype);
                    put(biases, g, b, dtype);
                    g += 1;
                }
            }
            Kind::Values { bits, decode } => {
                decode(block, &mut vals);
                let top = ((1u32 << bits) - 1) as f32;
                for v in vals.chunks_exact(GROUP) {
                    let lo = v.iter().copied().fold(f32::INFINITY, f32::min);
                    let hi = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let (s, b) = (stored((hi - lo) / top, dtype), stored(lo, dtype));
                    for &x in v {
                        let q = if s > 0.0 {
                            ((x - b) / s).round().clamp(0.0, top)
                        } else {
                            0.0
                        };
                        err = err.max((s * q + b - x).abs());
                        big = big.max(x.abs());
                        packer.push(q as u8, bits);
                    }
                    put(scales, g, s, dtype);
                    put(biases, g, b, dtype);
                    g += 1;
                }
            }
            _ => unreachable!("only quantized types convert"),
        }
    }
    (err, big)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mlx::{ops, Array};

    #[test]
    fn half_floats_round_trip_and_round_as_mlx_does() {
        for h in 0..=u16::MAX {
            let x = f16_to_f32(h);
            if x.is_nan() {
                continue;
            }
            assert_eq!(f32_to_f16(x), h, "{h:#x} -> {x}");
        }
        let xs: Vec<f32> = (0..4000)
            .map(|i| ((i as f32) * 0.7331).sin() * 10f32.powi(i % 12 - 7))
            .chain([65504.0, 65520.0, 1e9, -1e-9, 6.1e-5, 5.96e-8, 2.98e-8])
            .collect();
        let mlx = Array::from_slice(&xs, &[xs.len() as i32])
            .unwrap()
            .astype(Dtype::Float16)
            .unwrap()
            .astype(Dtype::Float32)
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        for (x, m) in xs.iter().zip(mlx) {
            assert_eq!(f16_to_f32(f32_to_f16(*x)).to_bits(), m.to_bits(), "{x}");
        }
    }

    /// Codes packed here read back through MLX's own dequantize as the
    /// weights they stand for, at every bit width used.
    #[test]
    fn packed_codes_dequantize_in_mlx_to_the_weights() {
        let cols = 64;
        for (name, exact) in [
            ("Q4_0", true),
            ("Q5_1", true),
            ("Q8_0", true),
            ("Q4_K", true),
            ("Q5_K", true),
            ("Q3_K", false),
            ("Q6_K", false),
            ("IQ4_NL", false),
        ] {
            let ty = TYPES.iter().find(|t| t.name == name).unwrap();
            let cols = cols.max(ty.block);
            let rows = 3;
            let mut data: Vec<u8> = (0..rows * ty.bytes(cols as u64) as usize)
                .map(|i| (i as u32).wrapping_mul(2654435761).rotate_right(13) as u8)
                .collect();
            // Small finite half-float scales where each format keeps them.
            let d_at: &[usize] = match name {
                "Q3_K" => &[108],
                "Q6_K" => &[208],
                "Q4_K" | "Q5_K" => &[0, 2],
                "Q5_1" => &[0, 2],
                _ => &[0],
            };
            for b in data.chunks_exact_mut(ty.block_bytes) {
                for &at in d_at {
                    b[at..at + 2].copy_from_slice(&f32_to_f16(0.01).to_le_bytes());
                }
            }
            let order = [2, 0, 1];
            let a = to_affine(ty, &data, rows, cols, Some(&order), Dtype::Float32);
            let w = Array::from_slice(&a.words, &[rows as i32, (cols as u32 * a.bits / 32) as i32])
                .unwrap();
            let groups = [rows as i32, (cols / GROUP) as i32];
            let s = Array::from_bytes(&a.scales, &groups, Dtype::Float32).unwrap();
            let b = Array::from_bytes(&a.biases, &groups, Dtype::Float32).unwrap();
            let got = ops::dequantize(&w, &s, Some(&b), GROUP as i32, a.bits as i32)
                .unwrap()
                .to_vec::<f32>()
                .unwrap();
            // The reference: this module's own block decoding, row order applied.
            let row_bytes = ty.bytes(cols as u64) as usize;
            let mut want = Vec::new();
            for &r in &order {
                for block in data[r * row_bytes..(r + 1) * row_bytes].chunks_exact(ty.block_bytes) {
                    let mut v = vec![0f32; ty.block];
                    match ty.kind {
                        Kind::Affine { decode, .. } => {
                            let mut q = vec![0u8; ty.block];
                            let mut g = vec![(0f32, 0f32); ty.block / GROUP];
                            decode(block, &mut q, &mut g);
                            for (i, x) in v.iter_mut().enumerate() {
                                let (s, b) = g[i / GROUP];
                                *x = s * q[i] as f32 + b;
                            }
                        }
                        Kind::Values { decode, .. } => decode(block, &mut v),
                        _ => unreachable!(),
                    }
                    want.extend(v);
                }
            }
            let worst = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs())
                .fold(0f32, f32::max);
            if exact {
                assert_eq!(worst, 0.0, "{name}");
                assert_eq!(a.max_error, 0.0, "{name}");
            } else {
                assert!(
                    worst > 0.0 && worst <= a.max_error * 1.0001,
                    "{name}: {worst} vs {}",
                    a.max_error
                );
            }
        }
    }
}
