//! What the clients saw and what it cost the servers: step times, errors, and the CPU time and
//! peak memory of the server processes from `/proc`, printed and optionally written as JSON.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value, json};

/// Step times by step, in the order the steps first happened, and errors by kind.
#[derive(Default)]
pub struct Seen {
    steps: Vec<(&'static str, Vec<Duration>)>,
    errors: BTreeMap<String, u32>,
}

/// The name of the step that spans a whole registration; its count is the registrations done.
pub const WHOLE: &str = "whole";

impl Seen {
    fn step(&mut self, name: &'static str, took: Duration) {
        match self.steps.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => v.push(took),
            None => self.steps.push((name, vec![took])),
        }
    }

    /// Registrations that went through.
    pub fn done(&self) -> usize {
        self.steps
            .iter()
            .find(|(n, _)| *n == WHOLE)
            .map_or(0, |(_, v)| v.len())
    }
}

/// What one registration records, shared by all.
pub struct Recorder<'a>(pub &'a Mutex<Seen>);

impl Recorder<'_> {
    fn with(&self, f: impl FnOnce(&mut Seen)) {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// One step of one registration took `took`.
    pub fn step(&self, name: &'static str, took: Duration) {
        self.with(|s| s.step(name, took));
    }

    /// One registration failed with `what` (kept short: errors are counted by their text).
    pub fn error(&self, what: impl Into<String>) {
        let what = what.into();
        self.with(|s| *s.errors.entry(what).or_default() += 1);
    }
}

/// CPU time and peak memory of one process.
#[derive(Clone, Copy)]
pub struct Usage {
    /// `utime + stime`, seconds.
    pub cpu: f64,
    /// `stime` alone (the kernel's work for the process: network, files), seconds.
    pub system: f64,
    /// Peak resident set (`VmHWM`), MiB.
    pub peak_rss: f64,
}

impl Usage {
    /// `pid`'s usage so far, from `/proc`.
    pub fn of(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces) start after the last ')'.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let user: f64 = fields.get(11)?.parse().ok()?;
        let system: f64 = fields.get(12)?.parse().ok()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let hwm_kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        // USER_HZ is 100 on every Linux this runs on.
        Some(Self {
            cpu: (user + system) / 100.0,
            system: system / 100.0,
            peak_rss: hwm_kib / 1024.0,
        })
    }
}

/// CPU time of the whole machine (all cores), from `/proc/stat`: what other processes took
/// during a run shows how far its figures can be trusted.
#[derive(Clone, Copy)]
pub struct Machine {
    /// Busy time (user, nice, system, irq, softirq), seconds.
    pub busy: f64,
    /// Time the hypervisor gave to other guests, seconds.
    pub steal: f64,
}

impl Machine {
    pub fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let ticks: Vec<f64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .map(|t| t.parse().unwrap_or(0.0))
            .collect();
        let tick = |i: usize| ticks.get(i).copied().unwrap_or(0.0) / 100.0;
        Some(Self {
            busy: tick(0) + tick(1) + tick(2) + tick(5) + tick(6),
            steal: tick(7),
        })
    }
}

/// A server process whose cost is reported: its label, and its usage before and after the run.
pub struct Server {
    pub label: &'static str,
    pub before: Option<Usage>,
    pub after: Option<Usage>,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

/// How the run was driven, for the report's first line.
pub struct Run {
    pub mode: String,
    pub total: usize,
    pub clients: usize,
    pub rate: Option<f64>,
    pub elapsed: Duration,
    /// The machine before and after.
    pub machine: [Option<Machine>; 2],
}

/// Prints the report and returns it as JSON; `client` is this process (so that one can see
/// whether the load generator kept up).
pub fn report(run: &Run, mut seen: Seen, servers: &[Server], client: &Server) -> Value {
    let done = seen.done();
    let secs = run.elapsed.as_secs_f64();
    let offered = match run.rate {
        Some(r) => format!("offered {r:.0}/s"),
        None => "closed loop".to_owned(),
    };
    println!(
        "{}: {done} of {} registrations in {secs:.2} s ({offered}, {} clients): {:.0} registrations/s",
        run.mode,
        run.total,
        run.clients,
        done as f64 / secs
    );
    let mut steps = serde_json::Map::new();
    for (name, v) in &mut seen.steps {
        v.sort();
        let [p50, p95, p99, max] = [0.5, 0.95, 0.99, 1.0].map(|p| percentile(v, p));
        println!(
            "  {name:<8} p50 {p50:7.2} ms  p95 {p95:7.2} ms  p99 {p99:7.2} ms  max {max:7.2} ms  (n {})",
            v.len()
        );
        steps.insert(
            (*name).to_owned(),
            json!({"n": v.len(), "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "max_ms": max}),
        );
    }
    if seen.errors.is_empty() {
        println!("  errors: none");
    } else {
        println!("  errors: {:?}", seen.errors);
    }
    let mut costs = serde_json::Map::new();
    for s in servers {
        if let (Some(b), Some(a)) = (s.before, s.after) {
            let (cpu, system) = (a.cpu - b.cpu, a.system - b.system);
            let per = cpu / done.max(1) as f64 * 1e6;
            println!(
                "  {} CPU {cpu:.2} s ({system:.2} s of it in the kernel): {per:.0} µs per \
                 registration; peak RSS {:.1} MiB",
                s.label, a.peak_rss
            );
            costs.insert(
                s.label.to_owned(),
                json!({"cpu_s": cpu, "system_cpu_s": system, "cpu_us_per_registration": per,
                       "peak_rss_mib": a.peak_rss}),
            );
        }
    }
    let mut client_cpu = Value::Null;
    let mut ours = 0.0;
    if let (Some(b), Some(a)) = (client.before, client.after) {
        let cpu = a.cpu - b.cpu;
        println!(
            "  {} CPU {cpu:.2} s ({:.0}% of one core)",
            client.label,
            cpu / secs * 100.0
        );
        client_cpu = json!(cpu);
        ours += cpu;
    }
    for s in servers {
        if let (Some(b), Some(a)) = (s.before, s.after) {
            ours += a.cpu - b.cpu;
        }
    }
    let (mut other_cpu, mut steal) = (Value::Null, Value::Null);
    if let [Some(b), Some(a)] = run.machine {
        let (other, stolen) = ((a.busy - b.busy - ours).max(0.0), a.steal - b.steal);
        println!(
            "  other processes CPU {other:.2} s ({:.0}% of one core); stolen by the hypervisor {stolen:.2} s",
            other / secs * 100.0
        );
        (other_cpu, steal) = (json!(other), json!(stolen));
    }
    json!({
        "mode": run.mode,
        "client_cpu_s": client_cpu,
        "other_cpu_s": other_cpu,
        "steal_s": steal,
        "registrations": run.total,
        "done": done,
        "clients": run.clients,
        "rate": run.rate,
        "seconds": secs,
        "per_second": done as f64 / secs,
        "steps": steps,
        "errors": seen.errors,
        "servers": costs,
    })
}
