//! The prefix cache: KV caches of finished sequences kept for later ones
//! that begin with the same tokens (a shared system prompt, the earlier
//! turns of a chat), so those positions are not computed again.
//!
//! The coordinator decides: its `PrefixIndex` remembers which tokens each
//! kept prefix holds and, for a new prompt, names the longest usable one
//! and how many positions to take from it. Each stage keeps the caches in
//! a `PrefixStore`, bounded by bytes, least recently used evicted first; a
//! stage that evicted one refuses the step and the coordinator starts over
//! without it.
//!
//! A model in this process keeps both halves in one `PrefixCache`.
use std::collections::VecDeque;

use crate::cache::KvCache;

/// A prompt shares fewer positions than this with every kept prefix: not
/// worth a lookup on every stage.
pub const MIN_PREFIX: usize = 4;

/// The coordinator's view: the tokens each kept prefix holds.
#[derive(Default)]
pub struct PrefixIndex {
    /// Most recently used first.
    entries: VecDeque<(String, Vec<u32>)>,
}

/// Prefixes the coordinator remembers at most (stages may hold fewer).
const INDEX_ENTRIES: usize = 256;

impl PrefixIndex {
    /// The kept prefix sharing the most leading tokens with `prompt`, and
    /// how many (at most all but the last prompt token, which must run to
    /// produce logits).
    pub fn lookup(&mut self, prompt: &[u32]) -> Option<(String, usize)> {
        let limit = prompt.len().saturating_sub(1);
        let (i, n) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, (_, t))| {
                let n = t.iter().zip(prompt).take_while(|(a, b)| a == b).count();
                (i, n.min(limit))
            })
            .max_by_key(|&(i, n)| (n, std::cmp::Reverse(i)))?;
        if n < MIN_PREFIX {
            return None;
        }
        let entry = self.entries.remove(i)?;
        let id = entry.0.clone();
        self.entries.push_front(entry);
        Some((id, n))
    }

    /// Remembers that the stages keep `tokens`' cache under `id`. Returns
    /// whether it did, and the ids of the entries it forgot (those the new
    /// one covers, and the oldest beyond the index's size).
    pub fn insert(&mut self, id: String, tokens: Vec<u32>) -> (bool, Vec<String>) {
        if tokens.len() < MIN_PREFIX {
            return (false, Vec::new());
        }
        // A prefix another entry already covers adds nothing.
        if self.entries.iter().any(|(_, t)| t.starts_with(&tokens)) {
            return (false, Vec::new());
        }
        let mut dropped = Vec::new();
        self.entries.retain(|(i, t)| {
            let covered = tokens.starts_with(t);
            if covered {
                dropped.push(i.clone());
            }
            !covered
        });
        self.entries.push_front((id, tokens));
        while self.entries.len() > INDEX_ENTRIES {
            dropped.extend(self.entries.pop_back().map(|e| e.0));
        }
        (true, dropped)
    }

    /// Forgets a prefix a stage no longer holds.
    pub fn remove(&mut self, id: &str) {
        self.entries.retain(|(i, _)| i != id);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A stage's kept caches (one per layer of the stage), by prefix id.
#[derive(Default)]
pub struct PrefixStore {
    /// Most recently used first: (id, caches, bytes).
    entries: VecDeque<(String, Vec<KvCache>, u64)>,
    bytes: u64,
}

impl PrefixStore {
    /// Keeps `caches` under `id`, then evicts the least recently used
    /// entries beyond `budget` bytes.
    pub fn insert(&mut self, id: String, caches: Vec<KvCache>, budget: u64) {
        let bytes: u64 = caches.iter().map(|c| c.nbytes() as u64).sum();
        if bytes == 0 || bytes > budget {
            return;
        }
        self.entries.push_front((id, caches, bytes));
        self.bytes += bytes;
        self.shrink(budget);
    }

    /// A copy of the first `positions` positions of prefix `id` (the kept
    /// arrays are immutable, so the copy shares them until it grows).
    pub fn take(&mut self, id: &str, positions: usize) -> Option<Vec<KvCache>> {
        let i = self.entries.iter().position(|(i, _, _)| i == id)?;
        let entry = self.entries.remove(i)?;
        let held = entry.1.first().map_or(0, |c| c.offset()) as usize;
        let out = (positions <= held).then(|| {
            entry
                .1
                .iter()
                .map(|c| {
                    let mut c = c.clone();
                    c.trim((held - positions) as i32);
                    c
                })
                .collect()
        });
        self.entries.push_front(entry);
        out
    }

    /// Drops prefix `id`.
    pub fn remove(&mut self, id: &str) {
        if let Some(i) = self.entries.iter().position(|(i, _, _)| i == id) {
            if let Some((_, _, b)) = self.entries.remove(i) {
                self.bytes -= b;
            }
        }
    }

    /// Whether prefix `id` is held.
    pub fn contains(&self, id: &str) -> bool {
        self.entries.iter().any(|(i, _, _)| i == id)
    }

    /// Evicts least recently used entries until at most `budget` bytes are held.
    pub fn shrink(&mut self, budget: u64) {
        while self.bytes > budget {
            match self.entries.pop_back() {
                Some((_, _, b)) => self.bytes -= b,
                None => break,
            }
        }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The prefix cache of a model in this process: the index and the caches
/// together, bounded by `budget` bytes.
pub struct PrefixCache {
    index: PrefixIndex,
    store: PrefixStore,
    budget: u64,
    next_id: u64,
}

impl PrefixCache {
    pub fn new(budget: u64) -> PrefixCache {
        PrefixCache {
            index: PrefixIndex::default(),
            store: PrefixStore::default(),
            budget,
            next_id: 0,
        }
    }

    /// `MLX_DIST_PREFIX_CACHE_MB` megabytes (default 1024; 0 turns it off).
    pub fn from_env() -> PrefixCache {
        let mb = std::env::var("MLX_DIST_PREFIX_CACHE_MB")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(1024);
        PrefixCache::new(mb << 20)
    }

    /// Caches holding the longest kept prefix of `prompt` (all but its last
    /// token at most), and how many positions that is.
    pub fn take(&mut self, prompt: &[u32]) -> Option<(Vec<KvCache>, usize)> {
        if self.budget == 0 {
            return None;
        }
        let (id, n) = self.index.lookup(prompt)?;
        match self.store.take(&id, n) {
            Some(c) => Some((c, n)),
            None => {
                self.index.remove(&id);
                None
            }
        }
    }

    /// Keeps `caches`, which hold `tokens`' positions, for later prompts.
    pub fn keep(&mut self, tokens: Vec<u32>, caches: Vec<KvCache>) {
        if self.budget == 0 {
            return;
        }
        self.next_id += 1;
        let id = self.next_id.to_string();
        let (kept, dropped) = self.index.insert(id.clone(), tokens);
        for d in dropped {
            self.store.remove(&d);
        }
        if kept {
            self.store.insert(id.clone(), caches, self.budget);
            if !self.store.contains(&id) {
                self.index.remove(&id);
            }
        }
    }

    /// Bytes of the kept caches.
    pub fn bytes(&self) -> u64 {
        self.store.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mlx::{Array, Dtype};

    #[test]
    fn the_index_names_the_longest_shared_prefix() {
        let mut ix = PrefixIndex::default();
        ix.insert("a".into(), vec![1, 2, 3, 4, 5, 6]);
        ix.insert("b".into(), vec![1, 2, 3, 9, 9, 9, 9]);
        assert_eq!(ix.lookup(&[1, 2, 3, 4, 5, 6, 7, 8]), Some(("a".into(), 6)));
        // All but the last prompt token at most.
        assert_eq!(ix.lookup(&[1, 2, 3, 4, 5, 6]), Some(("a".into(), 5)));
        // Too short a match is no match.
        assert_eq!(ix.lookup(&[1, 2, 3, 7, 7, 7]), None);
        // A prefix of a kept one is not kept again; a longer one replaces it.
        ix.insert("c".into(), vec![1, 2, 3, 4, 5]);
        assert_eq!(ix.len(), 2);
        ix.insert("d".into(), vec![1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(ix.len(), 2);
        assert_eq!(
            ix.lookup(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
            Some(("d".into(), 9))
        );
        ix.remove("d");
        assert_eq!(ix.lookup(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]), None);
    }

    fn cache(positions: i32) -> KvCache {
        let mut c = KvCache::new();
        let x = Array::full(&[1, 2, positions, 4], 1.0, Dtype::Float32).unwrap();
        c.update_and_fetch(&x, &x).unwrap();
        c
    }

    #[test]
    fn the_store_truncates_copies_and_evicts_by_bytes() {
        let mut st = PrefixStore::default();
        let one = cache(10).nbytes() as u64 * 2;
        st.insert("a".into(), vec![cache(10), cache(10)], one * 2);
        st.insert("b".into(), vec![cache(20), cache(20)], one * 2);
        assert_eq!(st.len(), 2);
        let got = st.take("a", 6).unwrap();
        assert_eq!(got[0].offset(), 6);
        // The kept entry is unchanged by the copy.
        assert_eq!(st.take("a", 10).unwrap()[1].offset(), 10);
        assert!(st.take("a", 11).is_none());
        assert!(st.take("zzz", 1).is_none());
        // "a" was used last: "b" goes first.
        st.insert("c".into(), vec![cache(5), cache(5)], one * 2);
        assert!(st.take("b", 1).is_none());
        assert!(st.take("a", 1).is_some());
        assert!(st.bytes() <= one * 2);
    }

    #[test]
    fn a_local_prefix_cache_keeps_finds_and_forgets_together() {
        let one = cache(10).nbytes() as u64;
        let mut pc = PrefixCache::new(one * 2);
        pc.keep((1..=10).collect(), vec![cache(10)]);
        let (c, n) = pc.take(&[1, 2, 3, 4, 5, 6, 99]).unwrap();
        assert_eq!((c[0].offset(), n), (6, 6));
        assert!(pc.take(&[7, 7, 7, 7, 7]).is_none());
        // A longer sequence covering the first replaces it in both halves.
        pc.keep((1..=12).collect(), vec![cache(12)]);
        assert_eq!(pc.bytes(), one);
        assert_eq!(pc.take(&(1..=20).collect::<Vec<_>>()).unwrap().1, 12);
        // Over the budget: nothing kept, nothing found.
        pc.keep((50..=90).collect(), vec![cache(600)]);
        assert!(pc.take(&(50..=95).collect::<Vec<_>>()).is_none());
        // A zero budget turns it off.
        let mut off = PrefixCache::new(0);
        off.keep((1..=10).collect(), vec![cache(10)]);
        assert!(off.take(&(1..=20).collect::<Vec<_>>()).is_none());
    }
}
