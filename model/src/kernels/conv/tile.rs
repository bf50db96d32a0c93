//! The convolution's one micro-kernel: a tile `C [MR, NR] (+)= Σₖ a(k) ⊗ b(k)` of `MR` rows by `NR` columns
//! held in registers over the whole sum, `a(k)` being `MR` scalars (broadcast) and `b(k)` `NR` consecutive
//! floats (vector loads). Where they come from is the caller's (`Rows`, `Cols`): the forward pass and the
//! input gradient read `b(k)` straight out of zero-padded planes at kernel tap `k`'s offset (no unfolded
//! copy), or `a(k)` at each output position's place in them (`Gathered`), as the weight gradient does.
//!
//! One instruction set per machine, chosen at run time (`Isa::best`): AVX-512 (8 x 32, 16 accumulators),
//! AVX2 with FMA (6 x 16, 12 accumulators, as BLIS's), or portable code.

/// The `MR` scalars of step `k`: `a(i, k) = row(i)[index(k)]`, each row a fixed start and every step one
/// index shared by the rows (so that the AVX-512 tile addresses them as `[row + index * 4]`).
pub(super) trait Rows: Sync {
    /// Where row `i` starts.
    ///
    /// # Safety
    /// `i < MR`.
    unsafe fn row(&self, i: usize) -> *const f32;

    /// # Safety
    /// `k` below the sum's length given to the kernel.
    unsafe fn index(&self, k: usize) -> usize;

    /// # Safety
    /// As `row` and `index`.
    #[inline(always)]
    unsafe fn a(&self, i: usize, k: usize) -> f32 {
        *self.row(i).add(self.index(k))
    }
}

/// The `NR` consecutive floats of step `k`.
pub(super) trait Cols: Sync {
    /// # Safety
    /// `k` below the sum's length; the pointer must reach `NR` readable floats.
    unsafe fn b(&self, k: usize) -> *const f32;
}

/// Rows packed step by step: `a(i, k) = data[k * mr + i]` (a weight panel).
pub(super) struct Packed<'a> {
    pub data: &'a [f32],
    pub mr: usize,
}

impl Rows for Packed<'_> {
    #[inline(always)]
    unsafe fn row(&self, i: usize) -> *const f32 {
        self.data.as_ptr().add(i)
    }

    #[inline(always)]
    unsafe fn index(&self, k: usize) -> usize {
        k * self.mr
    }
}

/// The most rows a tile has.
pub(super) const MAX_MR: usize = 8;

/// Rows at positions of their own, every step at one more offset: `a(i, k) = data[base[i] + offsets[k]]`
/// (output positions reading a tap's plane).
pub(super) struct Gathered<'a> {
    pub data: &'a [f32],
    pub base: [usize; MAX_MR],
    pub offsets: &'a [usize],
}

impl Rows for Gathered<'_> {
    #[inline(always)]
    unsafe fn row(&self, i: usize) -> *const f32 {
        self.data.as_ptr().add(self.base[i])
    }

    #[inline(always)]
    unsafe fn index(&self, k: usize) -> usize {
        *self.offsets.get_unchecked(k)
    }
}

/// Columns at one offset per step: `b(k) = data[base + offsets[k]..]` (a tap's shifted plane).
pub(super) struct Shifted<'a> {
    pub data: &'a [f32],
    pub base: usize,
    pub offsets: &'a [usize],
}

impl Cols for Shifted<'_> {
    #[inline(always)]
    unsafe fn b(&self, k: usize) -> *const f32 {
        self.data
            .as_ptr()
            .add(self.base + *self.offsets.get_unchecked(k))
    }
}

/// Columns of a row-major matrix: `b(k) = data[k * stride + base..]`.
pub(super) struct Strided<'a> {
    pub data: &'a [f32],
    pub base: usize,
    pub stride: usize,
}

