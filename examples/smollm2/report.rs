//! Measuring: peak memory (Linux `VmHWM`, reset between configurations) and the table.

#[path = "../common/memory.rs"]
mod memory;

use memory::human_bytes;
pub(crate) use memory::{peak_rss, reset_peak_rss};

/// One configuration's results.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) name: &'static str,
    pub(crate) trainable: usize,
    pub(crate) total: usize,
    /// Bytes of what training produces: the adapter file, or the full checkpoint.
    pub(crate) saved_bytes: u64,
    pub(crate) peak_rss: u64,
    pub(crate) steps_per_s: f64,
    pub(crate) tokens_per_s: f64,
    pub(crate) loss: f32,
    pub(crate) exact: f64,
}

pub(crate) fn print_table(rows: &[Row]) {
    println!(
        "| configuration | trainable params | optimizer state | saved | peak RSS | steps/s | tokens/s | held-out loss | exact match |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let trained = r.trainable > 0;
        let dash = || "-".to_string();
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.3} | {:.1}% |",
            r.name,
            if trained {
                format!(
                    "{} ({:.2}%)",
                    r.trainable,
                    100.0 * r.trainable as f64 / r.total as f64
                )
            } else {
                dash()
            },
            if trained {
                human_bytes(8 * r.trainable as u64)
            } else {
                dash()
            },
            if trained {
                human_bytes(r.saved_bytes)
            } else {
                dash()
            },
            if trained {
                human_bytes(r.peak_rss)
            } else {
                dash()
            },
            if trained {
                format!("{:.3}", r.steps_per_s)
            } else {
                dash()
            },
            if trained {
                format!("{:.0}", r.tokens_per_s)
            } else {
                dash()
            },
            r.loss,
            100.0 * r.exact
        );
    }
}
