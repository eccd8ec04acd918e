//! Graph builders: a diffusers checkpoint folder (config.json + safetensors) turned into the same
//! computation diffusers runs, as an IR graph whose initializers are the checkpoint's tensors
//! (zero-copy slices of the memory-mapped files, in their stored dtype).
//!
//! diffusers' model code is the specification; each family lives in its own file:
//! [`latte`], [`dit`], [`pixart`], [`wan`], [`cogvideox`], [`hunyuan_video`]. Nodes are named by module path
//! (`transformer_blocks.3.attn1.to_q`), attention is written as MatMul -> Softmax -> MatMul so the
//! structure analysis finds and classifies every site, and shapes come from [`BuildOptions`]
//! (defaults per family, documented in the README) with an optional dynamic batch axis.
//!
//! Anything the builder does not reproduce exactly is refused: unknown `_class_name`, unknown config
//! keys, unsupported config values, and checkpoints whose tensors differ from what the config implies
//! (every missing, misshapen and unexpected tensor is listed).

mod basic_block;
mod cogvideox;
mod dit;
pub mod embed;
mod graph_builder;
mod hunyuan_video;
mod latte;
mod layers;
mod pixart;
mod wan;

use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Serialize};

use crate::checkpoint::Checkpoint;
use crate::ir::{AttrValue, DataType, Dim, Model};
pub use graph_builder::GraphBuilder;

/// ONNX opset of built graphs: LayerNormalization (17) without opset 18's Reduce/Split input changes.
pub const OPSET: i64 = 17;

/// Input shapes of the built graph, in latent units (what the transformer sees, after the VAE). Also the
/// command line's shape options (ignored for `.onnx` files, which carry their own shapes).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize, clap::Args)]
#[command(next_help_heading = "Shapes and input types when MODEL is a diffusers checkpoint folder")]
pub struct BuildOptions {
    /// Batch size [default: 1]; with --dynamic-batch, the largest batch of the TensorRT profile in the
    /// manifest's trtexec command [default: 2, as classifier-free guidance runs]
    #[arg(long)]
    pub batch: Option<i64>,
    /// Leave the batch axis symbolic ("batch"); the manifest's trtexec command then builds a profile
    /// for batches 1..=--batch
    #[arg(long)]
    pub dynamic_batch: bool,
    /// Latent frames [default: Latte: video_length; Wan: 21 (81 video frames); CogVideoX: 13;
    /// HunyuanVideo: 33 (129 video frames)]
    #[arg(long)]
    pub frames: Option<i64>,
    /// Latent height [default: sample_size; Wan: 60 (480 px); CogVideoX: sample_height;
    /// HunyuanVideo: 90 (720 px)]
    #[arg(long)]
    pub height: Option<i64>,
    /// Latent width [default: sample_size; Wan: 104 (832 px); CogVideoX: sample_width;
    /// HunyuanVideo: 160 (1280 px)]
    #[arg(long)]
    pub width: Option<i64>,
    /// Text tokens of encoder_hidden_states [default: Latte/PixArt 120, Wan 512, CogVideoX
    /// max_text_seq_length, HunyuanVideo 256]
    #[arg(long)]
    pub text_len: Option<i64>,
    /// Type of the `timestep` input [default: float32 for flow-matching families (Wan, HunyuanVideo:
    /// pipelines pass sigma x 1000 unrounded), int64 for Latte, DiT, PixArt, CogVideoX]
    #[arg(long, value_enum)]
    #[serde(default)]
    pub timestep_dtype: Option<TimestepDtype>,
    /// Image tokens of encoder_hidden_states_image (Wan image-to-video) [default: 257, the CLIP
    /// ViT-H/14 hidden states WanImageToVideoPipeline passes]
    #[arg(long)]
    #[serde(default)]
    pub image_len: Option<i64>,
    /// Wan: one timestep per video token, `timestep` [B, tokens] (Wan2.2 TI2V's pipeline with
    /// `expand_timesteps`)
    #[arg(long)]
    #[serde(default)]
    pub timestep_per_token: bool,
    /// CogVideoX with use_rotary_positional_embeddings: `pipeline` bakes the rotary tables that
    /// CogVideoXPipeline passes for these shapes; `none` builds the transformer's forward without
    /// `image_rotary_emb` (no positions) [default: pipeline]
    #[arg(long, value_enum)]
    #[serde(default)]
    pub rotary_emb: Option<RotaryEmb>,
}

/// Where a CogVideoX graph's rotary tables come from (see [`BuildOptions::rotary_emb`]).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum RotaryEmb {
    Pipeline,
    None,
}

/// The type of a built graph's `timestep` input.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum TimestepDtype {
    Int64,
    Float32,
}

