//! Refusing non-finite weights: a NaN or an infinity in a weight makes every output of the model
//! garbage, and quantization hides it (a NaN is skipped by absmax and rounds to 0; an infinite range gets
//! scale 1), so `convert`, `calibrate` and `inspect --check` refuse it, naming the tensor, the file that
//! holds it, the first bad element (flat and multi-dimensional index) and its value.
//!
//! Every float dtype is checked by its bit pattern, without converting: f32, f64, f16, bf16 and complex
//! (NaN and ±Inf), FLOAT8 E5M2 (NaN and ±Inf), E4M3FN (NaN only: `S.1111.111`; it has no infinity),
//! the FNUZ variants and E8M0 (one NaN encoding each, no infinity). FP4 E2M1 has no non-finite values,
//! and integer, bool and string tensors are skipped.
//!
//! Design. Weights are slices of memory-mapped files, so the scan reads them in place: tensors are cut
//! into 8 MiB chunks, scanned in parallel with rayon (the first bad element in tensor order wins, so the
//! report does not depend on scheduling), and each chunk's pages are released after it is scanned
//! ([`release_pages`]), so resident memory stays at a few chunks per thread whatever the model weighs.
//! `calibrate` and `inspect --check` run this scan as a separate pass ([`check_model`]).
//!
//! `convert` must not read a 28 GB checkpoint twice. Its weight writer already touches every byte once
//! (written from the source pages while a second thread hashes them), so the check is fused into that
//! stream: the hashing thread also scans each chunk of the tensors handed over in a [`StreamCheck`]
//! (in parallel with the hash, via `rayon::join`), and on a bad value the writer stops; the output is
//! still staged then, so nothing is renamed into place. What the stream does not carry verbatim, i.e.
//! weights that a pass consumed (`quantize-w8a8` turns them into INT8 and a scale that would hide the
//! NaN) or that stay inline in the graph file (below the external-data threshold), is scanned before
//! the lint and the write by [`check_before_write`], which decides the split. Hence no second pass over
//! the bulk of the weights, one extra read only of what quantization already read.
//!
//! The file named in a refusal is looked up only on that error path (the ONNX graph's external-data
//! entry of the tensor, or the checkpoint shard that lists it), so the happy path costs nothing for it.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Result;
use rayon::prelude::*;

use crate::ir::{DataType, Graph, Model, Tensor, TensorData};
use crate::onnx::external::release_pages;

/// Bytes scanned per work item (a multiple of every element size, so chunks start on an element).
const CHUNK: usize = 8 << 20;

/// What a non-finite element holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Nan,
    PosInf,
    NegInf,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Nan => "NaN",
            Kind::PosInf => "+Inf",
            Kind::NegInf => "-Inf",
        })
    }
}

/// How one dtype encodes non-finite values: a component (`width` bytes, little-endian) is non-finite
/// when `bits & mask == value`; it is an infinity (signed by `sign`) when the dtype `has_inf` and the
/// `mantissa` bits are zero, else a NaN. Complex elements are two components.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    width: usize,
    components: u64,
    mask: u64,
    value: u64,
    mantissa: u64,
    sign: u64,
    has_inf: bool,
}

impl Rule {
    const fn ieee(width: usize, exponent: u64, mantissa: u64) -> Rule {
        Rule {
            width,
            components: 1,
            mask: exponent,
            value: exponent,
            mantissa,
            sign: 1 << (8 * width - 1),
            has_inf: true,
        }
    }

    /// A byte type whose only non-finite values are NaNs matching `mask`/`value`.
    const fn nan_only(mask: u64, value: u64) -> Rule {
        Rule {
            width: 1,
            components: 1,
            mask,
            value,
            mantissa: 0,
            sign: 0,
            has_inf: false,
        }
    }

