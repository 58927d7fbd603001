//! The prefix cache: KV caches of finished sequences kept for later ones
//! that begin with the same tokens (a shared system prompt, the earlier
//! turns of a chat), so those positions are not computed again.
//!
//! The coordinator decides: its `PrefixIndex` remembers which tokens each
//! kept prefix holds and, for a new prompt, names the longest usable one
//! and how many positions to take from it. Each stage keeps the caches in
//! a `PrefixStore`, bounded by bytes, least recently used evicted first.
//!
//! The two are kept in step both ways. What the index stops naming (a
//! sequence equal to or covered by a kept one, the oldest beyond its size,
//! one a stage lacked) it queues, and the next sequence's first step tells
//! every stage to drop those (`forget_prefixes`), so identical prompts
//! share one entry. A stage that evicted an entry the index still names
//! refuses the step with `Error::PrefixMissing`; the coordinator forgets
//! the entry and runs the sequence again without it: a miss, not an error.
//!
//! One setting bounds every prefix cache (`WorkerConfig::prefix_cache_bytes`,
//! `config::prefix_cache_bytes`); a stage keeps at most a quarter of its KV
//! budget.
//! A model in this process keeps both halves in one `PrefixCache`.
use std::collections::VecDeque;

use crate::cache::KvCache;

/// The bound of every prefix cache unless configured, in MiB.
pub const DEFAULT_BUDGET_MB: u64 = 1024;

/// A stage keeps prefixes in at most this share of its KV budget, so that
/// live sequences always find room.
const KV_SHARE: u64 = 4;

/// What a stage with `kv_budget` bytes of KV cache may keep as prefixes:
/// `configured` bytes, and at most a quarter of its KV budget.
pub fn stage_budget(configured: u64, kv_budget: u64) -> u64 {
    configured.min(kv_budget / KV_SHARE)
}

/// A prompt shares fewer positions than this with every kept prefix: not
/// worth a lookup on every stage.
pub const MIN_PREFIX: usize = 4;

/// The coordinator's view: the tokens each kept prefix holds.
#[derive(Default)]
pub struct PrefixIndex {
    /// Most recently used first.
    entries: VecDeque<(String, Vec<u32>)>,
    /// Ids the index no longer names that stages may still hold, oldest
    /// first: for the stores to drop (`take_forgotten`).
    forgotten: VecDeque<String>,
}

/// Prefixes the coordinator remembers at most (stages may hold fewer).
const INDEX_ENTRIES: usize = 256;

/// Ids waiting to be forgotten by the stores at most: beyond it the oldest
/// are left to the stores' own eviction.
const FORGOTTEN: usize = 1024;

