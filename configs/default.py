"""Standard CamVid protocol: 11 classes, void ignored, official train/val/test splits.

Train on train/, select (plateau, early stopping, best checkpoint) on val/, report on test/ at the
native 360x480 resolution. Every field is overridable from the command line, e.g.
`--config.batch_size=8 --config.data.manual_dir=/data/CamVid`.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameter init, shuffling and augmentation.
  config.batch_size = 8  # Global training batch, split over all devices.
  config.eval_batch_size = 8  # Largest global evaluation batch; evened out per split, last padded.
  config.num_epochs = 120  # Upper bound; early stopping usually ends sooner.
  config.parallelism = 'jit'  # 'jit' (jit over a device Mesh) or 'pmap'.
  config.dtype = 'float32'  # Activation dtype: 'float32' or 'bfloat16' (parameters stay float32).
  # main.py restarts itself with glibc's malloc on transparent huge pages (glibc.malloc.hugetlb=1):
  # otherwise every step page-faults its large buffers anew, 4 KB at a time (train step 1.25x on
  # this CPU; sepres_jax/host_memory.py).
  config.host_huge_pages = True
  # ... and with malloc keeping the memory it frees (one arena, no mmap, no trimming): otherwise
  # blocks freed in a step go back to the kernel, and on a VM with free page reporting (this one)
  # the host takes them back and refills them slowly (1-2 s stalls every few steps with
  # model.large_conv's Fourier form). Costs peak memory (seed config: 5.9 against 3.5 GB).
  config.host_keep_memory = True
  config.init_from = ''  # Run or pretrained/<name> to start from (evaluate/predict/export: use).
  config.log_every_steps = 10  # Progress line and train scalars every this many steps.
  config.checkpoint_every_steps = 0  # Extra checkpoints inside an epoch (0: end of epoch only).

  # Data.
  config.data = ml_collections.ConfigDict()
  config.data.name = 'camvid'  # 'camvid' (a folder or the archive), 'folder' or 'synthetic'.
  config.data.manual_dir = ''  # Local CamVid folder (SegNet or prepped layout); '' downloads.
  config.data.cache_dir = '~/.cache/sepres_jax'  # Built datasets go here, never into manual_dir.
  config.data.split = 'official'  # 'official' (train/val/test) or 'random85' (85:15 of train).
  config.data.split_seed = 42  # Seed of the 'random85' split.
  config.data.image_size = (224, 288)  # Training size (H, W), divisible by 32; ~3:4 like CamVid.
  config.data.eval_resize = False  # Validate on resized labels too (cheap) instead of as eval.input.
  config.data.lab = False  # Append CIELAB channels (6 input channels), as the original post did.
  config.data.augment = ml_collections.ConfigDict()  # Training augmentation; all off by default.
  config.data.augment.crop = False  # Keep the aspect and take random image_size crops.
  config.data.augment.scale = (1.0, 1.0)  # Random scale range (with crop), 1 = height fits.
  config.data.augment.jitter = 0.0  # Brightness/contrast/saturation factor range 1 +- jitter.
  config.data.augment.hue = 0.0  # Random hue rotation in [-hue, hue] degrees.
  config.data.augment.blur = 0.0  # Probability of a Gaussian blur (sigma 0.3-1.5 pixels).
  config.data.random_flip = False  # Random horizontal flips of training examples (augmentation).
  config.data.num_classes = 11  # Real classes; the void label is num_classes.
  config.data.ignore_void = True  # Ignore void in loss and metrics; False predicts it as a class.
  config.data.class_weights = ''  # '', 'median_frequency', 'inverse_log', or comma floats.
  config.data.num_workers = 0  # grain worker processes (0: threads in the main process).
  config.data.num_threads = 2  # grain reader threads.
  config.data.prefetch = 4  # Batches prefetched ahead of the train step.
  config.data.cache_decoded_mb = 1024  # Decoded train/val examples kept, per split; 0: off.
  # Any folder of image/label pairs (data.name='folder'; see configs/custom.py and the README).
  config.data.folder = ml_collections.ConfigDict()
  config.data.folder.images = 'images'  # Image sub-folder of data.manual_dir.
  config.data.folder.labels = 'labels'  # Label sub-folder (files matched to images by stem).
  config.data.folder.encoding = 'ids'  # 'ids' (single-channel class ids) or 'colors' (RGB).
  config.data.folder.classes_file = ''  # Lines "name id R G B"; replaces class_names/colors.
  config.data.folder.class_names = ()  # The K class names, in id order 0..K-1.
  config.data.folder.colors = ()  # Their K colours, ((R, G, B), ...): palette and pictures.
  config.data.folder.ignore_value = 255  # Label id of void/unlabelled pixels (ids encoding).
  config.data.folder.ignore_color = ()  # Void colour (colours encoding); () = (0, 0, 0).
  config.data.folder.splits = 'folders'  # 'folders', 'lists' (<split>.txt) or 'random'.
  config.data.folder.fractions = (0.7, 0.15, 0.15)  # Train/val/test fractions of 'random'.
  # Synthetic scenes (data.name='synthetic').
  config.data.synthetic = ml_collections.ConfigDict()
  config.data.synthetic.num_train = 96
  config.data.synthetic.num_val = 24
  config.data.synthetic.num_test = 24
  config.data.synthetic.height = 120
  config.data.synthetic.width = 160
  config.data.synthetic.seed = 0  # Seed of the scenes; the same arguments give identical files.

  # Model.
  config.model = ml_collections.ConfigDict()
  config.model.widths = (16, 32, 64, 96, 128)  # Stem, then the four residual blocks' outputs.
  config.model.head_width = 2048  # conv6/conv7 channels of the FCN-8 head.
  config.model.block_depth = 3  # SeparableConv+BatchNorm+ELU units per residual block.
  config.model.fine_skips = 0  # Skips finer than FCN-8's: 1 adds pool2 (stride 4), 2 also pool1.
  config.model.refine = 0  # Channels of a refinement decoder on pool2 and pool1 (0: off).
  config.model.context = 0  # Channels of each branch of a context module on pool5 (0: off).
  # 0.9 (PyTorch's default): running statistics settle in ~30 steps. Keras' 0.99 (configs/seed.py)
  # needs ~500, so early epochs validate with stale statistics.
  config.model.bn_momentum = 0.9
  config.model.bn_epsilon = 1e-3
  config.model.impl = 'auto'  # Layer kernels: 'auto' (per backend), 'xla', 'fast_cpu', 'native_cpu'.
  # conv6 (7x7) on the CPU impls: 'dft' (products of Fourier transforms), 'rows' (a product per
  # kernel row) or 'auto' (dft at a batch of 8 or more, where its kernel transform pays).
  config.model.large_conv = 'auto'

  # Optimiser: RMSprop (Keras' decay and epsilon) with plateau decay once per epoch.
  config.learning_rate = 1e-3
  config.rmsprop_decay = 0.9
  config.rmsprop_eps = 1e-7
  # True: optax's update g / sqrt(v + eps), with which every result in the README was trained.
  # False: Keras' g / (sqrt(v) + eps). With eps 1e-7 they differ where sqrt(v) is below ~1e-3.
  config.rmsprop_eps_in_sqrt = True
  config.weight_decay = 0.0  # Decoupled (AdamW-style) decay of conv kernels, times the rate.
  config.label_smoothing = 0.0  # Cross-entropy label smoothing.
  config.lovasz_weight = 0.0  # Adds this times the per-image Lovasz-softmax loss (IoU surrogate).
  # Exponential moving average of the weights (and BatchNorm statistics), updated every step with
  # decay min(ema_decay, (1 + t) / (10 + t)); when on, validation, the best checkpoint, evaluate,
  # predict, init_from and packing use the average. 0: off.
  config.ema_decay = 0.0
  # Distillation (sepres_jax/distill.py): adds weight times the cross-entropy against a trained
  # model's probabilities of the training images, averaged over its flip and scales.
  config.distill = ml_collections.ConfigDict()
  config.distill.teacher = ''  # A workdir or pretrained/<name> folder of this architecture,
  # or several, comma-separated: an ensemble teacher (probabilities averaged).
  config.distill.weight = 0.0  # 0: off.
  config.distill.flip = True  # The teacher's predictions average the mirror image's ...
  config.distill.scales = (0.75, 1.0, 1.25)  # ... and these input scales'.
  # Keep the teacher's targets in <workdir>/distill_targets.npz, reused when the run resumes with
  # the same teacher weights, images and settings (a fingerprint of them is checked).
  config.distill.cache = True
  config.schedule = 'constant'  # Per-step multiplier: 'constant', 'cosine' or 'polynomial'.
  config.warmup_steps = 0  # Linear warm-up steps (any schedule).
  config.end_factor = 0.0  # Final multiplier of 'cosine' and 'polynomial'.
  config.poly_power = 0.9  # Exponent of 'polynomial' (0.9: the 'poly' rule of DeepLab).
  config.plateau = ml_collections.ConfigDict()
  config.plateau.monitor = 'val_miou'  # config_check.HISTORY_METRICS: val_loss, val_accuracy...
  config.plateau.factor = 0.1
  config.plateau.patience = 5
  config.plateau.cooldown = 0
  config.plateau.min_delta = 1e-4  # Absolute change that counts as an improvement (Keras').
  config.plateau.min_scale = 1e-4
  config.early_stopping = ml_collections.ConfigDict()
  config.early_stopping.monitor = 'val_miou'
  config.early_stopping.patience = 15  # Epochs without improvement; 0 disables.
  config.best_metric = 'val_miou'  # The 'best' checkpoint maximises (or minimises *_loss) this.

  # --mode=benchmark.
  config.benchmark = ml_collections.ConfigDict()
  config.benchmark.repeats = 5  # Timed steps after warm-up (the median is reported).
  config.benchmark.infer_size = (384, 480)  # CamVid's 360x480 padded to a multiple of 32.
  config.benchmark.profile = False  # Also print the train and infer steps' time per layer.
  config.benchmark.matmul_size = 4096  # n of the n x n matrix product timed as the limit.
  # The accelerator's data-sheet peak in TFLOP/s for the run's dtype (e.g. an H100 SXM's dense
  # bf16: 989); when set, the JSON also gives the fraction of it. 0: not reported.
  config.benchmark.peak_tflops = 0.0

  # Evaluation.
  config.eval = ml_collections.ConfigDict()
  config.eval.split = 'test'
  config.eval.checkpoint = 'best'  # 'best' or 'latest'.
  # Scored at native resolution either way: 'resize' predicts on a copy resized to image_size and
  # resizes the logits back; 'native' predicts on the native image padded to a multiple of 32.
  config.eval.input = 'resize'
  config.eval.flip = False  # Average the predictions of the image and its mirror image.
  config.eval.scales = (1.0,)  # Input scales whose predictions are averaged, e.g. (0.75, 1, 1.25).
  # Ensemble: comma-separated workdirs (their best checkpoints) or pretrained/<name> folders of the
  # same network whose class probabilities are averaged with these weights' (evaluate, predict).
  config.eval.ensemble = ''
  config.eval.ignore_void = True  # Score the real classes only (void learned as a class too).
  # With void learned as a class, validation in training also scores it (as Keras' accuracy did;
  # configs/seed.py); otherwise validation scores what eval.ignore_void makes evaluate score.
  config.eval.val_counts_void = False
  config.eval.num_panels = 6  # Image / prediction / truth panels drawn by --mode=evaluate (0: none).
  config.eval.worst_first = True  # Panels of the lowest-mIoU images first (else the split's first).

  # Pictures (--mode=visualize, and during training).
  config.visualize = ml_collections.ConfigDict()
  config.visualize.what = 'all'  # 'all' (data, + curves if history.json exists), 'data', 'curves'.
  config.visualize.split = 'train'  # Split whose images, labels and class frequencies are drawn.
  config.visualize.num_images = 4  # Images drawn (class masks, label panel, resize comparison).
  config.visualize.num_tensorboard_images = 3  # Fixed val images + predictions in TensorBoard.

  # Prediction on any images and videos (--mode=predict).
  config.predict = ml_collections.ConfigDict()
  config.predict.input = ''  # An image, a video, a folder (its images and videos) or a glob.
  config.predict.output = ''  # Output folder; '' writes into <workdir>/predictions.
  config.predict.resize = ''  # 'resize' (image_size, and back), 'native' (pad to /32), '': eval.input.
  config.predict.batch_size = 4  # Images or video frames per forward pass (of one size).
  config.predict.alpha = 0.5  # Opacity of the class colours in <stem>_overlay.png (and .mp4).
  config.predict.save_frames = False  # Videos: also each frame's class ids, <stem>_frames/*.png.

  # --mode=export: the network as a jax.export artifact + meta.json (see sepres_jax/exported.py).
  # Its input is predict's: predict.resize (or eval.input), data.image_size, eval.flip/scales.
  config.export = ml_collections.ConfigDict()
  config.export.output = ''  # Output folder; '' writes into <workdir>/export.
  return config
