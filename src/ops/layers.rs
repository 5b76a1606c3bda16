//! Linear layers, LayerNorm and gelu: the pieces every model family's blocks are built from.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::quant::QuantizedWeight;
use super::{is_half, use_fused, Dropout, Operands, Site};
use crate::cpu::{fused, skinny};

/// `xs · weightᵀ + bias` over the last dim of `xs`, weight `[out, in]` as HF stores it.
/// `operands` is the products' precision when the tensors are fp32 on the CPU (bf16 operands
/// with fp32 accumulation, see [`super::weight_dtype_and_operands`]); elsewhere the dtype decides.
pub fn linear(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    operands: Operands,
) -> Result<Tensor> {
    let dims = xs.dims().to_vec();
    let in_dim = *dims.last().expect("linear input has a last dim");
    let rows: usize = dims[..dims.len() - 1].iter().product();
    // Flattening to 2-D gives one large GEMM instead of a batch of small ones.
    let xs2 = xs.reshape((rows, in_dim))?;
    let fused = use_fused(xs) && weight.dtype() == DType::F32;
    // A frozen half-precision weight (LoRA's base on the CPU) is widened inside the op, one
    // layer at a time, and autograd keeps the half original, not an fp32 copy.
    if use_fused(xs) && is_half(weight) && !weight.track_op() {
        let op = fused::FrozenLinearOp { operands };
        let ys = xs2.contiguous()?.apply_op2(&weight.contiguous()?, op)?;
        let ys = match bias {
            Some(bias) => ys.broadcast_add(&bias.to_dtype(DType::F32)?)?,
            None => ys,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = weight.dim(0)?;
        return ys.reshape(out_dims);
    }
    // Decoding's few rows: each weight row read once instead of the matrix repacked for a GEMM.
    let skinny = match operands {
        Operands::F32 if fused => skinny::try_matmul_transposed(&xs2, weight)?,
        _ => None,
    };
    let ys = match (skinny, bias) {
        (Some(ys), Some(bias)) => ys.broadcast_add(bias)?,
        (Some(ys), None) => ys,
        (None, bias) if fused => {
            let op = fused::LinearOp { operands };
            let (xs2, weight) = (xs2.contiguous()?, weight.contiguous()?);
            match bias {
                Some(bias) => xs2.apply_op3(&weight, &bias.contiguous()?, op)?,
                None => xs2.apply_op2(&weight, op)?,
            }
        }
        (None, bias) => {
            let ys = xs2.matmul(&weight.t()?)?;
            match bias {
                Some(bias) => ys.broadcast_add(bias)?,
                None => ys,
            }
        }
    };
    let mut out_dims = dims;
    *out_dims.last_mut().unwrap() = weight.dim(0)?;
    ys.reshape(out_dims)
}

/// LayerNorm over the last dim with its statistics in fp32, whatever the compute dtype (as
/// torch's autocast does); the result is in `xs`'s dtype.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = xs.dtype();
    if use_fused(xs) && weight.dtype() == DType::F32 {
        let op = fused::LayerNormOp { eps };
        return xs.contiguous()?.apply_op3(weight, bias, op);
    }
    let xs = xs.to_dtype(DType::F32)?;
    let mean = xs.mean_keepdim(D::Minus1)?;
    let centered = xs.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    let ys = normed
        .broadcast_mul(&weight.to_dtype(DType::F32)?)?
        .broadcast_add(&bias.to_dtype(DType::F32)?)?;
    ys.to_dtype(dtype)
}

/// HF's `gelu_new` (the tanh approximation, as candle's `gelu`). Fused on the CPU: one op with a
/// one-pass backward, where candle's `gelu` backward takes a dozen full-size tensor ops.
pub fn gelu_new(xs: &Tensor) -> Result<Tensor> {
    if use_fused(xs) {
        return xs.contiguous()?.apply_op1(fused::GeluNew);
    }
    xs.gelu()
}

/// Rows of `table` (`[entries, width]`) for `ids` of any shape: `[...ids, width]`. Token and
/// position embeddings.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let mut dims = ids.dims().to_vec();
    dims.push(table.dim(1)?);
    table.index_select(&ids.flatten_all()?, 0)?.reshape(dims)
}

/// HF's `gelu` (the exact, erf-based one).
pub fn gelu(xs: &Tensor) -> Result<Tensor> {
    xs.gelu_erf()
}

/// `xs · Wᵀ + bias` over the last dim of `xs` for a quantised `W` (`[out, in]`).
pub fn quantized_linear(
    xs: &Tensor,
    weight: &QuantizedWeight,
    bias: Option<&Tensor>,
    operands: Operands,
) -> Result<Tensor> {
    let mut dims = xs.dims().to_vec();
    let in_dim = *dims.last().expect("linear input has a last dim");
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let ys = weight.matmul_transposed(&xs.reshape((rows, in_dim))?, operands)?;
    let ys = match bias {
        Some(bias) => ys.broadcast_add(&bias.to_dtype(ys.dtype())?)?,
        None => ys,
    };
    *dims.last_mut().unwrap() = weight.dims().0;
    ys.reshape(dims)
}

