//! Quantised frozen weights: NF4 as bitsandbytes stores and dequantises it, checked live
//! (`scripts/check_nf4.py`). Plain NF4 is bit-exact (codes, absmax, fp32 and bf16 values);
//! with double quantisation the 8-bit code table and the absmax codes are exact, and the offset
//! (the absmax values' mean, which torch sums in its own order) is exact or one unit in the last
//! place off.

mod common;

use std::collections::HashMap;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::{python_with, repo_root};
use kiln::ops::quant::{dynamic_map, Nf4, Nf4Scales, NF4_BLOCK};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

fn vec_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn nf4_equals_bitsandbytes_bit_for_bit_and_double_quantisation_to_the_last_bit_of_its_offset() {
    let Some(python) = python_with("bitsandbytes") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A partial last block (600 values), and enough blocks for two double-quantisation blocks.
    for (case, shape) in [("odd", [6usize, 100]), ("wide", [128, 256])] {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let normal = Normal::new(0.0f32, 0.02).unwrap();
        let mut w: Vec<f32> = (0..shape[0] * shape[1])
            .map(|_| normal.sample(&mut rng))
            .collect();
        w[3] = 0.31; // an outlier, as real weights have
        w[70] = 0.0;
        let input = dir.path().join(format!("{case}.safetensors"));
        let output = dir.path().join(format!("{case}-bnb.safetensors"));
        let tensor = Tensor::from_vec(w.clone(), (shape[0], shape[1]), &Device::Cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("w".to_string(), tensor)]), &input)
            .unwrap();
        let status = Command::new(&python)
            .args([
                repo_root().join("scripts/check_nf4.py").to_str().unwrap(),
                input.to_str().unwrap(),
                output.to_str().unwrap(),
            ])
            .status()
            .unwrap();
        assert!(status.success());
        let bnb = candle_core::safetensors::load(&output, &Device::Cpu).unwrap();
        let bnb_u8 =
            |name: &str| -> Vec<u8> { bnb[name].flatten_all().unwrap().to_vec1().unwrap() };
        let code2 = vec_f32(&bnb["double.code2"]);
        assert_eq!(bits(&dynamic_map()), bits(&code2), "the dynamic 8-bit code");
        for double in [false, true] {
            let name = if double { "double" } else { "plain" };
            let ours = Nf4::quantize(&w, &shape, NF4_BLOCK, double);
            let mut exact_offset = true;
            assert_eq!(
                ours.packed,
                bnb_u8(&format!("{name}.packed")),
                "{case} {name}: packed codes"
            );
            match &ours.scales {
                Nf4Scales::Fp32(absmax) => {
                    assert_eq!(
                        bits(absmax),
                        bits(&vec_f32(&bnb["plain.absmax"])),
                        "{case}: absmax"
                    );
                }
                Nf4Scales::Double {
                    quantized,
                    absmax,
                    offset,
                } => {
                    // The offset is the absmax values' mean, which torch sums in its own order:
                    // equal to the last bit or one unit in the last place off.
                    let theirs = vec_f32(&bnb["double.offset"])[0];
                    assert!(
                        offset.to_bits().abs_diff(theirs.to_bits()) <= 1,
                        "{case}: offset {offset} vs {theirs}"
                    );
                    exact_offset = offset.to_bits() == theirs.to_bits();
                    assert_eq!(
                        *quantized,
                        bnb_u8("double.absmax_codes"),
                        "{case}: 8-bit absmax codes"
                    );
                    let theirs = vec_f32(&bnb["double.absmax2"]);
                    for (a, b) in absmax.iter().zip(&theirs) {
                        assert!(
                            (a - b).abs() <= 2.0 * f32::EPSILON * b.abs(),
                            "{case}: absmax of the absmax {a} vs {b}"
                        );
                    }
                }
            }
            let dequantized = ours.dequantize();
            let theirs = vec_f32(&bnb[&format!("{name}.dequantized")]);
            match exact_offset {
                true => assert_eq!(
                    bits(&dequantized),
                    bits(&theirs),
                    "{case} {name}: dequantize_4bit in fp32"
                ),
                false => {
                    let worst = (dequantized.iter().zip(&theirs))
                        .map(|(a, b)| (a - b).abs() / b.abs().max(1e-30))
                        .fold(0f32, f32::max);
                    assert!(
                        worst <= 1e-6,
                        "{case} {name}: dequantize_4bit differs by {worst:e} relative"
                    );
                    eprintln!("{case} {name}: offset one ulp off torch's mean; values within {worst:.1e} relative");
                }
            }
            // From bf16 weights to bf16 values, as a bf16 base is quantised.
            let w_bf16 = vec_f32(
                &Tensor::from_vec(w.clone(), w.len(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap(),
            );
            let from_bf16 = Nf4::quantize(&w_bf16, &shape, NF4_BLOCK, double).dequantize();
            let as_bf16 = vec_f32(
                &Tensor::from_vec(from_bf16, w.len(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap(),
            );
            let theirs_bf16 = vec_f32(&bnb[&format!("{name}.bf16")]);
            let differing = (as_bf16.iter().zip(&theirs_bf16))
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            match double {
                false => assert_eq!(differing, 0, "{case} {name}: dequantize_4bit in bf16"),
                // One ulp of the offset can round a value to the neighbouring bf16.
                true => assert!(
                    differing * 1000 <= w.len(),
                    "{case} {name}: {differing} bf16 values differ"
                ),
            }
            let error = w
                .iter()
                .zip(&dequantized)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            eprintln!(
                "{case} {name}: {} bytes for {} values; largest error {error:.2e}",
                ours.bytes(),
                w.len()
            );
        }
    }
}
