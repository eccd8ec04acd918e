//! The tensor names and shapes of a real HunyuanVideo checkpoint: the parameters diffusers 0.42.1's
//! `HunyuanVideoTransformer3DModel` registers, module by module as its modeling code builds them
//! (written from `transformer_hunyuan_video.py`, not from ditc's builder), for the published
//! `hunyuanvideo-community/HunyuanVideo` transformer config (13B) or the same with fewer blocks.
//! Shared by the real-layout test (`tests/model_families.rs`) and the `checkpoint_scale` bench.
#![allow(dead_code)]

/// The config values that decide the layout.
pub struct Layout {
    pub in_channels: u64,
    pub out_channels: u64,
    pub heads: u64,
    pub head_dim: u64,
    pub layers: u64,
    pub single_layers: u64,
    pub refiner_layers: u64,
    pub mlp_ratio: f64,
    pub patch_size: u64,
    pub patch_size_t: u64,
    pub guidance_embeds: bool,
    pub text_embed_dim: u64,
    pub pooled_projection_dim: u64,
}

/// `hunyuanvideo-community/HunyuanVideo`'s `transformer/config.json`, as published.
pub fn published_config() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "HunyuanVideoTransformer3DModel",
        "_diffusers_version": "0.32.0.dev0",
        "attention_head_dim": 128,
        "guidance_embeds": true,
        "in_channels": 16,
        "mlp_ratio": 4.0,
        "num_attention_heads": 24,
        "num_layers": 20,
        "num_refiner_layers": 2,
        "num_single_layers": 40,
        "out_channels": 16,
        "patch_size": 2,
        "patch_size_t": 1,
        "pooled_projection_dim": 768,
        "qk_norm": "rms_norm",
        "rope_axes_dim": [16, 56, 56],
        "rope_theta": 256.0,
        "text_embed_dim": 4096
    })
}

impl Layout {
    /// The layout of a config.json (diffusers' defaults where a key is absent).
    pub fn of(config: &serde_json::Value) -> Layout {
        let int = |k: &str, default: u64| config[k].as_u64().unwrap_or(default);
        Layout {
            in_channels: int("in_channels", 16),
            out_channels: int("out_channels", int("in_channels", 16)),
            heads: int("num_attention_heads", 24),
            head_dim: int("attention_head_dim", 128),
            layers: int("num_layers", 20),
            single_layers: int("num_single_layers", 40),
            refiner_layers: int("num_refiner_layers", 2),
            mlp_ratio: config["mlp_ratio"].as_f64().unwrap_or(4.0),
            patch_size: int("patch_size", 2),
            patch_size_t: int("patch_size_t", 1),
            guidance_embeds: config["guidance_embeds"].as_bool().unwrap_or(true),
            text_embed_dim: int("text_embed_dim", 4096),
            pooled_projection_dim: int("pooled_projection_dim", 768),
        }
    }

    fn dim(&self) -> u64 {
        self.heads * self.head_dim
    }

    /// `int(hidden_size * mlp_ratio)`.
    fn mlp(&self) -> u64 {
        (self.dim() as f64 * self.mlp_ratio) as u64
    }