    /// The rule for `dtype`, or `None` for types without non-finite values (integers, bool, FP4, strings).
    pub fn of(dtype: DataType) -> Option<Rule> {
        use DataType::*;
        const F32: Rule = Rule::ieee(4, 0x7F80_0000, 0x007F_FFFF);
        const F64: Rule = Rule::ieee(8, 0x7FF0_0000_0000_0000, 0x000F_FFFF_FFFF_FFFF);
        let complex = |r: Rule| Rule { components: 2, ..r };
        Some(match dtype {
            DataType::F32 => F32,
            DataType::F64 => F64,
            F16 => Rule::ieee(2, 0x7C00, 0x03FF),
            BF16 => Rule::ieee(2, 0x7F80, 0x007F),
            F8E5M2 => Rule::ieee(1, 0x7C, 0x03),
            // E4M3FN: exponent and mantissa all ones is NaN (either sign); there is no infinity.
            F8E4M3FN => Rule::nan_only(0x7F, 0x7F),
            // FNUZ: the negative-zero encoding 0x80 is the one NaN; E8M0: 0xFF is.
            F8E4M3FNUZ | F8E5M2FNUZ => Rule::nan_only(0xFF, 0x80),
            F8E8M0 => Rule::nan_only(0xFF, 0xFF),
            Complex64 => complex(F32),
            Complex128 => complex(F64),
            U8 | I8 | U16 | I16 | I32 | I64 | U32 | U64 | U4 | I4 | Bool | String | F4E2M1 => {
                return None
            }
        })
    }

    fn kind(&self, bits: u64) -> Kind {
        if !self.has_inf || bits & self.mantissa != 0 {
            Kind::Nan
        } else if bits & self.sign != 0 {
            Kind::NegInf
        } else {
            Kind::PosInf
        }
    }

    /// The first non-finite element of `raw` (whole components of this rule): its element index within
    /// `raw` and what it holds.
    pub fn first_non_finite(&self, raw: &[u8]) -> Option<(u64, Kind)> {
        let component = match self.width {
            1 => first_match::<u8>(raw, self.mask, self.value),
            2 => first_match::<u16>(raw, self.mask, self.value),
            4 => first_match::<u32>(raw, self.mask, self.value),
            _ => first_match::<u64>(raw, self.mask, self.value),
        }?;
        let at = component * self.width;
        let mut bytes = [0u8; 8];
        bytes[..self.width].copy_from_slice(&raw[at..at + self.width]);
        let bits = u64::from_le_bytes(bytes);
        Some((component as u64 / self.components, self.kind(bits)))
    }
}

/// Little-endian words of the scanned widths.
trait Word: Copy + Eq + std::ops::BitAnd<Output = Self> {
    const BYTES: usize;
    fn read(bytes: &[u8]) -> Self;
    fn truncate(v: u64) -> Self;
}

macro_rules! word {
    ($t:ty) => {
        impl Word for $t {
            const BYTES: usize = std::mem::size_of::<$t>();
            fn read(bytes: &[u8]) -> Self {
                <$t>::from_le_bytes(bytes.try_into().expect("a whole word"))
            }
            fn truncate(v: u64) -> Self {
                v as $t
            }
        }
    };
}
word!(u8);
word!(u16);
word!(u32);
word!(u64);

/// Index of the first word with `w & mask == value`. Blocks are tested without early exit (which the
/// compiler vectorizes), and only a block that has a match is searched word by word.
fn first_match<W: Word>(raw: &[u8], mask: u64, value: u64) -> Option<usize> {
    const BLOCK: usize = 4096;
    let (mask, value) = (W::truncate(mask), W::truncate(value));
    let hit = |w: &[u8]| W::read(w) & mask == value;
    raw.chunks(BLOCK * W::BYTES)
        .enumerate()
        .find_map(|(b, block)| {
            let words = block.chunks_exact(W::BYTES);
            if !words.clone().fold(false, |any, w| any | hit(w)) {
                return None;
            }
            words.clone().position(hit).map(|i| b * BLOCK + i)
        })
}

