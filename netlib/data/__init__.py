"""netlib's data pipeline: Caffe's databases, Datums, images, the data
transformer, prefetching, and the Data/ImageData/WindowData layers.

* :mod:`netlib.data.db`: LMDB/LevelDB readers (read-only) and atomic writers;
* :mod:`netlib.data.datum`: Datum records <-> arrays;
* :mod:`netlib.data.image`: images loaded as Caffe's OpenCV path loads them;
* :mod:`netlib.data.transformer`: ``transform_param`` (Caffe's DataTransformer);
* :mod:`netlib.data.prefetch`: batches prepared ahead on worker threads;
* :mod:`netlib.data.layers`, :mod:`netlib.data.window`: the layers.

The folder also ships the UCI digits used by the quick start (README.md).
"""
