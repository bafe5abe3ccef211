//! The one retry backoff of the store and its followers.

use std::time::Duration;

/// Exponential backoff with jitter: each wait is a random time in the upper half
/// of the current step, and the step doubles per failure up to `max`. The jitter
/// keeps the agents of a cluster that lost etcd together from coming back in the
/// same instant.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            step: min,
        }
    }

    /// The wait for this failure; the next one waits up to twice as long.
    pub fn next_wait(&mut self) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(self.max);
        step.mul_f64(0.5 + rand::random::<f64>() / 2.0)
    }

    /// After a success: the next failure waits `min` again.
    pub fn reset(&mut self) {
        self.step = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_with_jitter_and_resets() {
        let (min, max) = (Duration::from_millis(5), Duration::from_millis(20));
        let mut b = Backoff::new(min, max);
        let waits: Vec<Duration> = (0..5).map(|_| b.next_wait()).collect();
        for (w, step) in waits.iter().zip([5u64, 10, 20, 20, 20]) {
            let step = Duration::from_millis(step);
            assert!(
                *w >= step / 2 && *w <= step,
                "{w:?} within [{:?}, {step:?}]",
                step / 2
            );
        }
        b.reset();
        assert!(b.next_wait() <= min);
    }
}
