//! exp and tanh in plain arithmetic that the compiler vectorises, for the fused CPU ops (libm's
//! are scalar calls), and the dispatch that compiles a loop for AVX-512 or AVX2 at run time.

/// `e^x` for `x <= 0` (softmax arguments), within 2 ulp: `2^n · e^r` with `|r| <= ln2/2` and a
/// degree-7 Taylor polynomial. Below -87 (where e^x leaves the normal floats) it is 0, so
/// masked scores stay exactly zero; NaN stays NaN.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 × 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let clamped = if x < -87.0 { -87.0 } else { x };
    let n = (clamped * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let poly = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // `n` is in [-126, 0], so the add cannot overflow; `wrapping_add` says so, and keeps the
    // overflow check of test and debug builds from stopping the loops around it vectorising
    // (the variant tests would then compare scalar code only).
    let value = poly * f32::from_bits(((n as i32).wrapping_add(127) << 23) as u32);
    if x < -87.0 {
        0.0
    } else {
        value
    }
}

/// `tanh(x)` within 1e-7 absolute, as `(1 - e^-2|x|) / (1 + e^-2|x|)` with the sign of `x`.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let e = exp_nonpositive(-2.0 * x.abs());
    let t = (1.0 - e) / (1.0 + e);
    if x < 0.0 {
        -t
    } else {
        t
    }
}

/// Defines `fn name(args) -> ret { body }` compiled three times, for AVX-512, for AVX2+FMA and
/// portably, running the variant [`Isa::selected`] names. The body is inlined into each variant,
/// so its loops (written with independent lanes, since the compiler may not reorder a float sum)
/// vectorise for it. Rust never fuses a multiply and an add on its own, so every variant does
/// the same IEEE operations in the same order and gives the same bits (the tests in
/// `simd_variants.rs` hold each kernel to that).
macro_rules! simd_kernel {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn portable($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                // These lists and `Isa::missing_features` must name the same features.
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    portable($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    portable($($arg),*)
                }
                match $crate::cpu::vmath::Isa::selected() {
                    // SAFETY: `selected` names only instruction sets this CPU has.
                    $crate::cpu::vmath::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::cpu::vmath::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::cpu::vmath::Isa::Portable => {}
                }
            }
            portable($($arg),*)
        }
    };
}
pub(crate) use simd_kernel;

/// The instruction sets a `simd_kernel!` function is compiled for, widest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    pub const ALL: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Portable];

    /// The variant the kernels run: the widest this CPU has, decided once per process (in unit
    /// tests, the one `Isa::run` asked for on this thread, so that each variant can be tested).
    #[inline]
    pub fn selected() -> Isa {
        #[cfg(test)]
        if let Some(isa) = variants::FORCED.with(std::cell::Cell::get) {
            return isa;
        }
        static WIDEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *WIDEST.get_or_init(|| {
            Isa::ALL
                .into_iter()
                .find(|isa| isa.missing_features().is_empty())
                .unwrap_or(Isa::Portable)
        })
    }

    /// The CPU features this variant needs and this CPU lacks: empty when it can run,
    /// `["x86_64"]` off x86_64, where only the portable variant is compiled. A variant may use
    /// every feature its `target_feature` list turns on, and rustc also turns on what those imply
    /// (`rustc --print cfg -C target-feature=+avx512f,...` lists them), so all are checked.
    pub fn missing_features(self) -> Vec<&'static str> {
        #[cfg(target_arch = "x86_64")]
        macro_rules! lacking {
            ($($feature:tt),*) => {
                [$(($feature, std::is_x86_feature_detected!($feature))),*]
                    .into_iter()
                    .filter(|&(_, present)| !present)
                    .map(|(feature, _)| feature)
                    .collect()
            };
        }
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => lacking!(
                "avx512f", "avx512bw", "avx512dq", "avx512vl", "fma", "avx2", "f16c", "avx",
                "sse4.2", "sse4.1", "ssse3", "sse3"
            ),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => lacking!("avx2", "fma", "avx", "sse4.2", "sse4.1", "ssse3", "sse3"),
            // Off x86_64 only the portable variant is compiled.
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx512 | Isa::Avx2 => vec!["x86_64"],
            Isa::Portable => Vec::new(),
        }
    }
}

/// Sum of a slice in 16 independent lanes (vectorises; a plain fold would not).
#[inline(always)]
pub fn lane_sum(xs: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = xs.chunks_exact(16);
    for chunk in &mut chunks {
        for (l, x) in lanes.iter_mut().zip(chunk) {
            *l += x;
        }
    }
    chunks.remainder().iter().sum::<f32>() + lanes.iter().sum::<f32>()
}

