//! `cargo fuzz run decode`: the wire decoder on arbitrary bytes must never
//! panic, must refuse with a reason, and whatever it accepts must re-encode
//! to a message it accepts again, equal.
#![no_main]

use chrono::{TimeDelta, TimeZone, Utc};
use driftline_core::wire::{self, TimeBounds};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|payload: &[u8]| {
    let bounds = TimeBounds {
        now: Utc.with_ymd_and_hms(2026, 11, 27, 12, 0, 0).unwrap(),
        max_age: TimeDelta::days(30),
        max_future: TimeDelta::hours(1),
    };
    let topic = "driftline/v1/eu-kiosks/kiosk-0007/metrics";
    match wire::accept(topic, payload, &bounds) {
        Ok(report) => {
            let again = report.encode().expect("accepted reports encode");
            let back = wire::accept(topic, &again, &bounds).expect("re-encoded report accepted");
            assert_eq!(back, report);
        }
        Err(rejection) => assert!(!rejection.code().is_empty()),
    }
});
