//! Every variant of the model's `simd_kernel!` functions against the portable one, on random
//! inputs of ragged lengths and on edge values, and a check that every such function in the
//! crate has a test of this kind (the kernels in `train` are private there, so theirs live in
//! their own modules).

use super::amx::{pack_row_pairs, round_slice_to_bits};
use super::fused::{
    gelu_backward, gelu_forward, layer_norm_backward_rows, layer_norm_rows, masked_softmax_rows,
    softmax_backward_rows,
};
use super::gemm::{round_slice, MatRef};
use super::vmath::variants::{check_variants, random, variant_tests, with_edges, LENGTHS};

/// For the element-wise kernels: each length in plain values of magnitude up to `scale`, and
/// with edge values.
fn element_cases(scale: f32) -> Vec<Vec<f32>> {
    let plain = LENGTHS.iter().map(|&len| random(len, len as u64, scale));
    let edged = LENGTHS
        .iter()
        .map(|&len| with_edges(random(len, 1000 + len as u64, scale), len % 5));
    plain.chain(edged).collect()
}

/// Row widths for the row kernels: single values, ragged 16-lane blocks and a long row.
const WIDTHS: [usize; 8] = [1, 2, 15, 16, 17, 33, 100, 1029];
const ROWS: usize = 3;

variant_tests! {
    fn gelu_variants_agree(isa) {
        let cases = element_cases(6.0);
        check_variants("gelu_forward", isa, &cases, |xs| {
            let mut out = vec![0f32; xs.len()];
            gelu_forward(xs, &mut out);
            out
        });
        check_variants("gelu_backward", isa, &cases, |xs| {
            let grads = random(xs.len(), 7, 2.0);
            let mut dx = vec![0f32; xs.len()];
            gelu_backward(xs, &grads, &mut dx);
            dx
        });
    }
}

variant_tests! {
    fn bf16_rounding_variants_agree(isa) {
        let cases = element_cases(3.0);
        check_variants("round_slice", isa, &cases, |xs| {
            let mut out = vec![0f32; xs.len()];
            round_slice(xs, &mut out);
            out
        });
        check_variants("round_slice_to_bits", isa, &cases, |xs| {
            let mut out = vec![0u16; xs.len()];
            round_slice_to_bits(xs, &mut out);
            out
        });
        // Odd and even row counts, one or two 32-row blocks, groups at column 0 and further in.
        let mut matrices = Vec::new();
        for rows in [1, 2, 31, 33, 70] {
            let cols = 40;
            let values = with_edges(random(rows * cols, rows as u64, 3.0), rows % 5);
            for col0 in [0, 8, 24] {
                matrices.push((values.clone(), rows, cols, col0));
            }
        }
        check_variants("pack_row_pairs", isa, &matrices, |(values, rows, cols, col0)| {
            let mut out = vec![0u16; rows.div_ceil(32) * 32 * 16];
            pack_row_pairs(MatRef::row_major(values, *rows, *cols), *col0, &mut out);
            out
        });
    }
}

variant_tests! {
    fn softmax_variants_agree(isa) {
        let mut cases = Vec::new();
        for (i, &width) in WIDTHS.iter().enumerate() {
            let scores = random(ROWS * width, i as u64, 8.0);
            // Causal masking as attention builds it (f32::MIN, not -inf), plus a few more.
            let mask: Vec<f32> = (0..ROWS * width)
                .map(|x| {
                    let (row, col) = (x / width, x % width);
                    if col > row || col % 7 == 6 {
                        f32::MIN
                    } else {
                        0.0
                    }
                })
                .collect();
            cases.push((scores.clone(), Some(mask), 1.0));
            cases.push((scores.clone(), None, 1.0));
            cases.push((scores, None, (width as f32).sqrt()));
            // Infinite and NaN scores reach whole rows (a NaN row stays NaN).
            cases.push((
                with_edges(random(ROWS * width, 50 + i as u64, 8.0), i),
                None,
                2.0,
            ));
        }
        check_variants("masked_softmax_rows", isa, &cases, |(scores, mask, scale)| {
            let mut scores = scores.clone();
            let width = scores.len() / ROWS;
            masked_softmax_rows(&mut scores, mask.as_deref(), *scale, width);
            scores
        });
        check_variants("softmax_backward_rows", isa, &cases, |(grads, _, scale)| {
            let width = grads.len() / ROWS;
            let mut probs = random(grads.len(), width as u64, 1.0);
            masked_softmax_rows(&mut probs, None, 1.0, width);
            let mut dp = grads.clone();
            softmax_backward_rows(&mut dp, &probs, *scale, width);
            dp
        });
    }
}

variant_tests! {
    fn layer_norm_variants_agree(isa) {
        let mut cases = Vec::new();
        for (i, &width) in WIDTHS.iter().enumerate() {
            let x = random(ROWS * width, i as u64, 3.0);
            // Offset rows: the variance of values far from zero loses precision first.
            let offset: Vec<f32> = x.iter().map(|v| v + 1000.0).collect();
            let edged = with_edges(x.clone(), i);
            for xs in [x, offset, edged] {
                cases.push(xs);
            }
        }
        let eps = 1e-5;
        check_variants("layer_norm_rows", isa, &cases, |xs| {
            let d = xs.len() / ROWS;
            let (w, b) = (random(d, 1, 2.0), random(d, 2, 1.0));
            let mut out = vec![0f32; xs.len()];
            layer_norm_rows(xs, &w, &b, &mut out, eps);
            out
        });
        check_variants("layer_norm_backward_rows", isa, &cases, |xs| {
            let d = xs.len() / ROWS;
            let (w, dys) = (random(d, 3, 2.0), random(xs.len(), 4, 1.0));
            // The parameter gradients are added to what is there.
            let (mut dw, mut db) = (random(d, 5, 1.0), random(d, 6, 1.0));
            let mut dx = vec![0f32; xs.len()];
            layer_norm_backward_rows(xs, &dys, &w, eps, &mut dx, &mut dw, &mut db);
            (dx, dw, db)
        });
    }
}

/// Every `simd_kernel!` function in `src/` is named in a `check_variants` call somewhere in
/// `src/`, so a new kernel cannot go untested in its AVX2 and AVX-512 forms.
#[test]
fn every_simd_kernel_has_a_variant_test() {
    fn sources(dir: &std::path::Path, found: &mut Vec<(std::path::PathBuf, String)>) {
        for entry in std::fs::read_dir(dir).expect("src/ is readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                sources(&path, found);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("a readable source file");
                found.push((path, text));
            }
        }
    }
    let mut files = Vec::new();
    sources(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let kernel = regex::Regex::new(r"(?s)simd_kernel!\s*\{.*?\bfn\s+(\w+)\s*\(").unwrap();
    let checked = regex::Regex::new(r#"check_variants\(\s*"(\w+)""#).unwrap();
    let names = |re: &regex::Regex, text: &str| -> Vec<String> {
        re.captures_iter(text).map(|c| c[1].to_string()).collect()
    };
    let tested: Vec<String> = files.iter().flat_map(|(_, t)| names(&checked, t)).collect();
    let mut kernels = Vec::new();
    let mut untested = Vec::new();
    for (path, text) in &files {
        for name in names(&kernel, text) {
            if !tested.contains(&name) {
                untested.push(format!("{name} ({})", path.display()));
            }
            kernels.push(name);
        }
    }
    // The model's own kernels at least: a scan that finds fewer has gone wrong.
    assert!(kernels.len() >= 9, "found only the kernels {kernels:?}");
    assert!(
        untested.is_empty(),
        "simd_kernel! functions without a check_variants test: {}",
        untested.join(", ")
    );
}
