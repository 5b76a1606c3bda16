//! bf16 matrix products on Intel AMX tiles (Sapphire Rapids and later).
//!
//! Rust's AMX intrinsics are unstable, so the tile instructions are inline assembly. One
//! `tdpbf16ps` multiplies a 16×32 bf16 tile by a 32×16 one into 16×16 fp32 accumulators;
//! a "block" here is 32×32 of the output (four accumulator tiles, two A and two B tiles).
//! Operands are packed once per product: A row-major bf16, B in the pair-interleaved
//! ("VNNI") layout the instruction reads, both zero-padded to whole tiles, so the kernel never
//! sees a ragged edge; only the fp32 output's edge tiles go through a small buffer.
//!
//! Packing is plain code (`simd_kernel!`s) that runs on any CPU; everything that executes a
//! tile instruction is in `tiles`, which exists on x86_64 only and is entered only after
//! [`available`] has said yes.

use super::matrix::{round_to_bf16_bits, MatRef};
use super::vmath::simd_kernel;
use rayon::prelude::*;
use std::sync::OnceLock;

const TILE: usize = 16;
/// bf16 values along k in one A tile row (64 bytes).
const TILE_K: usize = 32;
const BLOCK: usize = 32;

/// Whether this CPU has AMX-BF16 and the OS lets this process use the tile registers (always
/// false off x86_64 Linux). `KILN_NO_AMX=1` turns it off (for comparisons).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| std::env::var_os("KILN_NO_AMX").is_none() && detect())
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use core::arch::x86_64::{__cpuid_count, __get_cpuid_max};
    // CPUID leaf 7, EDX: bit 22 AMX-BF16, bit 24 AMX-TILE (a CPU without leaf 7 would answer
    // with another leaf's bits).
    if __get_cpuid_max(0).0 < 7 {
        return false;
    }
    let leaf7 = __cpuid_count(7, 0);
    if leaf7.edx & (1 << 22) == 0 || leaf7.edx & (1 << 24) == 0 {
        return false;
    }
    // Linux grants the 8 KB tile state only on request (ARCH_REQ_XCOMP_PERM, XTILEDATA), and
    // refuses where the CPU or the kernel lacks it.
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes this process's permissions.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// The right-hand operand, packed: for each 16-column group, k-pairs of 16 columns × 2.
// Off x86_64 nothing reads the packed values: only `tiles` does.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub struct PackedB {
    data: Vec<u16>,
    rows: usize,
    cols: usize,
    /// Padded k (a multiple of 32) and padded columns (a multiple of 32).
    k: usize,
    n: usize,
}

