//! The device-day accountant: what every window a device released in one
//! budget period costs together, as one `(epsilon, delta)` guarantee.
//!
//! A window released with discrete Laplace noise is pure `epsilon_w`-DP for
//! the device's whole window (sensitivity `K` events, see [`crate::privacy`]);
//! a window with discrete Gaussian noise is `rho_w`-zCDP. Two accountants:
//!
//! - **Pure-DP optimal composition** (Laplace only). `k` windows of at most
//!   `epsilon_w` each are dominated by `k` randomized responses with
//!   `epsilon_w` (Kairouz, Oh and Viswanath, "The composition theorem for
//!   differential privacy", 2015), whose privacy loss is `(k - 2l)
//!   epsilon_w` with `l ~ Binomial(k, 1 / (1 + e^epsilon_w))`. The
//!   hockey-stick divergence of that distribution is the exact `delta(eps)`
//!   of the composition, and OpenDP's [`PrivacyProfile`] inverts it. For a
//!   discrete Laplace release whose window sensitivity is one noise step
//!   this is the exact value; for larger sensitivities it is within a few
//!   per cent of a privacy-loss-distribution accountant (checked in CI
//!   against Google's `dp-accounting`, tests/test_privacy_report.py).
//! - **zCDP** (Gaussian, or any mix): rho adds up (a Laplace window counts
//!   `epsilon_w^2 / 2`), and OpenDP's optimal conversion
//!   ([`ConcentratedMeasure::convert`], Canonne, Kamath and Steinke 2020)
//!   turns the total into `(epsilon, delta)`.
//!
//! Both only ever over-state the true loss: the guarantee reported is never
//! below the tight value. For Laplace windows alone the first is used: it
//! is exact for the worst pure-DP mechanism (randomized response), so the
//! zCDP route, which must cover that mechanism too, is never tighter.

use opendp::combinators::ConcentratedMeasure;
use opendp::measures::{PrivacyProfile, ZeroConcentratedDivergence};

use crate::privacy::PrivacyError;

/// What one released window costs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cost {
    /// Pure `epsilon`-DP for the device's whole window (discrete Laplace).
    Laplace { epsilon: f64 },
    /// `rho`-zCDP for the device's whole window (discrete Gaussian).
    Gaussian { rho: f64 },
}

impl Cost {
    /// Whether this is a cost the accountant can add: finite and >= 0.
    pub fn is_valid(&self) -> bool {
        let v = match *self {
            Cost::Laplace { epsilon } => epsilon,
            Cost::Gaussian { rho } => rho,
        };
        v.is_finite() && v >= 0.0
    }
}

/// The windows released in one period, summarised for the accountant.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Spent {
    laplace_windows: u64,
    laplace_max: f64,
    laplace_sum: f64,
    /// Sum of the Laplace windows' `epsilon^2 / 2`.
    laplace_rho: f64,
    gaussian_rho: f64,
}

impl Spent {
    pub fn add(&mut self, cost: Cost) {
        match cost {
            Cost::Laplace { epsilon } => {
                self.laplace_windows += 1;
                self.laplace_max = self.laplace_max.max(epsilon);
                self.laplace_sum += epsilon;
                self.laplace_rho += epsilon * epsilon / 2.0;
            }
            Cost::Gaussian { rho } => self.gaussian_rho += rho,
        }
    }

    /// `n` windows of one cost.
    pub fn repeated(cost: Cost, n: u64) -> Self {
        let mut s = Spent::default();
        match cost {
            Cost::Laplace { epsilon } => {
                s.laplace_windows = n;
                s.laplace_max = epsilon;
                s.laplace_sum = epsilon * n as f64;
                s.laplace_rho = epsilon * epsilon / 2.0 * n as f64;
            }
            Cost::Gaussian { rho } => s.gaussian_rho = rho * n as f64,
        }
        s
    }

    /// Basic composition, the sum of the epsilons, when everything spent
    /// is pure DP: a quick upper bound of [`Spent::epsilon`].
    pub fn pure_sum(&self) -> Option<f64> {
        (self.gaussian_rho == 0.0).then_some(self.laplace_sum)
    }

    /// The zCDP rho of everything spent (pure epsilon-DP implies
    /// `epsilon^2 / 2`-zCDP; Bun and Steinke 2016).
    pub fn rho(&self) -> f64 {
        self.laplace_rho + self.gaussian_rho
    }

