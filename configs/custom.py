"""Template for your own data: copy this file, then edit the fields marked EDIT.

Your folder holds images and label maps with matching file names (stems), e.g.

    my_data/images/train/0001.jpg   my_data/labels/train/0001.png   (and val/, optionally test/)

Label maps are class ids (single-channel PNG: 0..K-1, ignore_value for unlabelled pixels) or
colours (RGB PNG in the palette below; set encoding='colors' and ignore_color). Check the folder
first, then train, evaluate and predict:

    python main.py --config=configs/my_data.py --mode=verify
    python main.py --config=configs/my_data.py --workdir=runs/my_data
    python main.py --config=configs/my_data.py --workdir=runs/my_data --mode=evaluate
    python main.py --config=configs/my_data.py --workdir=runs/my_data --mode=predict \
        --config.predict.input=photos/

Every other field of configs/default.py (augmentation, schedule, model width, ...) can be changed
here or on the command line; the README's "Train on your own data" explains the choices.
"""

from configs import default


def get_config():
  config = default.get_config()
  data = config.data
  data.name = 'folder'
  data.manual_dir = 'my_data'  # EDIT: the data folder.
  data.folder.images = 'images'  # Sub-folders of manual_dir with the images and the label maps.
  data.folder.labels = 'labels'
  data.folder.encoding = 'ids'  # EDIT: 'ids' (single-channel PNG) or 'colors' (RGB PNG).
  # EDIT: the classes in id order, and their colours (the palette of 'colors' labels, and of every
  # picture). Or put them in a file, one "name id R G B" per line, and set classes_file instead.
  data.folder.class_names = ('background', 'disc', 'box')
  data.folder.colors = ((40, 40, 40), (230, 60, 60), (60, 120, 230))
  data.folder.classes_file = ''
  data.num_classes = 3  # EDIT: the number of classes (void not counted).
  data.folder.ignore_value = 255  # EDIT: id of unlabelled pixels ('ids' labels).
  data.folder.ignore_color = ()  # EDIT: colour of unlabelled pixels ('colors'); () = black
  # (with 'ids', where it only draws pictures: white, or grey, ..., if a class is black).
  # Splits: 'folders' (images/train/, images/val/, images/test/ and the same under labels/),
  # 'lists' (train.txt, val.txt, test.txt beside images/: one file name per line) or 'random'.
  data.folder.splits = 'folders'
  data.folder.fractions = (0.7, 0.15, 0.15)  # Train/val/test shares of 'random', seeded by split_seed.
  data.image_size = (224, 288)  # EDIT: training size (H, W), multiples of 32.

  # Light, generally useful defaults for a new data set; see configs/camvid_best.py for more.
  data.augment.crop = True
  data.augment.scale = (0.75, 1.5)
  data.random_flip = True
  config.num_epochs = 100
  config.eval.input = 'resize'
  return config
