//! What a configuration guarantees, computed before it runs: the figures of
//! `driftline-agent privacy-report` and `check-config`, and the device-day
//! guarantee every message declares (`privacy.device_day_epsilon`).

use serde::Serialize;

use crate::accountant::{zcdp_epsilon, Cost, Spent};
use crate::ledger::Budget;
use crate::privacy::{
    l1_sensitivity, l2_sensitivity, per_event_sensitivity, MechanismConfig, PrivacyError,
    Privatizer,
};
use crate::window::{ModelKey, ModelSpec};

/// The guarantee of one configuration (docs/privacy.md explains each figure).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub mechanism: &'static str,
    /// Discrete Laplace `b` or discrete Gaussian `sigma` of the model with
    /// the largest sensitivity.
    pub noise_scale: f64,
    /// One device's whole window (`K` events), Laplace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l1_sensitivity: Option<f64>,
    /// One device's whole window (`K` events), Gaussian.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l2_sensitivity: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon_per_window: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rho_per_window: Option<f64>,
    pub max_events_per_window: u32,
    pub window_secs: u32,
    pub models: usize,
    /// Windows of all models in one budget period.
    pub windows_per_day: u64,
    pub delta: f64,
    pub device_day: DeviceDay,
    pub per_event: PerEvent,
    pub accountant: &'static str,
    pub budget: BudgetReport,
    pub per_model: Vec<ModelReport>,
}

/// The guarantee for everything one device does in one budget period.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceDay {
    /// `min(composed_epsilon, budget)`: the ledger withholds windows beyond
    /// the budget.
    pub epsilon: f64,
    pub delta: f64,
    /// zCDP rho of the windows released in the period.
    pub rho: f64,
    /// What all of the period's windows compose to, budget aside.
    pub composed_epsilon: f64,
}