    /// The tightest `epsilon` at `delta` the two accountants give, and
    /// which one gave it.
    pub fn epsilon(&self, delta: f64) -> Result<(f64, Accountant), PrivacyError> {
        if !(delta > 0.0 && delta < 1.0) {
            return Err(PrivacyError::BadDelta(delta));
        }
        if self.gaussian_rho == 0.0 && self.laplace_windows > 0 {
            // The optimal composition is exact for the worst pure-DP
            // mechanism, which the zCDP route must also cover: it is never
            // the looser of the two here.
            let pure = pure_composition_epsilon(self.laplace_windows, self.laplace_max, delta)?
                .min(self.laplace_sum);
            return Ok((pure, Accountant::PureComposition));
        }
        Ok((zcdp_epsilon(self.rho(), delta)?, Accountant::Zcdp))
    }
}

/// Which accountant bounded a guarantee.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accountant {
    PureComposition,
    Zcdp,
}

impl Accountant {
    pub fn describe(self) -> &'static str {
        match self {
            Accountant::PureComposition => {
                "optimal composition of pure-DP windows (Kairouz et al. 2015), inverted with OpenDP's PrivacyProfile"
            }
            Accountant::Zcdp => {
                "zCDP, rho summed over windows, OpenDP's optimal zCDP to (epsilon, delta) conversion"
            }
        }
    }
}

fn opendp(step: &'static str) -> impl Fn(opendp::error::Error) -> PrivacyError {
    move |e| PrivacyError::OpenDp {
        step,
        message: e.to_string(),
    }
}

/// `epsilon` at `delta` of `rho`-zCDP, by OpenDP's conversion. Where
/// that overflows (a rho in the millions, far from any private setting),
/// the classic bound `rho + 2 sqrt(rho ln(1/delta))` (Bun and Steinke
/// 2016), which is looser but valid.
pub fn zcdp_epsilon(rho: f64, delta: f64) -> Result<f64, PrivacyError> {
    if rho == 0.0 {
        return Ok(0.0);
    }
    if !(rho.is_finite() && rho > 0.0) {
        return Err(PrivacyError::BadRho(rho));
    }
    let classic = rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt();
    Ok(ZeroConcentratedDivergence::convert(rho)
        .and_then(|profile| profile.epsilon(delta))
        .map_or(classic, |eps| eps.min(classic)))
}

/// `epsilon` at `delta` of `k` pure `epsilon_w`-DP releases, composed
/// optimally (module docs).
pub fn pure_composition_epsilon(k: u64, epsilon_w: f64, delta: f64) -> Result<f64, PrivacyError> {
    if k == 0 || epsilon_w == 0.0 {
        return Ok(0.0);
    }
    let profile = PrivacyProfile::new(move |eps| Ok(randomized_response_delta(k, epsilon_w, eps)));
    let eps = profile
        .epsilon(delta)
        .map_err(opendp("pure-DP composition"))?;
    // The bisection stops within a hair of the root; never report below it.
    Ok((eps * (1.0 + 1e-9)).min(k as f64 * epsilon_w))
}

/// The hockey-stick divergence `delta(eps)` of `k` randomized responses
/// with `epsilon_w`: `E[(1 - e^(eps - L))+]` for the privacy loss `L =
/// (k - 2l) epsilon_w`, `l ~ Binomial(k, 1 / (1 + e^epsilon_w))`.
fn randomized_response_delta(k: u64, epsilon_w: f64, eps: f64) -> f64 {
    let log_p = -(-epsilon_w).exp().ln_1p(); // ln(e^e / (1 + e^e))
    let log_q = -epsilon_w + log_p; // ln(1 / (1 + e^e)), finite for any e
    let kf = k as f64;
    let mut log_binom = 0.0; // ln C(k, l)
    let mut delta = 0.0;
    for l in 0..=k {
        let lf = l as f64;
        let loss = (kf - 2.0 * lf) * epsilon_w;
        if loss <= eps {
            break; // the loss only falls with l
        }
        let log_w = log_binom + (kf - lf) * log_p + if l > 0 { lf * log_q } else { 0.0 };
        delta += log_w.exp() * -(eps - loss).exp_m1();
        log_binom += (kf - lf).ln() - (lf + 1.0).ln();
    }
    delta.clamp(0.0, 1.0)
}

