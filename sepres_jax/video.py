"""--mode=predict on videos: every frame predicted as an image, into an overlay video.

Frames are decoded by OpenCV (FFmpeg), turned from BGR into RGB and predicted exactly as image
files are (`predict.label_maps`: the same preprocessing, input mode, flip/scale averaging and
batches of `predict.batch_size`). For an input `<stem>.<ext>` the output folder gets
`<stem>_overlay.mp4` (MPEG-4 Part 2, fourcc 'mp4v'; `<stem>_overlay.avi` with Motion JPEG where
this OpenCV cannot write mp4v) at the input's frame rate and frame size (odd sizes lose their last
row or column: the encoders need even ones), and with `predict.save_frames` the per-frame class ids
`<stem>_frames/000000.png`, ... (uint8, the frame's size, as an image's `<stem>.png`).
"""

import contextlib
import math
import os
import shutil
import time

import cv2
import numpy as np
from PIL import Image as PILImage

from sepres_jax import drawing

VIDEO_SUFFIXES = ('.mp4', '.avi', '.mov', '.mkv', '.webm', '.m4v', '.mpg', '.mpeg')
CODECS = (('mp4v', '.mp4'), ('MJPG', '.avi'))  # Overlay video: the first one that opens.
DEFAULT_FPS = 25.0  # Frame rate of the overlay when the input does not state one.
PROGRESS_SECONDS = 10.0  # A progress line at most this often.
# FFmpeg quiet (read when OpenCV first starts it): unreadable files are named once, by the caller.
os.environ.setdefault('OPENCV_FFMPEG_LOGLEVEL', '-8')


class VideoError(Exception):
  """A video that cannot be opened, decoded or written: reported by name and skipped."""


def has_video_suffix(path: str) -> bool:
  return path.lower().endswith(VIDEO_SUFFIXES)


@contextlib.contextmanager
def _quiet():
  """No OpenCV warnings on stderr for unreadable files: the caller names them once."""
  level = cv2.utils.logging.getLogLevel()
  cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
  try:
    yield
  finally:
    cv2.utils.logging.setLogLevel(level)


def open_video(path: str) -> cv2.VideoCapture:
  with _quiet():
    capture = cv2.VideoCapture(path)
  if not capture.isOpened():
    capture.release()
    empty = os.path.isfile(path) and not os.path.getsize(path)
    raise VideoError('empty file' if empty else 'OpenCV cannot open it as a video')
  return capture


def decodes(path: str) -> bool:
  """Whether OpenCV opens `path` and decodes a first frame (for files PIL cannot read)."""
  try:
    capture = open_video(path)
  except VideoError:
    return False
  try:
    with _quiet():
      return bool(capture.read()[0])
  finally:
    capture.release()


def open_writer(base: str, fps: float, size_wh) -> tuple[cv2.VideoWriter, str]:
  """(writer, path) of `base` + the first of CODECS' suffixes whose fourcc this OpenCV writes."""
  for fourcc, suffix in CODECS:
    path = base + suffix
    with _quiet():
      writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), fps, tuple(size_wh))
    if writer.isOpened():
      return writer, path
    writer.release()
    if os.path.isfile(path) and not os.path.getsize(path):
      os.remove(path)
  raise VideoError(f'this OpenCV writes none of the codecs {[c for c, _ in CODECS]}')


def _read(capture, n: int) -> list[np.ndarray]:
  frames = []
  while len(frames) < n:
    ok, frame = capture.read()
    if not ok:
      break
    frames.append(frame)
  return frames


