//! A step whose reply is late: how long the coordinator waits, and how it
//! tells a stage that is slow from one that is dead and a step that is lost.
use std::time::Duration;

use super::link::Link;
use super::{RemoteTokens, StageHandle};
use crate::error::{Error, Result};

/// How long the coordinator waits for one step's reply before asking the
/// stages whether they still answer: `base` (`ClusterOptions::step_timeout`,
/// default 30 s) plus 0.1 s per token in the step, for long prefill chunks
/// on slow devices.
pub(super) fn step_deadline(base: Duration, tokens: usize) -> Duration {
    base + Duration::from_millis(100) * tokens as u32
}

/// Deadlines a late reply may run past while every stage answers health
/// checks: a worker busy for minutes (a GPU compiling kernels for shapes it
/// has not run yet, which can take a minute; a long prompt of another
/// sequence ahead in its queue) is slow, not failed.
pub(super) const LATE_DEADLINES: u32 = 10;

/// What the stages say while a step's reply is late.
#[derive(Debug)]
pub(super) enum Late<S = StageHandle> {
    /// This stage does not answer.
    Silent(S, Error),
    /// Every stage answers, and this one has run one job this long: slow
    /// (a GPU compiling kernels for a shape it has not run, a long prompt
    /// chunk), not failed.
    Busy(S, Duration),
    /// Every stage answers at once: nothing computes the step.
    Idle,
}

impl<S> Late<S> {
    /// The verdict from each stage's answer: how long its engine has run
    /// its current job (0: it answered at once), or why it did not answer.
    fn from_answers(answers: impl IntoIterator<Item = (S, Result<u64>)>) -> Late<S> {
        let mut busiest: Option<(S, Duration)> = None;
        for (s, a) in answers {
            match a {
                Err(e) => return Late::Silent(s, e),
                Ok(0) => {}
                Ok(micros) => {
                    let busy = Duration::from_micros(micros);
                    if busiest.as_ref().is_none_or(|(_, b)| busy > *b) {
                        busiest = Some((s, busy));
                    }
                }
            }
        }
        match busiest {
            Some((s, busy)) => Late::Busy(s, busy),
            None => Late::Idle,
        }
    }
}

/// How long a stage has to answer a health check when a reply is late.
const LIVENESS_TIMEOUT: Duration = Duration::from_secs(2);

impl RemoteTokens {
    /// What the stages say while a reply is late: each is asked for its
    /// figures, which a worker gives within half a second even when its
    /// engine is busy (with how long it has run its current job).
    pub(super) async fn late_stages(&self) -> Late {
        let ask = |s: &StageHandle| {
            let address = s.address.clone();
            let transport = self.transport.clone();
            async move {
                let mut link = Link::open(&address, LIVENESS_TIMEOUT, &transport).await?;
                let info = tokio::time::timeout(LIVENESS_TIMEOUT, link.device_info())
                    .await
                    .map_err(|_| Error::Worker("no answer to a question about its state".into()))?
                    .map_err(|s| Error::Worker(s.message().to_string()))?;
                Ok::<u64, Error>(info.busy_for_micros)
            }
        };
        let answers = futures::future::join_all(self.stages.iter().map(ask)).await;
        Late::from_answers(self.stages.iter().cloned().zip(answers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(answers: &[std::result::Result<u64, &str>]) -> Late<usize> {
        Late::from_answers(
            answers
                .iter()
                .enumerate()
                .map(|(i, a)| (i, a.map_err(|e| Error::Worker(e.into())))),
        )
    }

    #[test]
    fn a_steps_deadline_grows_with_its_tokens() {
        let base = Duration::from_secs(30);
        assert_eq!(step_deadline(base, 0), base);
        assert_eq!(step_deadline(base, 20), Duration::from_secs(32));
    }

    #[test]
    fn a_late_reply_is_a_lost_step_only_when_every_stage_is_idle() {
        assert!(matches!(verdict(&[Ok(0), Ok(0)]), Late::Idle));
        // The busiest stage is named, however many are busy.
        match verdict(&[Ok(0), Ok(3_000_000), Ok(40_000_000)]) {
            Late::Busy(2, d) => assert_eq!(d, Duration::from_secs(40)),
            other => panic!("{other:?}"),
        }
        // One stage that does not answer outweighs busy ones.
        assert!(matches!(
            verdict(&[Ok(5), Err("refused"), Ok(0)]),
            Late::Silent(1, _)
        ));
    }
}
