//! Sequences on a stage: admitting one (its slot, its share of the KV
//! budget, a kept prefix), ending it, and keeping its cache as a prefix.
use super::{Engine, Sequence, Step};
use crate::error::{Error, Result};
use crate::mlx;

impl Engine {
    fn reserved(&self) -> u64 {
        self.seqs.values().map(|s| s.reserved).sum()
    }

    /// The bytes kept prefixes may hold on this stage (0 with no stage).
    pub(super) fn prefix_budget(&self) -> u64 {
        self.stage.as_ref().map_or(0, |st| {
            crate::prefix::stage_budget(self.prefix_cache_bytes, st.cache_budget)
        })
    }

    /// Room for kept prefixes now: their budget, and only what live
    /// sequences leave free.
    pub(super) fn prefix_room(&self) -> Option<u64> {
        let st = self.stage.as_ref()?;
        Some(
            self.prefix_budget()
                .min(st.cache_budget.saturating_sub(self.reserved())),
        )
    }

    /// Drops the kept prefixes the coordinator no longer names; a live
    /// sequence to be kept under such an id will not be.
    fn forget_prefixes(&mut self, ids: &[String]) {
        for id in ids {
            self.prefixes.remove(id);
            for s in self.seqs.values_mut() {
                if s.keep_as.as_ref() == Some(id) {
                    s.keep_as = None;
                }
            }
        }
    }

    /// A new sequence's slot: the lowest free one, else a new row.
    fn take_slot(&mut self) -> usize {
        self.free.sort_unstable_by(|a, b| b.cmp(a));
        let slot = self
            .free
            .pop()
            .unwrap_or_else(|| self.caches.first().map_or(0, |c| c.slots()));
        for c in &mut self.caches {
            c.reserve(slot + 1, 0);
        }
        slot
    }

    /// Ends a sequence: its slot is freed for reuse, and once no sequence is
    /// left the caches' memory goes back.
    pub(super) fn end(&mut self, seq: &str) -> Option<Sequence> {
        let ended = self.seqs.remove(seq)?;
        for c in &mut self.caches {
            c.clear_slot(ended.slot);
        }
        self.free.push(ended.slot);
        if self.seqs.is_empty() {
            self.drop_caches();
        }
        Some(ended)
    }

    /// Gives back the memory of every slot (no sequence may hold one).
    pub(super) fn drop_caches(&mut self) {
        for c in &mut self.caches {
            c.clear();
        }
        self.free.clear();
        mlx::clear_cache();
    }

    /// A copy of an ending sequence's cache, if it asked to be kept as a
    /// prefix: its id and one cache per layer.
    pub(super) fn keep(&self, seq: &str) -> Option<(String, Vec<crate::cache::KvCache>)> {
        let s = self.seqs.get(seq)?;
        let id = s.keep_as.clone()?;
        let caches: Result<Vec<_>> = self.caches.iter().map(|c| c.copy_out(s.slot)).collect();
        match caches {
            Ok(c) => Some((id, c)),
            Err(e) => {
                tracing::warn!(sequence = %seq, "could not keep the prefix: {e}");
                None
            }
        }
    }

