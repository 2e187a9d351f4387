//! The short randomized run of the nemesis suite (`syncline_e2e::nemesis`): a few seeds drawn
//! from the clock, or the one in `SYNCLINE_NEMESIS_SEED` to replay a failure. The long run is
//! `syncline-nemesis --seeds N --minutes M` (docs/RELIABILITY.md).

use std::time::Duration;

use syncline_e2e::nemesis::{Config, run_scenario};

#[test]
fn faults_injected_at_random_lose_no_acknowledged_write_and_replicas_converge() {
    let seeds: Vec<u64> = match std::env::var("SYNCLINE_NEMESIS_SEED") {
        Ok(s) => vec![s.parse().expect("SYNCLINE_NEMESIS_SEED is a number")],
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_secs());
            vec![t, t.wrapping_mul(6364136223846793005).wrapping_add(1)]
        }
    };
    let mut failed = Vec::new();
    for seed in seeds {
        let report = run_scenario(&Config::new(seed, Duration::from_secs(25)));
        eprintln!("{}", report.summary());
        // The run must have done something: writes acknowledged and faults injected.
        assert!(report.acked > 100, "too few writes: {}", report.summary());
        assert!(
            report.faults.values().sum::<u64>() >= 3,
            "too few faults: {}",
            report.summary()
        );
        if !report.passed() {
            failed.push(format!(
                "{}\n  or: SYNCLINE_NEMESIS_SEED={seed} cargo test -p syncline-e2e --test e2e nemesis",
                report.summary()
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
