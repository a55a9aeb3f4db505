"""pycaffe's ``caffe.Detector``: classify windows (boxes) of images, R-CNN
style (Girshick et al., "Rich feature hierarchies for accurate object
detection and semantic segmentation", arXiv:1311.2524).

::

    import netlib as caffe
    det = caffe.Detector("deploy.prototxt", "weights.caffemodel", mean=mu,
                         raw_scale=255, channel_swap=(2, 1, 0), context_pad=16)
    for d in det.detect_windows([("cat.jpg", [[0, 0, 200, 250]])]):
        print(d["filename"], d["window"], d["prediction"].argmax())

Windows are (ymin, xmin, ymax, xmax) in pixels.  Selective Search proposals
need the external ``selective_search_ijcv_with_python`` module (and MATLAB),
as in pycaffe.
"""
import os

import numpy as np

from . import io as _io
from .classifier import _make_transformer
from .net import Net
from .proto.caffe_pb2 import TEST

SELECTIVE_SEARCH_URL = "https://github.com/sergeyk/selective_search_ijcv_with_python"


class Detector(Net):
    """A TEST-phase Net plus preprocessing for windowed detection.

    ``mean``, ``input_scale``, ``raw_scale``, ``channel_swap``: as the
    Transformer setters (``self.transformer``, transpose (2, 0, 1) preset).
    ``context_pad``: pixels of the net input that show context around the
    window (R-CNN); see :meth:`crop`.
    """

    def __init__(self, model_file, pretrained_file, mean=None, input_scale=None,
                 raw_scale=None, channel_swap=None, context_pad=None):
        Net.__init__(self, model_file, TEST, weights=pretrained_file)
        self.transformer = _make_transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.configure_crop(context_pad)

    def detect_windows(self, images_windows):
        """Classify windows of images.  ``images_windows``: an iterable of
        ``(image filename, windows)`` pairs (it is walked twice, so pass a
        list, not a generator); each window is cropped with :meth:`crop`
        from the image (load_image, RGB in [0, 1]), warped to the net input
        size by the transformer and run through ``forward_all``.

        Returns a list of dicts, in input order, with keys ``window`` (the
        window as given), ``prediction`` (the net's first output for it)
        and ``filename``."""
        crops = []
        for filename, windows in images_windows:
            image = _io.load_image(filename).astype(np.float32)
            crops.extend(self.crop(image, window) for window in windows)
        name = self.inputs[0]
        batch = np.zeros((len(crops), crops[0].shape[2]) + tuple(self.blobs[name].data.shape[2:]),
                         dtype=np.float32)
        for i, crop in enumerate(crops):
            batch[i] = self.transformer.preprocess(name, crop)
        scores = self.forward_all(**{name: batch})[self.outputs[0]]
        detections = []
        for filename, windows in images_windows:
            for window in windows:
                detections.append({'window': window, 'prediction': scores[len(detections)],
                                   'filename': filename})
        return detections

    def detect_selective_search(self, image_fnames):
        """detect_windows over Selective Search proposals for each image
        (absolute paths are passed on, for MATLAB).  Needs the external
        selective_search_ijcv_with_python module; ImportError naming it
        when it is not installed."""
        try:
            import selective_search_ijcv_with_python as selective_search
        except ImportError:
            raise ImportError(
                "Detector.detect_selective_search needs the selective_search_ijcv_with_python "
                "module (and MATLAB), which is not installed: get it from %s and put it on "
                "PYTHONPATH, or compute windows yourself and call detect_windows()"
                % SELECTIVE_SEARCH_URL) from None
        image_fnames = [os.path.abspath(f) for f in image_fnames]
        windows_list = selective_search.get_windows(image_fnames, cmd='selective_search_rcnn')
        return self.detect_windows(list(zip(image_fnames, windows_list)))

    def crop(self, im, window):
        """The part of ``im`` (H x W x K) that ``window`` (ymin, xmin, ymax,
        xmax; end-exclusive slicing) covers.

        With ``context_pad`` the box is first grown about its centre by
        ``size / (size - 2 * context_pad)`` (``size`` the net input width,
        square input assumed), rounded, and clipped to the image; the clipped
        region is resized to where it falls in a ``crop_dims`` canvas filled
        with ``crop_mean``, so out-of-image context shows the mean.

        pycaffe slices with the float box coordinates, which NumPy >= 1.12
        rejects; netlib truncates them to int, as older NumPy (which pycaffe
        was written for) did."""
        crop = im[window[0]:window[2], window[1]:window[3]]
        if not self.context_pad:
            return crop
        box = np.array(window, dtype=float)
        size = self.blobs[self.inputs[0]].width
        grow = size / (1. * size - self.context_pad * 2)
        half_h = (box[2] - box[0] + 1) / 2.
        half_w = (box[3] - box[1] + 1) / 2.
        centre = np.array((box[0] + half_h, box[1] + half_w))
        box = np.round(np.tile(centre, 2) + grow * np.array((-half_h, -half_w, half_h, half_w)))
        scale_h = size / (box[2] - box[0] + 1)
        scale_w = size / (box[3] - box[1] + 1)
        pad_y = round(max(0, -box[0]) * scale_h)  # context above / left of the image
        pad_x = round(max(0, -box[1]) * scale_w)
        im_h, im_w = im.shape[:2]
        box = np.clip(box, 0., [im_h, im_w, im_h, im_w])
        clip_h = box[2] - box[0] + 1
        clip_w = box[3] - box[1] + 1
        assert clip_h > 0 and clip_w > 0
        crop_h = min(round(clip_h * scale_h), size - pad_y)
        crop_w = min(round(clip_w * scale_w), size - pad_x)
        y0, x0, y1, x1 = (int(v) for v in box)
        context = _io.resize_image(im[y0:y1, x0:x1], (crop_h, crop_w))
        canvas = np.ones(self.crop_dims, dtype=np.float32) * self.crop_mean
        canvas[pad_y:pad_y + crop_h, pad_x:pad_x + crop_w] = context
        return canvas

    def configure_crop(self, context_pad):
        """Set ``crop_dims`` (the net input's shape in image axis order,
        H x W x K) and ``context_pad``; with a context pad also
        ``crop_mean``, the transformer's mean taken back to image space
        (transposed, channel swap undone, divided by raw_scale), or zeros
        when no mean is set.

        As pycaffe, the image axis order is found by applying the transpose
        to itself, which inverts the usual (2, 0, 1)."""
        name = self.inputs[0]
        tpose = self.transformer.transpose[name]
        back = [tpose[t] for t in tpose]
        self.crop_dims = np.array(self.blobs[name].data.shape[1:])[back]
        self.context_pad = context_pad
        if not self.context_pad:
            return
        mean = self.transformer.mean.get(name)
        if mean is None:
            self.crop_mean = np.zeros(self.crop_dims, dtype=np.float32)
            return
        transpose = self.transformer.transpose.get(name)
        channel_order = self.transformer.channel_swap.get(name)
        raw_scale = self.transformer.raw_scale.get(name)
        crop_mean = mean.copy().transpose([transpose[t] for t in transpose])
        if channel_order is not None:
            order = list(channel_order)
            crop_mean = crop_mean[:, :, [order.index(i) for i in range(crop_mean.shape[2])]]
        if raw_scale is not None:
            crop_mean /= raw_scale
        self.crop_mean = crop_mean
