"""The Caffe protobuf schema (``proto/caffe.proto``) compiled for Python.

``from netlib.proto import caffe_pb2`` gives the same messages as pycaffe's
``caffe.proto.caffe_pb2``.
"""
from . import caffe_pb2  # noqa: F401