/// The largest per-window epsilon (`laplace`) or rho such that `windows`
/// windows of it compose to at most `epsilon` at `delta`: how a device-day
/// budget becomes a per-window one.
pub fn calibrate(
    laplace: bool,
    windows: u64,
    epsilon: f64,
    delta: f64,
) -> Result<f64, PrivacyError> {
    if !(epsilon.is_finite() && epsilon > 0.0) {
        return Err(PrivacyError::BadEpsilon(epsilon));
    }
    let windows = windows.max(1);
    let make = |x: f64| {
        if laplace {
            Cost::Laplace { epsilon: x }
        } else {
            Cost::Gaussian { rho: x }
        }
    };
    // Bisection on the per-window value; the total is increasing in it.
    let (mut lo, mut hi) = (0.0f64, epsilon);
    while hi - lo > 1e-9 * hi {
        let mid = (lo + hi) / 2.0;
        let (total, _) = Spent::repeated(make(mid), windows).epsilon(delta)?;
        if total <= epsilon {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// Windows of all `models` that the events of one `period` can fall into:
/// `ceil(period / window) + 1` per model, since a period that does not
/// start on a window boundary touches one window more.
pub fn windows_per_period(period: chrono::TimeDelta, window_secs: u32, models: usize) -> u64 {
    let period = u64::try_from(period.num_seconds()).unwrap_or(0);
    let per_model = period.div_ceil(u64::from(window_secs.max(1))) + 1;
    per_model * models as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_laplace_window_costs_its_epsilon() {
        let (eps, _) = Spent::repeated(Cost::Laplace { epsilon: 0.7 }, 1)
            .epsilon(1e-6)
            .expect("eps");
        assert!(eps <= 0.7 && eps > 0.6999, "{eps}");
    }

    #[test]
    fn many_laplace_windows_compose_below_the_sum() {
        // 48 windows of 0.2: basic composition says 9.6; the exact
        // composition of discrete Laplace with unit sensitivity (which
        // dp-accounting also gives) is 6.735.
        let (eps, acc) = Spent::repeated(Cost::Laplace { epsilon: 0.2 }, 48)
            .epsilon(1e-6)
            .expect("eps");
        assert_eq!(acc, Accountant::PureComposition);
        assert!((eps - 6.735).abs() < 0.002, "{eps}");
    }

    #[test]
    fn gaussian_windows_add_their_rho() {
        let one = Spent::repeated(Cost::Gaussian { rho: 0.96 }, 1)
            .epsilon(1e-6)
            .expect("eps")
            .0;
        let many = Spent::repeated(Cost::Gaussian { rho: 0.01 }, 96)
            .epsilon(1e-6)
            .expect("eps")
            .0;
        assert!((one - many).abs() < 1e-9);
        // The classic bound rho + 2 sqrt(rho ln(1/delta)) is looser.
        let classic = 0.96 + 2.0 * (0.96f64 * 1e6f64.ln()).sqrt();
        assert!(many < classic && many > 7.0, "{many}");
    }

    #[test]
    fn calibration_meets_the_target_from_below() {
        for laplace in [true, false] {
            for windows in [1, 24, 2880] {
                let x = calibrate(laplace, windows, 8.0, 1e-6).expect("calibrate");
                let cost = if laplace {
                    Cost::Laplace { epsilon: x }
                } else {
                    Cost::Gaussian { rho: x }
                };
                let (eps, _) = Spent::repeated(cost, windows).epsilon(1e-6).expect("eps");
                assert!(eps <= 8.0 && eps > 7.99, "{laplace} {windows}: {eps}");
            }
        }
    }

    #[test]
    fn huge_settings_still_get_a_valid_bound() {
        let (eps, _) = Spent::repeated(Cost::Laplace { epsilon: 20_000.0 }, 86_400)
            .epsilon(1e-6)
            .expect("eps");
        assert!(eps.is_finite() && eps <= 20_000.0 * 86_400.0, "{eps}");
        let rho = 1e13;
        let eps = zcdp_epsilon(rho, 1e-6).expect("eps");
        assert!(eps >= rho && eps.is_finite(), "{eps}");
    }

    #[test]
    fn a_mix_is_accounted_in_zcdp() {
        let mut s = Spent::default();
        s.add(Cost::Laplace { epsilon: 0.2 });
        s.add(Cost::Gaussian { rho: 0.02 });
        assert!((s.rho() - 0.04).abs() < 1e-12);
        assert_eq!(s.epsilon(1e-6).expect("eps").1, Accountant::Zcdp);
    }
}