impl Cols for Strided<'_> {
    #[inline(always)]
    unsafe fn b(&self, k: usize) -> *const f32 {
        self.data.as_ptr().add(k * self.stride + self.base)
    }
}

/// The instruction set the tiles run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    /// The widest this CPU runs, or the one `FEDSLM_KERNEL_ISA` names (`avx512`, `avx2`, `portable`) where
    /// the CPU runs it: benchmarks measure a narrower machine's tiles that way.
    pub fn best() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let asked = std::env::var("FEDSLM_KERNEL_ISA")
                .ok()
                .and_then(|v| Isa::parse(&v));
            match asked {
                Some(isa) if isa.runs() => isa,
                _ => Isa::available()[0],
            }
        })
    }

    /// `avx512`, `avx2` or `portable`.
    pub fn parse(name: &str) -> Option<Isa> {
        match name.to_ascii_lowercase().as_str() {
            "avx512" => Some(Isa::Avx512),
            "avx2" => Some(Isa::Avx2),
            "portable" => Some(Isa::Portable),
            _ => None,
        }
    }

    /// Every instruction set this CPU runs, widest first (the tests run each); detected once.
    pub fn available() -> &'static [Isa] {
        static AVAILABLE: std::sync::OnceLock<Vec<Isa>> = std::sync::OnceLock::new();
        AVAILABLE.get_or_init(|| {
            let mut out = Vec::new();
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    out.push(Isa::Avx512);
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    out.push(Isa::Avx2);
                }
            }
            out.push(Isa::Portable);
            out
        })
    }

    /// Whether this CPU runs it.
    pub fn runs(self) -> bool {
        Isa::available().contains(&self)
    }

    /// Rows of a tile.
    pub(super) fn mr(self) -> usize {
        match self {
            Isa::Avx512 => 8,
            Isa::Avx2 => 6,
            Isa::Portable => 4,
        }
    }

    /// Columns of a tile.
    pub(super) fn nr(self) -> usize {
        match self {
            Isa::Avx512 => 32,
            Isa::Avx2 => 16,
            Isa::Portable => 8,
        }
    }

    /// `c[i * ldc + j] (+)= Σ_{k < depth} a(i, k) · b(k)[j]` for `i < mr()`, `j < nr()`.
    ///
    /// # Safety
    /// `a` and `b` must be readable for every `k < depth` (see the traits), `c` writable at every `(i, j)`,
    /// and `self` supported by this CPU (one of `available()`).
    #[inline]
    pub(super) unsafe fn tile(
        self,
        depth: usize,
        a: &impl Rows,
        b: &impl Cols,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if x86::broadcast_in_register() => {
                x86::tile_avx512::<false>(depth, a, b, c, ldc, accumulate)
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86::tile_avx512::<true>(depth, a, b, c, ldc, accumulate),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::tile_avx2(depth, a, b, c, ldc, accumulate),
            _ => portable(depth, a, b, c, ldc, accumulate),
        }
    }
}

