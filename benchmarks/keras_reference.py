"""The same network in Keras 3 (TensorFlow backend), timed like `main.py --mode=benchmark`.

The original post's framework, as a reference on the same machine. Not a dependency of sepres_jax:
run it in its own environment,
    python -m venv /tmp/venv-keras && /tmp/venv-keras/bin/pip install tensorflow-cpu
    /tmp/venv-keras/bin/python benchmarks/keras_reference.py [--jit_compile]
(benchmarks/README.md runs it beside the others). The network is configs/seed.py's: widths 16-128,
a 2048-channel FCN-8 head, 12 outputs with softmax, Keras' default BatchNorm, float32. Training is
`train_on_batch` with RMSprop (lr 1e-3, rho 0.9) and categorical cross-entropy on random one-hot
224x224 batches, as the post compiled it; inference is `predict_on_batch` at 384x480 followed by an
argmax. Each figure is the median of `--repeats` timed calls after two warm-up calls. The last line
printed is one JSON object.

`--fit_epochs=N` times whole epochs instead, as the post trained: `model.fit` on 367 training and
101 validation images of 224x224 held in memory (random here; CamVid's sizes and the official
split), batch 32, shuffled, validation at the end of each epoch; it prints every epoch's seconds
and `fit_epoch_seconds`, the median of epochs 2..N (the first compiles), to set beside
`main.py --config=configs/seed.py --workdir=DIR --config.data.manual_dir=CamVid
--config.data.split=official`'s epoch_time.
"""

import json
import os
import resource
import statistics
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('KERAS_BACKEND', 'tensorflow')

import keras  # pylint: disable=g-import-not-at-top
from keras import layers  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

import reference_common  # pylint: disable=g-import-not-at-top


def build(num_classes=12, widths=(16, 32, 64, 96, 128), head_width=2048):
  inputs = keras.Input((None, None, 3))
  x = layers.Conv2D(widths[0], 3, padding='same')(inputs)
  x = layers.MaxPooling2D()(layers.Activation('relu')(layers.BatchNormalization()(x)))
  taps = []
  for f in widths[1:]:
    f_in = x.shape[-1]
    y = x
    for g in (f_in, f_in, f):
      y = layers.SeparableConv2D(g, 3, padding='same')(y)
      y = layers.Activation('elu')(layers.BatchNormalization()(y))
    s = layers.BatchNormalization()(layers.SeparableConv2D(f, 3, padding='same')(x))
    x = layers.MaxPooling2D()(layers.Activation('relu')(layers.Add()([y, s])))
    taps.append(x)
  pool3, pool4, pool5 = taps[1:]
  y = layers.Conv2D(head_width, 7, padding='same', activation='relu')(pool5)
  y = layers.Conv2D(head_width, 1, activation='relu')(y)
  y = layers.Conv2DTranspose(num_classes, 4, strides=4, use_bias=False)(y)
  s4 = layers.Conv2D(num_classes, 1, activation='relu')(pool4)
  s4 = layers.Conv2DTranspose(num_classes, 2, strides=2, use_bias=False)(s4)
  s3 = layers.Conv2D(num_classes, 1, activation='relu')(pool3)
  y = layers.Conv2DTranspose(num_classes, 8, strides=8, use_bias=False)(
      layers.Add()([y, s4, s3]))
  return keras.Model(inputs, layers.Activation('softmax')(y))


class _EpochTimes(keras.callbacks.Callback):

  def on_train_begin(self, logs=None):
    self.seconds = []

  def on_epoch_begin(self, epoch, logs=None):
    self.start = time.perf_counter()

  def on_epoch_end(self, epoch, logs=None):
    self.seconds.append(time.perf_counter() - self.start)
    print(f'epoch {epoch + 1}: {self.seconds[-1]:.2f} s', flush=True)


def fit_epochs(model, rng, eye, size, epochs, num_train=367, num_val=101, batch=32):
  """Seconds of each epoch of model.fit (training and validation), as the post trained."""
  data = lambda n: (rng.uniform(-1, 1, (n, *size, 3)).astype(np.float32),
                    eye[rng.integers(0, len(eye), (n, *size))])
  (x, y), val = data(num_train), data(num_val)
  times = _EpochTimes()
  model.fit(x, y, batch_size=batch, epochs=epochs, validation_data=val, shuffle=True,
            callbacks=[times], verbose=0)
  return {'fit_epoch_times': [round(t, 2) for t in times.seconds],
          'fit_epoch_seconds': round(statistics.median(times.seconds[1:] or times.seconds), 2)}


def main():
  parser = reference_common.parser(__doc__)
  parser.add_argument('--jit_compile', action='store_true', help='XLA (jit_compile=True)')
  parser.add_argument('--fit_epochs', type=int, default=0,
                      help='time this many epochs of model.fit at the official split instead')
  args = parser.parse_args()
  keras.utils.set_random_seed(0)
  model = build(args.num_classes)
  model.compile(optimizer=keras.optimizers.RMSprop(1e-3), loss='categorical_crossentropy',
                jit_compile=args.jit_compile)
  rng = np.random.default_rng(0)
  h, w = reference_common.sizes(args.train_size)
  result = {'keras': keras.__version__, 'backend': keras.backend.backend(),
            'jit_compile': args.jit_compile}
  eye = np.eye(args.num_classes, dtype=np.float32)
  if args.fit_epochs:
    result.update(fit_epochs(model, rng, eye, (h, w), args.fit_epochs))
    print(json.dumps(result))
    return

  for b in reference_common.sizes(args.train_batch_sizes):
    x = rng.uniform(-1, 1, (b, h, w, 3)).astype(np.float32)
    y = eye[rng.integers(0, args.num_classes, (b, h, w))]
    seconds = reference_common.median_seconds(lambda: model.train_on_batch(x, y), args.repeats)
    result[f'train_images_per_sec_batch{b}'] = round(b / seconds, 2)
    print(f'train, batch {b}: {result[f"train_images_per_sec_batch{b}"]} img/s', flush=True)

  ih, iw = reference_common.sizes(args.infer_size)
  b = args.infer_batch_size
  x = rng.uniform(-1, 1, (b, ih, iw, 3)).astype(np.float32)
  seconds = reference_common.median_seconds(
      lambda: np.argmax(model.predict_on_batch(x), -1), args.repeats)
  result['infer_images_per_sec'] = round(b / seconds, 2)
  print(f'inference {ih}x{iw}, batch {b}: {result["infer_images_per_sec"]} img/s', flush=True)
  result['peak_rss_mb'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
  print(json.dumps(result))


if __name__ == '__main__':
  main()