impl PackedB {
    /// Packs `b` for [`matmul_packed`]; runs on any CPU.
    pub fn new(b: MatRef) -> Self {
        let (k, n) = (round_up(b.rows, TILE_K), round_up(b.cols, BLOCK));
        let mut data = vec![0u16; k * n];
        data.par_chunks_mut(k * TILE)
            .enumerate()
            .for_each(|(group, out)| {
                let col0 = group * TILE;
                let width = TILE.min(b.cols.saturating_sub(col0));
                if b.col_stride == 1 && width == TILE {
                    pack_row_pairs(b, col0, out);
                    return;
                }
                for p in 0..b.rows {
                    let row = &mut out[(p / 2) * 2 * TILE..][..2 * TILE];
                    for c in 0..width {
                        row[c * 2 + p % 2] = round_to_bf16_bits(b.at(p, col0 + c));
                    }
                }
            });
        Self {
            data,
            rows: b.rows,
            cols: b.cols,
            k,
            n,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// The left operand, packed row-major bf16 with k padded to 32 and rows to 32.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct PackedA {
    data: Vec<u16>,
    rows: usize,
    k: usize,
}

impl PackedA {
    fn new(a: MatRef) -> Self {
        let (m, k) = (round_up(a.rows, BLOCK), round_up(a.cols, TILE_K));
        let mut data = vec![0u16; m * k];
        data.par_chunks_mut(k * TILE)
            .enumerate()
            .for_each(|(group, out)| {
                let row0 = group * TILE;
                let height = TILE.min(a.rows.saturating_sub(row0));
                if a.col_stride == 1 {
                    for r in 0..height {
                        let src = &a.data[(row0 + r) * a.row_stride..][..a.cols];
                        round_slice_to_bits(src, &mut out[r * k..][..a.cols]);
                    }
                } else {
                    // Column-strided (a transposed view): walk k outside so that the 16 reads of
                    // one step are neighbours in memory.
                    for p in 0..a.cols {
                        for r in 0..height {
                            out[r * k + p] = round_to_bf16_bits(a.at(row0 + r, p));
                        }
                    }
                }
            });
        Self {
            data,
            rows: a.rows,
            k,
        }
    }
}

simd_kernel! {
    /// Rounds `src` into `dst` as bf16 bits, 16 lanes at a time.
    pub(super) fn round_slice_to_bits(src: &[f32], dst: &mut [u16]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = round_to_bf16_bits(x);
        }
    }
}

simd_kernel! {
    /// One 16-column group of a row-major B: rows `2q` and `2q + 1` interleaved into pair-row
    /// `q`.
    pub(super) fn pack_row_pairs(b: MatRef, col0: usize, out: &mut [u16]) {
        let row = |p: usize| -> [f32; TILE] {
            if p < b.rows {
                b.data[p * b.row_stride + col0..][..TILE]
                    .try_into()
                    .expect("16 values")
            } else {
                [0.0; TILE]
            }
        };
        for (q, pair) in out.chunks_exact_mut(2 * TILE).enumerate() {
            if 2 * q >= b.rows {
                break;
            }
            let (even, odd) = (row(2 * q), row(2 * q + 1));
            for c in 0..TILE {
                pair[2 * c] = round_to_bf16_bits(even[c]);
                pair[2 * c + 1] = round_to_bf16_bits(odd[c]);
            }
        }
    }
}

/// `c (+)= round(a) · b`, `c` row-major `a.rows × b.cols()`. Panics unless [`available`].
pub fn matmul_packed(a: MatRef, b: &PackedB, c: &mut [f32], accumulate: bool) {
    assert!(available(), "AMX products on a machine without AMX");
    assert_eq!(a.cols, b.rows, "inner dimensions differ");
    let packed_a = PackedA::new(a);
    if accumulate {
        // The product from zero, then added to `c`, as the SGEMM path does: loading `c` into the
        // accumulators would round `c + Σ` in another order, so a layer whose bias is the
        // starting `c` (the fp32 linear) would differ in the last bit from one that adds it
        // after the product (the frozen bf16 linear).
        let mut product = vec![0f32; c.len()];
        // SAFETY: `available()` has found AMX-BF16 and AMX-TILE and obtained the OS permission.
        unsafe { tiles::matmul(&packed_a, b, &mut product) };
        c.par_iter_mut().zip(&product).for_each(|(c, p)| *c += p);
        return;
    }
    // SAFETY: `available()` has found AMX-BF16 and AMX-TILE and obtained the OS permission.
    unsafe { tiles::matmul(&packed_a, b, c) }
}

#[cfg(not(target_arch = "x86_64"))]
mod tiles {
    /// Never called: `available()` is false off x86_64.
    pub(super) unsafe fn matmul(_: &super::PackedA, _: &super::PackedB, _: &mut [f32]) {
        unreachable!("AMX exists only on x86_64")
    }
}

/// The tile instructions.
#[cfg(target_arch = "x86_64")]
mod tiles {
    use super::{round_up, PackedA, PackedB, BLOCK, TILE, TILE_K};
    use rayon::prelude::*;

    /// Inner-dimension panel for long products, so a panel of A and of B stay in L2.
    const PANEL_K: usize = 512;

    /// `c = a · b` from packed operands.
    ///
    /// # Safety
    /// [`super::available`] must have returned true: the tile instructions need AMX-BF16 and
    /// AMX-TILE, and the OS's permission for the tile state.
    pub(super) unsafe fn matmul(packed_a: &PackedA, b: &PackedB, c: &mut [f32]) {
        let (m, n) = (packed_a.rows, b.cols);
        assert_eq!(c.len(), m * n, "output size");
        assert_eq!(packed_a.k, b.k, "inner dimensions differ");
        let (m_blocks, n_blocks) = (round_up(m, BLOCK) / BLOCK, b.n / BLOCK);
        let blocks = m_blocks * n_blocks;
        let panel = if b.k <= 2 * PANEL_K { b.k } else { PANEL_K };
        let output = OutPtr(c.as_mut_ptr());
        let tasks = (rayon::current_num_threads() * 4).min(blocks).max(1);
        for k0 in (0..b.k).step_by(panel) {
            let steps = panel.min(b.k - k0) / TILE_K;
            // Later panels add to what the earlier ones left in `c`.
            let load = k0 > 0;
            (0..tasks).into_par_iter().for_each(|task| {
                let output = &output;
                // SAFETY: the caller has checked `available()`.
                let _tiles = unsafe { Tiles::configure() };
                let mut edge = [[0f32; TILE * TILE]; 4];
                for block in (task * blocks / tasks)..((task + 1) * blocks / tasks) {
                    // The larger operand outside: its block is read once and meets every block
                    // of the smaller one, which stays in cache.
                    let (nb, mb) = if m_blocks > n_blocks {
                        (block % n_blocks, block / n_blocks)
                    } else {
                        (block / m_blocks, block % m_blocks)
                    };
                    let (row0, col0) = (mb * BLOCK, nb * BLOCK);
                    let a_ptr = packed_a.data[row0 * packed_a.k + k0..].as_ptr();
                    let b_ptr = b.data[nb * 2 * TILE * b.k + k0 * TILE..].as_ptr();
                    // SAFETY: this thread's tiles are configured (`_tiles`); both packed operands
                    // are padded to whole blocks, so the `steps` tiles read from `k0` on are
                    // inside them; the block's output rows and columns are disjoint from every
                    // other block's, and `c` holds `m × n` (asserted above).
                    unsafe {
                        block_product(
                            a_ptr,
                            packed_a.k,
                            b_ptr,
                            b.k,
                            steps,
                            output.0,
                            (m, n),
                            (row0, col0),
                            load,
                            &mut edge,
                        )
                    }
                }
            });
        }
    }