/// What a scan covered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Checked {
    pub tensors: usize,
    pub bytes: u64,
}

/// Check every float initializer of `model` (subgraphs included), read from `source` (the `.onnx` file
/// or checkpoint folder, for naming the file in a refusal).
pub fn check_model(source: &Path, model: &Model, progress: bool) -> Result<Checked> {
    check_tensors(source, &initializers(&model.graph), progress)
}

/// Scan `tensors` in parallel; the error names the first bad element in `tensors` order.
pub fn check_tensors(source: &Path, tensors: &[&Tensor], progress: bool) -> Result<Checked> {
    let scanned: Vec<(&Tensor, Rule, &[u8])> = tensors
        .iter()
        .filter_map(|t| Some((*t, Rule::of(t.dtype)?, &t.raw()?[..])))
        .collect();
    let bytes: u64 = scanned.iter().map(|(_, _, raw)| raw.len() as u64).sum();
    let bar = crate::progress::bytes_bar(bytes, "checking weights", progress);
    let items: Vec<(usize, usize)> = scanned
        .iter()
        .enumerate()
        .flat_map(|(i, (_, _, raw))| (0..raw.len()).step_by(CHUNK).map(move |s| (i, s)))
        .collect();
    let first = items.par_iter().find_map_first(|&(i, start)| {
        let (_, rule, raw) = scanned[i];
        let chunk = &raw[start..(start + CHUNK).min(raw.len())];
        let found = rule.first_non_finite(chunk);
        release_pages(chunk);
        bar.inc(chunk.len() as u64);
        found.map(|(element, kind)| {
            (
                i,
                (start / rule.width) as u64 / rule.components + element,
                kind,
            )
        })
    });
    bar.finish_and_clear();
    match first {
        Some((i, element, kind)) => Err(refusal(source, scanned[i].0, element, kind)),
        None => Ok(Checked {
            tensors: scanned.len(),
            bytes,
        }),
    }
}

/// The tensors `convert` leaves to its weight stream: checkpoint/ONNX weights that reach the output's
/// external data file with their bytes unchanged, scanned chunk by chunk as they are written.
#[derive(Clone, Debug, Default)]
pub struct StreamCheck {
    source: PathBuf,
    tensors: HashSet<String>,
}

/// Where one streamed chunk lies: the tensor's rule and the chunk's first element.
#[derive(Clone, Copy, Debug)]
pub struct ChunkScan {
    rule: Rule,
    first_element: u64,
}

impl ChunkScan {
    /// The first non-finite element of `chunk`, as an index into the whole tensor.
    pub fn run(&self, chunk: &[u8]) -> Option<(u64, Kind)> {
        let (element, kind) = self.rule.first_non_finite(chunk)?;
        Some((self.first_element + element, kind))
    }
}

impl StreamCheck {
    /// The scan of the chunk of `t` starting at byte `offset`, if `t` is checked in the stream.
    pub fn chunk(&self, t: &Tensor, offset: usize) -> Option<ChunkScan> {
        if !self.tensors.contains(&t.name) {
            return None;
        }
        let rule = Rule::of(t.dtype)?;
        Some(ChunkScan {
            rule,
            first_element: (offset / rule.width) as u64 / rule.components,
        })
    }

    /// The refusal for element `element` of `t`.
    pub fn refusal(&self, t: &Tensor, element: u64, kind: Kind) -> anyhow::Error {
        refusal(&self.source, t, element, kind)
    }
}

