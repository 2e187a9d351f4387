//! `syncline-nemesis`: the long run of the nemesis suite (see `nemesis.rs` in this crate and
//! docs/RELIABILITY.md). It runs scenarios one after the other with the `syncline-hub` and
//! `syncline-edge` binaries next to it, prints each one's summary as it ends, and with
//! `--report FILE` writes the totals into that Markdown file between its nemesis markers.
//! It exits with status 1 if any scenario failed, printing how to replay it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use syncline_e2e::nemesis::{Config, Report, run_scenario};

#[derive(Parser)]
#[command(about = "Fault-injection runs against real syncline-hub and syncline-edge processes")]
struct Args {
    /// How many scenarios (seeds) to run.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// The first seed (the others follow it); default: drawn from the clock.
    #[arg(long)]
    seed: Option<u64>,
    /// Minutes of faults per scenario.
    #[arg(long, default_value_t = 1.0, conflicts_with = "fault_secs")]
    minutes: f64,
    /// Seconds of faults per scenario (for short replays).
    #[arg(long)]
    fault_secs: Option<u64>,
    /// Edges per scenario.
    #[arg(long, default_value_t = 4)]
    edges: usize,
    /// Write the totals into this Markdown file, between `<!-- nemesis:begin -->` and
    /// `<!-- nemesis:end -->` (docs/RELIABILITY.md).
    #[arg(long)]
    report: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let first = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
    });
    let fault_time = match args.fault_secs {
        Some(s) => Duration::from_secs(s),
        None => Duration::from_secs_f64((args.minutes * 60.0).max(1.0)),
    };
    let started = Instant::now();
    let mut reports = Vec::new();
    for i in 0..args.seeds {
        let seed = first.wrapping_add(i);
        eprintln!(
            "scenario {}/{}: seed {seed}, {} s of faults...",
            i + 1,
            args.seeds,
            fault_time.as_secs()
        );
        let mut config = Config::new(seed, fault_time);
        config.edges = args.edges.max(2);
        let report = run_scenario(&config);
        println!("{}", report.summary());
        reports.push(report);
    }
    let failed: Vec<&Report> = reports.iter().filter(|r| !r.passed()).collect();
    let totals = totals(&reports, started.elapsed(), &args, first);
    println!("\n{totals}");
    if let Some(path) = &args.report {
        if let Err(e) = write_report(path, &totals) {
            eprintln!("error: cannot write {}: {e}", path.display());
            return ExitCode::from(2);
        }
        eprintln!("wrote the totals into {}", path.display());
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        for r in failed {
            eprintln!("seed {} FAILED; replay: {}", r.seed, r.replay());
        }
        ExitCode::from(1)
    }
}

/// The Markdown section of the totals.
fn totals(reports: &[Report], took: Duration, args: &Args, first: u64) -> String {
    let mut faults: BTreeMap<&str, u64> = BTreeMap::new();
    for r in reports {
        for (k, n) in &r.faults {
            *faults.entry(k).or_insert(0) += n;
        }
    }
    let sum = |f: fn(&Report) -> u64| reports.iter().map(f).sum::<u64>();
    let worst = reports.iter().map(|r| r.converge).max().unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut md = String::new();
    md.push_str(&format!(
        "Run on {}: {} scenarios (seeds {}..={}), {} s of faults each, {} edges, {} cores, \
         {:.0} min in all.\n\n\
         Command: `syncline-nemesis --seeds {} --seed {} {} --edges {} --report docs/RELIABILITY.md`\n\n",
        today(),
        reports.len(),
        first,
        first.wrapping_add(reports.len().saturating_sub(1) as u64),
        reports.first().map_or(0, |r| r.fault_secs),
        args.edges,
        cores,
        took.as_secs_f64() / 60.0,
        args.seeds,
        first,
        match args.fault_secs {
            Some(s) => format!("--fault-secs {s}"),
            None => format!("--minutes {}", args.minutes),
        },
        args.edges,
    ));
    let passed = reports.iter().filter(|r| r.passed()).count();
    let rows = [
        ("scenarios passed", format!("{passed} of {}", reports.len())),
        ("writes acknowledged", sum(|r| r.acked).to_string()),
        (
            "writes refused with 507 storage_full (disk full)",
            sum(|r| r.refused).to_string(),
        ),
        (
            "writes whose answer was lost (process killed or paused)",
            sum(|r| r.unknown).to_string(),
        ),
        (
            "**acknowledged writes lost**",
            format!("**{}**", sum(|r| r.lost)),
        ),
        (
            "**documents diverged**",
            format!("**{}**", sum(|r| r.divergences)),
        ),
        (
            "worst time to converge after heal",
            format!("{:.1} s", worst.as_secs_f64()),
        ),
        (
            "signatures verified at the end",
            sum(|r| r.verified).to_string(),
        ),
        (
            "datagrams forwarded / dropped / duplicated / reordered",
            format!(
                "{} / {} / {} / {}",
                sum(|r| r.network.forwarded),
                sum(|r| r.network.dropped),
                sum(|r| r.network.duplicated),
                sum(|r| r.network.reordered)
            ),
        ),
    ];
    md.push_str("| result | value |\n|---|---|\n");
    for (what, value) in rows {
        md.push_str(&format!("| {what} | {value} |\n"));
    }
    md.push_str("\n| fault injected | times |\n|---|---|\n");
    for (k, n) in &faults {
        md.push_str(&format!("| {k} | {n} |\n"));
    }
    let failed: Vec<&Report> = reports.iter().filter(|r| !r.passed()).collect();
    if !failed.is_empty() {
        md.push_str("\nFailed scenarios:\n\n");
        for r in failed {
            md.push_str(&format!("- seed {}: {}\n", r.seed, r.failures.join("; ")));
        }
    }
    md
}

fn today() -> String {
    std::process::Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

const BEGIN: &str = "<!-- nemesis:begin -->";
const END: &str = "<!-- nemesis:end -->";

fn write_report(path: &PathBuf, totals: &str) -> std::io::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("it has no {BEGIN} ... {END} section"),
        ));
    };
    let out = format!("{}{BEGIN}\n{totals}{}", &text[..b], &text[e..]);
    std::fs::write(path, out)
}