impl PrefixIndex {
    /// The kept prefix sharing the most leading tokens with `prompt`, and
    /// how many: at most all but the last `run` prompt tokens (at least the
    /// last must run, to produce logits).
    pub fn lookup(&mut self, prompt: &[u32], run: usize) -> Option<(String, usize)> {
        let limit = prompt.len().saturating_sub(run.max(1));
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

    /// Notes that the stages keep `tokens`' cache under `id`; returns
    /// whether the index names it. One too short, or equal to or covered by
    /// an entry already named, is not named but queued to be forgotten, as
    /// are the entries it covers and the oldest beyond the index's size.
    pub fn insert(&mut self, id: String, tokens: Vec<u32>) -> bool {
        // A prefix another entry already covers adds nothing.
        if tokens.len() < MIN_PREFIX || self.entries.iter().any(|(_, t)| t.starts_with(&tokens)) {
            self.forget(id);
            return false;
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
        for d in dropped {
            self.forget(d);
        }
        true
    }

    /// Stops naming prefix `id` (a stage lacked it, or its sequence
    /// failed) and queues it for every store to drop.
    pub fn remove(&mut self, id: &str) {
        self.entries.retain(|(i, _)| i != id);
        self.forget(id.to_string());
    }

    fn forget(&mut self, id: String) {
        self.forgotten.push_back(id);
        while self.forgotten.len() > FORGOTTEN {
            self.forgotten.pop_front();
        }
    }

    /// The ids the stores should drop, oldest first (each given once).
    pub fn take_forgotten(&mut self) -> Vec<String> {
        self.forgotten.drain(..).collect()
    }

    /// Queues again ids taken that did not reach every store (the step
    /// that carried them failed).
    pub fn requeue(&mut self, ids: Vec<String>) {
        for id in ids {
            self.forget(id);
        }
    }

    /// Whether prefix `id` is named.
    pub fn contains(&self, id: &str) -> bool {
        self.entries.iter().any(|(i, _)| i == id)
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
    /// Keeps `caches` under `id` (in place of an entry of that id), then
    /// evicts the least recently used entries beyond `budget` bytes.
    pub fn insert(&mut self, id: String, caches: Vec<KvCache>, budget: u64) {
        self.remove(&id);
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

    /// Caches holding the longest kept prefix of `prompt` (all but its last
    /// token at most), and how many positions that is.
    pub fn take(&mut self, prompt: &[u32]) -> Option<(Vec<KvCache>, usize)> {
        if self.budget == 0 {
            return None;
        }
        let (id, n) = self.index.lookup(prompt, 1)?;
        match self.store.take(&id, n) {
            Some(c) => Some((c, n)),
            None => {
                self.index.remove(&id);
                None
            }
        }
    }

    /// Keeps `caches`, which hold `tokens`' positions, for later prompts
    /// (only those positions: a sequence's cache has room for more).
    pub fn keep(&mut self, tokens: Vec<u32>, caches: Vec<KvCache>) {
        if self.budget == 0 {
            return;
        }
        self.next_id += 1;
        let id = self.next_id.to_string();
        if self.index.insert(id.clone(), tokens) {
            match caches.iter().map(|c| c.compacted()).collect() {
                Ok(caches) => self.store.insert(id.clone(), caches, self.budget),
                Err(e) => tracing::warn!("could not keep the prefix: {e}"),
            }
        }
        for d in self.index.take_forgotten() {
            self.store.remove(&d);
        }
        // Evicted here: the index names only what the store holds.
        let gone: Vec<String> = self
            .index
            .entries
            .iter()
            .filter(|(i, _)| !self.store.contains(i))
            .map(|(i, _)| i.clone())
            .collect();
        for i in gone {
            self.index.remove(&i);
        }
        self.index.take_forgotten();
    }

    /// Bytes of the kept caches.
    pub fn bytes(&self) -> u64 {
        self.store.bytes()
    }

    /// Prefixes kept.
    pub fn len(&self) -> usize {
        self.store.len()
    }

    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    /// The most bytes kept (0: off).
    pub fn budget(&self) -> u64 {
        self.budget
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
        assert_eq!(
            ix.lookup(&[1, 2, 3, 4, 5, 6, 7, 8], 1),
            Some(("a".into(), 6))
        );
        // All but the last prompt token at most, or the last two.
        assert_eq!(ix.lookup(&[1, 2, 3, 4, 5, 6], 1), Some(("a".into(), 5)));
        assert_eq!(ix.lookup(&[1, 2, 3, 4, 5, 6], 2), Some(("a".into(), 4)));
        // Too short a match is no match.
        assert_eq!(ix.lookup(&[1, 2, 3, 7, 7, 7], 1), None);
        // A prefix of a kept one is not kept again; a longer one replaces it.
        assert!(!ix.insert("c".into(), vec![1, 2, 3, 4, 5]));
        assert_eq!(ix.len(), 2);
        assert!(ix.insert("d".into(), vec![1, 2, 3, 4, 5, 6, 7, 8, 9]));
        assert_eq!(ix.len(), 2);
        assert_eq!(
            ix.lookup(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 1),
            Some(("d".into(), 9))
        );
        ix.remove("d");
        assert_eq!(ix.lookup(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 1), None);
    }

    #[test]
    fn what_the_index_stops_naming_is_queued_for_the_stores() {
        let mut ix = PrefixIndex::default();
        let p: Vec<u32> = (1..=10).collect();
        assert!(ix.insert("a".into(), p.clone()));
        assert!(ix.take_forgotten().is_empty());
        // The same prompt again, and a prefix of it: one entry, the others
        // forgotten by the stages that kept them.
        assert!(!ix.insert("b".into(), p.clone()));
        assert!(!ix.insert("c".into(), p[..6].to_vec()));
        assert!(!ix.insert("short".into(), vec![1, 2]));
        assert_eq!(ix.len(), 1);
        assert_eq!(ix.take_forgotten(), ["b", "c", "short"]);
        // A longer one covers it: the covered one goes.
        assert!(ix.insert("d".into(), (1..=12).collect()));
        assert_eq!(ix.take_forgotten(), ["a"]);
        // A stage lacked it, or its sequence failed.
        ix.remove("d");
        assert!(!ix.contains("d"));
        ix.remove("never-named");
        assert_eq!(ix.take_forgotten(), ["d", "never-named"]);
        // The oldest beyond the index's size.
        for i in 0..INDEX_ENTRIES as u32 + 3 {
            ix.insert(format!("e{i}"), vec![i, i, i, i, 9]);
        }
        assert_eq!(ix.len(), INDEX_ENTRIES);
        assert_eq!(ix.take_forgotten(), ["e0", "e1", "e2"]);
        // Given once; queued again when the step carrying them failed; at
        // most FORGOTTEN wait.
        assert!(ix.take_forgotten().is_empty());
        ix.requeue(vec!["x".into()]);
        assert_eq!(ix.take_forgotten(), ["x"]);
        ix.requeue((0..FORGOTTEN + 5).map(|i| i.to_string()).collect());
        let f = ix.take_forgotten();
        assert_eq!((f.len(), f[0].as_str()), (FORGOTTEN, "5"));
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
        // An id kept again replaces its entry; one removed frees its bytes.
        st.insert("a".into(), vec![cache(3), cache(3)], one * 2);
        assert_eq!(st.len(), 2);
        st.remove("a");
        st.remove("c");
        assert_eq!((st.len(), st.bytes()), (0, 0));
    }

    #[test]
    fn a_kept_copy_holds_only_its_positions_and_pins_no_buffer() {
        let _serial = crate::mlx::MEMORY_TEST_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // A row with room for 1024 positions, 10 of them used.
        let mut slots = crate::cache::SlotCache::new();
        slots.reserve(1, 1000);
        slots.copy_in(0, &cache(10)).unwrap();
        crate::mlx::eval(&slots.state()).unwrap();
        let row = slots.nbytes();
        let kept = slots.copy_out(0).unwrap();
        assert_eq!(kept.offset(), 10);
        assert_eq!(kept.nbytes(), row * 10 / 1024);
        let local = cache(10).compacted().unwrap();
        assert_eq!(local.nbytes(), kept.nbytes());
        // The shared buffer goes once its cache does: the copy is its own.
        let before = crate::mlx::active_memory();
        drop(slots);
        assert!(
            before - crate::mlx::active_memory() >= row,
            "the copy pins the row"
        );
    }

    #[test]
    fn the_budget_is_one_setting_within_a_share_of_the_kv_budget() {
        assert_eq!(stage_budget(1 << 30, 8 << 30), 1 << 30);
        assert_eq!(stage_budget(1 << 30, 1 << 30), 256 << 20);
        assert_eq!(stage_budget(0, 8 << 30), 0);
    }

    #[test]
    fn a_local_prefix_cache_keeps_finds_and_forgets_together() {
        // Kept entries hold only their positions, not the cache's room.
        let room = cache(10).nbytes() as u64;
        let one = cache(10).compacted().unwrap().nbytes() as u64;
        assert_eq!(room / one, 256 / 10);
        let mut pc = PrefixCache::new(one * 2);
        pc.keep((1..=10).collect(), vec![cache(10)]);
        assert_eq!(pc.bytes(), one);
        let (c, n) = pc.take(&[1, 2, 3, 4, 5, 6, 99]).unwrap();
        assert_eq!((c[0].offset(), n), (6, 6));
        assert!(pc.take(&[7, 7, 7, 7, 7]).is_none());
        // The same prompt again shares the entry.
        for _ in 0..5 {
            pc.keep((1..=10).collect(), vec![cache(10)]);
        }
        assert_eq!((pc.len(), pc.bytes()), (1, one));
        // A longer sequence covering the first replaces it in both halves.
        pc.keep((1..=12).collect(), vec![cache(12)]);
        assert_eq!(pc.len(), 1);
        assert_eq!(pc.take(&(1..=20).collect::<Vec<_>>()).unwrap().1, 12);
        // Others evict it by bytes; the index stops naming it too.
        pc.keep((30..=40).collect(), vec![cache(11)]);
        pc.keep((50..=60).collect(), vec![cache(11)]);
        assert!(pc.bytes() <= one * 2);
        assert!(pc.take(&(1..=20).collect::<Vec<_>>()).is_none());
        assert!(!pc.index.contains("7"));
        assert_eq!(pc.index.len(), pc.len());
        // Over the budget: nothing kept, nothing found.
        pc.keep((70..=90).collect(), vec![cache(600)]);
        assert!(pc.take(&(70..=95).collect::<Vec<_>>()).is_none());
        // A zero budget turns it off.
        let mut off = PrefixCache::new(0);
        off.keep((1..=10).collect(), vec![cache(10)]);
        assert!(off.take(&(1..=20).collect::<Vec<_>>()).is_none());
    }

    /// The coordinator's index over two stages with different budgets, as
    /// `Cluster::start` and the workers drive them: stages evict on their
    /// own, misses are forgotten, forgets reach the stores with the next
    /// first step. No lookup may name what a stage lacks twice, nothing the
    /// index forgot stays in a store past the next start, and the stores
    /// stay within their budgets.
    #[test]
    fn the_index_and_the_stores_stay_in_step() {
        let entry = cache(8).compacted().unwrap().nbytes() as u64;
        let budgets = [entry * 8, entry * 4];
        let mut stores = [PrefixStore::default(), PrefixStore::default()];
        let mut ix = PrefixIndex::default();
        let mut rng = 7u64;
        let (mut hits, mut misses) = (0, 0);
        for seq in 0..400 {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Eight prompts, asked at random.
            let p = ((rng >> 33) % 8) as u32;
            let prompt: Vec<u32> = vec![p, p, p, p, p, p, p, p, 1];
            let id = format!("s{seq}");
            let forget = ix.take_forgotten();
            for st in &mut stores {
                for f in &forget {
                    st.remove(f);
                }
            }
            let mut cached = 0;
            if let Some((pid, n)) = ix.lookup(&prompt, 2) {
                if stores.iter_mut().all(|st| st.take(&pid, n).is_some()) {
                    hits += 1;
                    cached = n;
                } else {
                    misses += 1;
                    ix.remove(&pid);
                    // Not named again until kept again.
                    assert!(ix.lookup(&prompt, 2).is_none());
                }
            }
            assert!(cached <= prompt.len() - 2);
            for (st, b) in stores.iter_mut().zip(budgets) {
                st.insert(id.clone(), vec![cache(8).compacted().unwrap()], b);
                assert!(st.bytes() <= b);
            }
            ix.insert(id, prompt[..8].to_vec());
            // Equal prompts share one entry: never more named than prompts.
            assert!(ix.len() <= 8);
        }
        // The last forgets delivered: the stores hold only named entries.
        let forget = ix.take_forgotten();
        for st in &mut stores {
            for f in &forget {
                st.remove(f);
            }
            assert!(st.entries.iter().all(|(i, _, _)| ix.contains(i)));
        }
        assert!(hits > 100 && misses > 10, "{hits} hits, {misses} misses");
    }
}
