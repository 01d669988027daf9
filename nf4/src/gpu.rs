//! CUDA dequantization: one fused kernel launch per tensor (`dequant.cu`).
//!
//! Two doors to the same launch:
//! - [`GpuQuantized`]: upload a [`Quantized`] once, dequantize it as often as needed into
//!   a new buffer or the caller's, on the [`Gpu`]'s stream. Sizes are checked against the
//!   state, so the kernel never reads or writes out of bounds.
//! - [`launch_dequant`] on raw device pointers and a raw stream, for callers that own
//!   their tensors (the C ABI in [`crate::capi`] is a thin shell around it), and
//!   [`launch_dequant_rows`], the same into rows embedded in a wider matrix (a row
//!   stride for the output: fsdp's linear puts its LoRA `B` beside the weight).
//!
//! The kernel allocates nothing and runs on the caller's stream; the launch returns as
//! soon as it is queued.

use std::ffi::c_void;
use std::sync::OnceLock;

use cudakit::cudarc::driver::{sys, CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr};
use cudakit::kernel::{self, KernelSource};
use cudakit::{Gpu, GpuError};

use crate::codes::{QuantType, DYNAMIC_MAP_BITS, FP4_CODE, NF4_CODE};
use crate::element::{to_le_bytes, Element, FloatDtype};
use crate::error::{Nf4Error, Result};
use crate::quantize::Quantized;
use crate::state::{Absmax, QuantState, BLOCKSIZES};

const THREADS: u32 = 256;
/// A build of the kernel: its tuning knobs (see `dequant.cu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    /// Units (8 elements) per thread per tile.
    pub units: u32,
    /// `__launch_bounds__` minimum blocks per SM (0: let the compiler choose registers).
    pub min_blocks: u32,
    /// Evict-first (`st.global.cs`) stores for the output.
    pub stream_stores: bool,
    /// Access layout (see `dequant.cu`): 0 interleaved 4-byte loads, 1 lane-contiguous
    /// 16-byte loads, 2 16-byte loads with warp-shuffled coalesced stores, 3 as 0 with an
    /// equal contiguous share per warp.
    pub layout: u32,
}

impl Variant {
    /// A short label, e.g. `L0-u4-b0-cs`.
    pub fn label(&self) -> String {
        format!("L{}-u{}-b{}{}", self.layout, self.units, self.min_blocks, if self.stream_stores { "-cs" } else { "" })
    }
}

/// The builds `nf4-bench gpu` sweeps (and the GPU tests check against the CPU reference).
pub const TUNING_VARIANTS: [Variant; 6] = [
    Variant { units: 4, min_blocks: 0, stream_stores: true, layout: 0 },
    Variant { units: 8, min_blocks: 8, stream_stores: true, layout: 0 },
    Variant { units: 4, min_blocks: 0, stream_stores: true, layout: 2 },
    Variant { units: 4, min_blocks: 0, stream_stores: true, layout: 3 },
    Variant { units: 2, min_blocks: 0, stream_stores: true, layout: 3 },
    Variant { units: 8, min_blocks: 0, stream_stores: true, layout: 3 },
];

/// The build [`launch_dequant`] uses.
pub const DEFAULT_VARIANT: Variant = Variant { units: 4, min_blocks: 0, stream_stores: true, layout: 0 };

fn table(name: &str, bits: impl Iterator<Item = u32>) -> String {
    let v: Vec<String> = bits.map(|b| format!("0x{b:08x}u")).collect();
    format!("__device__ const unsigned int {name}[{}] = {{{}}};\n", v.len(), v.join(", "))
}

