//! The KV cache protocol: one cache per layer per sequence, grown in steps
//! of 256 positions as mlx-lm's `KVCache` does (same buffers, same slices, so
//! attention sees bit-identical inputs). Model code only calls
//! `update_and_fetch`.
use crate::error::Result;
use crate::mlx::{ops, Array};

const STEP: i32 = 256;

#[derive(Default, Clone)]
pub struct KvCache {
    keys: Option<Array>,
    values: Option<Array>,
    offset: i32,
}

impl KvCache {
    pub fn new() -> KvCache {
        KvCache::default()
    }

    /// Positions held.
    pub fn offset(&self) -> i32 {
        self.offset
    }

    /// Appends `[B, H, L, D]` keys and values; returns all keys and values
    /// held so far.
    pub fn update_and_fetch(&mut self, keys: &Array, values: &Array) -> Result<(Array, Array)> {
        let prev = self.offset;
        let (ks, vs) = (keys.shape(), values.shape());
        let l = ks[2];
        let capacity = self.keys.as_ref().map_or(0, |k| k.dim(2));
        if self.keys.is_none() || prev + l > capacity {
            let n_steps = (STEP + l - 1) / STEP;
            let new_k = Array::zeros(&[ks[0], ks[1], n_steps * STEP, ks[3]], keys.dtype())?;
            let new_v = Array::zeros(&[vs[0], vs[1], n_steps * STEP, vs[3]], values.dtype())?;
            match (self.keys.take(), self.values.take()) {
                (Some(mut k), Some(mut v)) => {
                    if prev % STEP != 0 {
                        k = k.slice_axis(2, 0, prev)?;
                        v = v.slice_axis(2, 0, prev)?;
                    }
                    self.keys = Some(ops::concatenate(&[&k, &new_k], 2)?);
                    self.values = Some(ops::concatenate(&[&v, &new_v], 2)?);
                }
                _ => {
                    self.keys = Some(new_k);
                    self.values = Some(new_v);
                }
            }
        }
        self.offset += l;
        let (k, v) = (self.keys.as_ref().unwrap(), self.values.as_ref().unwrap());
        let k = k.slice_update(keys, &[0, 0, prev, 0], &[ks[0], ks[1], self.offset, ks[3]])?;
        let v = v.slice_update(
            values,
            &[0, 0, prev, 0],
            &[vs[0], vs[1], self.offset, vs[3]],
        )?;
        self.keys = Some(k);
        self.values = Some(v);
        self.fetch()
    }

    fn fetch(&self) -> Result<(Array, Array)> {
        let (k, v) = (self.keys.as_ref().unwrap(), self.values.as_ref().unwrap());
        if self.offset < k.dim(2) {
            Ok((
                k.slice_axis(2, 0, self.offset)?,
                v.slice_axis(2, 0, self.offset)?,
            ))
        } else {
            Ok((k.clone(), v.clone()))
        }
    }

    /// Drops the last `n` positions; returns how many were dropped.
    pub fn trim(&mut self, n: i32) -> i32 {
        let n = n.min(self.offset);
        self.offset -= n;
        n
    }

    /// Bytes held by the buffers (capacity, not only the used part).
    pub fn nbytes(&self) -> usize {
        self.keys.as_ref().map_or(0, |k| k.nbytes())
            + self.values.as_ref().map_or(0, |v| v.nbytes())
    }

    /// The arrays to evaluate to materialise the cache.
    pub fn state(&self) -> Vec<&Array> {
        self.keys.iter().chain(self.values.iter()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mlx::Dtype;

    fn filled(l: i32, v: f32) -> Array {
        Array::full(&[1, 2, l, 4], v as f64, Dtype::Float32).unwrap()
    }

    #[test]
    fn grows_in_steps_and_returns_exactly_the_used_positions() {
        let mut c = KvCache::new();
        let (k, _) = c
            .update_and_fetch(&filled(3, 1.0), &filled(3, 2.0))
            .unwrap();
        assert_eq!(k.shape(), vec![1, 2, 3, 4]);
        assert_eq!(c.nbytes(), 2 * 2 * 256 * 4 * 4);
        for i in 0..300 {
            let (k, v) = c
                .update_and_fetch(&filled(1, i as f32), &filled(1, 0.0))
                .unwrap();
            assert_eq!(k.dim(2), 4 + i);
            assert_eq!(v.dim(2), 4 + i);
        }
        assert_eq!(c.offset(), 303);
        assert_eq!(c.nbytes(), 2 * 2 * 512 * 4 * 4);
        let (k, _) = c
            .update_and_fetch(&filled(1, 7.0), &filled(1, 7.0))
            .unwrap();
        let last = k.slice_axis(2, 303, 304).unwrap().to_vec::<f32>().unwrap();
        assert!(last.iter().all(|&x| x == 7.0));
        let first = k.slice_axis(2, 0, 3).unwrap().to_vec::<f32>().unwrap();
        assert!(first.iter().all(|&x| x == 1.0));
    }

    #[test]
    fn trim_rewinds() {
        let mut c = KvCache::new();
        c.update_and_fetch(&filled(10, 1.0), &filled(10, 1.0))
            .unwrap();
        assert_eq!(c.trim(4), 4);
        assert_eq!(c.trim(100), 6);
        assert_eq!(c.offset(), 0);
    }
}
