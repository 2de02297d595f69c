//! Synthetic workloads: request arrival times (Poisson or gamma-bursty) and prompt/output
//! length distributions, seeded. Shared by the simulator (`study`) and the serving benchmark
//! (`serve::bench`), so both draw the same workload from the same flags.

use crate::sampling::Rng;
use serde::{Deserialize, Serialize};

/// A length distribution.
#[derive(Debug, Clone, PartialEq)]
pub enum Lengths {
    Fixed(usize),
    Uniform(usize, usize),
    /// Median and sigma of the underlying normal.
    LogNormal {
        median: f64,
        sigma: f64,
    },
}

impl std::str::FromStr for Lengths {
    type Err = String;
    /// `N`, `uniform:A:B`, `lognormal:MEDIAN:SIGMA`.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let num = |x: &str| x.parse::<f64>().map_err(|_| format!("{x:?} is not a number in length spec {s:?}"));
        match parts.as_slice() {
            [n] => Ok(Lengths::Fixed(num(n)? as usize)),
            ["uniform", a, b] => Ok(Lengths::Uniform(num(a)? as usize, num(b)? as usize)),
            ["lognormal", m, sg] => Ok(Lengths::LogNormal { median: num(m)?, sigma: num(sg)? }),
            _ => Err(format!("bad length spec {s:?}: use N, uniform:A:B or lognormal:MEDIAN:SIGMA")),
        }
    }
}

fn normal(rng: &mut Rng) -> f64 {
    let (u1, u2) = (rng.uniform().max(1e-300), rng.uniform());
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Gamma(shape k, scale 1) by Marsaglia and Tsang.
fn gamma(rng: &mut Rng, k: f64) -> f64 {
    if k < 1.0 {
        return gamma(rng, k + 1.0) * rng.uniform().max(1e-300).powf(1.0 / k);
    }
    let d = k - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = rng.uniform();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

impl Lengths {
    pub fn sample(&self, rng: &mut Rng) -> usize {
        match *self {
            Lengths::Fixed(n) => n,
            Lengths::Uniform(a, b) => a + (rng.uniform() * (b - a + 1) as f64) as usize,
            Lengths::LogNormal { median, sigma } => (median * (sigma * normal(rng)).exp()).round().max(1.0) as usize,
        }
    }
}

/// How requests arrive.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub num_requests: usize,
    /// Requests per second; infinity = all at time 0.
    pub rate: f64,
    /// Gamma shape of inter-arrival times: 1 = Poisson; < 1 burstier (CV = 1/sqrt(shape)).
    pub burstiness: f64,
    pub prompt: Lengths,
    pub output: Lengths,
    pub seed: u64,
}

/// One request of a workload: arrival time (s), prompt and output lengths.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WorkItem {
    pub arrival_s: f64,
    pub prompt_len: usize,
    pub output_len: usize,
}

impl Workload {
    pub fn items(&self) -> Vec<WorkItem> {
        let mut rng = Rng::new(self.seed);
        let mut t = 0.0;
        (0..self.num_requests)
            .map(|_| {
                if self.rate.is_finite() {
                    let k = self.burstiness;
                    t += gamma(&mut rng, k) / (k * self.rate);
                }
                WorkItem {
                    arrival_s: t,
                    prompt_len: self.prompt.sample(&mut rng).max(1),
                    output_len: self.output.sample(&mut rng).max(1),
                }
            })
            .collect()
    }
}

/// Reads a JSONL workload trace (`arrival_s`, `prompt_len`, `output_len` per line).
pub fn read_workload(path: &std::path::Path) -> anyhow::Result<Vec<WorkItem>> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| anyhow::anyhow!("{}: line {}: not a workload item: {e}", path.display(), i + 1))
        })
        .collect()
}
