"""The same network in PyTorch, timed like `main.py --mode=benchmark`: a reference on one machine.

Not part of sepres_jax and not a dependency of it: run it in its own environment,
    python -m venv /tmp/venv-torch && /tmp/venv-torch/bin/pip install torch numpy
    /tmp/venv-torch/bin/python benchmarks/pytorch_reference.py
then `python main.py --config=configs/seed.py --mode=benchmark` (and `--config.batch_size=8`)
right after it, so that both are measured in the same state of the machine (benchmarks/README.md).

The network is configs/seed.py's: widths 16-128, a 2048-channel FCN-8 head, 12 outputs, Keras'
BatchNorm epsilon, channels-last float32. Training: RMSprop (lr 1e-3, alpha 0.9, eps 1e-7) with
cross-entropy on random 224x224 batches; inference: eval mode under torch.inference_mode at
384x480. Each figure is the median of `--repeats` timed calls after two warm-up calls. The last line
printed is one JSON object.
"""

import json
import resource

import numpy as np
import torch
from torch import nn

import reference_common


class SeparableConv(nn.Sequential):
  """Keras' SeparableConv2D: 3x3 depthwise without bias, then a 1x1 conv with bias."""

  def __init__(self, cin, cout):
    super().__init__(nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False),
                     nn.Conv2d(cin, cout, 1))


class ResidualBlock(nn.Module):

  def __init__(self, cin, cout, depth=3):
    super().__init__()
    layers = []
    for i in range(depth):
      f = cout if i == depth - 1 else cin
      layers += [SeparableConv(cin, f), nn.BatchNorm2d(f, eps=1e-3), nn.ELU()]
    self.main = nn.Sequential(*layers)
    self.shortcut = nn.Sequential(SeparableConv(cin, cout), nn.BatchNorm2d(cout, eps=1e-3))

  def forward(self, x):
    return torch.relu(self.main(x) + self.shortcut(x))


class SepResFCN8(nn.Module):

  def __init__(self, num_classes=12, widths=(16, 32, 64, 96, 128), head_width=2048):
    super().__init__()
    self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1),
                              nn.BatchNorm2d(widths[0], eps=1e-3), nn.ReLU())
    self.blocks = nn.ModuleList(ResidualBlock(a, b) for a, b in zip(widths[:-1], widths[1:]))
    self.pool = nn.MaxPool2d(2)
    self.conv6 = nn.Conv2d(widths[4], head_width, 7, padding=3)
    self.conv7 = nn.Conv2d(head_width, head_width, 1)
    self.up_conv7 = nn.ConvTranspose2d(head_width, num_classes, 4, stride=4, bias=False)
    self.score_pool4 = nn.Conv2d(widths[3], num_classes, 1)
    self.up_pool4 = nn.ConvTranspose2d(num_classes, num_classes, 2, stride=2, bias=False)
    self.score_pool3 = nn.Conv2d(widths[2], num_classes, 1)
    self.up_final = nn.ConvTranspose2d(num_classes, num_classes, 8, stride=8, bias=False)

  def forward(self, x):
    x = self.pool(self.stem(x))
    taps = []
    for block in self.blocks:
      x = self.pool(block(x))
      taps.append(x)
    pool3, pool4, pool5 = taps[1:]
    y = torch.relu(self.conv7(torch.relu(self.conv6(pool5))))
    y = self.up_conv7(y)
    s4 = self.up_pool4(torch.relu(self.score_pool4(pool4)))
    s3 = torch.relu(self.score_pool3(pool3))
    return self.up_final(y + s4 + s3)


def main():
  parser = reference_common.parser(__doc__)
  args = parser.parse_args()
  torch.manual_seed(0)
  fmt = torch.channels_last
  model = SepResFCN8(args.num_classes).to(memory_format=fmt)
  opt = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
  loss_fn = nn.CrossEntropyLoss()
  rng = np.random.default_rng(0)
  h, w = reference_common.sizes(args.train_size)
  result = {'torch': torch.__version__, 'threads': torch.get_num_threads()}

  for b in reference_common.sizes(args.train_batch_sizes):
    x = torch.from_numpy(rng.uniform(-1, 1, (b, 3, h, w)).astype(np.float32)).to(
        memory_format=fmt)
    y = torch.from_numpy(rng.integers(0, args.num_classes, (b, h, w)))
    model.train()

    def step():
      opt.zero_grad(set_to_none=True)
      loss = loss_fn(model(x), y)
      loss.backward()
      opt.step()
      return loss.item()

    seconds = reference_common.median_seconds(step, args.repeats)
    result[f'train_images_per_sec_batch{b}'] = round(b / seconds, 2)
    print(f'train, batch {b}: {result[f"train_images_per_sec_batch{b}"]} img/s', flush=True)

  ih, iw = reference_common.sizes(args.infer_size)
  b = args.infer_batch_size
  x = torch.from_numpy(rng.uniform(-1, 1, (b, 3, ih, iw)).astype(np.float32)).to(
      memory_format=fmt)
  model.eval()

  def infer():
    with torch.inference_mode():
      return model(x).argmax(1)

  result['infer_images_per_sec'] = round(
      b / reference_common.median_seconds(infer, args.repeats), 2)
  print(f'inference {ih}x{iw}, batch {b}: {result["infer_images_per_sec"]} img/s', flush=True)
  result['peak_rss_mb'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
  print(json.dumps(result))


if __name__ == '__main__':
  main()
