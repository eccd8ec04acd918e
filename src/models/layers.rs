//! The layers the DiT families share, written once as ONNX node patterns: linear, norms, activations,
//! timestep embeddings, multi-head attention and feed-forward. Each takes the module path of the
//! PyTorch module it reproduces (`transformer_blocks.3.attn1`) and uses it for node and weight names.
//!
//! Token tensors are `[rows..., features]`; the leading dimensions are passed as `lead` with at most one
//! `-1` (the batch-dependent one), so the same graph serves a dynamic batch axis.

use crate::ir::{AttrValue, DataType};

use super::graph_builder::GraphBuilder;

/// The `lead` dims of a `[B, S, D]` token tensor with batch left to the runtime.
pub fn tokens(seq: i64) -> [i64; 2] {
    [-1, seq]
}

impl GraphBuilder {
    pub fn reshape(&mut self, name: &str, x: &str, dims: &[i64]) -> String {
        let shape = self.const_i64(&format!("{name}/shape"), dims);
        self.op(name, "Reshape", &[x, &shape], vec![])
    }

    pub fn transpose(&mut self, name: &str, x: &str, perm: &[i64]) -> String {
        self.op(
            name,
            "Transpose",
            &[x],
            vec![("perm", AttrValue::Ints(perm.to_vec()))],
        )
    }

    pub fn add(&mut self, name: &str, a: &str, b: &str) -> String {
        self.op(name, "Add", &[a, b], vec![])
    }

    pub fn mul(&mut self, name: &str, a: &str, b: &str) -> String {
        self.op(name, "Mul", &[a, b], vec![])
    }

    pub fn silu(&mut self, name: &str, x: &str) -> String {
        let sig = self.op(&format!("{name}/sigmoid"), "Sigmoid", &[x], vec![]);
        self.mul(name, x, &sig)
    }