/// A linear layer stored as HF stores it: weight `[out, in]` (or quantised), optional bias
/// `[out]`; with a LoRA adapter when the weights it loads from hold one.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    pub bias: Option<Tensor>,
    operands: Operands,
    adapter: Option<LowRank>,
}

/// A linear layer's weight: as loaded, or frozen in 4 or 8 bits (`model.quantize`).
#[derive(Debug, Clone)]
enum Weight {
    Dense(Tensor),
    /// Boxed: a quantised weight holds several tensors, and most layers are dense.
    Quantized(Box<QuantizedWeight>),
}

/// A LoRA adapter's path beside a frozen weight: `(drop(x)·Aᵀ)·(scale·B)ᵀ`, read from the
/// layer's own weights as `lora_A.weight` (`[r, in]`) and `lora_B.scaled` (`[out, r]`, see
/// `model::lora`).
#[derive(Debug, Clone)]
struct LowRank {
    a: Tensor,
    scaled_b: Tensor,
    dropout_site: Site,
}

impl LowRank {
    fn load(vb: &VarBuilder) -> Result<Option<Self>> {
        if !vb.contains_tensor("lora_A.weight") {
            return Ok(None);
        }
        Ok(Some(Self {
            a: vb.get_unchecked("lora_A.weight")?,
            scaled_b: vb.get_unchecked("lora_B.scaled")?,
            dropout_site: Site::LoraInput(fnv1a(vb.prefix().as_bytes())),
        }))
    }
}

/// A stable 64-bit hash (FNV-1a): dropout masks must not change between builds or runs.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ byte as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Linear {
    pub fn load(
        vb: VarBuilder,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        operands: Operands,
    ) -> Result<Self> {
        let weight = match QuantizedWeight::load(&vb, "weight", out_dim, in_dim)? {
            Some(quantized) => Weight::Quantized(Box::new(quantized)),
            None => Weight::Dense(vb.get((out_dim, in_dim), "weight")?),
        };
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            operands,
            adapter: LowRank::load(&vb)?,
        })
    }

    /// GPT-2's `Conv1D`, which stores its weight `[in, out]`: the layer multiplies by the
    /// transpose, so the parameter keeps HF's name and layout. The transpose is laid out once,
    /// when the model is built (once per training step, once for inference), not in every
    /// forward: the kernels read `[out, in]` rows, and decoding would otherwise copy every
    /// weight for each new token. Gradients flow back through the copy to the `[in, out]`
    /// parameter.
    pub fn load_conv1d(
        vb: VarBuilder,
        in_dim: usize,
        out_dim: usize,
        operands: Operands,
    ) -> Result<Self> {
        // Quantised, the weight is held `[out, in]` already (see `model::quantized`).
        let weight = match QuantizedWeight::load(&vb, "weight", out_dim, in_dim)? {
            Some(quantized) => Weight::Quantized(Box::new(quantized)),
            None => Weight::Dense(vb.get((in_dim, out_dim), "weight")?.t()?.contiguous()?),
        };
        Ok(Self {
            weight,
            bias: Some(vb.get(out_dim, "bias")?),
            operands,
            adapter: LowRank::load(&vb)?,
        })
    }

    /// A bias-free layer over an existing `[out, in]` tensor (a head tied to the embedding).
    pub fn tied(weight: Tensor, operands: Operands) -> Self {
        Self {
            weight: Weight::Dense(weight),
            bias: None,
            operands,
            adapter: None,
        }
    }

    /// The weight, unless it is quantised.
    pub fn dense_weight(&self) -> Option<&Tensor> {
        match &self.weight {
            Weight::Dense(weight) => Some(weight),
            Weight::Quantized(_) => None,
        }
    }

    /// The frozen weight's product alone, the adapter (if any) left out.
    pub fn forward_base(&self, xs: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(weight) => linear(xs, weight, self.bias.as_ref(), self.operands),
            Weight::Quantized(weight) => {
                quantized_linear(xs, weight, self.bias.as_ref(), self.operands)
            }
        }
    }

    /// The layer's output, its adapter's input dropped out as `dropout` says (training).
    pub fn forward_dropped(&self, xs: &Tensor, dropout: Option<&Dropout>) -> Result<Tensor> {
        let ys = self.forward_base(xs)?;
        let Some(adapter) = &self.adapter else {
            return Ok(ys);
        };
        let input = match dropout {
            Some(dropout) => dropout.apply(xs, adapter.dropout_site)?,
            None => xs.clone(),
        };
        let down = linear(&input, &adapter.a, None, self.operands)?;
        ys + linear(&down, &adapter.scaled_b, None, self.operands)?
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_dropped(xs, None)
    }
}

#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        layer_norm(xs, &self.weight, &self.bias, self.eps)
    }
}