/// Maximum of a slice in 16 lanes; NaNs are skipped (as `f32::max` does).
#[inline(always)]
pub fn lane_max(xs: &[f32]) -> f32 {
    let greater = |a: f32, b: f32| if b > a { b } else { a };
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = xs.chunks_exact(16);
    for chunk in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(chunk) {
            *l = greater(*l, x);
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &x| greater(m, x))
}

/// `x ← e^(x - max)` over the slice; returns the sum of the new values.
#[inline(always)]
pub fn exp_shifted_in_place(xs: &mut [f32], max: f32) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = xs.chunks_exact_mut(16);
    for chunk in &mut chunks {
        for (l, x) in lanes.iter_mut().zip(chunk) {
            *x = exp_nonpositive(*x - max);
            *l += *x;
        }
    }
    let mut sum = 0f32;
    for x in chunks.into_remainder() {
        *x = exp_nonpositive(*x - max);
        sum += *x;
    }
    sum + lanes.iter().sum::<f32>()
}

/// Running and comparing the variants of `simd_kernel!` functions, for unit tests anywhere in
/// the crate (a kernel is usually private to its module, so its test lives there too).
#[cfg(test)]
pub(crate) mod variants {
    use super::Isa;
    use rand::{Rng, SeedableRng};
    use std::cell::Cell;

    thread_local! {
        /// Set only by `Isa::run`, after checking that this CPU can run the variant.
        pub(super) static FORCED: Cell<Option<Isa>> = const { Cell::new(None) };
    }

    impl Isa {
        /// Runs `f` with every `simd_kernel!` function it calls on this thread in this variant;
        /// `None` when this CPU cannot run it.
        pub(crate) fn run<R>(self, f: impl FnOnce() -> R) -> Option<R> {
            if !self.missing_features().is_empty() {
                return None;
            }
            struct Restore(Option<Isa>);
            impl Drop for Restore {
                fn drop(&mut self) {
                    FORCED.set(self.0);
                }
            }
            let _restore = Restore(FORCED.replace(Some(self)));
            Some(f())
        }
    }

    /// What a kernel produced (its return value and the slices it wrote), to compare by bits.
    pub(crate) trait Outputs {
        fn append_to(&self, values: &mut Vec<f64>);
    }

    impl Outputs for f32 {
        fn append_to(&self, values: &mut Vec<f64>) {
            values.push(*self as f64);
        }
    }

    impl Outputs for f64 {
        fn append_to(&self, values: &mut Vec<f64>) {
            values.push(*self);
        }
    }

    impl Outputs for u16 {
        fn append_to(&self, values: &mut Vec<f64>) {
            values.push(*self as f64);
        }
    }

    impl<T: Outputs> Outputs for Vec<T> {
        fn append_to(&self, values: &mut Vec<f64>) {
            self.iter().for_each(|x| x.append_to(values));
        }
    }

    impl<A: Outputs, B: Outputs> Outputs for (A, B) {
        fn append_to(&self, values: &mut Vec<f64>) {
            self.0.append_to(values);
            self.1.append_to(values);
        }
    }

    impl<A: Outputs, B: Outputs, C: Outputs> Outputs for (A, B, C) {
        fn append_to(&self, values: &mut Vec<f64>) {
            self.0.append_to(values);
            self.1.append_to(values);
            self.2.append_to(values);
        }
    }

    /// Runs `kernel` on every case in the `isa` variant and in the portable one and asserts that
    /// they give the same bits (any NaN matches any NaN: which operand's payload survives may
    /// differ). Called from the tests [`variant_tests!`] makes, which are ignored (with the
    /// reason) where the build machine lacks the variant; one that runs anyway on a CPU without
    /// it fails here, saying so.
    pub(crate) fn check_variants<T, R: Outputs>(
        kernel: &str,
        isa: Isa,
        cases: &[T],
        run: impl Fn(&T) -> R,
    ) {
        let outputs = |isa: Isa, case: &T| {
            let mut values = Vec::new();
            isa.run(|| run(case))?.append_to(&mut values);
            Some(values)
        };
        let missing = isa.missing_features();
        assert!(
            missing.is_empty(),
            "{kernel}: the {isa:?} variant cannot run on this CPU (it lacks {}), but this test \
             binary was built where it could: rebuild it on this machine",
            missing.join(", ")
        );
        for (i, case) in cases.iter().enumerate() {
            let expected = outputs(Isa::Portable, case).expect("the portable variant always runs");
            let got = outputs(isa, case).expect("checked above");
            assert_eq!(got.len(), expected.len(), "{kernel} case {i}: output sizes");
            for (at, (x, y)) in got.iter().zip(&expected).enumerate() {
                assert!(
                    x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
                    "{kernel} case {i}, output {at}: {isa:?} gives {x:e}, Portable {y:e}"
                );
            }
        }
        eprintln!(
            "{kernel} ({} cases): {isa:?} equals Portable bit for bit",
            cases.len()
        );
    }