/// The kernel source of a variant, with its generated prelude (code tables, knobs).
/// Variants other than [`DEFAULT_VARIANT`] exist for the benchmark's tuning sweep.
pub fn source_variant(v: Variant) -> KernelSource {
    let mut src = format!(
        "#define UNITS {}\n#define MIN_BLOCKS {}\n#define STREAM_STORES {}\n#define LAYOUT {}\n",
        v.units, v.min_blocks, v.stream_stores as u32, v.layout
    );
    src += &table("NF4_BITS", NF4_CODE.iter().map(|x| x.to_bits()));
    src += &table("FP4_BITS", FP4_CODE.iter().map(|x| x.to_bits()));
    src += &table("DYN_BITS", DYNAMIC_MAP_BITS.iter().copied());
    src += include_str!("dequant.cu");
    KernelSource::new(format!("nf4/dequant.cu({})", v.label()), src)
}

/// The kernel source as launched by default.
pub fn source() -> &'static KernelSource {
    static S: OnceLock<KernelSource> = OnceLock::new();
    S.get_or_init(|| source_variant(DEFAULT_VARIANT))
}

/// Arguments of one dequantization on raw device pointers (`u64` device addresses).
#[derive(Clone, Copy, Debug)]
pub struct DequantArgs {
    /// Packed codes, `ceil(n / 2)` bytes.
    pub packed: u64,
    /// `f32[num_blocks]`, or `u8[num_blocks]` when `absmax2 != 0` (nested).
    pub absmax: u64,
    /// Nested: `f32[ceil(num_blocks / nested_blocksize)]`; 0 when not nested.
    pub absmax2: u64,
    /// Nested: `f32[256]` code book; 0 for bitsandbytes' signed dynamic map.
    pub code2: u64,
    /// Nested: the offset added after decoding.
    pub offset: f32,
    /// `f32[16]` code values; 0 for the standard table of `quant_type`.
    pub code: u64,
    /// Which standard table to use when `code == 0`.
    pub quant_type: QuantType,
    /// Number of elements.
    pub n: u64,
    /// Elements per absmax block (power of two, 32..=4096).
    pub blocksize: u32,
    /// Blocks per nested absmax2 value (power of two; 256 in practice).
    pub nested_blocksize: u32,
    /// The legacy transposed layout: the original (rows, cols); output is written transposed.
    pub transposed: Option<(u64, u64)>,
    /// Output, `n` elements of `out_dtype`.
    pub out: u64,
    /// Output dtype.
    pub out_dtype: FloatDtype,
}

fn invalid(arg: &'static str, problem: impl Into<String>) -> GpuError {
    GpuError::InvalidArgument { arg, problem: problem.into() }
}

/// Launch geometry for `n` elements with `units` per thread: a persistent grid of exactly
/// the blocks that can be resident at once (`resident` = SMs x blocks per SM at this
/// kernel's occupancy), grid-striding over tiles, never more blocks than tiles.
fn grid_for(n: u64, units: u32, resident: u32) -> u32 {
    let nunits = n.div_ceil(8);
    let tile = (THREADS * units) as u64;
    nunits.div_ceil(tile).clamp(1, resident.max(1) as u64) as u32
}

/// Queues one dequantization on `stream` in the calling thread's current context.
///
/// # Safety
/// Every non-zero pointer must be a device address valid for the sizes documented on
/// [`DequantArgs`], and `stream` a stream of the current context (or null). The
/// arguments that can be checked without the buffers' sizes are checked here.
pub unsafe fn launch_dequant(a: &DequantArgs, stream: sys::CUstream) -> Result<(), GpuError> {
    launch_dequant_with(source(), DEFAULT_VARIANT, a, stream)
}

/// [`launch_dequant`] with another build of the kernel (the benchmark's tuning sweep).
///
/// # Safety
/// As [`launch_dequant`]; `v` must be the variant `src` was built from.
#[doc(hidden)]
pub unsafe fn launch_dequant_with(src: &KernelSource, v: Variant, a: &DequantArgs, stream: sys::CUstream) -> Result<(), GpuError> {
    launch_impl(src, v, a, None, stream)
}

