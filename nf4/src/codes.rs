//! The code books: NF4 and FP4 values, bitsandbytes' decision trees that pick a code for a
//! normalised value, and the signed dynamic 8-bit map used for the nested absmax.
//!
//! These are format constants. The thresholds are the exact f32 literals bitsandbytes'
//! CUDA quantizer compares against (midpoints between neighbouring codes); matching them
//! bit for bit is what makes our quantizer's output identical to theirs.

/// 4-bit quantization type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// NormalFloat4: 16 quantiles of N(0, 1), scaled to [-1, 1].
    Nf4,
    /// bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit), scaled to [-1, 1].
    Fp4,
}

impl QuantType {
    /// bitsandbytes' name: `nf4` or `fp4`.
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }
    /// Parses `nf4` / `fp4`.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "nf4" => Some(QuantType::Nf4),
            "fp4" => Some(QuantType::Fp4),
            _ => None,
        }
    }
    /// The value of each of the 16 codes, as the dequantizer uses them.
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            QuantType::Nf4 => &NF4_CODE,
            QuantType::Fp4 => &FP4_CODE,
        }
    }
    /// The code for a value already divided by its block's absmax.
    #[inline(always)]
    pub fn quantize(self, x: f32) -> u8 {
        match self {
            QuantType::Nf4 => nf4_quantize(x),
            QuantType::Fp4 => fp4_quantize(x),
        }
    }
}

/// NF4 code values (bitsandbytes' `nf4_dequantization_lut`, also its `quant_map`).
// The literals carry bitsandbytes' own digits (more than an f32 holds: each rounds to the
// f32 bitsandbytes uses), so they can be compared with its source as they stand.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_484_521_865_84,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// FP4 magnitudes for the 3 low bits, exactly the f32 literals of bitsandbytes' kernel LUT.
#[allow(clippy::excessive_precision)] // its digits, as above
const FP4_MAGNITUDE: [f32; 8] = [0.0, 0.005_208_333_333, 0.666_666_67, 1.0, 0.333_333_33, 0.5, 0.166_666_67, 0.25];

/// FP4 code values: the high bit is the sign. bitsandbytes computes `lut[c & 7] * (1 - 2*s)`,
/// which is exactly `±lut[c & 7]` (code 8 is `-0.0`).
pub const FP4_CODE: [f32; 16] = {
    let mut t = [0.0f32; 16];
    let mut i = 0;
    while i < 8 {
        t[i] = FP4_MAGNITUDE[i];
        t[i + 8] = -FP4_MAGNITUDE[i];
        i += 1;
    }
    t
};

/// The midpoints between neighbouring NF4 codes, exactly the f32 literals of bitsandbytes'
/// `dQuantizeNF4` decision tree, sorted.
const NF4_THRESHOLDS: [f32; 15] = [
    -0.848_096_4,
    -0.610_632_9,
    -0.459_995_27,
    -0.339_679_43,
    -0.234_607_4,
    -0.137_911_73,
    -0.045_525_018,
    0.039_790_15,
    0.120_255_25,
    0.203_521_25,
    0.292_013_77,
    0.389_312_54,
    0.501_663_4,
    0.642_786_9,
    0.861_478_4,
];

/// The NF4 code of a normalised value. bitsandbytes' tree is a binary search over sorted
/// thresholds with `x > t` at each node, so its answer is the number of thresholds `x`
/// exceeds: the same comparisons, without the unpredictable branches (a test holds this to
/// the literal tree). NaN exceeds none: code 0, as in the tree.
#[inline(always)]
pub fn nf4_quantize(x: f32) -> u8 {
    NF4_THRESHOLDS.iter().map(|&t| (x > t) as u8).sum()
}

/// bitsandbytes' FP4 magnitude thresholds (`dQuantizeFP4`), sorted, and the code of each
/// interval they bound.
const FP4_THRESHOLDS: [f32; 7] = [0.002_604_17, 0.085_937_5, 0.208_333_33, 0.291_666_67, 0.416_666_7, 0.583_333, 0.833_333_3];
const FP4_INTERVAL_CODE: [u8; 8] = [0b0000, 0b0001, 0b0110, 0b0111, 0b0100, 0b0101, 0b0010, 0b0011];

/// The FP4 code of a normalised value: sign bit, then the interval of |x| (as above, the
/// count of thresholds exceeded; equal to bitsandbytes' tree).
#[inline(always)]
pub fn fp4_quantize(x: f32) -> u8 {
    let sign = if x < 0.0 { 0b1000 } else { 0 };
    let a = x.abs();
    let i: usize = FP4_THRESHOLDS.iter().map(|&t| (a > t) as usize).sum();
    FP4_INTERVAL_CODE[i] + sign
}