/// The tile in plain Rust (4 x 8; the compiler vectorises what it can).
unsafe fn portable(
    depth: usize,
    a: &impl Rows,
    b: &impl Cols,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [[0f32; 8]; 4];
    if accumulate {
        for (i, row) in acc.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = *c.add(i * ldc + j);
            }
        }
    }
    for k in 0..depth {
        let bk = std::slice::from_raw_parts(b.b(k), 8);
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = a.a(i, k);
            for (v, bj) in row.iter_mut().zip(bk) {
                *v = ai.mul_add(*bj, *v);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            *c.add(i * ldc + j) = *v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Cols, Rows};
    use std::arch::x86_64::*;

    /// Whether the AVX-512 tile broadcasts each row's scalar into a register first (`vbroadcastss`, one load
    /// for the row's two FMAs) rather than inside each FMA (`{1to16}`, a load per FMA): on CPUs with two
    /// 512-bit FMA units (Intel's Xeons), 18 loads per 16 FMAs bound the tile by its loads, and the
    /// register broadcast ran ResNet-18's convolutions 15-25 % faster (BENCHMARKS.md, "The AVX-512 tile on
    /// an Intel Xeon"); Zen 4 runs a 512-bit FMA as two halves, is bound by its FMAs either way, and ran the
    /// embedded broadcast faster. Chosen by the CPU's vendor; `FEDSLM_KERNEL_BROADCAST=register|embedded`
    /// forces one, for measurements. Both give the same bits.
    pub(super) fn broadcast_in_register() -> bool {
        static IN_REGISTER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *IN_REGISTER.get_or_init(|| {
            match std::env::var("FEDSLM_KERNEL_BROADCAST").as_deref() {
                Ok("register") => return true,
                Ok("embedded") => return false,
                _ => {}
            }
            // SAFETY: CPUID leaf 0 exists on every x86-64 CPU (newer compilers no longer ask for `unsafe`).
            #[allow(unused_unsafe)]
            let id = unsafe { __cpuid(0) };
            let vendor: Vec<u8> = [id.ebx, id.edx, id.ecx]
                .iter()
                .flat_map(|r| r.to_le_bytes())
                .collect();
            vendor == b"GenuineIntel"
        })
    }

    /// 8 rows x 2 vectors of 16; each row's scalar broadcast inside its FMAs (`EMBEDDED`) or into a register
    /// first (see `broadcast_in_register`).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_avx512<const EMBEDDED: bool>(
        depth: usize,
        a: &impl Rows,
        b: &impl Cols,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; 8];
        if accumulate {
            for (i, row) in acc.iter_mut().enumerate() {
                row[0] = _mm512_loadu_ps(c.add(i * ldc));
                row[1] = _mm512_loadu_ps(c.add(i * ldc + 16));
            }
        }
        // Written as assembly: the broadcast inside the FMA is not available from intrinsics, and the
        // compiler's own version of the register broadcast ran the layers 10-25 % slower on Zen 4 than the
        // embedded one (BENCHMARKS.md, "A direct convolution").
        let [a0, a1, a2, a3, a4, a5, a6, a7]: [*const f32; 8] = std::array::from_fn(|i| a.row(i));
        for k in 0..depth {
            let p = b.b(k);
            let x = a.index(k);
            let [[c00, c01], [c10, c11], [c20, c21], [c30, c31], [c40, c41], [c50, c51], [c60, c61], [c70, c71]] =
                &mut acc;
            // The operands both variants share: the two vectors of `b(k)`, the rows' pointers and the
            // index, the accumulators; each variant gives its instructions (and the register variant its
            // two broadcast registers).
            macro_rules! tile {
                ($($line:literal),* $(; $($scratch:tt)*)?) => {
                    std::arch::asm!(
                        "vmovups {b0}, zmmword ptr [{p}]",
                        "vmovups {b1}, zmmword ptr [{p} + 64]",
                        $($line,)*
                        p = in(reg) p,
                        x = in(reg) x,
                        a0 = in(reg) a0, a1 = in(reg) a1, a2 = in(reg) a2, a3 = in(reg) a3,
                        a4 = in(reg) a4, a5 = in(reg) a5, a6 = in(reg) a6, a7 = in(reg) a7,
                        b0 = out(zmm_reg) _, b1 = out(zmm_reg) _,
                        $($($scratch)*)?
                        c00 = inout(zmm_reg) *c00, c01 = inout(zmm_reg) *c01,
                        c10 = inout(zmm_reg) *c10, c11 = inout(zmm_reg) *c11,
                        c20 = inout(zmm_reg) *c20, c21 = inout(zmm_reg) *c21,
                        c30 = inout(zmm_reg) *c30, c31 = inout(zmm_reg) *c31,
                        c40 = inout(zmm_reg) *c40, c41 = inout(zmm_reg) *c41,
                        c50 = inout(zmm_reg) *c50, c51 = inout(zmm_reg) *c51,
                        c60 = inout(zmm_reg) *c60, c61 = inout(zmm_reg) *c61,
                        c70 = inout(zmm_reg) *c70, c71 = inout(zmm_reg) *c71,
                        options(nostack, readonly, preserves_flags),
                    )
                };
            }
            if EMBEDDED {
                tile!(
                    "vfmadd231ps {c00}, {b0}, dword ptr [{a0} + {x}*4]{{1to16}}",
                    "vfmadd231ps {c01}, {b1}, dword ptr [{a0} + {x}*4]{{1to16}}",
                    "vfmadd231ps {c10}, {b0}, dword ptr [{a1} + {x}*4]{{1to16}}",
                    "vfmadd231ps {c11}, {b1}, dword ptr [{a1} + {x}*4]{{1to16}}",
                    "vfmadd231ps {c20}, {b0}, dword ptr [{a2} + {x}*4]{{1to16}}",
                    "vfmadd231ps {c21}, {b1}, dword ptr [{a2} + {x}*4]{{1to16}}",
                    "vfmadd231ps {c30}, {b0}, dword ptr [{a3} + {x}*4]{{1to16}}",
                    "vfmadd231ps {c31}, {b1}, dword ptr [{a3} + {x}*4]{{1to16}}",
                    "vfmadd231ps {c40}, {b0}, dword ptr [{a4} + {x}*4]{{1to16}}",
                    "vfmadd231ps {c41}, {b1}, dword ptr [{a4} + {x}*4]{{1to16}}",
                    "vfmadd231ps {c50}, {b0}, dword ptr [{a5} + {x}*4]{{1to16}}",
                    "vfmadd231ps {c51}, {b1}, dword ptr [{a5} + {x}*4]{{1to16}}",
                    "vfmadd231ps {c60}, {b0}, dword ptr [{a6} + {x}*4]{{1to16}}",
                    "vfmadd231ps {c61}, {b1}, dword ptr [{a6} + {x}*4]{{1to16}}",
                    "vfmadd231ps {c70}, {b0}, dword ptr [{a7} + {x}*4]{{1to16}}",
                    "vfmadd231ps {c71}, {b1}, dword ptr [{a7} + {x}*4]{{1to16}}"
                );
            } else {
                tile!(
                    "vbroadcastss {t0}, dword ptr [{a0} + {x}*4]",
                    "vfmadd231ps {c00}, {b0}, {t0}",
                    "vfmadd231ps {c01}, {b1}, {t0}",
                    "vbroadcastss {t1}, dword ptr [{a1} + {x}*4]",
                    "vfmadd231ps {c10}, {b0}, {t1}",
                    "vfmadd231ps {c11}, {b1}, {t1}",
                    "vbroadcastss {t0}, dword ptr [{a2} + {x}*4]",
                    "vfmadd231ps {c20}, {b0}, {t0}",
                    "vfmadd231ps {c21}, {b1}, {t0}",
                    "vbroadcastss {t1}, dword ptr [{a3} + {x}*4]",
                    "vfmadd231ps {c30}, {b0}, {t1}",
                    "vfmadd231ps {c31}, {b1}, {t1}",
                    "vbroadcastss {t0}, dword ptr [{a4} + {x}*4]",
                    "vfmadd231ps {c40}, {b0}, {t0}",
                    "vfmadd231ps {c41}, {b1}, {t0}",
                    "vbroadcastss {t1}, dword ptr [{a5} + {x}*4]",
                    "vfmadd231ps {c50}, {b0}, {t1}",
                    "vfmadd231ps {c51}, {b1}, {t1}",
                    "vbroadcastss {t0}, dword ptr [{a6} + {x}*4]",
                    "vfmadd231ps {c60}, {b0}, {t0}",
                    "vfmadd231ps {c61}, {b1}, {t0}",
                    "vbroadcastss {t1}, dword ptr [{a7} + {x}*4]",
                    "vfmadd231ps {c70}, {b0}, {t1}",
                    "vfmadd231ps {c71}, {b1}, {t1}";
                    t0 = out(zmm_reg) _, t1 = out(zmm_reg) _,
                );
            }
        }
        for (i, row) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.add(i * ldc), row[0]);
            _mm512_storeu_ps(c.add(i * ldc + 16), row[1]);
        }
    }

    /// 6 rows x 2 vectors of 8.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2(
        depth: usize,
        a: &impl Rows,
        b: &impl Cols,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; 6];
        if accumulate {
            for (i, row) in acc.iter_mut().enumerate() {
                row[0] = _mm256_loadu_ps(c.add(i * ldc));
                row[1] = _mm256_loadu_ps(c.add(i * ldc + 8));
            }
        }
        for k in 0..depth {
            let p = b.b(k);
            let (b0, b1) = (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)));
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm256_set1_ps(a.a(i, k));
                row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
                row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
            }
        }
        for (i, row) in acc.iter().enumerate() {
            _mm256_storeu_ps(c.add(i * ldc), row[0]);
            _mm256_storeu_ps(c.add(i * ldc + 8), row[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in [-1, 1) from a fixed sequence.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// C before the tile adds its sums.
    fn before(mr: usize, nr: usize) -> Vec<f32> {
        values(mr * (nr + 5), 3)
    }

    /// `tile` on gathered rows and strided columns, from a C that already holds values (`accumulate`).
    fn run(
        tile: impl Fn(usize, &Gathered, &Strided, *mut f32, usize),
        mr: usize,
        nr: usize,
    ) -> Vec<f32> {
        let (depth, ldc) = (37, nr + 5); // ldc as in `before`
        let data = values(4096, 1);
        let offsets: Vec<usize> = (0..depth).map(|k| (k * 53) % 3000).collect();
        let mut base = [0usize; MAX_MR];
        for (i, b) in base.iter_mut().enumerate() {
            *b = i * 97 % 1000;
        }
        let a = Gathered {
            data: &data,
            base,
            offsets: &offsets,
        };
        let cols = values(depth * (nr + 3), 2);
        let b = Strided {
            data: &cols,
            base: 1,
            stride: nr + 3,
        };
        let mut c = before(mr, nr);
        tile(depth, &a, &b, c.as_mut_ptr(), ldc);
        c
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn both_avx512_broadcasts_give_the_portable_tiles_bits() {
        if !Isa::Avx512.runs() {
            return; // nothing to compare on this CPU
        }
        // The portable tile covers 4 x 8; four of them cover the AVX-512 tile's 8 x 32 in the same order.
        let portable_c = run(
            |depth, a, b, c, ldc| unsafe {
                for (i0, j0) in (0..8)
                    .step_by(4)
                    .flat_map(|i| (0..32).step_by(8).map(move |j| (i, j)))
                {
                    let rows = Gathered {
                        data: a.data,
                        base: std::array::from_fn(|i| a.base[(i0 + i).min(MAX_MR - 1)]),
                        offsets: a.offsets,
                    };
                    let cols = Strided {
                        data: b.data,
                        base: b.base + j0,
                        stride: b.stride,
                    };
                    portable(depth, &rows, &cols, c.add(i0 * ldc + j0), ldc, true);
                }
            },
            8,
            32,
        );
        let embedded = run(
            |depth, a, b, c, ldc| unsafe { x86::tile_avx512::<true>(depth, a, b, c, ldc, true) },
            8,
            32,
        );
        let register = run(
            |depth, a, b, c, ldc| unsafe { x86::tile_avx512::<false>(depth, a, b, c, ldc, true) },
            8,
            32,
        );
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&embedded), bits(&portable_c));
        assert_eq!(bits(&register), bits(&portable_c));
        // The sums changed C (the test is not comparing untouched buffers).
        assert_ne!(bits(&register), bits(&before(8, 32)));
    }
}
