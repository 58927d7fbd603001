//! A sequence's ledger on the coordinator: the steps it sent, the replies
//! it read, the tokens that came round the ring, and from them what the
//! stages' caches hold. Pure bookkeeping, so its rules are tested here
//! without a stage.
use std::collections::VecDeque;

/// What goes out after a token is read.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// Nothing: the ring has the next step under way, or none is wanted.
    Nothing,
    /// One more ring step may start: the first stage gets a credit.
    Credit,
    /// This token is the next step's input.
    Step(u32),
}

#[derive(Debug, Default)]
pub(super) struct Ledger {
    /// The position the next step starts at.
    offset: u32,
    /// Tokens of each step sent and not yet answered, oldest first.
    outstanding: VecDeque<usize>,
    /// Every token the stages were given, and how many of them they
    /// confirmed (their steps were answered).
    fed: Vec<u32>,
    acked: usize,
    /// Tokens still to come round the ring after the next reply, and the
    /// last token that came (the stages feed it in themselves).
    ring_left: u32,
    ring_last: Option<u32>,
    /// A token is due: its step was sent, or the ring runs it.
    pending: bool,
}

impl Ledger {
    /// A sequence whose stages start from `cached`, a kept prefix.
    pub(super) fn new(cached: &[u32]) -> Ledger {
        Ledger {
            offset: cached.len() as u32,
            fed: cached.to_vec(),
            acked: cached.len(),
            ..Default::default()
        }
    }

    /// A step of `tokens` goes out; the position it starts at.
    pub(super) fn sent(&mut self, tokens: &[u32]) -> u32 {
        let at = self.offset;
        self.offset += tokens.len() as u32;
        self.outstanding.push_back(tokens.len());
        self.fed.extend_from_slice(tokens);
        at
    }

    /// The oldest unanswered step's reply came (a ring token answers none).
    pub(super) fn replied(&mut self) {
        self.acked += self.outstanding.pop_front().unwrap_or(0);
    }

    /// Steps sent and not yet answered.
    pub(super) fn in_flight(&self) -> usize {
        self.outstanding.len()
    }

    /// Their tokens (a reply's deadline grows with them).
    pub(super) fn in_flight_tokens(&self) -> usize {
        self.outstanding.iter().sum()
    }

    /// The prompt's last step went out: a token is due, and `ahead` more
    /// come round the ring after it.
    pub(super) fn started(&mut self, ahead: u32) {
        self.ring_left = ahead;
        self.pending = true;
    }

    pub(super) fn pending(&self) -> bool {
        self.pending
    }

    /// Ring steps are still to come (a sequence dropped now must be
    /// released behind them).
    pub(super) fn ring_running(&self) -> bool {
        self.ring_left > 0
    }

    /// `token` was read; with `schedule_next`, the step after it may start.
    pub(super) fn token_read(&mut self, token: u32, schedule_next: bool) -> Next {
        self.pending = false;
        if let Some(fed) = self.ring_last.take() {
            // This token's step ran on every stage: the one before it is in
            // their caches.
            self.fed.push(fed);
            self.acked += 1;
        }
        if self.ring_left > 0 {
            // The first stage already runs the next step; this token was
            // read, so it may start one more.
            self.ring_left -= 1;
            self.ring_last = Some(token);
            self.pending = true;
            if self.ring_left > 0 && schedule_next {
                Next::Credit
            } else {
                Next::Nothing
            }
        } else if schedule_next {
            self.pending = true;
            Next::Step(token)
        } else {
            Next::Nothing
        }
    }

    /// The tokens the stages' caches hold for certain: those of answered
    /// steps, in order.
    pub(super) fn confirmed(&mut self) -> Vec<u32> {
        self.fed.truncate(self.acked);
        std::mem::take(&mut self.fed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_sent_by_the_coordinator_are_confirmed_by_their_replies() {
        let mut l = Ledger::new(&[]);
        assert_eq!(l.sent(&[1, 2, 3]), 0);
        assert_eq!(l.sent(&[4]), 3);
        l.started(0);
        assert_eq!((l.in_flight(), l.in_flight_tokens()), (2, 4));
        l.replied();
        l.replied();
        assert_eq!(l.token_read(10, true), Next::Step(10));
        assert!(l.pending());
        assert_eq!(l.sent(&[10]), 4);
        l.replied();
        // The last token is never a step's input: nothing holds it.
        assert_eq!(l.token_read(11, false), Next::Nothing);
        assert!(!l.pending());
        assert_eq!(l.confirmed(), [1, 2, 3, 4, 10]);
    }

    #[test]
    fn ring_tokens_count_once_the_next_one_comes() {
        // Four tokens: the prompt's, then three round the ring.
        let mut l = Ledger::new(&[]);
        l.sent(&[1, 2]);
        l.started(3);
        l.replied();
        assert_eq!(l.token_read(5, true), Next::Credit);
        l.replied();
        assert_eq!(l.token_read(6, true), Next::Credit);
        assert!(l.ring_running());
        l.replied();
        // The last ring step is under way: no credit for one more.
        assert_eq!(l.token_read(7, true), Next::Nothing);
        assert!(l.pending() && !l.ring_running());
        l.replied();
        assert_eq!(l.token_read(8, false), Next::Nothing);
        assert!(!l.pending());
        assert_eq!(l.confirmed(), [1, 2, 5, 6, 7]);
    }

    #[test]
    fn a_reader_that_wants_no_more_sends_no_credit() {
        let mut l = Ledger::new(&[]);
        l.sent(&[1]);
        l.started(5);
        l.replied();
        assert_eq!(l.token_read(2, false), Next::Nothing);
        // The ring still owes its steps: dropping now must release behind them.
        assert!(l.ring_running() && l.pending());
    }

    #[test]
    fn unanswered_steps_are_not_confirmed() {
        let mut l = Ledger::new(&[7, 8]);
        assert_eq!(l.sent(&[1, 2, 3]), 2);
        l.sent(&[4]);
        l.replied();
        assert_eq!(l.confirmed(), [7, 8, 1, 2, 3]);
    }
}