/// bitsandbytes' NF4 decision tree (`dQuantizeNF4`), verbatim: the reference for
/// [`nf4_quantize`]. NaN falls through to code 0.
pub fn nf4_quantize_tree(x: f32) -> u8 {
    if x > 0.039_790_15 {
        if x > 0.389_312_54 {
            if x > 0.642_786_9 {
                if x > 0.861_478_4 { 0b1111 } else { 0b1110 }
            } else if x > 0.501_663_4 {
                0b1101
            } else {
                0b1100
            }
        } else if x > 0.203_521_25 {
            if x > 0.292_013_77 { 0b1011 } else { 0b1010 }
        } else if x > 0.120_255_25 {
            0b1001
        } else {
            0b1000
        }
    } else if x > -0.339_679_43 {
        if x > -0.137_911_73 {
            if x > -0.045_525_018 { 0b0111 } else { 0b0110 }
        } else if x > -0.234_607_4 {
            0b0101
        } else {
            0b0100
        }
    } else if x > -0.610_632_9 {
        if x > -0.459_995_27 { 0b0011 } else { 0b0010 }
    } else if x > -0.848_096_4 {
        0b0001
    } else {
        0b0000
    }
}

/// bitsandbytes' FP4 decision tree (`dQuantizeFP4`), verbatim: the reference for
/// [`fp4_quantize`].
pub fn fp4_quantize_tree(x: f32) -> u8 {
    let sign = if x < 0.0 { 0b1000 } else { 0 };
    let x = x.abs();
    let c = if x > 0.291_666_67 {
        if x > 0.583_333 {
            if x > 0.833_333_3 { 0b0011 } else { 0b0010 }
        } else if x > 0.416_666_7 {
            0b0101
        } else {
            0b0100
        }
    } else if x > 0.085_937_5 {
        if x > 0.208_333_33 { 0b0111 } else { 0b0110 }
    } else if x > 0.002_604_17 {
        0b0001
    } else {
        0b0000
    };
    c + sign
}

/// bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`), as f32 bits.
/// Taken from real bitsandbytes 0.50.2 output (the `dynamic_map` fixture, checked by a test).
pub const DYNAMIC_MAP_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// The signed dynamic map as f32 values.
pub fn dynamic_map() -> [f32; 256] {
    DYNAMIC_MAP_BITS.map(f32::from_bits)
}

/// bitsandbytes' 8-bit code search (`dQuantize<0>`): a 7-step binary search over the sorted
/// 256-entry `code`, then the nearer of the two neighbours by midpoint. Exactly their
/// comparisons, so ties and NaN resolve as theirs do.
pub fn quantize_8bit(code: &[f32; 256], x: f32) -> u8 {
    let mut pivot: usize = 127;
    let mut upper_pivot: usize = 255;
    let mut lower_pivot: usize = 0;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = code[pivot];
    let mut i = 64;
    while i > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
        i >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[upper_pivot];
    }
    if lower_pivot == 0 {
        lower = code[lower_pivot];
    }
    if x > val {
        let midpoint = (upper + val) * 0.5;
        if x > midpoint { upper_pivot as u8 } else { pivot as u8 }
    } else {
        let midpoint = (lower + val) * 0.5;
        if x < midpoint { lower_pivot as u8 } else { pivot as u8 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_tree_picks_the_nearest_code() {
        for (i, &c) in NF4_CODE.iter().enumerate() {
            assert_eq!(nf4_quantize(c) as usize, i, "code {i} = {c} must map to itself");
        }
        // Between codes, the tree's thresholds are the midpoints.
        let mut x = -1.0f32;
        while x <= 1.0 {
            let q = nf4_quantize(x) as usize;
            let best = (0..16)
                .min_by(|&a, &b| (NF4_CODE[a] - x).abs().total_cmp(&(NF4_CODE[b] - x).abs()))
                .unwrap();
            assert!(q == best || (NF4_CODE[q] - x).abs() - (NF4_CODE[best] - x).abs() < 1e-6, "x={x} q={q} best={best}");
            x += 1.0 / 4096.0;
        }
        assert_eq!(nf4_quantize(f32::NAN), 0);
    }

    #[test]
    fn fp4_tree_picks_the_nearest_code() {
        for (i, &c) in FP4_CODE.iter().enumerate() {
            let q = fp4_quantize(c) as usize;
            assert_eq!(FP4_CODE[q], c, "code {i} = {c}");
        }
        assert_eq!(fp4_quantize(f32::NAN), 0);
    }

    #[test]
    fn threshold_counts_equal_the_literal_trees() {
        // Every threshold, its neighbours one ulp away, special values, and a dense sweep.
        let mut xs = vec![0.0f32, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.0, -1.0, 1e-40, -1e-40];
        for &t in NF4_THRESHOLDS.iter().chain(&FP4_THRESHOLDS) {
            for v in [t, -t] {
                xs.extend([v, f32::from_bits(v.to_bits() + 1), f32::from_bits(v.to_bits() - 1)]);
            }
        }
        let mut s = 0x9e37_79b9u32;
        for _ in 0..1_000_000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            xs.push((s as f32 / u32::MAX as f32) * 2.4 - 1.2);
        }
        for x in xs {
            assert_eq!(nf4_quantize(x), nf4_quantize_tree(x), "nf4 {x:e}");
            assert_eq!(fp4_quantize(x), fp4_quantize_tree(x), "fp4 {x:e}");
        }
    }

    #[test]
    fn dynamic_map_is_sorted_and_spans_minus_one_to_one() {
        let m = dynamic_map();
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(m[255], 1.0);
        assert!(m[0] < -0.99);
        for (i, &c) in m.iter().enumerate() {
            let q = quantize_8bit(&m, c) as usize;
            assert_eq!(m[q], c, "code {i}");
        }
    }
}
