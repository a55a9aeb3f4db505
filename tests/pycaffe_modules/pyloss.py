"""A Euclidean loss written as a pycaffe Python layer, the way Caffe's
examples/pycaffe/layers/pyloss.py writes it: ``import caffe``, subclass
``caffe.Layer``, compare ``bottom[i].count``, divide by ``bottom[0].num``.

Used unchanged by real pycaffe (tools/make_train_net_goldens.py) and by netlib.
"""
import caffe
import numpy as np


class EuclideanLossLayer(caffe.Layer):
    """loss = sum((x - y)^2) / num / 2 over two bottoms of the same count."""

    def setup(self, bottom, top):
        if len(bottom) != 2:
            raise Exception("EuclideanLossLayer needs two bottoms")

    def reshape(self, bottom, top):
        if bottom[0].count != bottom[1].count:
            raise Exception("EuclideanLossLayer bottoms differ in count")
        self.diff = np.zeros_like(bottom[0].data, dtype=np.float32)
        top[0].reshape(1)

    def forward(self, bottom, top):
        self.diff[...] = bottom[0].data - bottom[1].data
        top[0].data[...] = np.sum(self.diff ** 2) / bottom[0].num / 2.

    def backward(self, top, propagate_down, bottom):
        for i in range(2):
            if not propagate_down[i]:
                continue
            sign = 1 if i == 0 else -1
            bottom[i].diff[...] = sign * self.diff / bottom[i].num
