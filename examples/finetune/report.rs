//! The research harness around the story: the results table, peak-RSS probes and timing.

use std::time::Instant;

use anyhow::Result;
use candle_nn::VarMap;

use super::train::Scores;

#[path = "../common/memory.rs"]
mod memory;

pub(crate) use memory::{human_bytes, peak_rss, reset_peak_rss};

/// One line of the results table.
pub(crate) struct Row {
    pub(crate) name: &'static str,
    pub(crate) trainable: usize,
    pub(crate) total: usize,
    pub(crate) opt_bytes: u64,
    pub(crate) rss: u64,
    pub(crate) steps_per_s: f64,
    pub(crate) lr: f64,
    pub(crate) scores: Scores,
}

impl Row {
    /// The base model, not trained on the task: only its scores.
    pub(crate) fn base_only(total: usize, scores: Scores) -> Self {
        Self {
            name: "base model only",
            trainable: 0,
            total,
            opt_bytes: 0,
            rss: 0,
            steps_per_s: 0.0,
            lr: 0.0,
            scores,
        }
    }
}

/// Prints `rows` as a Markdown table.
pub(crate) fn print_table(rows: &[Row], held_out: usize) {
    println!();
    println!("| held-out: {held_out} MRs with unseen names | trainable params | % of all | optimizer state | peak RSS | steps/s | lr | loss | exact match | token acc |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let na = r.trainable == 0;
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.3} | {:.1}% | {:.1}% |",
            r.name,
            r.trainable,
            if na {
                "0%".into()
            } else {
                format!("{:.2}%", 100.0 * r.trainable as f64 / r.total as f64)
            },
            human_bytes(r.opt_bytes),
            if na { "-".into() } else { human_bytes(r.rss) },
            if na {
                "-".into()
            } else {
                format!("{:.1}", r.steps_per_s)
            },
            if na {
                "-".into()
            } else {
                format!("{:e}", r.lr)
            },
            r.scores.loss,
            100.0 * r.scores.exact,
            100.0 * r.scores.acc
        );
    }
}

/// The median time of each case: `rounds` interleaved rounds, each timing every case `runs` times
/// in turn, so drift on a shared machine hits all cases alike.
pub(crate) fn interleaved_medians<const N: usize>(
    mut cases: [&mut dyn FnMut() -> Result<()>; N],
    runs: usize,
    rounds: usize,
) -> Result<[f64; N]> {
    let mut times: [Vec<f64>; N] = std::array::from_fn(|_| Vec::with_capacity(rounds));
    for _ in 0..rounds {
        for (case, t) in cases.iter_mut().zip(&mut times) {
            t.push(median_secs(&mut **case, runs)?);
        }
    }
    Ok(times.map(median))
}

fn median_secs(f: &mut dyn FnMut() -> Result<()>, runs: usize) -> Result<f64> {
    let mut t = Vec::with_capacity(runs);
    for _ in 0..runs {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    Ok(median(t))
}

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

pub(crate) fn count_params(varmap: &VarMap) -> usize {
    varmap.all_vars().iter().map(|v| v.elem_count()).sum()
}