def predict_video(path, out_dir, stem, label_maps, colors, *, alpha=0.5, batch_size=4,
                  save_frames=False, make_out_dir=None) -> int:
  """Predicts every frame of `path` into the overlay video (and label maps); returns frames.

  `label_maps(rgbs)` -> uint8 class ids [h, w] for each of up to `batch_size` RGB frames.
  `make_out_dir(out_dir)` creates the folder once a frame has decoded (default os.makedirs).
  Raises VideoError when the file opens as no video or not one frame decodes.
  """
  capture = open_video(path)
  fps = capture.get(cv2.CAP_PROP_FPS)
  fps = fps if math.isfinite(fps) and 0 < fps < 1000 else DEFAULT_FPS
  total = max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0), 0)  # The header's; 0: unknown.
  # Written under temporary names and renamed into place once every frame is done, so a kill,
  # a full disk or a failing decoder keeps an earlier run's video and frames whole.
  frames_dir = os.path.join(out_dir, f'{stem}_frames') if save_frames else None
  frames_tmp = os.path.join(out_dir, f'.{stem}_frames.partial') if save_frames else None
  writer = out_path = tmp_path = None
  done, t0 = 0, time.time()
  last = t0
  finished = False
  try:
    while batch := _read(capture, max(1, int(batch_size))):
      if writer is None:  # The folder, once a frame has decoded.
        h, w = batch[0].shape[:2]
        (make_out_dir or (lambda d: os.makedirs(d, exist_ok=True)))(out_dir)
        base = os.path.join(out_dir, f'.{stem}_overlay.partial')
        writer, tmp_path = open_writer(base, fps, (w - w % 2, h - h % 2))
        out_path = os.path.join(out_dir, f'{stem}_overlay{tmp_path[len(base):]}')
        if frames_tmp:
          shutil.rmtree(frames_tmp, ignore_errors=True)  # A killed run's.
          os.makedirs(frames_tmp)
      # All frames at the first one's size (a stream that changes size is resized back).
      rgbs = [cv2.cvtColor(f if f.shape[:2] == (h, w) else cv2.resize(f, (w, h)),
                           cv2.COLOR_BGR2RGB) for f in batch]
      for rgb, ids in zip(rgbs, label_maps(rgbs)):
        picture = drawing.overlay(rgb, ids, colors, alpha)[:h - h % 2, :w - w % 2]
        writer.write(cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        if frames_dir:
          PILImage.fromarray(np.ascontiguousarray(ids, np.uint8), mode='L').save(
              os.path.join(frames_tmp, f'{done:06d}.png'))
        done += 1
      if time.time() - last >= PROGRESS_SECONDS:
        last = time.time()
        print(f'{path}: {done}/{total or "?"} frames ({done / (last - t0):.1f} frames/s)',
              flush=True)
    if writer is not None:
      writer.release()
      writer = None
      os.replace(tmp_path, out_path)
      if frames_tmp:  # Each frame renamed into place; other files there (a user's) stay.
        os.makedirs(frames_dir, exist_ok=True)
        for name in sorted(os.listdir(frames_tmp)):
          os.replace(os.path.join(frames_tmp, name), os.path.join(frames_dir, name))
        os.rmdir(frames_tmp)
        for name in os.listdir(frames_dir):  # Frames of a longer video predicted earlier go.
          if len(name) == 10 and name.endswith('.png') and name[:6].isdigit() and int(
              name[:6]) >= done:
            os.remove(os.path.join(frames_dir, name))
      finished = True
  finally:
    capture.release()
    if writer is not None:
      writer.release()
    if not finished:  # Nothing half-written is left beside the earlier outputs.
      for leftover in (tmp_path, frames_tmp):
        if leftover and os.path.isdir(leftover):
          shutil.rmtree(leftover, ignore_errors=True)
        elif leftover and os.path.exists(leftover):
          os.remove(leftover)
  if not done:
    raise VideoError('not one frame could be decoded')
  short = f' (its header says {total})' if done < total else ''
  print(f'{path}: {done} frames{short} at {fps:g} fps, {done / max(time.time() - t0, 1e-9):.1f} '
        f'frames/s -> {out_path}' + (f', {frames_dir}{os.sep}' if frames_dir else ''), flush=True)
  return done