/// [`launch_dequant`] into a matrix embedded in a wider one: element `i` of the tensor
/// goes to `out[(i / cols) * ld + i % cols]` (rows of `cols` elements, row stride `ld`
/// elements, `ld >= cols`); the `ld - cols` elements after each row are not written. For
/// a weight `[rows, cols]` this writes it into the first `cols` columns of a
/// `[rows, ld]` matrix in one pass (the fsdp linear puts its LoRA `B` beside it). The
/// absmax blocks follow the flat tensor as always: a block may straddle rows.
///
/// Fast (the same vector path as [`launch_dequant`]) when `cols` and `ld` are multiples
/// of 8 and `out` is 16-byte aligned; correct (element by element) otherwise. `n` must be
/// a multiple of `cols`; the legacy transposed layout is refused.
///
/// # Safety
/// As [`launch_dequant`], with `out` valid for `(n / cols - 1) * ld + cols` elements.
pub unsafe fn launch_dequant_rows(a: &DequantArgs, cols: u64, ld: u64, stream: sys::CUstream) -> Result<(), GpuError> {
    if cols == 0 || ld < cols {
        return Err(invalid("ld", format!("row stride {ld} must be >= the row length {cols} > 0")));
    }
    if a.n % cols != 0 {
        return Err(invalid("cols", format!("{} elements are not whole rows of {cols}", a.n)));
    }
    if a.transposed.is_some() {
        return Err(invalid("transposed", "a strided output of the legacy transposed layout is not supported"));
    }
    launch_impl(source(), DEFAULT_VARIANT, a, Some((cols, ld)), stream)
}

unsafe fn launch_impl(src: &KernelSource, v: Variant, a: &DequantArgs, rows: Option<(u64, u64)>, stream: sys::CUstream) -> Result<(), GpuError> {
    if !BLOCKSIZES.contains(&(a.blocksize as usize)) {
        return Err(invalid("blocksize", format!("{} is not one of {:?}", a.blocksize, BLOCKSIZES)));
    }
    let nested = a.absmax2 != 0;
    if nested && !a.nested_blocksize.is_power_of_two() {
        return Err(invalid("nested_blocksize", format!("{} is not a power of two", a.nested_blocksize)));
    }
    if a.n == 0 {
        return Ok(());
    }
    for (name, p) in [("packed", a.packed), ("absmax", a.absmax), ("out", a.out)] {
        if p == 0 {
            return Err(invalid(name, "is a null pointer"));
        }
    }
    let (rows_t, cols_t) = match a.transposed {
        Some((r, c)) if r.checked_mul(c) == Some(a.n) => (r, c),
        Some((r, c)) => return Err(invalid("transposed", format!("{r} x {c} is not {} elements", a.n))),
        None => (0, 0),
    };
    let out_align = 16;
    let load_align = if v.layout == 0 || v.layout == 3 { 4 } else { 16 };
    // Strided: whole 8-element units per row and 16-byte aligned rows, else scalar.
    let rows_ok = rows.is_none_or(|(c, ld)| c % 8 == 0 && ld % 8 == 0);
    let aligned = (a.transposed.is_none() && rows_ok && a.packed % load_align == 0 && a.out % out_align == 0) as i32;
    let name = match (rows.is_some(), nested, a.out_dtype) {
        (false, false, FloatDtype::F32) => "nf4_dequant_f32",
        (false, false, FloatDtype::F16) => "nf4_dequant_f16",
        (false, false, FloatDtype::Bf16) => "nf4_dequant_bf16",
        (false, true, FloatDtype::F32) => "nf4_dequant_nested_f32",
        (false, true, FloatDtype::F16) => "nf4_dequant_nested_f16",
        (false, true, FloatDtype::Bf16) => "nf4_dequant_nested_bf16",
        (true, false, FloatDtype::F32) => "nf4_dequant_rows_f32",
        (true, false, FloatDtype::F16) => "nf4_dequant_rows_f16",
        (true, false, FloatDtype::Bf16) => "nf4_dequant_rows_bf16",
        (true, true, FloatDtype::F32) => "nf4_dequant_rows_nested_f32",
        (true, true, FloatDtype::F16) => "nf4_dequant_rows_nested_f16",
        (true, true, FloatDtype::Bf16) => "nf4_dequant_rows_nested_bf16",
    };
    let f = kernel::function_in_current_context(src, name)?;
    let qtype: i32 = match a.quant_type {
        QuantType::Nf4 => 0,
        QuantType::Fp4 => 1,
    };
    let log2_bs = a.blocksize.trailing_zeros();
    let log2_bs2 = if nested { a.nested_blocksize.trailing_zeros() } else { 0 };
    let mut p = [a.packed, a.absmax, a.absmax2, a.code2];
    let mut offset = a.offset;
    let mut code = a.code;
    let mut qt = qtype;
    let mut n = a.n;
    let (mut l1, mut l2) = (log2_bs, log2_bs2);
    let (mut r, mut c) = (rows_t, cols_t);
    let mut al = aligned;
    let mut out = a.out;
    let (mut oc, mut ol) = rows.unwrap_or((0, 0));
    let mut params: Vec<*mut c_void> = vec![
        &mut p[0] as *mut u64 as *mut c_void,
        &mut p[1] as *mut u64 as *mut c_void,
        &mut p[2] as *mut u64 as *mut c_void,
        &mut p[3] as *mut u64 as *mut c_void,
        &mut offset as *mut f32 as *mut c_void,
        &mut code as *mut u64 as *mut c_void,
        &mut qt as *mut i32 as *mut c_void,
        &mut n as *mut u64 as *mut c_void,
        &mut l1 as *mut u32 as *mut c_void,
        &mut l2 as *mut u32 as *mut c_void,
    ];
    if rows.is_some() {
        params.extend([
            &mut al as *mut i32 as *mut c_void,
            &mut out as *mut u64 as *mut c_void,
            &mut oc as *mut u64 as *mut c_void,
            &mut ol as *mut u64 as *mut c_void,
        ]);
    } else {
        params.extend([
            &mut r as *mut u64 as *mut c_void,
            &mut c as *mut u64 as *mut c_void,
            &mut al as *mut i32 as *mut c_void,
            &mut out as *mut u64 as *mut c_void,
        ]);
    }
    let resident = kernel::resident_blocks(f, THREADS)?;
    let units_per_thread = match v.layout {
        0 => v.units,
        3 => 1, // equal shares: use every resident block as long as each warp gets >= 32 units
        _ => 4,
    };
    kernel::launch(f, grid_for(a.n, units_per_thread, resident), THREADS, 0, stream, &mut params)
}