    /// Checks a step against this stage and its sequence, starting the
    /// sequence (a slot, its KV budget, a kept prefix) on its first step.
    /// Its input is checked where it is read (`activations`, `row_input`).
    pub(super) fn admit(&mut self, req: &Step) -> Result<()> {
        self.forget_prefixes(&req.forget_prefixes);
        let stage = self.stage.as_ref().ok_or_else(|| {
            Error::NotReady(format!(
                "worker {} holds no model: load a shard first",
                self.name
            ))
        })?;
        let model = stage.model.clone();
        if !self.seqs.contains_key(&req.sequence) {
            if self.seqs.len() >= self.max_sequences {
                return Err(Error::KvBudgetFull(format!(
                    "worker {}: it holds {} sequences, its most (--max-sequences); sequence {} cannot start",
                    self.name,
                    self.seqs.len(),
                    req.sequence
                )));
            }
            let prefix = if let Some(id) = &req.prefix {
                Some(self.prefixes.take(id, req.offset as usize).ok_or_else(|| {
                    Error::PrefixMissing(format!(
                        "worker {}: prefix {id} ({} positions) is not kept here",
                        self.name, req.offset
                    ))
                })?)
            } else if req.offset != 0 {
                return Err(Error::NotReady(format!(
                    "sequence {} is unknown here (its cache was released or never made) but the step starts at position {}",
                    req.sequence, req.offset
                )));
            } else {
                None
            };
            let length = (req.max_length as u64)
                .max(req.offset as u64 + req.tokens.len() as u64)
                .max(1);
            let need = length * stage.kv_bytes_per_token;
            let used = self.reserved();
            // The slot caches give every row the longest row's room.
            let rows =
                self.caches.first().map_or(0, |c| c.slots()) + usize::from(self.free.is_empty());
            let room = self
                .caches
                .first()
                .map_or(0, |c| c.capacity() as u64)
                .max(crate::cache::room_for(length));
            let held = (used + need).max(rows as u64 * room * stage.kv_bytes_per_token);
            if need > stage.cache_budget {
                return Err(Error::KvBudgetExceeded {
                    need,
                    budget: stage.cache_budget,
                    detail: format!(
                        "worker {}: sequence {} needs {:.1} MB of KV cache for {length} tokens, more than this stage's whole budget of {:.1} MB",
                        self.name,
                        req.sequence,
                        need as f64 / 1e6,
                        stage.cache_budget as f64 / 1e6
                    ),
                });
            }
            if held > stage.cache_budget {
                return Err(Error::KvBudgetFull(format!(
                    "worker {}: sequence {} needs {:.1} MB of KV cache for {length} tokens ({:.1} MB held in all with it, each of {rows} sequences with room for {room} tokens), but the budget is {:.1} MB",
                    self.name,
                    req.sequence,
                    need as f64 / 1e6,
                    held as f64 / 1e6,
                    stage.cache_budget as f64 / 1e6
                )));
            }
            // Kept prefixes give way to live sequences.
            self.prefixes.shrink(stage.cache_budget - held);
            let sampler = if stage.info.head {
                let sampling = req.sampling.clone().unwrap_or_default();
                Some(sampling.sampler(model.args.vocab_size as usize)?)
            } else {
                None
            };
            let slot = self.take_slot();
            let copied = self.caches.iter_mut().enumerate().try_for_each(|(i, c)| {
                c.reserve(slot + 1, length as i32);
                match &prefix {
                    Some(p) => c.copy_in(slot, &p[i]),
                    None => Ok(()),
                }
            });
            if let Err(e) = copied {
                for c in &mut self.caches {
                    c.clear_slot(slot);
                }
                self.free.push(slot);
                return Err(e);
            }
            tracing::info!(
                sequence = %req.sequence,
                "started: up to {length} tokens, {:.1} MB of KV reserved{}",
                need as f64 / 1e6,
                if req.offset > 0 { format!(", {} positions from a kept prefix", req.offset) } else { String::new() }
            );
            self.seqs.insert(
                req.sequence.clone(),
                Sequence {
                    slot,
                    sampler,
                    history: Vec::new(),
                    reserved: need,
                    keep_as: req.keep_as.clone(),
                    done: None,
                    back_after: None,
                },
            );
        }
        let seq = &self.seqs[&req.sequence];
        let offset = self.caches.first().map_or(0, |c| c.length(seq.slot)) as u32;
        if offset != req.offset {
            return Err(Error::InvalidArgument(format!(
                "sequence {}: step starts at position {} but this stage's cache holds {offset}",
                req.sequence, req.offset
            )));
        }
        Ok(())
    }
}
