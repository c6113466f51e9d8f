"""Synthetic CamVid-like road scenes for tests and quick experiments (numpy + cv2 only).

Each scene is drawn from its own seed (seed, split, index), back to front: sky, buildings, fence,
sidewalk, road, trees, poles with signs, cars, pedestrians, bicyclists and void clutter. Colours
are per-class distributions that overlap, with texture, per-scene brightness/tint, blur and noise,
so colour alone does not solve the task. Output uses CamVid's SegNet layout and label format.
"""

import os
from pathlib import Path

import cv2
import numpy as np

SKY, BUILDING, POLE, ROAD, SIDEWALK, TREE, SIGN, FENCE, CAR, PEDESTRIAN, BICYCLIST, VOID = range(12)
_SPLIT_CODES = {'train': 0, 'val': 1, 'test': 2}
# Part of the cached scenes' key: raise it when a change here draws other scenes, so that caches
# written before are not reused.
SCENES_VERSION = 1


def _jitter(rng, base, spread):
  return np.clip(np.asarray(base, np.float32) + rng.normal(0, spread, 3), 0, 255)


def _fill(img, label, mask, cls, colour):
  img[mask] = colour
  label[mask] = cls


def _poly(shape, points):
  mask = np.zeros(shape, np.uint8)
  cv2.fillPoly(mask, [np.round(np.asarray(points)).astype(np.int32)], 1)
  return mask.astype(bool)


def _rect(img, label, x0, y0, x1, y1, cls, colour):
  h, w = label.shape
  x0, x1 = int(np.clip(min(x0, x1), 0, w)), int(np.clip(max(x0, x1), 0, w))
  y0, y1 = int(np.clip(min(y0, y1), 0, h)), int(np.clip(max(y0, y1), 0, h))
  img[y0:y1, x0:x1] = colour
  if cls is not None:
    label[y0:y1, x0:x1] = cls