    /// GELU with torch's tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    pub fn gelu_tanh(&mut self, name: &str, x: &str) -> String {
        let x2 = self.mul(&format!("{name}/x2"), x, x);
        let x3 = self.mul(&format!("{name}/x3"), &x2, x);
        let c = self.scalar(&format!("{name}/c"), 0.044715);
        let cx3 = self.mul(&format!("{name}/cx3"), &x3, &c);
        let inner = self.add(&format!("{name}/inner"), x, &cx3);
        let k = self.scalar(
            &format!("{name}/k"),
            (2.0f64 / std::f64::consts::PI).sqrt() as f32,
        );
        let scaled = self.mul(&format!("{name}/scaled"), &inner, &k);
        let tanh = self.op(&format!("{name}/tanh"), "Tanh", &[&scaled], vec![]);
        let one = self.scalar(&format!("{name}/one"), 1.0);
        let onep = self.add(&format!("{name}/1p"), &tanh, &one);
        let half = self.scalar(&format!("{name}/half"), 0.5);
        let hx = self.mul(&format!("{name}/hx"), x, &half);
        self.mul(name, &hx, &onep)
    }

    /// `nn.Linear(in, out)` at `path` on `x = [lead..., in]`: a Gemm with transB (the checkpoint's
    /// `[out, in]` weight used as stored, no copy), between reshapes to 2-D and back when `lead` has
    /// more than one dimension.
    pub fn linear(
        &mut self,
        path: &str,
        x: &str,
        lead: &[i64],
        in_f: i64,
        out_f: i64,
        bias: bool,
    ) -> String {
        let w = self.weight(&format!("{path}.weight"), &[out_f, in_f]);
        let b = bias.then(|| self.weight(&format!("{path}.bias"), &[out_f]));
        let flat = if lead.len() > 1 {
            self.reshape(&format!("{path}/flatten"), x, &[-1, in_f])
        } else {
            x.to_string()
        };
        let mut inputs = vec![flat.as_str(), w.as_str()];
        if let Some(b) = &b {
            inputs.push(b);
        }
        let y = self.op(path, "Gemm", &inputs, vec![("transB", AttrValue::Int(1))]);
        if lead.len() > 1 {
            let mut dims = lead.to_vec();
            dims.push(out_f);
            self.reshape(&format!("{path}/unflatten"), &y, &dims)
        } else {
            y
        }
    }

    /// `nn.LayerNorm(dim, eps, elementwise_affine)` over the last axis (ONNX LayerNormalization).
    pub fn layer_norm(
        &mut self,
        path: &str,
        x: &str,
        dim: i64,
        eps: f64,
        affine: bool,
        bias: bool,
    ) -> String {
        let (scale, shift) = if affine {
            let w = self.weight(&format!("{path}.weight"), &[dim]);
            let b = if bias {
                self.weight(&format!("{path}.bias"), &[dim])
            } else {
                self.const_f32(
                    &format!("{path}/zeros"),
                    vec![dim],
                    &vec![0.0; dim as usize],
                )
            };
            (w, b)
        } else {
            (
                self.const_f32(&format!("{path}/ones"), vec![dim], &vec![1.0; dim as usize]),
                self.const_f32(
                    &format!("{path}/zeros"),
                    vec![dim],
                    &vec![0.0; dim as usize],
                ),
            )
        };
        self.op(
            path,
            "LayerNormalization",
            &[x, &scale, &shift],
            vec![
                ("axis", AttrValue::Int(-1)),
                ("epsilon", AttrValue::Float(eps as f32)),
            ],
        )
    }

    /// `nn.RMSNorm(dim, eps)` with weight, over the last axis: x / sqrt(mean(x^2) + eps) * weight.
    pub fn rms_norm(&mut self, path: &str, x: &str, dim: i64, eps: f64) -> String {
        let w = self.weight(&format!("{path}.weight"), &[dim]);
        let sq = self.mul(&format!("{path}/square"), x, x);
        let mean = self.op(
            &format!("{path}/mean"),
            "ReduceMean",
            &[&sq],
            vec![
                ("axes", AttrValue::Ints(vec![-1])),
                ("keepdims", AttrValue::Int(1)),
            ],
        );
        let e = self.scalar(&format!("{path}/eps"), eps as f32);
        let var = self.add(&format!("{path}/var"), &mean, &e);
        let rms = self.op(&format!("{path}/sqrt"), "Sqrt", &[&var], vec![]);
        let normed = self.op(&format!("{path}/normalize"), "Div", &[x, &rms], vec![]);
        self.mul(path, &normed, &w)
    }

    /// `x * (1 + scale) + shift` (adaLN modulation).
    pub fn modulate(&mut self, name: &str, x: &str, scale: &str, shift: &str) -> String {
        let one = self.scalar(&format!("{name}/one"), 1.0);
        let s1 = self.add(&format!("{name}/1p_scale"), scale, &one);
        let scaled = self.mul(&format!("{name}/scale"), x, &s1);
        self.add(name, &scaled, shift)
    }

    /// diffusers' `get_timestep_embedding` of `timestep` [B] (int64, cast to float32; or float32, used as
    /// given): [B, channels] sinusoids with frequencies exp(-ln(10000) i / (channels/2 - shift)) computed
    /// as torch does (float32).
    pub fn timestep_proj(
        &mut self,
        name: &str,
        timestep: &str,
        channels: i64,
        flip_sin_to_cos: bool,
        shift: f32,
    ) -> String {
        let half = channels / 2;
        let ln = -(10000f64.ln()) as f32;
        let freqs: Vec<f32> = (0..half)
            .map(|i| (ln * i as f32 / (half as f32 - shift)).exp())
            .collect();
        let freqs = self.const_f32(&format!("{name}/freqs"), vec![1, half], &freqs);
        let t = if self.input_dtype(timestep) == Some(DataType::F32) {
            timestep.to_string()
        } else {
            self.cast_f32(&format!("{name}/float"), timestep)
        };
        let axis = self.const_i64(&format!("{name}/axis"), &[1]);
        let t = self.op(
            &format!("{name}/unsqueeze"),
            "Unsqueeze",
            &[&t, &axis],
            vec![],
        );
        let args = self.mul(&format!("{name}/args"), &t, &freqs);
        let sin = self.op(&format!("{name}/sin"), "Sin", &[&args], vec![]);
        let cos = self.op(&format!("{name}/cos"), "Cos", &[&args], vec![]);
        let parts = if flip_sin_to_cos {
            [&cos, &sin]
        } else {
            [&sin, &cos]
        };
        self.op(
            name,
            "Concat",
            &[parts[0], parts[1]],
            vec![("axis", AttrValue::Int(-1))],
        )
    }

    /// diffusers' `TimestepEmbedding`: linear_1, SiLU, linear_2 on a [B, in] tensor.
    pub fn timestep_embedding(&mut self, path: &str, x: &str, in_f: i64, dim: i64) -> String {
        let h = self.linear(&format!("{path}.linear_1"), x, &[-1], in_f, dim, true);
        let h = self.silu(&format!("{path}.act"), &h);
        self.linear(&format!("{path}.linear_2"), &h, &[-1], dim, dim, true)
    }

    /// diffusers' `FeedForward` with a tanh-GELU (`net.0.proj`, GELU, `net.2`).
    pub fn feed_forward(
        &mut self,
        path: &str,
        x: &str,
        lead: &[i64],
        dim: i64,
        inner: i64,
        bias: bool,
    ) -> String {
        let h = self.linear(&format!("{path}.net.0.proj"), x, lead, dim, inner, bias);
        let h = self.gelu_tanh(&format!("{path}.net.0"), &h);
        self.linear(&format!("{path}.net.2"), &h, lead, inner, dim, bias)
    }

    /// Split `[B', S, heads*head_dim]` into `[B', heads, S, head_dim]` (or `[B', heads, head_dim, S]`
    /// with `keys_transposed`, the layout `Q @ K^T` wants).
    pub fn split_heads(
        &mut self,
        name: &str,
        x: &str,
        seq: i64,
        heads: i64,
        head_dim: i64,
        keys_transposed: bool,
    ) -> String {
        let x = self.reshape(&format!("{name}/heads"), x, &[-1, seq, heads, head_dim]);
        let perm: &[i64] = if keys_transposed {
            &[0, 2, 3, 1]
        } else {
            &[0, 2, 1, 3]
        };
        self.transpose(&format!("{name}/transpose"), &x, perm)
    }

    /// Scaled dot-product attention on head-split tensors (q [B',H,Sq,d], k^T [B',H,d,Sk], v
    /// [B',H,Sk,d]) written out as MatMul -> Softmax -> MatMul, then merged back to [B', Sq, H*d].
    pub fn sdpa(
        &mut self,
        path: &str,
        q: &str,
        k_t: &str,
        v: &str,
        [seq_q, heads, head_dim]: [i64; 3],
    ) -> String {
        let scale = self.scalar(&format!("{path}/scale"), 1.0 / (head_dim as f32).sqrt());
        let q = self.mul(&format!("{path}/q_scaled"), q, &scale);
        let scores = self.op(&format!("{path}/scores"), "MatMul", &[&q, k_t], vec![]);
        let probs = self.op(
            &format!("{path}/softmax"),
            "Softmax",
            &[&scores],
            vec![("axis", AttrValue::Int(-1))],
        );
        let out = self.op(&format!("{path}/context"), "MatMul", &[&probs, v], vec![]);
        let out = self.transpose(&format!("{path}/merge_heads"), &out, &[0, 2, 1, 3]);
        self.reshape(
            &format!("{path}/merge"),
            &out,
            &[-1, seq_q, heads * head_dim],
        )
    }

    /// `x` [B, rest...] with each batch row repeated `times` times in place (torch's
    /// `repeat_interleave(times, dim=0)`): [B*times, rest...].
    pub fn repeat_rows(&mut self, name: &str, x: &str, times: i64, rest: &[i64]) -> String {
        let axis = self.const_i64(&format!("{name}/axis"), &[1]);
        let x = self.op(
            &format!("{name}/unsqueeze"),
            "Unsqueeze",
            &[x, &axis],
            vec![],
        );
        let mut dims = vec![1, times];
        dims.extend(rest.iter().map(|_| 1));
        let reps = self.const_i64(&format!("{name}/repeats"), &dims);
        let tiled = self.op(&format!("{name}/tile"), "Tile", &[&x, &reps], vec![]);
        let mut out = vec![-1];
        out.extend_from_slice(rest);
        self.reshape(name, &tiled, &out)
    }

    /// `x` split into `parts` equal chunks along `axis` (torch's `chunk`; opset 17 Split, no sizes).
    pub fn chunk(&mut self, name: &str, x: &str, parts: usize, axis: i64) -> Vec<String> {
        self.op_n(
            name,
            "Split",
            &[x],
            parts,
            vec![("axis", AttrValue::Int(axis))],
        )
    }

    /// `x` split along `axis` into parts of the given sizes (torch's `split([a, b], dim)`).
    pub fn split_sizes(&mut self, name: &str, x: &str, sizes: &[i64], axis: i64) -> Vec<String> {
        let sizes_value = self.const_i64(&format!("{name}/sizes"), sizes);
        self.op_n(
            name,
            "Split",
            &[x, &sizes_value],
            sizes.len(),
            vec![("axis", AttrValue::Int(axis))],
        )
    }

    /// `x` and `y` joined along `axis`.
    pub fn concat(&mut self, name: &str, x: &str, y: &str, axis: i64) -> String {
        self.op(
            name,
            "Concat",
            &[x, y],
            vec![("axis", AttrValue::Int(axis))],
        )
    }

    /// adaLN conditioning: `linear(silu(cond))` (Linear `in_f -> parts*dim` at `linear_path`, the SiLU
    /// named `silu_name`) split into `parts` chunks of `[B, 1, dim]` (shift, scale, gate, ...).
    pub fn adaln_chunks(
        &mut self,
        silu_name: &str,
        linear_path: &str,
        cond: &str,
        in_f: i64,
        dim: i64,
        parts: usize,
    ) -> Vec<String> {
        let act = self.silu(silu_name, cond);
        let out = parts as i64 * dim;
        let emb = self.linear(linear_path, &act, &[-1], in_f, out, true);
        let rows = self.reshape(
            &format!("{linear_path}/rows"),
            &emb,
            &[-1, parts as i64, dim],
        );
        self.chunk(&format!("{linear_path}/chunks"), &rows, parts, 1)
    }
}