/// For `convert`: scan now every float initializer of the source model `original` that the weight
/// stream of `output` will not carry verbatim (consumed by a pass, or inline below
/// `external_threshold`), and return the rest for the stream to check.
pub fn check_before_write(
    source: &Path,
    original: &Model,
    output: &Model,
    external_threshold: u64,
) -> Result<StreamCheck> {
    let streamed: HashMap<&str, &Tensor> = initializers(&output.graph)
        .into_iter()
        .filter(|t| crate::onnx::is_streamed(t, external_threshold))
        .map(|t| (t.name.as_str(), t))
        .collect();
    let (later, now): (Vec<&Tensor>, Vec<&Tensor>) = initializers(&original.graph)
        .into_iter()
        .filter(|t| Rule::of(t.dtype).is_some())
        .partition(|t| {
            streamed
                .get(t.name.as_str())
                .is_some_and(|o| same_bytes(o, t))
        });
    check_tensors(source, &now, false)?;
    Ok(StreamCheck {
        source: source.to_path_buf(),
        tensors: later.into_iter().map(|t| t.name.clone()).collect(),
    })
}

/// The same dtype and the very same bytes (a zero-copy pass-through, not equal contents).
fn same_bytes(a: &Tensor, b: &Tensor) -> bool {
    match (&a.data, &b.data) {
        (TensorData::Raw(x), TensorData::Raw(y)) => {
            a.dtype == b.dtype && x.as_ptr() == y.as_ptr() && x.len() == y.len()
        }
        _ => false,
    }
}

/// Initializers of `graph` and of its subgraphs.
fn initializers(graph: &Graph) -> Vec<&Tensor> {
    let mut out: Vec<&Tensor> = graph.initializers.iter().collect();
    for node in &graph.nodes {
        for sub in node.subgraphs() {
            out.extend(initializers(sub));
        }
    }
    out
}

fn refusal(source: &Path, t: &Tensor, element: u64, kind: Kind) -> anyhow::Error {
    anyhow::anyhow!(
        "tensor '{}' ({} {:?}) in {} holds {kind} at flat index {element} (index {:?}): a non-finite \
         weight makes every output garbage (and quantization would hide it); re-export or repair the \
         checkpoint",
        t.name,
        t.dtype,
        t.dims,
        origin(source, &t.name),
        unravel(element, &t.dims)
    )
}

/// The multi-dimensional index of flat (row-major) index `flat` in `dims`.
pub fn unravel(mut flat: u64, dims: &[i64]) -> Vec<u64> {
    let mut index = vec![0u64; dims.len()];
    for (i, &d) in dims.iter().enumerate().rev() {
        let d = d.max(1) as u64;
        index[i] = flat % d;
        flat /= d;
    }
    index
}

/// The file holding tensor `name` of the model read from `source`, quoted, or what made the tensor.
fn origin(source: &Path, name: &str) -> String {
    let found = if source.is_dir() {
        shard_holding(source, name)
    } else {
        onnx_file_holding(source, name)
    };
    match found {
        Some(file) => format!("'{}'", file.display()),
        None if source.is_dir() => format!(
            "the graph built from '{}' (not a checkpoint tensor)",
            source.display()
        ),
        None => format!("'{}'", source.display()),
    }
}

fn shard_holding(dir: &Path, name: &str) -> Option<PathBuf> {
    use crate::checkpoint::{read_shard, INDEX, WEIGHTS};
    let index = dir.join(INDEX);
    let file = if index.is_file() {
        let text = std::fs::read_to_string(&index).ok()?;
        let index: serde_json::Value = serde_json::from_str(&text).ok()?;
        dir.join(index["weight_map"][name].as_str()?)
    } else {
        dir.join(WEIGHTS)
    };
    let tensors = read_shard(&file).ok()?;
    tensors.iter().any(|t| t.name == name).then_some(file)
}

/// The `.onnx` file itself for inline data, or the external data file its entry names.
fn onnx_file_holding(path: &Path, name: &str) -> Option<PathBuf> {
    use crate::onnx::proto::{self, ModelProto};
    use prost::Message;
    let file = std::fs::File::open(path).ok()?;
    let model = ModelProto::decode(crate::onnx::external::map_file(&file).ok()?).ok()?;
    let tensor = find_initializer(model.graph.as_ref()?, name)?;
    if tensor.data_location != proto::DATA_LOCATION_EXTERNAL {
        return Some(path.to_path_buf());
    }
    let r = crate::onnx::external::ExternalRef::parse(name, &tensor.external_data).ok()?;
    Some(path.parent().unwrap_or(Path::new("")).join(r.location))
}