/// A quantized tensor resident on a GPU.
pub struct GpuQuantized {
    gpu: Gpu,
    name: String,
    state: QuantState,
    packed: CudaSlice<u8>,
    absmax: CudaSlice<u8>,
    absmax2: Option<CudaSlice<f32>>,
    code2: Option<CudaSlice<f32>>,
    /// Only when the state's quant_map differs from the built-in table.
    code: Option<CudaSlice<f32>>,
}

impl GpuQuantized {
    /// Validates and uploads `q` (named `name` in errors) to `gpu`.
    pub fn upload(gpu: &Gpu, name: &str, q: &Quantized) -> Result<GpuQuantized> {
        q.state.validate_with_packed(name, q.packed.len())?;
        if let Absmax::Nested { blocksize2, .. } = &q.state.absmax {
            if !blocksize2.is_power_of_two() {
                return Err(Nf4Error::field(name, "nested_blocksize", format!("{blocksize2} is not a power of two")));
            }
        }
        let g = |source| Nf4Error::Gpu { tensor: name.to_string(), source };
        let d = |e| g(GpuError::driver("cuMemcpyHtoD")(e));
        gpu.bind().map_err(g)?;
        let s = gpu.stream();
        let packed = s.clone_htod(&q.packed[..q.state.packed_len()]).map_err(d)?;
        let (absmax, absmax2, code2) = match &q.state.absmax {
            Absmax::Plain(v) => {
                (s.clone_htod(&to_le_bytes(v)).map_err(d)?, None, None)
            }
            Absmax::Nested { q: codes, absmax2, code2, .. } => (
                s.clone_htod(codes).map_err(d)?,
                Some(s.clone_htod(absmax2).map_err(d)?),
                Some(s.clone_htod(&code2[..]).map_err(d)?),
            ),
        };
        let code = if q.state.uses_builtin_code() { None } else { Some(s.clone_htod(&q.state.code[..]).map_err(d)?) };
        Ok(GpuQuantized { gpu: gpu.clone(), name: name.to_string(), state: q.state.clone(), packed, absmax, absmax2, code2, code })
    }

