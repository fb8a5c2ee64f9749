//! `x W^T` for a few rows of `x`: the base matmul of a server's decoding step, where a
//! mixed-adapter batch holds one token per sequence (`RoutedLinear` in `kernels`).
//!
//! gemm vectorises along the rows of `x`: with 2-16 rows most of each vector lane is idle.
//! Here every output is a dot product of a weight row and an input row, both contiguous: the
//! weight is read once, tiles of 4 weight rows x 4 input rows keep 16 vector accumulators (8 x 1
//! for the rows left over; AVX-512 where the CPU has it, a portable loop otherwise), and blocks
//! of weight rows are split between threads.
//!
//! Each output element is computed by the same sequence of operations whichever tile, thread
//! or batch size it falls in, so a sequence's logits do not depend on which other sequences
//! share its decoding step.

use rayon::prelude::*;

/// The most rows of `x` this kernel takes; larger inputs go to gemm.
pub(crate) const MAX_ROWS: usize = 16;

/// Weight rows one task computes.
const ROWS_PER_TASK: usize = 64;

/// `dst [n, out] = x [n, k]` times the transpose of `w` (rows of `k` contiguous values, `w_rs`
/// apart, `out` of them). The caller checks the lengths: `x.len() >= n k`,
/// `w.len() >= (out - 1) w_rs + k`, `dst.len() == n out`.
pub(crate) fn matmul_t(
    x: &[f32],
    n: usize,
    k: usize,
    w: &[f32],
    w_rs: usize,
    out: usize,
    dst: &mut [f32],
) {
    if n == 0 || out == 0 {
        return;
    }
    let rows: Vec<&[f32]> = x.chunks_exact(k.max(1)).take(n).collect();
    let weight_row = |j: usize| &w[j * w_rs..j * w_rs + k];
    // `[out, n]`: each task owns a contiguous block of weight rows.
    let mut t = vec![0f32; out * n];
    let task = |(c, block): (usize, &mut [f32])| {
        let first = c * ROWS_PER_TASK;
        dots(&rows, k, block, |j| weight_row(first + j));
    };
    if out * k * n < 1 << 16 {
        t.chunks_mut(ROWS_PER_TASK * n).enumerate().for_each(task);
    } else {
        t.par_chunks_mut(ROWS_PER_TASK * n)
            .enumerate()
            .for_each(task);
    }
    for (j, col) in t.chunks_exact(n).enumerate() {
        for (i, v) in col.iter().enumerate() {
            dst[i * out + j] = *v;
        }
    }
}

/// `block[j n + i] = w_j . x_i` for the weight rows of one task (`block.len() / n` of them).
fn dots<'w>(rows: &[&[f32]], k: usize, block: &mut [f32], weight_row: impl Fn(usize) -> &'w [f32]) {
    let n = rows.len();
    let m = block.len() / n;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma")
    {
        // Tiles of 4 x 4, the fringes as 4 x 1, 1 x 4 and 1 x 1: every accumulator does the
        // same work in each shape.
        let mut j = 0;
        while j < m {
            // Blocks of 8 weight rows (the fringe in 4s and 1s): input rows 4 at a time in
            // tiles of 4 x 4, the rest one at a time against the whole block (8 loads in flight
            // when the weight streams from memory).
            let r = [8, 4, 1].into_iter().find(|&r| m - j >= r).unwrap_or(1);
            let ws: [&[f32]; 8] = std::array::from_fn(|t| weight_row(j + t.min(r - 1)));
            let mut i = 0;
            while i < n {
                let c = if n - i >= 4 { 4 } else { 1 };
                let xs: [&[f32]; 4] = std::array::from_fn(|t| rows[i + t.min(c - 1)]);
                let mut sums = [[0f32; 4]; 8];
                // SAFETY: the CPU has AVX-512F and FMA (checked above); every row holds `k`
                // values (the caller's contract).
                unsafe {
                    match (r, c) {
                        (8, 4) => {
                            avx512::tile::<4, 4>(&ws, &xs, k, &mut sums, 0);
                            avx512::tile::<4, 4>(&ws, &xs, k, &mut sums, 4);
                        }
                        (8, _) => avx512::tile::<8, 1>(&ws, &xs, k, &mut sums, 0),
                        (4, 4) => avx512::tile::<4, 4>(&ws, &xs, k, &mut sums, 0),
                        (4, _) => avx512::tile::<4, 1>(&ws, &xs, k, &mut sums, 0),
                        (_, 4) => avx512::tile::<1, 4>(&ws, &xs, k, &mut sums, 0),
                        _ => avx512::tile::<1, 1>(&ws, &xs, k, &mut sums, 0),
                    }
                }
                for (jj, row) in sums.iter().enumerate().take(r) {
                    for (ii, v) in row.iter().enumerate().take(c) {
                        block[(j + jj) * n + i + ii] = *v;
                    }
                }
                i += c;
            }
            j += r;
        }
        return;
    }
    for j in 0..m {
        let w = weight_row(j);
        for (i, x) in rows.iter().enumerate() {
            block[j * n + i] = portable_dot(w, x, k);
        }
    }
}

