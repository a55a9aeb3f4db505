"""Segmentation data layers written for pycaffe, in the way FCN's voc_layers.py
is: ``import caffe``, ``eval(self.param_str)``, Pillow images, one image per
forward with the tops reshaped to it, a seeded ``random`` pick in training.

Only the SBDD label format differs: FCN reads ``cls/<id>.mat`` with SciPy;
this module reads ``cls/<id>.png`` so that it needs only NumPy and Pillow.
Used unchanged by real pycaffe (tools/make_train_net_goldens.py) and by netlib.
"""
import random

import caffe
import numpy as np
from PIL import Image


class _SegDataLayer(caffe.Layer):
    """Tops: data (1, 3, H, W) mean-subtracted BGR float, label (1, 1, H, W)."""

    dir_key = None

    def setup(self, bottom, top):
        params = eval(self.param_str)
        self.root = params[self.dir_key]
        self.split = params["split"]
        self.mean = np.array(params["mean"])
        self.random = params.get("randomize", True)
        self.seed = params.get("seed", None)
        if len(top) != 2:
            raise Exception("Need to define two tops: data and label.")
        if len(bottom) != 0:
            raise Exception("Do not define a bottom.")
        self.indices = open(self.split_file(), "r").read().splitlines()
        self.idx = 0
        if "train" not in self.split:
            self.random = False
        if self.random:
            random.seed(self.seed)
            self.idx = random.randint(0, len(self.indices) - 1)

    def reshape(self, bottom, top):
        self.data = self.load_image(self.indices[self.idx])
        self.label = self.load_label(self.indices[self.idx])
        top[0].reshape(1, *self.data.shape)
        top[1].reshape(1, *self.label.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.data
        top[1].data[...] = self.label
        if self.random:
            self.idx = random.randint(0, len(self.indices) - 1)
        else:
            self.idx = (self.idx + 1) % len(self.indices)

    def backward(self, top, propagate_down, bottom):
        pass

    def load_image(self, idx):
        im = Image.open(self.image_path(idx))
        in_ = np.array(im, dtype=np.float32)
        in_ = in_[:, :, ::-1]
        in_ -= self.mean
        return in_.transpose((2, 0, 1))

    def load_label(self, idx):
        label = np.array(Image.open(self.label_path(idx)), dtype=np.uint8)
        return label[np.newaxis, ...]


class VOCSegDataLayer(_SegDataLayer):
    """PASCAL VOC: ImageSets/Segmentation/<split>.txt, JPEGImages/, SegmentationClass/."""

    dir_key = "voc_dir"

    def split_file(self):
        return "%s/ImageSets/Segmentation/%s.txt" % (self.root, self.split)

    def image_path(self, idx):
        return "%s/JPEGImages/%s.jpg" % (self.root, idx)

    def label_path(self, idx):
        return "%s/SegmentationClass/%s.png" % (self.root, idx)


class SBDDSegDataLayer(_SegDataLayer):
    """SBDD: <split>.txt, img/, cls/ (PNG labels here, .mat in FCN)."""

    dir_key = "sbdd_dir"

    def split_file(self):
        return "%s/%s.txt" % (self.root, self.split)

    def image_path(self, idx):
        return "%s/img/%s.jpg" % (self.root, idx)

    def label_path(self, idx):
        return "%s/cls/%s.png" % (self.root, idx)