    /// Every parameter's name and shape, in module order.
    pub fn tensors(&self) -> Vec<(String, Vec<u64>)> {
        let mut t = Tensors(Vec::new());
        let (d, c) = (self.dim(), self.in_channels);
        let (p, pt) = (self.patch_size, self.patch_size_t);
        // x_embedder: HunyuanVideoPatchEmbed, Conv3d(in, dim, kernel = stride = (pt, p, p)).
        t.add("x_embedder.proj.weight", vec![d, c, pt, p, p]);
        t.add("x_embedder.proj.bias", vec![d]);
        // context_embedder: HunyuanVideoTokenRefiner(text_embed_dim, heads, head_dim, refiner layers).
        let ce = "context_embedder";
        t.timestep_embedding(&format!("{ce}.time_text_embed.timestep_embedder"), d);
        t.text_projection(
            &format!("{ce}.time_text_embed.text_embedder"),
            self.text_embed_dim,
            d,
        );
        t.linear(&format!("{ce}.proj_in"), self.text_embed_dim, d);
        for i in 0..self.refiner_layers {
            let b = format!("{ce}.token_refiner.refiner_blocks.{i}");
            t.norm_affine(&format!("{b}.norm1"), d);
            for proj in ["to_q", "to_k", "to_v", "to_out.0"] {
                t.linear(&format!("{b}.attn.{proj}"), d, d);
            }
            t.norm_affine(&format!("{b}.norm2"), d);
            // FeedForward(mult=4.0, "linear-silu"): the refiner keeps its default width.
            t.linear(&format!("{b}.ff.net.0.proj"), d, 4 * d);
            t.linear(&format!("{b}.ff.net.2"), 4 * d, d);
            t.linear(&format!("{b}.norm_out.linear"), d, 2 * d);
        }
        // time_text_embed: HunyuanVideoConditionEmbedding.
        t.timestep_embedding("time_text_embed.timestep_embedder", d);
        t.text_projection(
            "time_text_embed.text_embedder",
            self.pooled_projection_dim,
            d,
        );
        if self.guidance_embeds {
            t.timestep_embedding("time_text_embed.guidance_embedder", d);
        }
        let (hd, m) = (self.head_dim, self.mlp());
        for i in 0..self.layers {
            let b = format!("transformer_blocks.{i}");
            t.linear(&format!("{b}.norm1.linear"), d, 6 * d);
            t.linear(&format!("{b}.norm1_context.linear"), d, 6 * d);
            for proj in [
                "to_q",
                "to_k",
                "to_v",
                "add_q_proj",
                "add_k_proj",
                "add_v_proj",
            ] {
                t.linear(&format!("{b}.attn.{proj}"), d, d);
            }
            for norm in ["norm_q", "norm_k", "norm_added_q", "norm_added_k"] {
                t.add(&format!("{b}.attn.{norm}.weight"), vec![hd]);
            }
            t.linear(&format!("{b}.attn.to_out.0"), d, d);
            t.linear(&format!("{b}.attn.to_add_out"), d, d);
            for ff in ["ff", "ff_context"] {
                t.linear(&format!("{b}.{ff}.net.0.proj"), d, m);
                t.linear(&format!("{b}.{ff}.net.2"), m, d);
            }
        }
        for i in 0..self.single_layers {
            let b = format!("single_transformer_blocks.{i}");
            for proj in ["to_q", "to_k", "to_v"] {
                t.linear(&format!("{b}.attn.{proj}"), d, d);
            }
            t.add(&format!("{b}.attn.norm_q.weight"), vec![hd]);
            t.add(&format!("{b}.attn.norm_k.weight"), vec![hd]);
            t.linear(&format!("{b}.norm.linear"), d, 3 * d);
            t.linear(&format!("{b}.proj_mlp"), d, m);
            t.linear(&format!("{b}.proj_out"), d + m, d);
        }
        t.linear("norm_out.linear", d, 2 * d);
        t.linear("proj_out", d, pt * p * p * self.out_channels);
        t.0
    }

    /// The parameter count from the config's arithmetic alone, block by block.
    pub fn parameters_by_arithmetic(&self) -> u64 {
        let (d, m, hd) = (self.dim(), self.mlp(), self.head_dim);
        let lin = |i: u64, o: u64| i * o + o;
        let embedder = |i: u64| lin(i, d) + lin(d, d);
        let patches = d * self.in_channels * self.patch_size_t * self.patch_size.pow(2) + d;
        let refiner_block =
            2 * 2 * d + 4 * lin(d, d) + lin(d, 4 * d) + lin(4 * d, d) + lin(d, 2 * d);
        let refiner = embedder(256)
            + embedder(self.text_embed_dim)
            + lin(self.text_embed_dim, d)
            + self.refiner_layers * refiner_block;
        let condition = embedder(256)
            + embedder(self.pooled_projection_dim)
            + if self.guidance_embeds {
                embedder(256)
            } else {
                0
            };
        let dual = 2 * lin(d, 6 * d) + 8 * lin(d, d) + 4 * hd + 2 * (lin(d, m) + lin(m, d));
        let single = 3 * lin(d, d) + 2 * hd + lin(d, 3 * d) + lin(d, m) + lin(d + m, d);
        let out = lin(d, 2 * d)
            + lin(
                d,
                self.patch_size_t * self.patch_size.pow(2) * self.out_channels,
            );
        patches + refiner + condition + self.layers * dual + self.single_layers * single + out
    }
}

struct Tensors(Vec<(String, Vec<u64>)>);

impl Tensors {
    fn add(&mut self, name: &str, shape: Vec<u64>) {
        self.0.push((name.to_string(), shape));
    }

    /// `nn.Linear(i, o)`: weight [o, i], bias [o].
    fn linear(&mut self, path: &str, i: u64, o: u64) {
        self.add(&format!("{path}.weight"), vec![o, i]);
        self.add(&format!("{path}.bias"), vec![o]);
    }

    /// `nn.LayerNorm(dim, elementwise_affine=True)`.
    fn norm_affine(&mut self, path: &str, dim: u64) {
        self.add(&format!("{path}.weight"), vec![dim]);
        self.add(&format!("{path}.bias"), vec![dim]);
    }

    /// `TimestepEmbedding(256, dim)`.
    fn timestep_embedding(&mut self, path: &str, dim: u64) {
        self.linear(&format!("{path}.linear_1"), 256, dim);
        self.linear(&format!("{path}.linear_2"), dim, dim);
    }

    /// `PixArtAlphaTextProjection(in, dim)`.
    fn text_projection(&mut self, path: &str, i: u64, dim: u64) {
        self.linear(&format!("{path}.linear_1"), i, dim);
        self.linear(&format!("{path}.linear_2"), dim, dim);
    }
}