/// `w . x` over the first `k` values: 16 lanes, their sum, then the tail (one fixed order, so
/// batch-independent like the AVX-512 path).
fn portable_dot(w: &[f32], x: &[f32], k: usize) -> f32 {
    let mut acc = [0f32; 16];
    let full = k / 16 * 16;
    for (wc, xc) in w[..full].chunks_exact(16).zip(x[..full].chunks_exact(16)) {
        for l in 0..16 {
            acc[l] += wc[l] * xc[l];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for t in full..k {
        s += w[t] * x[t];
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::{
        __m512, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_reduce_add_ps, _mm512_setzero_ps,
    };

    /// `sums[from + a][b] = ws[from + a] . xs[b]` for `a < R`, `b < C`.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and FMA; the first `R` weight rows and `C` input rows must
    /// hold `k` values each.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn tile<const R: usize, const C: usize>(
        ws: &[&[f32]; 8],
        xs: &[&[f32]; 4],
        k: usize,
        sums: &mut [[f32; 4]; 8],
        from: usize,
    ) {
        let ws = &ws[from..from + R];
        let mut acc: [[__m512; C]; R] = [[_mm512_setzero_ps(); C]; R];
        let full = k / 16 * 16;
        let mut o = 0;
        while o < full {
            let mut xv = [_mm512_setzero_ps(); C];
            for (v, x) in xv.iter_mut().zip(xs) {
                // SAFETY: `o + 16 <= k` and the row holds `k` values.
                *v = unsafe { _mm512_loadu_ps(x.as_ptr().add(o)) };
            }
            for (a, w) in acc.iter_mut().zip(ws) {
                // SAFETY: as above.
                let wv = unsafe { _mm512_loadu_ps(w.as_ptr().add(o)) };
                for (s, x) in a.iter_mut().zip(xv) {
                    *s = _mm512_fmadd_ps(wv, x, *s);
                }
            }
            o += 16;
        }
        for (jj, a) in acc.iter().enumerate() {
            for (ii, v) in a.iter().enumerate() {
                let mut s = _mm512_reduce_add_ps(*v);
                for t in full..k {
                    s = ws[jj][t].mul_add(xs[ii][t], s);
                }
                sums[from + jj][ii] = s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2000) as f32 / 1000.0
                    - 1.0
            })
            .collect()
    }

    /// Against an f64 reference, for shapes with and without tails, and every row count.
    #[test]
    fn matches_an_f64_reference() {
        for &(k, out) in &[(576, 200), (37, 5), (16, 1), (100, 131)] {
            let w = data(out * k, 1);
            for n in 1..=MAX_ROWS {
                let x = data(n * k, 7);
                let mut dst = vec![0f32; n * out];
                matmul_t(&x, n, k, &w, k, out, &mut dst);
                for i in 0..n {
                    for j in 0..out {
                        let exact: f64 = (0..k)
                            .map(|t| f64::from(x[i * k + t]) * f64::from(w[j * k + t]))
                            .sum::<f64>();
                        // f32 dot products of `k` terms of magnitude <= 1: within k * eps.
                        let bound = k as f64 * f64::from(f32::EPSILON) * 2.0;
                        assert!((f64::from(dst[i * out + j]) - exact).abs() <= bound);
                    }
                }
            }
        }
    }

    /// A row's result is the same bit for bit whatever other rows share the batch.
    #[test]
    fn rows_do_not_depend_on_the_batch() {
        let (k, out) = (576, 300);
        let w = data(out * k, 3);
        let x = data(MAX_ROWS * k, 9);
        let mut all = vec![0f32; MAX_ROWS * out];
        matmul_t(&x, MAX_ROWS, k, &w, k, out, &mut all);
        for i in 0..MAX_ROWS {
            let mut one = vec![0f32; out];
            matmul_t(&x[i * k..(i + 1) * k], 1, k, &w, k, out, &mut one);
            assert_eq!(one, all[i * out..(i + 1) * out]);
        }
    }
}
