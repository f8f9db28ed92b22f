//! How a closed window leaves the pipeline: its privacy cost is spent in
//! the budget ledger first, and only a granted window is noised. [`release`]
//! is the only way to a [`PrivateWindow`] outside this crate, so no caller
//! can noise (and publish) a window whose cost was not recorded, nor
//! forget to record it.

use chrono::{DateTime, TimeDelta, Utc};

use crate::ledger::{Ledger, LedgerError, Now};
use crate::privacy::{PrivacyError, PrivateWindow, Privatizer};
use crate::window::ClosedWindow;

/// What became of a closed window.
#[derive(Debug)]
pub enum Released {
    /// Its cost was spent: the noised window, ready to publish.
    Window(Box<PrivateWindow>),
    /// The budget would be exceeded: the window is withheld (never noised,
    /// never published) and the budget allows windows again at `resumes_at`.
    Withheld { resumes_at: DateTime<Utc> },
}

/// Errors of [`release`]; a window the budget cannot afford is not one.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error(transparent)]
    Privacy(#[from] PrivacyError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// Spends `window`'s privacy cost in `ledger`, then noises it.
///
/// The spend is dated at the window's end (with the device's uptime
/// `uptime`), so that the windows of one day are always the same set,
/// whatever the jitter of the moment the window is closed.
pub fn release(
    privatizer: &Privatizer,
    ledger: &mut Ledger,
    window: ClosedWindow,
    uptime: TimeDelta,
) -> Result<Released, ReleaseError> {
    let end = window.window_start + TimeDelta::seconds(i64::from(window.window_secs));
    let cost = privatizer.cost_of(&window)?;
    match ledger.try_spend(
        Now {
            wall: end,
            up: uptime,
        },
        cost,
    ) {
        Ok(()) => Ok(Released::Window(Box::new(privatizer.privatize(window)?))),
        Err(LedgerError::Exhausted { resumes_at, .. }) => Ok(Released::Withheld { resumes_at }),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Budget;
    use crate::privacy::MechanismConfig;
    use crate::window::{ModelKey, ModelSpec, Windower};

    /// A granted window is noised and its cost recorded; once the budget is
    /// spent, the next window is withheld and costs nothing.
    #[test]
    fn a_window_is_noised_only_after_its_cost_is_spent() {
        let start: DateTime<Utc> = "2026-11-27T10:00:00Z".parse().expect("ts");
        let privatizer =
            Privatizer::new(MechanismConfig::Laplace { epsilon: 1.0 }).expect("privatizer");
        let mut ledger = Ledger::in_memory(Budget {
            epsilon: Some(1.5),
            delta: 1e-6,
            rho: None,
            period: TimeDelta::days(1),
            window: TimeDelta::zero(),
        });
        let mut windower = Windower::new(60, start);
        windower.register(ModelKey::new("m", "1"), &ModelSpec::default());
        let mut close = |minute: i64| {
            windower
                .close_due(start + TimeDelta::minutes(minute))
                .pop()
                .expect("a closed window")
        };
        let first = release(&privatizer, &mut ledger, close(1), TimeDelta::minutes(1));
        assert!(matches!(first, Ok(Released::Window(_))), "{first:?}");
        let spent = ledger.state().clone();
        let second = release(&privatizer, &mut ledger, close(2), TimeDelta::minutes(2));
        assert!(
            matches!(second, Ok(Released::Withheld { .. })),
            "{second:?}"
        );
        assert_eq!(ledger.state(), &spent);
    }
}
