"""The depthwise-separable residual FCN-8 network, in Flax linen.

Encoder: a 3x3 conv stem and four residual blocks, each followed by 2x2 max-pooling; pool3, pool4
and pool5 are the outputs of the 2nd, 3rd and 4th blocks' pools. Head: FCN-8 (conv6 7x7 and conv7
1x1 on pool5, 1x1 score convs on pool4 and pool3, transposed convs x4, x2, x8). `fine_skips` adds
finer skips beyond the original's: 1 scores pool2 (stride 4), 2 also pool1 (the stem's, stride 2),
each a 1x1 score conv and a transposed conv to full size added to the logits. Those transposed
convs start at zero, so the network starts as FCN-8 (and a fine-tune from FCN-8 weights starts
from their predictions). `refine` > 0 adds a small U-Net-like decoder of that many channels: the
stride-8 logits (before FCN-8's x8 upsampling) are upsampled x2 (bilinear), concatenated with
pool2, passed through SeparableConv+BatchNorm+ReLU, upsampled x2 again, concatenated with pool1,
and passed through another; a 1x1 conv started at zero scores that and its x2 bilinear upsampling is
added to the logits: features at strides 4 and 2 that see the coarse prediction, meant for the
thin classes (on CamVid it moved val by +0.003 only, README). It too starts as the network without
it. `context` > 0 adds a context module on pool5 (after DeepLab's ASPP, at this network's stride
32): image-level pooling (the mean over the map, a 1x1 conv, ReLU, spread back over the map) and two
dilated 3x3 separable convs (rates 3 and 6) with BatchNorm and ReLU, each of that many channels,
concatenated and projected by a 1x1 conv started at zero into conv7's input to its ReLU, so it too
starts as the network without it. The network returns
logits at the input's size; softmax lives in the loss. Inputs must have a height and width divisible
by 32: callers pad other sizes and crop back.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sepres_jax import ops

_kernel_init = nn.initializers.glorot_uniform()  # Keras' default, as in the original.


class Conv(nn.Module):
  """KxK convolution (stride 1, SAME) with bias; its kernel form is chosen by `impl`."""
  features: int
  kernel_size: int
  impl: str = 'xla'
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Any = _kernel_init
  large_conv: str = 'auto'  # CPU form of a large kernel: 'auto', 'rows' or 'dft' (ops.conv).

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features))
    y = ops.conv(x.astype(self.dtype), kernel.astype(self.dtype), self.impl, self.large_conv)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return y


class Upsample(nn.Module):
  """Transposed convolution with kernel == stride and no bias (the FCN-8 upsampling layers)."""
  features: int
  factor: int
  impl: str = 'xla'
  dtype: Any = jnp.float32
  kernel_init: Any = _kernel_init

  @nn.compact
  def __call__(self, x):
    s = self.factor
    kernel = self.param('kernel', self.kernel_init, (s, s, x.shape[-1], self.features))
    return ops.upsample_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.impl)


class SeparableConv(nn.Module):
  """Keras' SeparableConv2D: 3x3 depthwise (no bias, dilated by `rate`) then 1x1 pointwise with
  bias, SAME."""
  features: int
  impl: str = 'xla'
  dtype: Any = jnp.float32
  rate: int = 1

  @nn.compact
  def __call__(self, x):
    cin = x.shape[-1]
    depthwise = self.param('depthwise_kernel', _kernel_init, (3, 3, 1, cin))
    pointwise = self.param('pointwise_kernel', _kernel_init, (1, 1, cin, self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    x = x.astype(self.dtype)
    y = ops.depthwise_conv3x3(x, depthwise.astype(self.dtype), self.impl, self.rate)
    y = ops.pointwise_conv(y, pointwise.astype(self.dtype), self.impl)
    return y + bias.astype(self.dtype)


class BatchNormAct(nn.Module):
  """BatchNorm (flax's nn.BatchNorm: the same variables and values) followed by `act` (None,
  'relu' or 'elu'). With `fused`, training mode runs ops.batch_norm_act, whose gradient is
  written out; the statistics and the normalisation are the same."""
  use_running_average: bool
  momentum: float = 0.99
  epsilon: float = 1e-3
  act: Optional[str] = None
  fused: bool = False
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,))
    bias = self.param('bias', nn.initializers.zeros, (c,))
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    axis_name = None if self.is_initializing() else self.axis_name
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    elif self.fused:
      y, mean, var = ops.batch_norm_act(x, scale, bias, self.epsilon, self.act, axis_name)
    else:
      mean, var = ops.batch_stats(x, axis_name)
    if not self.use_running_average and not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    if self.use_running_average or not self.fused:
      y = ops.normalize(x, mean, var, scale, bias, self.epsilon)
      y = ops.activate(y.astype(self.dtype), self.act)
    return y.astype(self.dtype)


class ResidualBlock(nn.Module):
  """`depth` SeparableConv+BatchNorm+ELU (f_in, ..., f_in, f_out; the original has 3) plus a
  SeparableConv+BatchNorm shortcut, added, then ReLU."""
  features: int
  norm: Any
  impl: str = 'xla'
  dtype: Any = jnp.float32
  depth: int = 3

  @nn.compact
  def __call__(self, x):
    f_in = x.shape[-1]
    y = x
    for i, f in enumerate((f_in,) * (self.depth - 1) + (self.features,)):
      y = SeparableConv(f, self.impl, self.dtype, name=f'sep{i + 1}')(y)
      y = self.norm(f'bn{i + 1}', 'elu')(y)
    shortcut = SeparableConv(self.features, self.impl, self.dtype, name='shortcut')(x)
    shortcut = self.norm('shortcut_bn')(shortcut)
    return nn.relu(y + shortcut)


class SepResFCN8(nn.Module):
  """Separable residual encoder with an FCN-8 head; returns logits [B, H, W, num_classes]."""
  num_classes: int
  widths: Sequence[int] = (16, 32, 64, 96, 128)
  head_width: int = 2048
  block_depth: int = 3  # SeparableConv+BatchNorm+ELU units per residual block.
  fine_skips: int = 0  # Skips finer than FCN-8's: 1 adds pool2 (stride 4), 2 also pool1 (stride 2).
  refine: int = 0  # Channels of the refinement decoder on pool2 and pool1; 0: none (the original).
  context: int = 0  # Channels of each branch of the context module on pool5; 0: none.
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  impl: str = 'xla'
  large_conv: str = 'auto'  # conv6's CPU form: 'auto', 'rows' or 'dft' (ops.conv).
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None  # Set under pmap so BatchNorm sees the global batch.

  @nn.compact
  def __call__(self, x, train: bool = False):
    if len(self.widths) != 5:
      raise ValueError(f'model.widths needs 5 entries (stem + 4 blocks), got {self.widths}')
    if self.block_depth < 1:
      raise ValueError(f'model.block_depth must be at least 1, got {self.block_depth}')
    if self.fine_skips not in (0, 1, 2):
      raise ValueError(f'model.fine_skips must be 0, 1 or 2, got {self.fine_skips}')
    if self.refine < 0:
      raise ValueError(f'model.refine must be 0 (off) or a channel count, got {self.refine}')
    if self.context < 0:
      raise ValueError(f'model.context must be 0 (off) or a channel count, got {self.context}')
    if x.shape[1] % 32 or x.shape[2] % 32:
      raise ValueError(f'input height and width must be divisible by 32, got {x.shape[1:3]}')
    norm = lambda name, act=None: BatchNormAct(
        use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
        act=act, fused=self.impl != 'xla', dtype=self.dtype,
        axis_name=self.bn_axis_name if train else None, name=name)
    pool = lambda y: ops.max_pool2x2(y, self.impl)

    x = Conv(self.widths[0], 3, self.impl, dtype=self.dtype, name='stem')(x)
    x = pool(norm('stem_bn', 'relu')(x))
    taps = [x]
    for i, f in enumerate(self.widths[1:]):
      x = pool(ResidualBlock(f, norm, self.impl, self.dtype, self.block_depth,
                             name=f'block{i + 1}')(x))
      taps.append(x)
    pool1, pool2, pool3, pool4, pool5 = taps

    c = self.num_classes
    y = nn.relu(Conv(self.head_width, 7, self.impl, dtype=self.dtype, large_conv=self.large_conv,
                     name='conv6')(pool5))
    y = Conv(self.head_width, 1, self.impl, dtype=self.dtype, name='conv7')(y)
    if self.context:
      y = y + self._context(pool5, norm)
    y = nn.relu(y)
    y = Upsample(c, 4, self.impl, self.dtype, name='up_conv7')(y)
    s4 = nn.relu(Conv(c, 1, self.impl, dtype=self.dtype, name='score_pool4')(pool4))
    s4 = Upsample(c, 2, self.impl, self.dtype, name='up_pool4')(s4)
    s3 = nn.relu(Conv(c, 1, self.impl, dtype=self.dtype, name='score_pool3')(pool3))
    coarse = y + s4 + s3  # Stride-8 logits.
    y = Upsample(c, 8, self.impl, self.dtype, name='up_final')(coarse)
    for i, (tap, factor) in enumerate(((pool2, 4), (pool1, 2))[:self.fine_skips]):
      name = f'pool{2 - i}'
      s = nn.relu(Conv(c, 1, self.impl, dtype=self.dtype, name=f'score_{name}')(tap))
      y = y + Upsample(c, factor, self.impl, self.dtype, nn.initializers.zeros, name=f'up_{name}')(s)
    if self.refine:
      z = coarse
      for name, tap in (('refine4', pool2), ('refine2', pool1)):
        z = jnp.concatenate([_upsample2x(z), tap.astype(z.dtype)], axis=-1)
        z = SeparableConv(self.refine, self.impl, self.dtype, name=name)(z)
        z = norm(f'{name}_bn', 'relu')(z)
      z = Conv(c, 1, self.impl, dtype=self.dtype, kernel_init=nn.initializers.zeros,
               name='refine_score')(z)
      y = y + _upsample2x(z)
    return y.astype(jnp.float32)

  def _context(self, x, norm):
    """The context module's contribution to conv7's pre-activation (zero at initialisation)."""
    f = self.context
    g = jnp.mean(x.astype(self.dtype), axis=(1, 2), keepdims=True)
    g = nn.relu(Conv(f, 1, self.impl, dtype=self.dtype, name='context_pool')(g))
    branches = [jnp.broadcast_to(g, x.shape[:3] + (f,))]
    for rate in (3, 6):
      z = SeparableConv(f, self.impl, self.dtype, rate, name=f'context_d{rate}')(x)
      branches.append(norm(f'context_d{rate}_bn', 'relu')(z))
    return Conv(self.head_width, 1, self.impl, use_bias=False, dtype=self.dtype,
                kernel_init=nn.initializers.zeros,
                name='context_proj')(jnp.concatenate(branches, axis=-1))


def _upsample2x(x):
  """Bilinear x2 upsampling of [B, H, W, C] (half-pixel centres, as jax.image.resize)."""
  b, h, w, c = x.shape
  return jax.image.resize(x, (b, 2 * h, 2 * w, c), 'bilinear')


class ModelConfigError(ValueError):
  """A config.model field that names no form (model.impl, model.large_conv): a user error."""


def create_model(config, num_outputs: int, bn_axis_name: Optional[str] = None) -> SepResFCN8:
  """The network described by `config.model`, with `num_outputs` logits per pixel."""
  m = config.model
  large_conv = m.get('large_conv', 'auto')
  try:
    ops.check_large_conv(large_conv)
    impl = ops.resolve_impl(m.impl)
  except ValueError as e:
    raise ModelConfigError(str(e)) from None
  return SepResFCN8(
      num_classes=num_outputs, widths=tuple(m.widths), head_width=m.head_width,
      block_depth=m.get('block_depth', 3), fine_skips=m.get('fine_skips', 0),
      refine=m.get('refine', 0), context=m.get('context', 0),
      bn_momentum=m.bn_momentum, bn_epsilon=m.bn_epsilon, impl=impl, large_conv=large_conv,
      dtype=jnp.dtype(config.dtype), bn_axis_name=bn_axis_name)


def averaged_logits(apply_fn, variables, images, flip: bool = False, scales=(1.0,)):
  """Log of the class probabilities averaged over horizontal flips and input scales.

  Each scale resizes the batch to the nearest multiple of 32 and its logits back to the input's
  size. `variables` may be a list of variable dicts of one architecture (an ensemble): every
  member's probabilities count equally. With one member, no flip and scales (1.0,) this is the
  plain forward pass.
  """
  members = list(variables) if isinstance(variables, (list, tuple)) else [variables]
  if len(members) == 1 and not flip and tuple(scales) == (1.0,):
    return apply_fn(members[0], images, train=False)
  b, h, w, c = images.shape
  probs = 0.0
  n = 0
  for s in scales:
    # Scale 1 keeps the size as it is (also a symbolic size, as in an exported model).
    sh, sw = (h, w) if s == 1 else (max(32, int(round(d * s / 32)) * 32) for d in (h, w))
    x = images if (sh, sw) == (h, w) else jax.image.resize(images, (b, sh, sw, c), 'bilinear')
    for flipped in ((False, True) if flip else (False,)):
      for member in members:
        logits = apply_fn(member, x[:, :, ::-1] if flipped else x, train=False)
        logits = logits[:, :, ::-1] if flipped else logits
        if (sh, sw) != (h, w):
          logits = jax.image.resize(logits, (b, h, w, logits.shape[-1]), 'bilinear')
        probs = probs + jax.nn.softmax(logits, axis=-1)
        n += 1
  return jnp.log(probs / n + 1e-12)
