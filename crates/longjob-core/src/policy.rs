//! Retry policy and timeouts.

use std::time::Duration;

use crate::JobError;

/// When and how often a failed attempt is retried: exponential backoff with full jitter, capped,
/// up to a number of attempts; `validation` errors are never retried.
///
/// ```
/// use std::time::Duration;
/// use longjob_core::RetryPolicy;
///
/// let policy = RetryPolicy::default();
/// assert_eq!(policy.max_attempts, 3);
/// // The ceiling doubles per attempt up to the cap; the delay is drawn below it.
/// assert_eq!(policy.backoff_ceiling(1), Duration::from_secs(1));
/// assert_eq!(policy.backoff_ceiling(3), Duration::from_secs(4));
/// assert!(policy.backoff(3) <= Duration::from_secs(4));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1). Default 3.
    pub max_attempts: u32,
    /// The ceiling of the first retry's delay. Default 1 s.
    pub base_delay: Duration,
    /// The largest ceiling. Default 60 s.
    pub max_delay: Duration,
    /// Draw the delay uniformly in `[0, ceiling]` (full jitter) rather than wait the ceiling.
    /// Default true.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            jitter: true,
        }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Run again after this delay.
    RetryAfter(Duration),
    /// Fail for good.
    GiveUp,
}

impl RetryPolicy {
    /// The ceiling of the delay after attempt `attempt` (1-based): `base · 2^(attempt-1)`, capped.
    pub fn backoff_ceiling(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(31);
        self.base_delay
            .checked_mul(1u32 << exp)
            .unwrap_or(self.max_delay)
            .min(self.max_delay)
    }

    /// The delay after attempt `attempt`: the ceiling, or a uniform draw below it with jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self.backoff_ceiling(attempt);
        if !self.jitter || ceiling.is_zero() {
            return ceiling;
        }
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::random_range(0..=nanos))
    }

    /// Whether attempt `attempt` of `max_attempts`, failed with `error`, is retried, and when.
    pub fn decide(&self, attempt: u32, max_attempts: u32, error: &JobError) -> RetryDecision {
        if !error.is_retryable() || attempt >= max_attempts {
            RetryDecision::GiveUp
        } else {
            RetryDecision::RetryAfter(self.backoff(attempt))
        }
    }
}

/// Deadlines, with the design's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// One attempt of a job. Default 130 s.
    pub job: Duration,
    /// One item of a job (handlers read it from their context). Default 60 s.
    pub item: Duration,
    /// One S3 call. Default 30 s.
    pub s3: Duration,
    /// One database call. Default 10 s.
    pub database: Duration,
    /// One Redis call. Default 5 s.
    pub redis: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            job: Duration::from_secs(130),
            item: Duration::from_secs(60),
            s3: Duration::from_secs(30),
            database: Duration::from_secs(10),
            redis: Duration::from_secs(5),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_without_jitter_doubles_up_to_the_cap() {
        let policy = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(5),
            jitter: false,
        };
        let delays: Vec<_> = (1..=6).map(|a| policy.backoff(a).as_millis()).collect();
        assert_eq!(delays, [500, 1000, 2000, 4000, 5000, 5000]);
        assert_eq!(policy.backoff(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn jitter_stays_below_the_ceiling_and_varies() {
        let policy = RetryPolicy::default();
        let draws: Vec<_> = (0..200).map(|_| policy.backoff(4)).collect();
        assert!(draws.iter().all(|d| *d <= Duration::from_secs(8)));
        assert!(draws.iter().any(|d| *d != draws[0]));
    }

    #[test]
    fn validation_is_never_retried_and_attempts_are_bounded() {
        let policy = RetryPolicy::default();
        assert_eq!(
            policy.decide(1, 3, &JobError::validation("x")),
            RetryDecision::GiveUp
        );
        assert!(matches!(
            policy.decide(1, 3, &JobError::network("x")),
            RetryDecision::RetryAfter(_)
        ));
        assert!(matches!(
            policy.decide(2, 3, &JobError::timeout("x")),
            RetryDecision::RetryAfter(_)
        ));
        assert_eq!(
            policy.decide(3, 3, &JobError::storage("x")),
            RetryDecision::GiveUp
        );
    }
}