impl From<TimestepDtype> for DataType {
    fn from(t: TimestepDtype) -> DataType {
        match t {
            TimestepDtype::Int64 => DataType::I64,
            TimestepDtype::Float32 => DataType::F32,
        }
    }
}

impl BuildOptions {
    /// (min, opt, max) of a symbolic batch axis for TensorRT's optimisation profile.
    pub fn batch_range(&self) -> (i64, i64, i64) {
        let max = self.batch.unwrap_or(if self.dynamic_batch { 2 } else { 1 });
        (1, max, max)
    }

    /// Input dims: the batch axis, then `rest`.
    pub fn dims(&self, rest: &[i64]) -> Vec<Dim> {
        let batch = if self.dynamic_batch {
            Dim::Param("batch".into())
        } else {
            Dim::Value(self.batch.unwrap_or(1))
        };
        std::iter::once(batch)
            .chain(rest.iter().map(|&d| Dim::Value(d)))
            .collect()
    }

    /// The `timestep` input's type: `--timestep-dtype`, else the family's `default`.
    fn timestep_dtype(&self, default: TimestepDtype) -> DataType {
        self.timestep_dtype.unwrap_or(default).into()
    }

    fn latent_size(&self, default_h: i64, default_w: i64) -> (i64, i64) {
        (
            self.height.unwrap_or(default_h),
            self.width.unwrap_or(default_w),
        )
    }

    fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("batch", self.batch),
            ("frames", self.frames),
            ("height", self.height),
            ("width", self.width),
            ("text-len", self.text_len),
            ("image-len", self.image_len),
        ] {
            if let Some(v) = v {
                if !(1..=1 << 20).contains(&v) {
                    bail!("--{name} {v} is out of range (1..=1048576)");
                }
            }
        }
        Ok(())
    }
}

/// One model family: its diffusers class name and how to build its graph.
trait Family {
    const CLASS: &'static str;
    /// The `timestep` input's type unless `--timestep-dtype` says otherwise: int64 (diffusers' pipelines
    /// of these families pass integer timesteps); flow-matching families override it with float32.
    const TIMESTEP_DTYPE: TimestepDtype = TimestepDtype::Int64;
    fn build(config: &serde_json::Value, opts: &BuildOptions, b: &mut GraphBuilder) -> Result<()>;
}

/// The class names [`build_model`] accepts.
pub const CLASSES: &[&str] = &[
    latte::Latte::CLASS,
    dit::Dit::CLASS,
    pixart::PixArt::CLASS,
    wan::Wan::CLASS,
    cogvideox::CogVideoX::CLASS,
    hunyuan_video::HunyuanVideo::CLASS,
];

/// Read `path`: an ONNX file, or a diffusers checkpoint folder built with `opts`.
pub fn read_model_or_checkpoint(path: &std::path::Path, opts: &BuildOptions) -> Result<Model> {
    if path.is_dir() {
        if crate::checkpoint::is_checkpoint_dir(path) {
            return build_model(&Checkpoint::open(path)?, opts);
        }
        bail!(
            "'{}' is a folder but not a diffusers checkpoint (config.json + {} or {}); give an .onnx file or a checkpoint folder",
            path.display(),
            crate::checkpoint::WEIGHTS,
            crate::checkpoint::INDEX
        );
    }
    if *opts != BuildOptions::default() {
        bail!("--batch/--dynamic-batch/--frames/--height/--width/--text-len/--image-len/--timestep-per-token/--rotary-emb/--timestep-dtype apply to diffusers checkpoint folders; '{}' is an ONNX file with its own shapes and types", path.display());
    }
    crate::onnx::read_model(path)
}

/// Build the graph of a diffusers checkpoint.
pub fn build_model(ckpt: &Checkpoint, opts: &BuildOptions) -> Result<Model> {
    opts.validate()?;
    let mut b = GraphBuilder::new(&ckpt.class_name, ckpt.tensors.clone());
    let build = match ckpt.class_name.as_str() {
        latte::Latte::CLASS => latte::Latte::build,
        dit::Dit::CLASS => dit::Dit::build,
        pixart::PixArt::CLASS => pixart::PixArt::build,
        wan::Wan::CLASS => wan::Wan::build,
        cogvideox::CogVideoX::CLASS => cogvideox::CogVideoX::build,
        hunyuan_video::HunyuanVideo::CLASS => hunyuan_video::HunyuanVideo::build,
        other => bail!(
            "'{}': _class_name '{other}' has no graph builder (ditc builds {})",
            ckpt.dir.join("config.json").display(),
            CLASSES.join(", ")
        ),
    };
    let context = || format!("building {} from '{}'", ckpt.class_name, ckpt.dir.display());
    build(&ckpt.config, opts, &mut b).with_context(context)?;
    let graph = b.finish(&ckpt.class_name).with_context(context)?;
    let mut model = Model::new(graph, OPSET);
    model.producer_name = "ditc".into();
    model.producer_version = env!("CARGO_PKG_VERSION").into();
    model.doc_string = format!(
        "{} built from a diffusers checkpoint by ditc",
        ckpt.class_name
    );
    // The files the weights live in (reported as the source in manifests).
    model.external_files = ckpt.files.clone();
    crate::ir::check_graph(&model.graph).context("the built graph is malformed (a ditc bug)")?;
    Ok(model)
}