    /// The state (host copy).
    pub fn state(&self) -> &QuantState {
        &self.state
    }

    /// Dequantizes into a new device buffer of `numel` elements of `T`, in
    /// [`QuantState::output_shape`] order.
    pub fn dequantize<T: Element + DeviceRepr>(&self) -> Result<CudaSlice<T>> {
        let g = |source| Nf4Error::Gpu { tensor: self.name.clone(), source };
        // SAFETY: every element is written by the kernel before anyone reads it.
        let mut out = unsafe { self.gpu.stream().alloc::<T>(self.state.numel()) }
            .map_err(|e| g(GpuError::driver("cuMemAlloc")(e)))?;
        self.dequantize_into(&mut out)?;
        Ok(out)
    }

    /// Dequantizes into the caller's buffer, which must hold exactly `numel` elements.
    pub fn dequantize_into<T: Element + DeviceRepr>(&self, out: &mut CudaSlice<T>) -> Result<()> {
        if out.len() != self.state.numel() {
            return Err(Nf4Error::field(
                &self.name,
                "out",
                format!("the output buffer holds {} elements but the tensor has {}", out.len(), self.state.numel()),
            ));
        }
        let stream = self.gpu.stream();
        let args = self.dequant_args(out.device_ptr_mut(stream).0, T::DTYPE);
        let g = |source| Nf4Error::Gpu { tensor: self.name.clone(), source };
        self.gpu.bind().map_err(g)?;
        // SAFETY: all buffers were sized from the validated state (packed >= ceil(n/2)
        // bytes, absmax one per block, absmax2 one per nested group, code 16, code2 256)
        // and `out` holds numel elements; they live on this context and stream.
        unsafe { launch_dequant(&args, stream.cu_stream()) }.map_err(g)
    }

    /// The [`launch_dequant`] arguments that write this whole tensor (`numel` elements of
    /// `out_dtype`, in [`QuantState::output_shape`] order) to the device address `out`:
    /// for callers that dequantize into their own buffers (a slice of a larger scratch
    /// buffer, say) on their own stream. The input addresses stay valid while `self`
    /// lives; launch in the context it was uploaded to, with `out` holding `numel`
    /// elements.
    pub fn dequant_args(&self, out: u64, out_dtype: FloatDtype) -> DequantArgs {
        let stream = self.gpu.stream();
        let ptr = |s: &CudaSlice<_>| s.device_ptr(stream).0;
        DequantArgs {
            packed: self.packed.device_ptr(stream).0,
            absmax: self.absmax.device_ptr(stream).0,
            absmax2: self.absmax2.as_ref().map_or(0, ptr),
            code2: self.code2.as_ref().map_or(0, ptr),
            offset: match &self.state.absmax {
                Absmax::Nested { offset, .. } => *offset,
                Absmax::Plain(_) => 0.0,
            },
            code: self.code.as_ref().map_or(0, ptr),
            quant_type: self.state.quant_type,
            n: self.state.numel() as u64,
            blocksize: self.state.blocksize as u32,
            nested_blocksize: match &self.state.absmax {
                Absmax::Nested { blocksize2, .. } => *blocksize2 as u32,
                Absmax::Plain(_) => 0,
            },
            transposed: self.state.is_transposed().then(|| (self.state.shape[0] as u64, self.state.shape[1] as u64)),
            out,
            out_dtype,
        }
    }

}
