//! The KV cache protocol. Two stores behind one `update_and_fetch`:
//! - `KvCache`: one sequence's cache per layer, grown in steps of 256
//!   positions as mlx-lm's `KVCache` does (same buffers, same slices, so
//!   attention sees bit-identical inputs);
//! - `SlotCache`: the caches of all the sequences a worker holds, one row
//!   (slot) each in one buffer per layer, so that a decode step of many
//!   sequences writes with one scatter and attends with one call.
//!
//! Model code only calls `CacheRef::update_and_fetch` (and asks it for the
//! positions to rotate by and the mask to attend with).
use crate::error::{Error, Result};
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

    /// A cache holding `keys` and `values` (`[1, H, capacity, D]`), of which
    /// the first `offset` positions are used.
    pub fn from_parts(keys: Array, values: Array, offset: i32) -> KvCache {
        KvCache {
            keys: Some(keys),
            values: Some(values),
            offset,
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

    /// A copy holding only the positions used, evaluated: what a kept
    /// prefix needs (the room grown for more positions would be dead weight).
    pub fn compacted(&self) -> Result<KvCache> {
        let (Some(k), Some(v)) = (&self.keys, &self.values) else {
            return Ok(KvCache::new());
        };
        if self.offset == 0 {
            return Ok(KvCache::new());
        }
        let k = owned(&k.slice_axis(2, 0, self.offset)?)?;
        let v = owned(&v.slice_axis(2, 0, self.offset)?)?;
        crate::mlx::eval(&[&k, &v])?;
        Ok(KvCache::from_parts(k, v, self.offset))
    }
}

/// `x` in a buffer of about its own size: MLX copies a view of a larger
/// buffer here, where a view (or a `slice_update` covering a whole array of
/// zeros, which MLX turns into the update itself) would pin all of it: a
/// kept prefix of 34 positions held its sequence's 256-position row, 11.8
/// MB on a 135M model.
fn owned(x: &Array) -> Result<Array> {
    x.contiguous()
}

/// The positions a cache grown in steps allocates to hold `n`.
pub fn room_for(n: u64) -> u64 {
    n.div_ceil(STEP as u64) * STEP as u64
}

/// One layer's caches of many sequences: `[slots, H, capacity, D]` keys and
/// values, row `s` holding sequence `s`'s first `lengths[s]` positions.
/// Rows and capacity grow (copying the buffer) as sequences join and
/// lengthen; a freed row is reused.
#[derive(Default)]
pub struct SlotCache {
    keys: Option<Array>,
    values: Option<Array>,
    lengths: Vec<i32>,
    capacity: i32,
}

impl SlotCache {
    pub fn new() -> SlotCache {
        SlotCache::default()
    }

    /// Rows.
    pub fn slots(&self) -> usize {
        self.lengths.len()
    }

    /// Positions held in `slot`.
    pub fn length(&self, slot: usize) -> i32 {
        self.lengths.get(slot).copied().unwrap_or(0)
    }

    /// Positions each row has room for (after `reserve`, at the next write).
    pub fn capacity(&self) -> i32 {
        self.capacity
    }

    /// Makes room for `slots` rows of `positions` each; the buffers grow at
    /// their next write.
    pub fn reserve(&mut self, slots: usize, positions: i32) {
        if slots > self.lengths.len() {
            self.lengths.resize(slots, 0);
        }
        self.capacity = self.capacity.max(room_for(positions.max(0) as u64) as i32);
    }

    /// Forgets `slot`'s positions from `length` on (their buffer rows are
    /// overwritten by the next writes).
    pub fn truncate(&mut self, slot: usize, length: i32) {
        if let Some(l) = self.lengths.get_mut(slot) {
            *l = (*l).min(length.max(0));
        }
    }

    /// Forgets what `slot` holds (its row is reused as is).
    pub fn clear_slot(&mut self, slot: usize) {
        if let Some(l) = self.lengths.get_mut(slot) {
            *l = 0;
        }
    }

    /// Drops the buffers.
    pub fn clear(&mut self) {
        *self = SlotCache::default();
    }

    /// Brings the buffers to `[slots, H, capacity, D]`.
    fn grow(&mut self, keys: &Array, values: &Array) -> Result<()> {
        let rows = self.lengths.len() as i32;
        let cap = self.capacity;
        let grown = |buf: Option<Array>, like: &Array| -> Result<Array> {
            let (h, d) = (like.dim(1), like.dim(3));
            let Some(mut b) = buf else {
                return Array::zeros(&[rows, h, cap, d], like.dtype());
            };
            if b.dim(2) < cap {
                let more = Array::zeros(&[b.dim(0), h, cap - b.dim(2), d], b.dtype())?;
                b = ops::concatenate(&[&b, &more], 2)?;
            }
            if b.dim(0) < rows {
                let more = Array::zeros(&[rows - b.dim(0), h, cap, d], b.dtype())?;
                b = ops::concatenate(&[&b, &more], 0)?;
            }
            Ok(b)
        };
        let k = grown(self.keys.take(), keys)?;
        let v = grown(self.values.take(), values)?;
        self.keys = Some(k);
        self.values = Some(v);
        Ok(())
    }

    /// Appends `[1, H, L, D]` keys and values to `slot`; returns all it holds.
    fn update_slot(&mut self, slot: usize, keys: &Array, values: &Array) -> Result<(Array, Array)> {
        let prev = self.length(slot);
        let (l, end) = (keys.dim(2), prev + keys.dim(2));
        self.reserve(slot + 1, end);
        self.grow(keys, values)?;
        let s = slot as i32;
        let write = |buf: &Array, x: &Array| {
            buf.slice_update(x, &[s, 0, prev, 0], &[s + 1, x.dim(1), end, x.dim(3)])
        };
        let k = write(self.keys.as_ref().unwrap(), keys)?;
        let v = write(self.values.as_ref().unwrap(), values)?;
        self.keys = Some(k);
        self.values = Some(v);
        self.lengths[slot] = prev + l;
        let read = |buf: &Array| {
            buf.slice(
                &[s, 0, 0, 0],
                &[s + 1, buf.dim(1), end, buf.dim(3)],
                &[1, 1, 1, 1],
            )
        };
        Ok((
            read(self.keys.as_ref().unwrap())?,
            read(self.values.as_ref().unwrap())?,
        ))
    }

    /// Appends one position (`[B, 1, H, D]` keys and values, row `b` for
    /// `rows.slots[b]`); returns `[B, H, L, D]` keys and values of those
    /// slots, `L` the longest, to attend with `rows.mask`.
    fn update_rows(&mut self, rows: &Rows, keys: &Array, values: &Array) -> Result<(Array, Array)> {
        let top = rows.slots.iter().max().map_or(0, |&s| s + 1);
        self.reserve(top, rows.longest);
        self.grow(keys, values)?;
        let at = [&rows.ids, &rows.positions];
        let write = |buf: &Array, x: &Array| {
            let (b, h, d) = (x.dim(0), x.dim(1), x.dim(3));
            buf.scatter(&at, &x.reshape(&[b, 1, h, 1, d])?, &[0, 2])
        };
        let k = write(self.keys.as_ref().unwrap(), keys)?;
        let v = write(self.values.as_ref().unwrap(), values)?;
        self.keys = Some(k);
        self.values = Some(v);
        for &s in &rows.slots {
            self.lengths[s] += 1;
        }
        let read = |buf: &Array| -> Result<Array> {
            let used = buf.slice_axis(2, 0, rows.longest)?;
            let n = rows.slots.len() as i32;
            match rows.run {
                Some(0) if n == used.dim(0) => Ok(used),
                Some(first) => used.slice_axis(0, first, first + n),
                None => used.take(&rows.ids, 0),
            }
        };
        Ok((
            read(self.keys.as_ref().unwrap())?,
            read(self.values.as_ref().unwrap())?,
        ))
    }

    /// Puts a sequence's own cache (a kept prefix) into `slot`.
    pub fn copy_in(&mut self, slot: usize, from: &KvCache) -> Result<()> {
        self.clear_slot(slot);
        if let (Some(k), Some(v)) = (&from.keys, &from.values) {
            let n = from.offset;
            if n > 0 {
                self.update_slot(slot, &k.slice_axis(2, 0, n)?, &v.slice_axis(2, 0, n)?)?;
            }
        }
        Ok(())
    }

    /// A copy of what `slot` holds as a sequence's own cache, evaluated (a
    /// view would pin the shared buffer and stop in-place writes to it).
    /// Only the positions held are copied: a kept prefix of 34 positions
    /// took the 256 of a grown row before, 7.5 times its size.
    pub fn copy_out(&self, slot: usize) -> Result<KvCache> {
        let n = self.length(slot);
        let (Some(keys), Some(values)) = (&self.keys, &self.values) else {
            return Ok(KvCache::new());
        };
        if n == 0 {
            return Ok(KvCache::new());
        }
        let s = slot as i32;
        let own = |buf: &Array| -> Result<Array> {
            let (h, d) = (buf.dim(1), buf.dim(3));
            let row = buf.slice(&[s, 0, 0, 0], &[s + 1, h, n, d], &[1, 1, 1, 1])?;
            owned(&row)
        };
        let (k, v) = (own(keys)?, own(values)?);
        crate::mlx::eval(&[&k, &v])?;
        Ok(KvCache::from_parts(k, v, n))
    }

    /// Bytes held by the buffers (every row's capacity).
    pub fn nbytes(&self) -> usize {
        self.keys.as_ref().map_or(0, |k| k.nbytes())
            + self.values.as_ref().map_or(0, |v| v.nbytes())
    }

    /// The arrays to evaluate to materialise the cache.
    pub fn state(&self) -> Vec<&Array> {
        self.keys.iter().chain(self.values.iter()).collect()
    }
}

/// The sequences of one batched decode step, read off a `SlotCache` before
/// it: where each writes, and the mask that keeps each row to its own
/// positions. Built once per step, shared by every layer.
pub struct Rows {
    slots: Vec<usize>,
    /// `slots` as int32 `[B]`.
    ids: Array,
    /// Where each row writes: its length before the step, int32 `[B]`.
    positions: Array,
    /// `[B, 1, 1, longest]`: true where row `b` attends; none when every
    /// row is at the same position (each attends to all `longest` keys, and
    /// attention takes MLX's unmasked single-query path, as mlx-lm's batches
    /// of equal prompts do).
    mask: Option<Array>,
    /// That common position, if any: rotary embeddings get one offset.
    same: Option<i32>,
    /// Positions of the longest row after the step.
    longest: i32,
    /// The first slot when the rows are consecutive slots in order: they
    /// attend on that run of the buffer as it lies, with no gather.
    run: Option<i32>,
}

impl Rows {
    /// Whether attention needs a mask (rows at different positions).
    #[cfg(test)]
    pub fn masked(&self) -> bool {
        self.mask.is_some()
    }

    pub fn new(cache: &SlotCache, slots: &[usize]) -> Result<Rows> {
        let mut seen = vec![false; cache.slots()];
        for &s in slots {
            if s >= cache.slots() || std::mem::replace(&mut seen[s], true) {
                return Err(Error::InvalidArgument(format!(
                    "slot {s} is not held or is in the batch twice"
                )));
            }
        }
        let positions: Vec<i32> = slots.iter().map(|&s| cache.length(s)).collect();
        let longest = positions.iter().max().map_or(1, |p| p + 1);
        let same = positions
            .first()
            .copied()
            .filter(|p| positions.iter().all(|q| q == p));
        let b = slots.len() as i32;
        let mask = if same.is_some() {
            None
        } else {
            let mut mask = Vec::with_capacity(slots.len() * longest as usize);
            for &p in &positions {
                mask.extend((0..longest).map(|j| j <= p));
            }
            Some(Array::from_slice(&mask, &[b, 1, 1, longest])?)
        };
        let ids: Vec<i32> = slots.iter().map(|&s| s as i32).collect();
        Ok(Rows {
            slots: slots.to_vec(),
            ids: Array::from_slice(&ids, &[b])?,
            positions: Array::from_slice(&positions, &[b])?,
            mask,
            same,
            longest,
            run: slots
                .windows(2)
                .all(|w| w[1] == w[0] + 1)
                .then(|| slots.first().map_or(0, |&s| s as i32)),
        })
    }
}

/// Where rotary embeddings start.
pub use crate::mlx::ops::Offset as Positions;

/// The cache one layer's attention appends to.
pub enum CacheRef<'a> {
    /// A sequence's own cache.
    Seq(&'a mut KvCache),
    /// One sequence's row of a shared cache.
    Slot(&'a mut SlotCache, usize),
    /// One decode position for each of several rows of a shared cache.
    Rows(&'a mut SlotCache, &'a Rows),
}

impl CacheRef<'_> {
    /// The positions of the keys and values about to be appended.
    pub fn positions(&self) -> Positions<'_> {
        match self {
            CacheRef::Seq(c) => Positions::From(c.offset()),
            CacheRef::Slot(c, s) => Positions::From(c.length(*s)),
            CacheRef::Rows(_, r) => match r.same {
                Some(p) => Positions::From(p),
                None => Positions::PerRow(&r.positions),
            },
        }
    }

    /// A mask to attend with in place of the causal/none one, if any.
    pub fn mask(&self) -> Option<&Array> {
        match self {
            CacheRef::Rows(_, r) => r.mask.as_ref(),
            _ => None,
        }
    }

    /// Appends `[B, H, L, D]` keys and values; returns those to attend to.
    pub fn update_and_fetch(&mut self, keys: &Array, values: &Array) -> Result<(Array, Array)> {
        match self {
            CacheRef::Seq(c) => c.update_and_fetch(keys, values),
            CacheRef::Slot(c, s) => c.update_slot(*s, keys, values),
            CacheRef::Rows(c, r) => c.update_rows(r, keys, values),
        }
    }
}

/// The caches of a forward pass through several layers, one per layer.
pub enum Caches<'a> {
    None,
    Seq(&'a mut [KvCache]),
    Slot(&'a mut [SlotCache], usize),
    Rows(&'a mut [SlotCache], &'a Rows),
}

impl Caches<'_> {
    /// Layers covered (`None`: any).
    pub fn layers(&self) -> Option<usize> {
        match self {
            Caches::None => None,
            Caches::Seq(c) => Some(c.len()),
            Caches::Slot(c, _) | Caches::Rows(c, _) => Some(c.len()),
        }
    }

    /// Layer `i`'s cache.
    pub fn layer(&mut self, i: usize) -> Option<CacheRef<'_>> {
        match self {
            Caches::None => None,
            Caches::Seq(c) => Some(CacheRef::Seq(&mut c[i])),
            Caches::Slot(c, s) => Some(CacheRef::Slot(&mut c[i], *s)),
            Caches::Rows(c, r) => Some(CacheRef::Rows(&mut c[i], r)),
        }
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