/// The guarantee for one event (it lives in one window).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PerEvent {
    pub epsilon: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BudgetReport {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    pub period_secs: i64,
    /// Windows of one period the budget lets through (all of them unless
    /// the per-window cost was set too high for the budget).
    pub windows_granted: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelReport {
    pub model_id: String,
    pub model_version: String,
    /// Counts one event moves by one.
    pub per_event_sensitivity: i64,
    pub max_events_per_window: u32,
    pub noise_scale: f64,
}

impl Report {
    /// The guarantee of `models` with windows of `window_secs` noised by
    /// `mechanism` under `budget`.
    pub fn of(
        mechanism: MechanismConfig,
        budget: &Budget,
        window_secs: u32,
        models: &[(ModelKey, ModelSpec)],
    ) -> Result<Self, PrivacyError> {
        let privatizer = Privatizer::new(mechanism)?;
        let delta = budget.delta;
        let windows =
            crate::accountant::windows_per_period(budget.period, window_secs, models.len());
        let per_model: Vec<ModelReport> = models
            .iter()
            .map(|(key, spec)| {
                let per_event = per_event_sensitivity(spec);
                let k = spec.max_events_per_window;
                ModelReport {
                    model_id: key.model_id.clone(),
                    model_version: key.model_version.clone(),
                    per_event_sensitivity: per_event,
                    max_events_per_window: k,
                    noise_scale: privatizer.scale_for(per_event, k),
                }
            })
            .collect();
        let widest = per_model
            .iter()
            .max_by(|a, b| a.noise_scale.total_cmp(&b.noise_scale));
        let (per_event, k) = widest.map_or((6, 1), |m| {
            (m.per_event_sensitivity, m.max_events_per_window)
        });
        let smallest_k = per_model
            .iter()
            .map(|m| m.max_events_per_window)
            .min()
            .unwrap_or(1);
        // What the ledger charges per window: OpenDP's map, the largest
        // over the models (they differ by rounding only).
        let mut cost = privatizer.cost();
        for (_, spec) in models {
            let c = privatizer.cost_for(per_event_sensitivity(spec), spec.max_events_per_window)?;
            cost = match (cost, c) {
                (Cost::Laplace { epsilon: a }, Cost::Laplace { epsilon: b }) => {
                    Cost::Laplace { epsilon: a.max(b) }
                }
                (Cost::Gaussian { rho: a }, Cost::Gaussian { rho: b }) => {
                    Cost::Gaussian { rho: a.max(b) }
                }
                (_, c) => c,
            };
        }

        let all = Spent::repeated(cost, windows);
        let (composed, accountant) = all.epsilon(delta)?;
        let granted = match budget.epsilon {
            Some(b) if composed > b => {
                // The most windows that fit: the composition grows with n.
                let (mut lo, mut hi) = (0, windows);
                while lo < hi {
                    let mid = (lo + hi).div_ceil(2);
                    if Spent::repeated(cost, mid).epsilon(delta)?.0 <= b {
                        lo = mid;
                    } else {
                        hi = mid - 1;
                    }
                }
                lo
            }
            _ => windows,
        };
        let released = Spent::repeated(cost, granted);
        let (device_day, accountant) = if granted == windows {
            (composed, accountant)
        } else {
            released.epsilon(delta)?
        };
        let (epsilon_per_window, rho_per_window, per_event_guarantee) = match mechanism {
            MechanismConfig::Laplace { epsilon } => (
                Some(epsilon),
                None,
                PerEvent {
                    epsilon: epsilon / f64::from(smallest_k),
                    delta: None,
                },
            ),
            MechanismConfig::Gaussian { rho, .. } => (
                None,
                Some(rho),
                PerEvent {
                    epsilon: zcdp_epsilon(rho / f64::from(smallest_k).powi(2), delta)?,
                    delta: Some(delta),
                },
            ),
        };
        let laplace = matches!(mechanism, MechanismConfig::Laplace { .. });
        Ok(Report {
            mechanism: if laplace { "laplace" } else { "gaussian" },
            noise_scale: widest.map_or(0.0, |m| m.noise_scale),
            l1_sensitivity: laplace.then(|| l1_sensitivity(per_event, k)),
            l2_sensitivity: (!laplace).then(|| l2_sensitivity(per_event, k)),
            epsilon_per_window,
            rho_per_window,
            max_events_per_window: k,
            window_secs,
            models: models.len(),
            windows_per_day: windows,
            delta,
            device_day: DeviceDay {
                epsilon: device_day,
                delta,
                rho: released.rho(),
                composed_epsilon: composed,
            },
            per_event: per_event_guarantee,
            accountant: accountant.describe(),
            budget: BudgetReport {
                epsilon: budget.epsilon,
                period_secs: budget.period.num_seconds(),
                windows_granted: granted,
            },
            per_model,
        })
    }

    /// The report for people.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let mut line = |k: &str, v: String| out.push_str(&format!("  {k:<22} {v}\n"));
        line(
            "device-day guarantee",
            format!(
                "epsilon {:.3} at delta {:e} for everything one device does in {} s",
                self.device_day.epsilon, self.device_day.delta, self.budget.period_secs
            ),
        );
        if self.budget.windows_granted < self.windows_per_day {
            line(
                "budget binds",
                format!(
                    "only {} of {} windows a period are published (they would compose to epsilon {:.3})",
                    self.budget.windows_granted, self.windows_per_day, self.device_day.composed_epsilon
                ),
            );
        }
        line("mechanism", self.mechanism.to_owned());
        match (self.epsilon_per_window, self.rho_per_window) {
            (Some(e), _) => line("per window", format!("epsilon {e:.6}")),
            (_, Some(r)) => line("per window", format!("rho {r:.6}")),
            _ => {}
        }
        line(
            "windows per period",
            format!(
                "{} ({} models, {} s windows)",
                self.windows_per_day, self.models, self.window_secs
            ),
        );
        line(
            "events per window",
            format!("at most {} counted per model", self.max_events_per_window),
        );
        match (self.l1_sensitivity, self.l2_sensitivity) {
            (Some(s), _) => line("L1 sensitivity", format!("{s} (one device's whole window)")),
            (_, Some(s)) => line(
                "L2 sensitivity",
                format!("{s:.4} (one device's whole window)"),
            ),
            _ => {}
        }
        line("noise scale", format!("{:.3}", self.noise_scale));
        line(
            "per event",
            match self.per_event.delta {
                Some(d) => format!("epsilon {:.4} at delta {d:e}", self.per_event.epsilon),
                None => format!("epsilon {:.4}", self.per_event.epsilon),
            },
        );
        line("accountant", self.accountant.to_owned());
        out
    }
}