def draw_scene(rng, height, width):
  """Returns (rgb uint8 [H, W, 3], label uint8 [H, W]) for one scene."""
  h, w = height, width
  img = np.zeros((h, w, 3), np.float32)
  label = np.zeros((h, w), np.uint8)
  yy = np.arange(h, dtype=np.float32)[:, None]
  horizon = rng.uniform(0.35, 0.55) * h
  vx = rng.uniform(0.3, 0.7) * w  # Vanishing point.

  # Sky: a vertical gradient from blue-grey to near white.
  top, bottom = _jitter(rng, (150, 170, 200), 15), _jitter(rng, (210, 210, 215), 12)
  t = np.clip(yy / max(horizon, 1), 0, 1)[..., None]
  img[:] = top * (1 - t) + bottom * t
  label[:] = SKY

  # Buildings: rectangles with window grids, bases a little below the horizon.
  x = rng.uniform(-0.1, 0.05) * w
  while x < w:
    bw = rng.uniform(0.12, 0.35) * w
    y_top = rng.uniform(0.02, 0.7) * horizon
    y_base = horizon + rng.uniform(0.0, 0.08) * h
    colour = _jitter(rng, rng.choice([(140, 90, 80), (150, 140, 130), (110, 105, 115)]), 20)
    _rect(img, label, x, y_top, x + bw, y_base, BUILDING, colour)
    win = colour * rng.uniform(0.4, 0.7)
    step_x, step_y = max(3, w // 40), max(3, h // 30)
    for wy in np.arange(y_top + 2, y_base - step_y, step_y * 1.6):
      for wx in np.arange(x + 2, x + bw - step_x, step_x * 1.7):
        _rect(img, label, wx, wy, wx + step_x, wy + step_y, None, win)
    x += bw + rng.uniform(-0.02, 0.08) * w
  # Sky may show through gaps; buildings never sit below the ground line drawn next.

  # Ground: sidewalk everywhere below the horizon, the road as a trapezoid on top of it.
  ground = yy >= horizon
  sw_colour = _jitter(rng, (150, 140, 145), 18)
  img[np.broadcast_to(ground, (h, w))] = sw_colour
  label[np.broadcast_to(ground, (h, w))] = SIDEWALK
  # Paving texture: faint horizontal lines.
  for gy in np.arange(horizon + 2, h, rng.uniform(3, 6)):
    img[int(gy), :] = np.where((label[int(gy), :] == SIDEWALK)[:, None], sw_colour * 0.85,
                               img[int(gy), :])
  half_top = rng.uniform(0.01, 0.05) * w
  bottom_l, bottom_r = rng.uniform(-0.3, 0.15) * w, rng.uniform(0.85, 1.3) * w
  road = _poly((h, w), [(vx - half_top, horizon), (vx + half_top, horizon), (bottom_r, h),
                        (bottom_l, h)])
  _fill(img, label, road, ROAD, _jitter(rng, (105, 95, 110), 15))
  # Lane markings (still road).
  for k in range(6):
    t0, t1 = (k + 0.3) / 6, (k + 0.6) / 6
    p0 = (vx + (w / 2 - vx) * t0, horizon + (h - horizon) * t0)
    p1 = (vx + (w / 2 - vx) * t1, horizon + (h - horizon) * t1)
    mask = np.zeros((h, w), np.uint8)
    cv2.line(mask, tuple(map(int, p0)), tuple(map(int, p1)), 1, max(1, int(3 * t1 * w / 160)))
    img[mask.astype(bool) & road] = _jitter(rng, (200, 200, 190), 10)

  # Fence: a striped band on one side, standing on the ground line.
  if rng.random() < 0.6:
    side = rng.choice([0, 1])
    x0, x1 = (0, vx - half_top * 4) if side == 0 else (vx + half_top * 4, w)
    fh = rng.uniform(0.05, 0.1) * h
    band = np.zeros((h, w), bool)
    band[int(horizon - fh):int(horizon + fh * 0.3), int(max(0, x0)):int(min(w, x1))] = True
    band &= label != ROAD
    c0, c1 = _jitter(rng, (90, 85, 110), 15), _jitter(rng, (60, 60, 75), 10)
    stripes = (np.arange(w) // max(1, w // 80)) % 2 == 0
    _fill(img, label, band, FENCE, c0)
    img[band & stripes[None, :]] = c1

  # Trees: clusters of textured green blobs on trunks.
  for _ in range(rng.integers(0, 4)):
    cx = rng.uniform(0, w)
    base = horizon + rng.uniform(0.0, 0.15) * h
    r = rng.uniform(0.05, 0.12) * w
    mask = np.zeros((h, w), np.uint8)
    cv2.rectangle(mask, (int(cx - r * 0.1), int(base - 2 * r)), (int(cx + r * 0.1), int(base)), 1,
                  -1)
    for _ in range(5):
      cv2.circle(mask, (int(cx + rng.normal(0, r * 0.6)), int(base - 2 * r + rng.normal(0, r * 0.5))),
                 int(r * rng.uniform(0.5, 1.0)), 1, -1)
    mask = mask.astype(bool) & (label != ROAD)
    leaf = _jitter(rng, (95, 115, 55), 18)
    texture = rng.uniform(0.55, 1.25, (h, w, 1)).astype(np.float32)
    img[mask] = (leaf * texture)[mask]
    label[mask] = TREE

  # Poles, half of them carrying a sign.
  for _ in range(rng.integers(1, 4)):
    px = rng.uniform(0, w)
    base = horizon + rng.uniform(0.05, 0.3) * (h - horizon)
    ptop = base - rng.uniform(0.3, 0.7) * h
    pw = max(1.0, w / 160 * rng.uniform(1, 3))
    _rect(img, label, px, ptop, px + pw, base, POLE, _jitter(rng, (150, 150, 140), 25))
    if rng.random() < 0.5:
      s = rng.uniform(0.03, 0.06) * w
      colour = _jitter(rng, rng.choice([(200, 40, 40), (40, 70, 190), (220, 200, 50)]), 20)
      if rng.random() < 0.5:
        _rect(img, label, px - s / 2, ptop, px + s / 2, ptop + s, SIGN, colour)
      else:
        mask = np.zeros((h, w), np.uint8)
        cv2.circle(mask, (int(px), int(ptop + s / 2)), int(s / 2) + 1, 1, -1)
        _fill(img, label, mask.astype(bool), SIGN, colour)

  # Road users, far ones first so near ones overlap them.
  objects = []
  for _ in range(rng.integers(0, 5)):
    objects.append((CAR, rng.uniform(0.1, 1.0)))
  for _ in range(rng.integers(0, 4)):
    objects.append((PEDESTRIAN, rng.uniform(0.1, 1.0)))
  for _ in range(rng.integers(0, 2)):
    objects.append((BICYCLIST, rng.uniform(0.2, 1.0)))
  for cls, depth in sorted(objects, key=lambda o: o[1]):
    y = horizon + depth * (h - horizon)  # Where the object touches the ground.
    scale = 0.15 + 0.85 * depth
    if cls == CAR:
      cw, ch = 0.3 * w * scale, 0.16 * w * scale
      cx = vx + (rng.uniform(-0.6, 0.6) * w) * depth
      body = _jitter(rng, rng.choice([(70, 40, 130), (150, 30, 30), (190, 190, 195), (40, 40, 45),
                                      (30, 60, 120)]), 25)
      _rect(img, label, cx - cw / 2, y - ch, cx + cw / 2, y, CAR, body)
      _rect(img, label, cx - cw * 0.35, y - ch * 1.5, cx + cw * 0.35, y - ch * 0.95, CAR,
            body * 0.9)
      _rect(img, label, cx - cw * 0.3, y - ch * 1.4, cx + cw * 0.3, y - ch, None,
            _jitter(rng, (60, 70, 80), 10))
      for wx in (cx - cw * 0.3, cx + cw * 0.3):
        mask = np.zeros((h, w), np.uint8)
        cv2.circle(mask, (int(wx), int(y)), max(1, int(ch * 0.22)), 1, -1)
        _fill(img, label, mask.astype(bool), CAR, np.array([25, 25, 25], np.float32))
    elif cls == PEDESTRIAN:
      ph = 0.3 * h * scale
      px = rng.uniform(0, w)
      clothes = _jitter(rng, rng.choice([(60, 60, 20), (40, 40, 90), (120, 30, 30), (30, 30, 30)]),
                        25)
      _rect(img, label, px - ph * 0.12, y - ph * 0.8, px + ph * 0.12, y - ph * 0.35, PEDESTRIAN,
            clothes)
      _rect(img, label, px - ph * 0.1, y - ph * 0.35, px + ph * 0.1, y, PEDESTRIAN, clothes * 0.7)
      mask = np.zeros((h, w), np.uint8)
      cv2.circle(mask, (int(px), int(y - ph * 0.88)), max(1, int(ph * 0.09)), 1, -1)
      _fill(img, label, mask.astype(bool), PEDESTRIAN, _jitter(rng, (200, 160, 130), 20))
    else:
      bh = 0.28 * h * scale
      bx = vx + rng.uniform(-0.5, 0.5) * w * depth
      mask = np.zeros((h, w), np.uint8)
      for wx in (bx - bh * 0.3, bx + bh * 0.3):
        cv2.circle(mask, (int(wx), int(y - bh * 0.15)), max(2, int(bh * 0.15)), 1,
                   max(1, int(bh * 0.04)))
      cv2.rectangle(mask, (int(bx - bh * 0.1), int(y - bh)), (int(bx + bh * 0.1), int(y - bh * 0.3)),
                    1, -1)
      _fill(img, label, mask.astype(bool), BICYCLIST, _jitter(rng, (30, 110, 170), 30))

  # Void: unlabelled clutter of any colour.
  for _ in range(rng.integers(0, 3)):
    cx, cy = rng.uniform(0, w), rng.uniform(horizon * 0.5, h)
    pts = np.stack([cx + rng.normal(0, w * 0.04, 5), cy + rng.normal(0, h * 0.04, 5)], 1)
    hull = cv2.convexHull(pts.astype(np.float32)).reshape(-1, 2)
    _fill(img, label, _poly((h, w), hull), VOID, rng.uniform(0, 255, 3))

  # Photometric variation: brightness, tint, blur, noise.
  img *= rng.uniform(0.7, 1.25) * rng.uniform(0.9, 1.1, 3)
  img = cv2.GaussianBlur(img, (3, 3), 0.8)
  img += rng.normal(0, 8, img.shape).astype(np.float32)
  return np.clip(np.round(img), 0, 255).astype(np.uint8), label


def write_synthetic_camvid(out_dir, *, num_train, num_val, num_test, height, width, seed):
  """Writes scenes in CamVid's SegNet layout under out_dir; returns out_dir as a Path.

  Byte-identical for the same arguments; scene i of a split depends only on (seed, split, i).
  """
  out_dir = Path(out_dir)
  for split, count in (('train', num_train), ('val', num_val), ('test', num_test)):
    image_dir, label_dir = out_dir / split, out_dir / f'{split}annot'
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
      rng = np.random.default_rng([seed, _SPLIT_CODES[split], i])
      rgb, label = draw_scene(rng, height, width)
      name = f'synth_{split}_{i:05d}.png'
      if not cv2.imwrite(os.fspath(image_dir / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f'{image_dir / name}: cannot write')
      if not cv2.imwrite(os.fspath(label_dir / name), label):
        raise OSError(f'{label_dir / name}: cannot write')
      lines.append(f'/SegNet/CamVid/{split}/{name} /SegNet/CamVid/{split}annot/{name}\n')
    (out_dir / f'{split}.txt').write_text(''.join(lines))
  return out_dir


# ---------------------------------------------------------------------------------------------
# A custom folder data set: coloured shapes on noise (data.name='folder').
# ---------------------------------------------------------------------------------------------

SHAPE_CLASSES = ('background', 'disc', 'box')
SHAPE_COLORS = ((40, 40, 40), (230, 60, 60), (60, 120, 230))  # Label colours (colours encoding).
SHAPE_VOID_COLOR = (255, 255, 255)
SHAPE_IGNORE_VALUE = 255  # Void in the class-id encoding.


def draw_shapes(rng, height, width):
  """(rgb uint8 [H, W, 3], label uint8 [H, W] with void = 3): discs and boxes on noise.

  Discs are reddish and boxes bluish with overlapping spreads, so shape helps; a void band of
  random width runs along one edge, and unlabelled specks are scattered as void too.
  """
  img = rng.normal(120, 35, (height, width, 3))
  label = np.zeros((height, width), np.uint8)
  for _ in range(rng.integers(2, 5)):
    cls = int(rng.integers(1, 3))
    size = rng.uniform(0.12, 0.28) * min(height, width)
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    mask = np.zeros((height, width), np.uint8)
    if cls == 1:
      cv2.circle(mask, (int(cx), int(cy)), int(size), 1, -1)
      colour = _jitter(rng, (200, 80, 70), 25)
    else:
      cv2.rectangle(mask, (int(cx - size), int(cy - size * 0.7)),
                    (int(cx + size), int(cy + size * 0.7)), 1, -1)
      colour = _jitter(rng, (70, 110, 200), 25)
    m = mask.astype(bool)
    img[m] = colour + rng.normal(0, 20, (int(m.sum()), 3))
    label[m] = cls
  band = int(rng.integers(2, max(3, height // 8)))
  label[-band:] = 3  # Void: an unlabelled strip at the bottom.
  specks = rng.random((height, width)) < 0.01
  label[specks] = 3
  img = cv2.GaussianBlur(np.clip(img, 0, 255).astype(np.uint8), (3, 3), 0)
  return img, label


def write_shapes_folder(root, encoding='ids', splits='folders', counts=(24, 8, 8), height=64,
                        width=80, seed=0, image_suffix='.jpg'):
  """Writes a 3-class (+ void) data set for data.name='folder'; returns its classes file path.

  encoding 'ids': single-channel PNG labels with void 255; 'colors': RGB PNG labels in
  SHAPE_COLORS with void SHAPE_VOID_COLOR. splits 'folders' writes images/<split>/ and
  labels/<split>/; 'lists' and 'random' write images/ and labels/ (and <split>.txt for 'lists').
  The classes file (classes.txt: "name id R G B" per line, void as id 255) is written too.
  """
  root = Path(root)
  lists = {}
  for split, count in zip(('train', 'val', 'test'), counts):
    sub = split if splits == 'folders' else ''
    (root / 'images' / sub).mkdir(parents=True, exist_ok=True)
    (root / 'labels' / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
      rng = np.random.default_rng((seed, _SPLIT_CODES[split], i))
      rgb, label = draw_shapes(rng, height, width)
      stem = f'{split}_{i:04d}'
      cv2.imwrite(os.fspath(root / 'images' / sub / f'{stem}{image_suffix}'), rgb[..., ::-1])
      if encoding == 'ids':
        out = np.where(label == 3, SHAPE_IGNORE_VALUE, label).astype(np.uint8)
      else:
        palette = np.asarray(SHAPE_COLORS + (SHAPE_VOID_COLOR,), np.uint8)
        out = palette[label][..., ::-1]  # cv2 writes BGR.
      cv2.imwrite(os.fspath(root / 'labels' / sub / f'{stem}.png'), out)
      lists.setdefault(split, []).append(f'{stem}{image_suffix}')
  if splits == 'lists':
    for split, names in lists.items():
      (root / f'{split}.txt').write_text('\n'.join(names) + '\n')
  classes = root / 'classes.txt'
  rows = [f'{n} {i} {" ".join(map(str, c))}' for i, (n, c) in
          enumerate(zip(SHAPE_CLASSES, SHAPE_COLORS))]
  classes.write_text('# name id R G B\n' + '\n'.join(rows) +
                     f'\nvoid {SHAPE_IGNORE_VALUE} {" ".join(map(str, SHAPE_VOID_COLOR))}\n')
  return classes
