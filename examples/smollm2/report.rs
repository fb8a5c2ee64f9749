//! Measuring: peak memory (Linux `VmHWM`, reset between configurations) and the table.

/// Peak resident memory since the last reset, in bytes (Linux; 0 elsewhere).
pub(crate) fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Resets the peak (writing 5 to `clear_refs`, Linux >= 4.0; harmless where unsupported).
pub(crate) fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn human_bytes(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b as f64 / 1024.0)
    }
}

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