    /// `variant_tests! { fn name(isa) { ... } }` makes the tests `name::avx512` and `name::avx2`,
    /// each running the body with that [`Isa`], and each ignored, with the reason, where the
    /// machine that built the tests lacks the variant (see `build.rs`): the test summary then
    /// shows what did not run instead of counting it as passed.
    macro_rules! variant_tests {
        ($(#[$meta:meta])* fn $name:ident($isa:ident) $body:block) => {
            $(#[$meta])*
            mod $name {
                #[allow(unused_imports)]
                use super::*;
                use $crate::cpu::vmath::Isa;

                fn body($isa: Isa) $body

                #[test]
                #[cfg_attr(
                    not(kiln_cpu_avx512),
                    ignore = "this CPU lacks AVX-512 (avx512f/bw/dq/vl): the AVX-512 variant cannot run here"
                )]
                fn avx512() {
                    body(Isa::Avx512)
                }

                #[test]
                #[cfg_attr(
                    not(kiln_cpu_avx2),
                    ignore = "this CPU lacks AVX2 and FMA: the AVX2 variant cannot run here"
                )]
                fn avx2() {
                    body(Isa::Avx2)
                }
            }
        };
    }
    pub(crate) use variant_tests;

    /// Lengths around the kernels' 16-lane blocks: empty, short, ragged and long.
    pub(crate) const LENGTHS: [usize; 13] = [0, 1, 2, 7, 15, 16, 17, 31, 32, 33, 64, 100, 1029];

    /// Zeros of both signs, infinities, NaN, subnormals, the extreme floats, exp's cut-off at
    /// -87 and bf16 rounding ties (1 + 2⁻⁸ rounds down to even, 1 + 3·2⁻⁸ up).
    pub(crate) const EDGES: [f32; 16] = [
        0.0,
        -0.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MIN_POSITIVE,
        1e-40,
        -1e-40,
        f32::MAX,
        f32::MIN,
        -87.0,
        -87.5,
        88.7,
        1.0 + 1.0 / 256.0,
        -(1.0 + 3.0 / 256.0),
        1e-8,
    ];

    /// `len` values uniform in ±`scale`.
    pub(crate) fn random(len: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.gen_range(-scale..scale)).collect()
    }

    /// `values` with every fifth one (from `offset`) replaced by the next of [`EDGES`].
    pub(crate) fn with_edges(mut values: Vec<f32>, offset: usize) -> Vec<f32> {
        let slots = values.iter_mut().skip(offset).step_by(5);
        for (slot, edge) in slots.zip(EDGES.iter().cycle()) {
            *slot = *edge;
        }
        values
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_and_keeps_nan() {
        let mut worst = 0f64;
        for i in 0..=87_000 {
            let x = -(i as f32) / 1000.0;
            let exact = (x as f64).exp();
            worst = worst.max(((exp_nonpositive(x) as f64) - exact).abs() / exact);
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert!(exp_nonpositive(f32::NAN).is_nan());
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(f32::MIN), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn a_variant_runs_only_where_the_cpu_has_it() {
        for isa in Isa::ALL {
            let runs = isa.missing_features().is_empty();
            assert_eq!(isa.run(Isa::selected), runs.then_some(isa), "{isa:?}");
        }
        assert_eq!(Isa::Portable.missing_features(), Vec::<&str>::new());
        // The choice is the widest variant this CPU has, and forcing one does not outlive `run`.
        let widest = Isa::ALL
            .into_iter()
            .find(|isa| isa.missing_features().is_empty());
        assert_eq!(Some(Isa::selected()), widest);
        eprintln!(
            "the kernels run the {:?} variant on this CPU",
            Isa::selected()
        );
    }

    #[test]
    fn tanh_is_accurate_everywhere() {
        let mut worst = 0f64;
        for i in -20_000..=20_000 {
            let x = i as f32 / 1000.0;
            worst = worst.max((tanh(x) as f64 - (x as f64).tanh()).abs());
        }
        assert!(worst < 2e-7, "absolute error {worst}");
        assert_eq!(tanh(f32::INFINITY), 1.0);
        assert_eq!(tanh(f32::NEG_INFINITY), -1.0);
        assert!(tanh(f32::NAN).is_nan());
    }
}
