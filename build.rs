//! Tells the unit tests which SIMD variants this machine can run, so that a test whose subject
//! the CPU lacks is reported as *ignored, with the reason* instead of passing without running.
//!
//! libtest decides `#[ignore]` at compile time, so the probe runs here, on the machine that
//! builds (and, for `cargo test`, runs) the tests; nothing here changes what the library does at
//! run time, where the kernels detect the CPU themselves. A test binary carried to another CPU is
//! still honest: a variant test that was not ignored but cannot run there fails and says so.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    // Builds the tests as on a CPU with none of these, to see what such a machine reports.
    println!("cargo::rerun-if-env-changed=KILN_TESTS_ASSUME_NO_SIMD");
    for cfg in ["kiln_cpu_avx512", "kiln_cpu_avx2", "kiln_cpu_amx"] {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
    }
    // A cross build cannot probe the CPU it targets: every hardware test is then ignored.
    let native = std::env::var("TARGET").ok() == std::env::var("HOST").ok();
    if native && std::env::var_os("KILN_TESTS_ASSUME_NO_SIMD").is_none() {
        for cfg in host::features() {
            println!("cargo::rustc-cfg={cfg}");
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod host {
    use std::arch::is_x86_feature_detected as has;

    /// The same feature lists as `Isa::missing_features` in `src/cpu/vmath.rs` (every feature a
    /// variant's `target_feature` list turns on or implies), and AMX as `cpu::amx::detect` sees
    /// it: the CPU's flags as Linux reports them, which it does only where it supports the tile
    /// state.
    pub fn features() -> Vec<&'static str> {
        let avx2 = has!("avx2")
            && has!("fma")
            && has!("avx")
            && has!("sse4.2")
            && has!("sse4.1")
            && has!("ssse3")
            && has!("sse3");
        let avx512 = avx2
            && has!("avx512f")
            && has!("avx512bw")
            && has!("avx512dq")
            && has!("avx512vl")
            && has!("f16c");
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let flags: Vec<&str> = cpuinfo
            .lines()
            .find(|line| line.starts_with("flags"))
            .map(|line| line.split_whitespace().collect())
            .unwrap_or_default();
        let amx =
            cfg!(target_os = "linux") && flags.contains(&"amx_tile") && flags.contains(&"amx_bf16");
        [
            (avx512, "kiln_cpu_avx512"),
            (avx2, "kiln_cpu_avx2"),
            (amx, "kiln_cpu_amx"),
        ]
        .into_iter()
        .filter_map(|(present, cfg)| present.then_some(cfg))
        .collect()
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod host {
    pub fn features() -> Vec<&'static str> {
        Vec::new()
    }
}