fn find_initializer<'a>(
    graph: &'a crate::onnx::proto::GraphProto,
    name: &str,
) -> Option<&'a crate::onnx::proto::TensorProto> {
    graph
        .initializer
        .iter()
        .find(|t| t.name == name)
        .or_else(|| {
            graph.node.iter().flat_map(|n| &n.attribute).find_map(|a| {
                a.g.iter()
                    .chain(&a.graphs)
                    .find_map(|g| find_initializer(g, name))
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    fn first(dtype: DataType, raw: &[u8]) -> Option<(u64, Kind)> {
        Rule::of(dtype).unwrap().first_non_finite(raw)
    }

    fn le<T: Copy, const N: usize>(values: &[T], bytes: impl Fn(T) -> [u8; N]) -> Vec<u8> {
        values.iter().flat_map(|&v| bytes(v)).collect()
    }

    #[test]
    fn f32_and_f64_extremes_are_finite_and_specials_are_named() {
        let finite = [f32::MAX, f32::MIN, f32::MIN_POSITIVE, 1e-45, -0.0, 0.0];
        assert_eq!(first(DataType::F32, &le(&finite, f32::to_le_bytes)), None);
        for (bad, kind) in [
            (f32::NAN, Kind::Nan),
            (-f32::NAN, Kind::Nan),
            (f32::from_bits(0x7F80_0001), Kind::Nan), // signalling NaN, smallest payload
            (f32::INFINITY, Kind::PosInf),
            (f32::NEG_INFINITY, Kind::NegInf),
        ] {
            let v = [1.0, 2.0, bad, f32::NAN];
            assert_eq!(
                first(DataType::F32, &le(&v, f32::to_le_bytes)),
                Some((2, kind)),
                "{bad}"
            );
        }
        let finite = [f64::MAX, f64::MIN, 5e-324, -0.0];
        assert_eq!(first(DataType::F64, &le(&finite, f64::to_le_bytes)), None);
        let v = [0.5, f64::NEG_INFINITY];
        assert_eq!(
            first(DataType::F64, &le(&v, f64::to_le_bytes)),
            Some((1, Kind::NegInf))
        );
        let v = [f64::from_bits(0x7FF8_0000_0000_0001)];
        assert_eq!(
            first(DataType::F64, &le(&v, f64::to_le_bytes)),
            Some((0, Kind::Nan))
        );
    }

    #[test]
    fn f16_max_and_subnormals_are_finite() {
        let finite = [
            f16::MAX,               // 65504
            f16::MIN,               // -65504
            f16::from_bits(0x0001), // smallest subnormal
            f16::from_bits(0x83FF), // largest negative subnormal
            f16::from_f32(1.0),
        ];
        assert_eq!(first(DataType::F16, &le(&finite, f16::to_le_bytes)), None);
        assert_eq!(f16::MAX.to_f32(), 65504.0);
        let v = [f16::ONE, f16::from_bits(0x7C00), f16::NAN];
        assert_eq!(
            first(DataType::F16, &le(&v, f16::to_le_bytes)),
            Some((1, Kind::PosInf))
        );
        let v = [f16::from_bits(0xFC00)];
        assert_eq!(
            first(DataType::F16, &le(&v, f16::to_le_bytes)),
            Some((0, Kind::NegInf))
        );
        let v = [f16::from_bits(0x7E01)];
        assert_eq!(
            first(DataType::F16, &le(&v, f16::to_le_bytes)),
            Some((0, Kind::Nan))
        );
    }

    #[test]
    fn bf16_nan_payloads_and_extremes() {
        let finite = [
            bf16::MAX,
            bf16::MIN,
            bf16::from_bits(0x0001), // subnormal
            bf16::from_bits(0x8000), // -0
        ];
        assert_eq!(first(DataType::BF16, &le(&finite, bf16::to_le_bytes)), None);
        // Every mantissa payload of an all-ones exponent is a NaN, either sign; zero mantissa is Inf.
        for payload in [0x01u16, 0x40, 0x7F] {
            for sign in [0u16, 0x8000] {
                let v = [bf16::ONE, bf16::from_bits(sign | 0x7F80 | payload)];
                assert_eq!(
                    first(DataType::BF16, &le(&v, bf16::to_le_bytes)),
                    Some((1, Kind::Nan)),
                    "{payload:#x}"
                );
            }
        }
        let v = [bf16::from_bits(0xFF80)];
        assert_eq!(
            first(DataType::BF16, &le(&v, bf16::to_le_bytes)),
            Some((0, Kind::NegInf))
        );
    }

    #[test]
    fn float8_encodings() {
        // E4M3FN: 0x7E = 448 and 0xFE = -448 are finite, 0x7F / 0xFF are NaN, there is no Inf.
        assert_eq!(first(DataType::F8E4M3FN, &[0x7E, 0xFE, 0x78, 0x01]), None);
        assert_eq!(
            first(DataType::F8E4M3FN, &[0x00, 0xFF]),
            Some((1, Kind::Nan))
        );
        assert_eq!(first(DataType::F8E4M3FN, &[0x7F]), Some((0, Kind::Nan)));
        // E5M2: 0x7B = 57344 is finite, 0x7C = +Inf, 0xFC = -Inf, 0x7D.. = NaN.
        assert_eq!(first(DataType::F8E5M2, &[0x7B, 0xFB, 0x01]), None);
        assert_eq!(first(DataType::F8E5M2, &[0x7C]), Some((0, Kind::PosInf)));
        assert_eq!(
            first(DataType::F8E5M2, &[0x00, 0xFC]),
            Some((1, Kind::NegInf))
        );
        assert_eq!(first(DataType::F8E5M2, &[0xFE]), Some((0, Kind::Nan)));
        // FNUZ: only 0x80 is NaN (0xFF is a finite negative); E8M0: only 0xFF.
        for d in [DataType::F8E4M3FNUZ, DataType::F8E5M2FNUZ] {
            assert_eq!(first(d, &[0x7F, 0xFF, 0x00]), None);
            assert_eq!(first(d, &[0x7F, 0x80]), Some((1, Kind::Nan)));
        }
        assert_eq!(first(DataType::F8E8M0, &[0x00, 0xFE]), None);
        assert_eq!(first(DataType::F8E8M0, &[0xFF]), Some((0, Kind::Nan)));
    }

    #[test]
    fn complex_elements_are_pairs_and_integers_are_skipped() {
        let v = [1.0f32, 2.0, 3.0, f32::INFINITY];
        assert_eq!(
            first(DataType::Complex64, &le(&v, f32::to_le_bytes)),
            Some((1, Kind::PosInf))
        );
        for d in [
            DataType::I32,
            DataType::U8,
            DataType::Bool,
            DataType::F4E2M1,
        ] {
            assert_eq!(Rule::of(d), None, "{d}");
        }
    }

    #[test]
    fn the_first_bad_element_is_found_across_blocks_and_chunks() {
        // Beyond the first 4096-word block, and a second bad value later that must not win.
        let mut v = vec![bf16::ONE; 3 * CHUNK / 2 + 5];
        v[3 * CHUNK / 2 + 1] = bf16::NAN;
        v[9000] = bf16::NEG_INFINITY;
        let raw = le(&v, bf16::to_le_bytes);
        assert_eq!(first(DataType::BF16, &raw), Some((9000, Kind::NegInf)));
        let t = Tensor::from_raw("w", DataType::BF16, vec![v.len() as i64], raw.into()).unwrap();
        // Parallel scan over 8 MiB chunks: the element in the second chunk is reported by its tensor
        // index, and the earlier one wins.
        let err = check_tensors(Path::new("m.onnx"), &[&t], false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("-Inf at flat index 9000 (index [9000])"),
            "{err}"
        );
        let mut v = vec![bf16::ONE; 3 * CHUNK / 2 + 5];
        v[3 * CHUNK / 2 + 1] = bf16::NAN;
        let t = Tensor::from_raw(
            "w",
            DataType::BF16,
            vec![v.len() as i64],
            le(&v, bf16::to_le_bytes).into(),
        )
        .unwrap();
        let err = check_tensors(Path::new("m.onnx"), &[&t], false)
            .unwrap_err()
            .to_string();
        let at = 3 * CHUNK / 2 + 1;
        assert!(err.contains(&format!("NaN at flat index {at} ")), "{err}");
    }

    #[test]
    fn refusals_name_the_multi_dimensional_index() {
        let mut v = vec![0.5f32; 24];
        v[17] = f32::INFINITY; // [1, 1, 1] in [2, 3, 4]
        let t = Tensor::from_f32("blocks.0.w", vec![2, 3, 4], &v);
        let ok = Tensor::from_f32("b", vec![2], &[1.0, 2.0]);
        let ints = Tensor::from_i64("shape", vec![1], &[-1]);
        let err = check_tensors(Path::new("m.onnx"), &[&ok, &ints, &t], false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tensor 'blocks.0.w' (f32 [2, 3, 4]) in 'm.onnx' holds +Inf at flat index 17 (index [1, 1, 1])"),
            "{err}"
        );
        assert_eq!(unravel(0, &[]), Vec::<u64>::new());
        assert_eq!(unravel(23, &[2, 3, 4]), vec![1, 2, 3]);
        let fine = check_tensors(Path::new("m.onnx"), &[&ok, &ints], false).unwrap();
        assert_eq!(
            fine,
            Checked {
                tensors: 1,
                bytes: 8
            }
        );
    }

    /// `convert`'s split: weights the stream carries unchanged are left to the writer, which refuses
    /// them before anything is committed; weights a pass replaced are scanned before the write.
    #[test]
    fn streamed_weights_are_refused_by_the_writer_and_consumed_ones_before_it() {
        use crate::ir::Graph;
        use crate::onnx::{write_model, WriteOptions};
        use crate::output::Staging;
        let mut values = vec![0.5f32; 1000];
        values[999] = f32::NAN;
        let w = Tensor::from_f32("w", vec![10, 100], &values);
        let b = Tensor::from_f32("b", vec![4], &[1.0; 4]);
        let m = Model::new(
            Graph {
                initializers: vec![w, b],
                ..Graph::default()
            },
            17,
        );
        let source = Path::new("m.onnx");
        let check = check_before_write(source, &m, &m, 1024).unwrap();
        assert_eq!(check.tensors, HashSet::from(["w".to_string()]));
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("bundle");
        let mut staging = Staging::new(&out).unwrap();
        let options = WriteOptions {
            external_threshold: 1024,
            progress: false,
            finite: Some(check),
        };
        let err = write_model(&m, &mut staging, "model.onnx", &options)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tensor 'w' (f32 [10, 100]) in 'm.onnx' holds NaN at flat index 999 (index [9, 99])"),
            "{err}"
        );
        drop(staging);
        assert!(!out.exists());
        // A pass replaced w (other bytes): the source's w is scanned before any writing.
        let mut passed = m.clone();
        passed.graph.initializers[0] = Tensor::from_f32("w", vec![10, 100], &[0.5; 1000]);
        let err = check_before_write(source, &m, &passed, 1024)
            .unwrap_err()
            .to_string();
        assert!(err.contains("NaN at flat index 999"), "{err}");
        // Inline (below the threshold): scanned before the write as well.
        let err = check_before_write(source, &m, &m, 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(err.contains("NaN at flat index 999"), "{err}");
    }
}
