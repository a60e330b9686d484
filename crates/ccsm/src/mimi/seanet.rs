//! The SEANet decoder: conv (hidden → filters·2^n) · per ratio [ELU · transposed conv (÷2 channels,
//! ×ratio samples) · residual units] · ELU · conv (filters → channels). Residual unit: x + conv1x1(ELU(
//! conv_k(ELU(x)))), the inner width compressed, dilation growing per unit.

use ggml::Tensor;

use super::config::SeanetConfig;
use super::conv::{CausalConv, ConvScope, ConvTranspose, StateLayout};
use crate::error::Result;
use crate::weights::WeightLoader;

/// x + conv1x1(ELU(conv_k(ELU(x)))): the inner width compressed (the encoder's and the decoder's).
pub(super) struct ResidualUnit {
    conv1: CausalConv,
    conv2: CausalConv,
}

impl ResidualUnit {
    /// Declares `{name}.conv1` and `{name}.conv2` for unit `j` at `width` channels.
    pub(super) fn load(
        loader: &mut WeightLoader<'_>,
        layout: &mut StateLayout,
        name: &str,
        c: &SeanetConfig,
        width: usize,
        j: usize,
    ) -> Result<Self> {
        let dilation = c.dilation_base.pow(j as u32);
        let inner = width / c.compress;
        Ok(ResidualUnit {
            conv1: CausalConv::load(loader, layout, &format!("{name}.conv1"), [width, c.residual_kernel_size, inner], dilation)?,
            conv2: CausalConv::load(loader, layout, &format!("{name}.conv2"), [inner, 1, width], 1)?,
        })
    }

    pub(super) fn build<'c>(&self, s: &mut ConvScope<'c>, x: Tensor<'c>) -> Result<Tensor<'c>> {
        let h = self.conv1.build(s, s.ctx.elu(x)?)?;
        Ok(s.ctx.add(x, self.conv2.build(s, s.ctx.elu(h)?)?)?)
    }
}

struct UpBlock {
    up: ConvTranspose,
    residuals: Vec<ResidualUnit>,
}

pub struct Seanet {
    conv_in: CausalConv,
    blocks: Vec<UpBlock>,
    conv_out: CausalConv,
}

impl Seanet {
    /// Declares `{prefix}decoder.*` for `hidden` input channels and `channels` output channels.
    pub fn load(
        loader: &mut WeightLoader<'_>,
        layout: &mut StateLayout,
        prefix: &str,
        c: &SeanetConfig,
        hidden: usize,
        channels: usize,
    ) -> Result<Self> {
        let name = |t: String| format!("{prefix}decoder.{t}");
        let top = c.channels_before(0);
        let conv_in = CausalConv::load(loader, layout, &name("conv_in".into()), [hidden, c.kernel_size, top], 1)?;
        let mut blocks = Vec::with_capacity(c.ratios.len());
        for (i, &ratio) in c.ratios.iter().enumerate() {
            let (c_in, width) = (c.channels_before(i), c.channels_before(i) / 2);
            let up = ConvTranspose::load(loader, layout, &name(format!("up.{i}")), c_in, width, ratio)?;
            let residuals = (0..c.residual_layers)
                .map(|j| ResidualUnit::load(loader, layout, &name(format!("res.{i}.{j}")), c, width, j))
                .collect::<Result<Vec<_>>>()?;
            blocks.push(UpBlock { up, residuals });
        }
        let conv_out = CausalConv::load(loader, layout, &name("conv_out".into()), [c.filters, c.last_kernel_size, channels], 1)?;
        Ok(Seanet { conv_in, blocks, conv_out })
    }

    /// x `[hidden, T]` → samples `[channels, T · Π ratios]`.
    pub fn build<'c>(&self, s: &mut ConvScope<'c>, x: Tensor<'c>) -> Result<Tensor<'c>> {
        let mut x = self.conv_in.build(s, x)?;
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.up.build(s, s.ctx.elu(x)?)?;
            for unit in &block.residuals {
                x = unit.build(s, x)?;
            }
            x = x.set_name(&format!("codec.seanet.{i}"));
        }
        self.conv_out.build(s, s.ctx.elu(x)?)
    }

    /// Graph nodes the decoder needs at most.
    pub fn max_nodes(&self) -> usize {
        16 + self.blocks.iter().map(|b| 16 + 16 * b.residuals.len()).sum::<usize>()
    }
}