/// `config` as `T`, refusing keys `T` does not know (diffusers' own `_`-prefixed keys aside) with one
/// error that lists them all.
fn parse_config<T: DeserializeOwned + Serialize + Default>(
    config: &serde_json::Value,
    class: &str,
) -> Result<T> {
    let known = serde_json::to_value(T::default())?;
    let known = known.as_object().expect("configs are structs");
    let obj = config.as_object().context("config.json is not an object")?;
    let unknown: Vec<&String> = obj
        .keys()
        .filter(|k| !k.starts_with('_') && !known.contains_key(*k))
        .collect();
    if !unknown.is_empty() {
        bail!(
            "config.json has keys the {class} builder does not know: {} (known: {})",
            unknown
                .iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            known
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    check_config_numbers(obj)?;
    let filtered: serde_json::Map<String, serde_json::Value> = obj
        .iter()
        .filter(|(k, _)| !k.starts_with('_'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    serde_json::from_value(serde_json::Value::Object(filtered))
        .context("config.json has a value of the wrong type")
}

/// Largest integer a config may hold (sizes, counts): keeps every product of a few of them in i64 and
/// every table a builder computes bounded, whatever a hostile config.json says.
const MAX_CONFIG_INT: i64 = 1 << 20;
const MAX_LAYERS: i64 = 1024;
/// Largest constant table (positions, rotary angles) a build may compute, in elements.
const MAX_TABLE: i64 = 1 << 26;

/// Integers in config.json (also inside arrays) must be 1..=2^20 (0 only for `freq_shift`), and
/// `num_layers` at most 1024.
fn check_config_numbers(obj: &serde_json::Map<String, serde_json::Value>) -> Result<()> {
    for (key, value) in obj.iter().filter(|(k, _)| !k.starts_with('_')) {
        let values: Vec<&serde_json::Value> = match value {
            serde_json::Value::Array(items) => items.iter().collect(),
            v => vec![v],
        };
        for v in values {
            if !v.is_number() || v.is_f64() {
                continue;
            }
            let min = if key == "freq_shift" { 0 } else { 1 };
            let max = if key == "num_layers" {
                MAX_LAYERS
            } else {
                MAX_CONFIG_INT
            };
            match v.as_i64() {
                Some(n) if (min..=max).contains(&n) => {}
                _ => bail!("config.json: \"{key}\" = {v} is out of range ({min}..={max})"),
            }
        }
    }
    Ok(())
}

/// heads x head_dim, refused above 65536 (the largest published DiTs use about 5000).
fn inner_dim(heads: i64, head_dim: i64) -> Result<i64> {
    match heads.checked_mul(head_dim) {
        Some(d) if d <= 1 << 16 => Ok(d),
        _ => bail!("num_attention_heads {heads} x attention_head_dim {head_dim} is above the supported inner dim 65536"),
    }
}

/// A constant table of `rows x cols` elements, refused above [`MAX_TABLE`].
fn check_table(what: &str, rows: i64, cols: i64) -> Result<()> {
    match rows.checked_mul(cols) {
        Some(n) if n <= MAX_TABLE => Ok(()),
        _ => bail!("the {what} table would have {rows} x {cols} elements (limit {MAX_TABLE}): the shapes are too large"),
    }
}

/// `size` (named `what`) must be a multiple of `by` (named `of`).
fn check_divisible(what: &str, size: i64, by: i64, of: &str) -> Result<()> {
    if by <= 0 || size % by != 0 {
        bail!("{what} {size} is not a multiple of {by} ({of})");
    }
    Ok(())
}

/// The 2-D patch grid of a `height x width` latent, checked: divisible by the patch, and a sincos
/// table of `h*w x dim` within bounds (its dim a multiple of 4, as the 2-D sincos split needs).
struct PatchGrid {
    p: i64,
    h: i64,
    w: i64,
}

impl PatchGrid {
    fn new(height: i64, width: i64, p: i64, dim: i64) -> Result<PatchGrid> {
        check_divisible("height", height, p, "the patch size")?;
        check_divisible("width", width, p, "the patch size")?;
        check_divisible("the inner dim", dim, 4, "2-D sincos positions need it")?;
        let (h, w) = (height / p, width / p);
        check_table("position", h * w, dim)?;
        Ok(PatchGrid { p, h, w })
    }

    fn tokens(&self) -> i64 {
        self.h * self.w
    }
}

/// diffusers' `PatchEmbed` at `pos_embed`: Conv2d patches (kernel = stride = patch) as tokens
/// [B', N, dim], plus the 2-D sincos table for this grid (`base_size` and `interpolation_scale` as the
/// model sets them).
fn patch_embed_sincos(
    b: &mut GraphBuilder,
    x: &str,
    cin: i64,
    dim: i64,
    grid: &PatchGrid,
    base_size: f64,
    interpolation_scale: f64,
) -> String {
    let (p, n) = (grid.p, grid.tokens());
    let w = b.weight("pos_embed.proj.weight", &[dim, cin, p, p]);
    let bias = b.weight("pos_embed.proj.bias", &[dim]);
    let y = b.op(
        "pos_embed.proj",
        "Conv",
        &[x, &w, &bias],
        vec![
            ("kernel_shape", AttrValue::Ints(vec![p, p])),
            ("strides", AttrValue::Ints(vec![p, p])),
        ],
    );
    let y = b.reshape("pos_embed/flatten", &y, &[-1, dim, n]);
    let y = b.transpose("pos_embed/tokens", &y, &[0, 2, 1]);
    let table = embed::sincos_2d(
        dim as usize,
        grid.h as usize,
        grid.w as usize,
        base_size,
        interpolation_scale,
    );
    let pos = b.const_f32("pos_embed.pos_embed", vec![1, n, dim], &table);
    b.add("pos_embed/add", &y, &pos)
}

/// `AdaLayerNormSingle` without additional conditions: `(linear(silu(emb)) [B, 6*dim], emb [B, dim])`.
fn ada_norm_single(b: &mut GraphBuilder, path: &str, timestep: &str, dim: i64) -> (String, String) {
    let proj = b.timestep_proj(&format!("{path}.emb.time_proj"), timestep, 256, true, 0.0);
    let emb = b.timestep_embedding(&format!("{path}.emb.timestep_embedder"), &proj, 256, dim);
    let act = b.silu(&format!("{path}.silu"), &emb);
    let t6 = b.linear(&format!("{path}.linear"), &act, &[-1], dim, 6 * dim, true);
    (t6, emb)
}

/// `PixArtAlphaTextProjection` (linear_1, tanh-GELU, linear_2) on [B, len, in] -> [B, len, dim].
fn caption_projection(
    b: &mut GraphBuilder,
    path: &str,
    x: &str,
    len: i64,
    in_f: i64,
    dim: i64,
) -> String {
    let lead = layers::tokens(len);
    let h = b.linear(&format!("{path}.linear_1"), x, &lead, in_f, dim, true);
    let h = b.gelu_tanh(&format!("{path}.act_1"), &h);
    b.linear(&format!("{path}.linear_2"), &h, &lead, dim, dim, true)
}

/// The adaLN-single final layer (PixArt, Latte, Wan): shift/scale from the model's `scale_shift_table`
/// value `table` (2 rows of `dim`) + the timestep embedding [B', dim], LayerNorm (no affine, `eps`),
/// modulation, then `proj_out` from `dim` to `out` features on `n` tokens.
fn final_layer_single(
    b: &mut GraphBuilder,
    x: &str,
    t_emb: &str,
    table: &str,
    eps: f64,
    [n, dim, out]: [i64; 3],
) -> String {
    let axis = b.const_i64("norm_out/axis", &[1]);
    let t = b.op("norm_out/unsqueeze", "Unsqueeze", &[t_emb, &axis], vec![]);
    let mods = b.add("norm_out/modulation", table, &t);
    let parts = b.chunk("norm_out/chunks", &mods, 2, 1);
    let normed = b.layer_norm("norm_out", x, dim, eps, false, false);
    let normed = b.modulate("norm_out/modulate", &normed, &parts[1], &parts[0]);
    b.linear("proj_out", &normed, &layers::tokens(n), dim, out, true)
}

/// Tokens [B', h*w, p*p*C] back to images [B', C, h*p, w*p] (diffusers' `nhwpqc->nchpwq`).
fn unpatchify_2d(b: &mut GraphBuilder, x: &str, h: i64, w: i64, p: i64, c: i64) -> String {
    let x = b.reshape("unpatchify/grid", x, &[-1, h, w, p, p, c]);
    let x = b.transpose("unpatchify/permute", &x, &[0, 5, 1, 3, 2, 4]);
    b.reshape("unpatchify", &x, &[-1, c, h * p, w * p])
}