    struct OutPtr(*mut f32);
    // SAFETY: tasks write disjoint blocks of the output.
    unsafe impl Sync for OutPtr {}

    /// The tile configuration for one thread: tiles 0-3 accumulate fp32 16×16, 4-5 hold A
    /// (16 rows × 32 bf16), 6-7 hold B (16 k-pairs × 16 columns × 2); every row is 64 bytes.
    /// Released on drop so an idle thread does not carry 8 KB of tile state through context
    /// switches.
    struct Tiles;

    impl Tiles {
        /// # Safety
        /// [`super::available`] must have returned true.
        unsafe fn configure() -> Self {
            let mut config = [0u8; 64];
            config[0] = 1; // palette 1
            for tile in 0..8 {
                config[16 + 2 * tile] = 64; // bytes per row (u16, little-endian)
                config[48 + tile] = TILE as u8; // rows
            }
            // SAFETY: the caller has checked the CPU and the OS permission (`available()`); the
            // configuration is a valid palette-1 layout.
            unsafe {
                std::arch::asm!("ldtilecfg [{0}]", in(reg) config.as_ptr(), options(nostack));
            }
            Tiles
        }
    }

    impl Drop for Tiles {
        fn drop(&mut self) {
            // SAFETY: a `Tiles` exists only once `configure` has run, so the CPU has AMX.
            unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) }
        }
    }

    /// One 32×32 output block over `steps × 32` of k: loads (or zeroes) the four accumulators,
    /// runs the tile products, stores them back.
    ///
    /// # Safety
    /// This thread's tiles are configured (a live [`Tiles`]). `a` is readable for 32 rows of
    /// `steps × 32` values, `a_stride` apart; `b` for `steps × 32 × 16` values and as many again
    /// `b_k × 16` later; `c` is an `m × n` output whose block at (`row0`, `col0`) no other thread
    /// touches meanwhile.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block_product(
        a: *const u16,
        a_stride: usize,
        b: *const u16,
        b_k: usize,
        steps: usize,
        c: *mut f32,
        (m, n): (usize, usize),
        (row0, col0): (usize, usize),
        load: bool,
        edge: &mut [[f32; TILE * TILE]; 4],
    ) {
        // Where each accumulator tile lives: in `c` when whole, else in an edge buffer.
        let mut places = [(std::ptr::null_mut::<f32>(), 0usize); 4];
        for (t, place) in places.iter_mut().enumerate() {
            let (r, col) = (row0 + (t / 2) * TILE, col0 + (t % 2) * TILE);
            if r + TILE <= m && col + TILE <= n {
                *place = (c.add(r * n + col), n * 4);
            } else {
                let buffer = &mut edge[t];
                buffer.fill(0.0);
                if load {
                    for i in 0..TILE.min(m.saturating_sub(r)) {
                        for j in 0..TILE.min(n.saturating_sub(col)) {
                            buffer[i * TILE + j] = *c.add((r + i) * n + col + j);
                        }
                    }
                }
                *place = (buffer.as_mut_ptr(), TILE * 4);
            }
        }
        let [(c00, s00), (c01, s01), (c10, s10), (c11, s11)] = places;
        if load {
            std::arch::asm!(
                "tileloadd tmm0, [{c00} + {s00}*1]",
                "tileloadd tmm1, [{c01} + {s01}*1]",
                "tileloadd tmm2, [{c10} + {s10}*1]",
                "tileloadd tmm3, [{c11} + {s11}*1]",
                c00 = in(reg) c00, s00 = in(reg) s00,
                c01 = in(reg) c01, s01 = in(reg) s01,
                c10 = in(reg) c10, s10 = in(reg) s10,
                c11 = in(reg) c11, s11 = in(reg) s11,
                options(nostack, readonly),
            );
        } else {
            std::arch::asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        }
        if steps > 0 {
            // A: rows `a_stride` bf16 apart, the second tile 16 rows down. B: 64-byte rows; the
            // next 16-column group starts `b_k × 16` values later.
            let a_bytes = a_stride * 2;
            std::arch::asm!(
                "2:",
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a0}, 64",
                "add {a1}, 64",
                "add {b0}, 1024",
                "add {b1}, 1024",
                "dec {steps}",
                "jnz 2b",
                a0 = inout(reg) a => _,
                a1 = inout(reg) a.add(TILE * a_stride) => _,
                b0 = inout(reg) b => _,
                b1 = inout(reg) b.add(b_k * TILE) => _,
                sa = in(reg) a_bytes,
                sb = in(reg) 64usize,
                steps = inout(reg) steps => _,
                options(nostack, readonly),
            );
        }
        std::arch::asm!(
            "tilestored [{c00} + {s00}*1], tmm0",
            "tilestored [{c01} + {s01}*1], tmm1",
            "tilestored [{c10} + {s10}*1], tmm2",
            "tilestored [{c11} + {s11}*1], tmm3",
            c00 = in(reg) c00, s00 = in(reg) s00,
            c01 = in(reg) c01, s01 = in(reg) s01,
            c10 = in(reg) c10, s10 = in(reg) s10,
            c11 = in(reg) c11, s11 = in(reg) s11,
            options(nostack),
        );
        for (t, buffer) in edge.iter().enumerate() {
            let (r, col) = (row0 + (t / 2) * TILE, col0 + (t % 2) * TILE);
            if !(r + TILE <= m && col + TILE <= n) {
                for i in 0..TILE.min(m.saturating_sub(r)) {
                    for j in 0..TILE.min(n.saturating_sub(col)) {
                        *c.add((r + i) * n + col + j) = buffer[i * TILE + j];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::gemm::tests::{random, reference};
    use super::super::gemm::Operands;
    use super::*;

    #[test]
    #[cfg_attr(
        not(kiln_cpu_amx),
        ignore = "this CPU (or its OS) offers no AMX-BF16: the tile products cannot run here"
    )]
    fn tile_products_equal_the_textbook_bf16_product() {
        assert!(
            available(),
            "AMX-BF16 is not usable here (KILN_NO_AMX is {}), but this test binary was built \
             where it was: rebuild on this machine, or unset KILN_NO_AMX",
            if std::env::var_os("KILN_NO_AMX").is_some() {
                "set"
            } else {
                "not set"
            }
        );
        // Ragged edges in every dimension, a long k that takes several panels, transposed views.
        for &(m, k, n) in &[(1, 1, 1), (17, 33, 15), (40, 70, 100), (64, 1500, 48)] {
            let a_data = random(m * k, 3);
            let b_data = random(k * n, 4);
            let a_t: Vec<f32> = (0..k * m).map(|x| a_data[(x % m) * k + x / m]).collect();
            let b_t: Vec<f32> = (0..n * k).map(|x| b_data[(x % k) * n + x / k]).collect();
            for (a, b) in [
                (
                    MatRef::row_major(&a_data, m, k),
                    MatRef::row_major(&b_data, k, n),
                ),
                (
                    MatRef::row_major(&a_t, k, m).t(),
                    MatRef::row_major(&b_t, n, k).t(),
                ),
            ] {
                let expected = reference(Operands::Bf16, a, b);
                let mut c = vec![f32::NAN; m * n];
                let packed = PackedB::new(b);
                matmul_packed(a, &packed, &mut c, false);
                // Accumulating adds the product to what is there, after computing it: the same
                // bits as adding it afterwards (a bias first or last gives one answer).
                let start = random(m * n, 5);
                let mut accumulated = start.clone();
                matmul_packed(a, &packed, &mut accumulated, true);
                for (((x, y), z), s) in c.iter().zip(&expected).zip(&accumulated).zip(&start) {
                    // Exact bf16 products, fp32 sums in another order.
                    assert!((x - y).abs() <= 1e-6 * k as f32, "{m}x{k}x{n}: {x} vs {y}");
                    assert_eq!(
                        z.to_bits(),
                        (s + x).to_bits(),
                        "accumulate: {z} vs {s} + {x}"
                    );
                }
            }
        }
    }
}
