"""pycaffe's ``caffe.Classifier``: a Net that classifies whole images.

::

    import netlib as caffe
    clf = caffe.Classifier("deploy.prototxt", "weights.caffemodel",
                           image_dims=(256, 256), mean=mu, raw_scale=255,
                           channel_swap=(2, 1, 0))
    probs = clf.predict([caffe.io.load_image("cat.jpg")])   # (N, classes)
"""
import numpy as np

from . import io as _io
from .net import Net
from .proto.caffe_pb2 import TEST


def _make_transformer(net, mean, input_scale, raw_scale, channel_swap):
    """The Transformer Classifier and Detector share: HxWxK -> KxHxW for the
    first input, plus whichever options were given (applied in the order
    mean, input_scale, raw_scale, channel_swap, each one validated)."""
    name = net.inputs[0]
    tf = _io.Transformer({name: net.blobs[name].data.shape})
    tf.set_transpose(name, (2, 0, 1))
    for value, setter in ((mean, tf.set_mean), (input_scale, tf.set_input_scale),
                          (raw_scale, tf.set_raw_scale), (channel_swap, tf.set_channel_swap)):
        if value is not None:
            setter(name, value)
    return tf


class Classifier(Net):
    """A TEST-phase Net (``model_file`` with ``pretrained_file`` weights)
    plus the preprocessing for its first input.

    ``image_dims`` (height, width): the size images are resized to before
    cropping; by default the net's input size (so the crop is the whole
    image).  ``mean``, ``input_scale``, ``raw_scale``, ``channel_swap``: as
    the Transformer setters (``self.transformer``).  ``crop_dims`` is the
    net input's (height, width) as an array.

    As pycaffe, ``image_dims`` is tested with ``not image_dims``, so pass a
    tuple or list (a NumPy array of 2 values raises ValueError).
    """

    def __init__(self, model_file, pretrained_file, image_dims=None, mean=None,
                 input_scale=None, raw_scale=None, channel_swap=None):
        Net.__init__(self, model_file, TEST, weights=pretrained_file)
        self.transformer = _make_transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.crop_dims = np.array(self.blobs[self.inputs[0]].data.shape[2:])
        if not image_dims:
            image_dims = self.crop_dims
        self.image_dims = image_dims

    def predict(self, inputs, oversample=True):
        """Class scores (the net's first output, usually softmax
        probabilities) for ``inputs``, a sequence of (H x W x K) images:
        an (N, classes) array.

        Each image is resized to ``image_dims``; with ``oversample`` the
        scores are the mean over the 10 crops of :func:`netlib.io.oversample`
        (corners, centre and their mirrors), otherwise the centre crop alone
        is used (its corners truncated to int as pycaffe).  Crops go through
        the transformer and ``forward_all``.
        """
        height, width = self.image_dims[0], self.image_dims[1]
        resized = np.zeros((len(inputs), height, width, inputs[0].shape[2]), dtype=np.float32)
        for i, image in enumerate(inputs):
            resized[i] = _io.resize_image(image, self.image_dims)
        if oversample:
            crops = _io.oversample(resized, self.crop_dims)
        else:
            centre = np.array(self.image_dims) / 2.0
            half = self.crop_dims / 2.0
            top, left, bottom, right = np.concatenate([centre - half, centre + half]).astype(int)
            crops = resized[:, top:bottom, left:right, :]
        name = self.inputs[0]
        batch = np.zeros((crops.shape[0], crops.shape[3], crops.shape[1], crops.shape[2]),
                         dtype=np.float32)
        for i, crop in enumerate(crops):
            batch[i] = self.transformer.preprocess(name, crop)
        scores = self.forward_all(**{name: batch})[self.outputs[0]]
        if oversample:
            scores = scores.reshape((len(scores) // 10, 10, -1)).mean(1)
        return scores
